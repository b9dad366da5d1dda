"""DDP's first iteration is bucket-level, and a resumed run equals an uninterrupted one.

A fresh ``DistributedDataParallel`` runs its first iteration (two with ``static_graph=True``)
with one bucket holding every parameter. Before the fix the hook weighted that single bucket
as one, so the first step was whole-model MOO and a run resumed from a checkpoint (whose
fresh DDP starts with the single bucket again) drifted from the uninterrupted run (max
parameter difference ~2e-4 with several buckets). Now the hook runs the single bucket as the
buckets DDP builds after its rebuild, and keeps that layout in ``state_dict()``.

Every case trains SGD with momentum for 4 steps, and 2 steps + checkpoint + a fresh model,
DDP, optimizer and state loaded from the checkpoint + 2 steps; the parameters must be equal.
"""

from __future__ import annotations

import pytest
import torch

from bucketmoo_kernels.ddp import BucketMOOState, bucket_moo_hook
from ddp_helpers import batch, flat_params, loss_of, make_model, run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CAP = 0.0004  # MiB: several buckets for the tiny model


def _segment(rank: int, cfg: dict, steps: range, checkpoint: dict | None):
    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=CAP,
                                                    static_graph=cfg.get("static_graph", False))
    state = BucketMOOState(method=cfg.get("method", "mgda"), granularity=cfg.get("granularity", "bucket"),
                           bucket_cap_mb=cfg.get("state_cap", CAP), record_diagnostics=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["opt"])
        state.load_state_dict(checkpoint["state"])
    ddp.register_comm_hook(state, bucket_moo_hook)
    layouts = []
    for step in steps:
        opt.zero_grad(set_to_none=True)
        loss_of(ddp, batch(step, rank, 0)).backward()
        layouts.append([[id(p) for p in ps] for _, ps in sorted(state.bucket_params.items())])
        opt.step()
    out = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict(),
           "state": state.state_dict(), "layouts": layouts,
           "diag_buckets": sorted({r.bucket for r in state.diagnostics.records})}
    del ddp
    return out


def _flat_params(segment: dict) -> torch.Tensor:
    """A segment's final model parameters (and buffers) as one flat tensor."""
    return torch.cat([v.reshape(-1) for v in segment["model"].values()])


def _resume_worker(rank: int, world: int, cases: dict) -> dict:
    out = {}
    for name, cfg in cases.items():
        whole = _segment(rank, cfg, range(4), None)
        first = _segment(rank, cfg, range(2), None)
        second = _segment(rank, cfg, range(2, 4), first)
        out[name] = {"whole": _flat_params(whole), "resumed": _flat_params(second), "layouts": whole["layouts"],
                     "state": first["state"], "diag_buckets": whole["diag_buckets"]}
    return out


CASES = {
    "bucket": {},
    "chunk": {"granularity": "chunk:16"},
    "static_graph": {"static_graph": True},
    # the state's cap differs from DDP's: the first iteration uses a wrong prediction, the
    # observed layout is saved, and the resumed run's first iteration uses it
    "observed_layout": {"state_cap": None},
}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_resume_worker, 2, CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_resumed_run_equals_uninterrupted(results, name):
    for rank, res in enumerate(results):
        got = res[name]
        assert torch.equal(got["resumed"], got["whole"]), (
            f"{name} rank {rank}: max parameter difference {float((got['resumed'] - got['whole']).abs().max())}")
    assert torch.equal(results[0][name]["whole"], results[1][name]["whole"])


@pytest.mark.parametrize("name", ["bucket", "chunk", "static_graph"])
def test_first_iteration_runs_the_rebuilt_buckets(results, name):
    layouts = results[0][name]["layouts"]
    assert len(layouts[0]) >= 2  # several buckets, not one
    assert all(layout == layouts[-1] for layout in layouts), layouts  # the same buckets every step
    assert results[0][name]["diag_buckets"] == list(range(len(layouts[0])))
    saved = results[0][name]["state"]
    assert saved["version"] == 2 and saved["bucket_cap_mb"] == CAP
    assert sorted(i for b in saved["bucket_layout"] for i in b) == list(range(6))


def test_observed_layout_is_saved(results):
    saved = results[0]["observed_layout"]["state"]
    assert saved["bucket_cap_mb"] is None and len(saved["bucket_layout"]) >= 2
    assert saved["bucket_layout"] == results[0]["bucket"]["state"]["bucket_layout"]


# --------------------------------------------------------------------------- stash_reduce="combined"
# Each rank solves its own weights from its own micro-batches, so a stateful method's states
# differ between the ranks. Resuming from rank 0's checkpoint alone (the usual practice, and
# what the HF integration does) must still continue every rank exactly.
COMBINED_CASES = {
    "gradvac": {"method": "gradvac"},
    "ema-param": {"method": "mgda", "granularity": "param", "ema": 0.5},
    "gradvac-global": {"method": "gradvac", "granularity": "global"},
}


def _stash_segment(rank: int, cfg: dict, steps: range, checkpoint: dict | None):
    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=CAP)
    state = BucketMOOState(mode="stash", num_tasks=2, stash_reduce="combined", bucket_cap_mb=CAP, **cfg)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["opt"])
        state.load_state_dict(checkpoint["state"])
    ddp.register_comm_hook(state, bucket_moo_hook)
    for step in steps:
        opt.zero_grad(set_to_none=True)
        for t in range(2):
            with state.task(t):
                loss_of(ddp, batch(step, rank, t)).backward()
        opt.step()
    out = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict(),
           "state": state.state_dict()}
    del ddp
    return out


def _combined_resume_worker(rank: int, world: int, cases: dict) -> dict:
    import torch.distributed as dist

    out = {}
    for name, cfg in cases.items():
        whole = _stash_segment(rank, cfg, range(4), None)
        first = _stash_segment(rank, cfg, range(2), None)
        shared = [first if rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)  # every rank resumes from rank 0's checkpoint
        second = _stash_segment(rank, cfg, range(2, 4), shared[0])
        out[name] = {"whole": _flat_params(whole), "resumed": _flat_params(second), "state": first["state"]}
    return out


@pytest.fixture(scope="module")
def combined_results():
    return run_distributed(_combined_resume_worker, 2, COMBINED_CASES)


@pytest.mark.parametrize("name", sorted(COMBINED_CASES))
def test_combined_stash_resumes_exactly_from_rank_zero(combined_results, name):
    saved = combined_results[0][name]["state"]
    per_rank = saved["rank_method_states"]
    assert sorted(per_rank) == [0, 1]
    assert _states_differ(per_rank[0], per_rank[1]), (
        "the ranks' method states are equal: this case would not show a wrong resume")
    for rank, res in enumerate(combined_results):
        got = res[name]
        assert torch.equal(got["resumed"], got["whole"]), (
            f"{name} rank {rank}: max parameter difference {float((got['resumed'] - got['whole']).abs().max())}")


def _states_differ(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[i]["tensors"][k], b[i]["tensors"][k]) for i in a for k in a[i]["tensors"])
