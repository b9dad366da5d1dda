"""Every new method through the DDP hook on 2 gloo processes: tasks on ranks (T = 2) at
bucket, param and global granularity, and stashed tasks (T = 3), each step's combined
gradient against the single-process float64-accumulated reference of ``ddp_helpers`` (each
task's full gradient, ``fused_bucket_moo`` per bucket), replicas bit-identical. Stateful
weight steps (gradvac, pcd, ``ema``) keep one MethodState per bucket in the reference, as the
hook keeps one per bucket in BucketMOOState."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ddp"))

import ddp_helpers  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RANKS_METHODS = {
    "upgrad": {}, "dualproj": {}, "imtl_g": {}, "aligned_mtl": {}, "nash_mtl": {}, "fairgrad": {"alpha": 2.0},
    "config": {}, "sum": {}, "constant": {"weights": [0.3, 0.7]}, "random": {"seed": 4},
    "cagrad": {"solver": "iterative"}, "gradvac": {"beta": 0.3}, "pcd": {"tau": 0.1}, "mgda": {"ema": 0.5},
}
STASH_METHODS = {**RANKS_METHODS, "constant": {"weights": [0.3, 0.7, 1.0]}, "krum": {"n_byzantine": 0},
                 "graddrop": {"seed": 2}, "trimmed_mean": {"trim_number": 1}}
ELEMENTWISE_RANKS = {"graddrop": {"seed": 2}, "trimmed_mean": {"trim_number": 0}}


def _scenarios() -> dict:
    out = {}
    for method, options in RANKS_METHODS.items():
        for granularity in ("bucket", "param", "global"):
            out[f"{method}-ranks-{granularity}"] = {"check": True, "method": method, "options": options,
                                                   "granularity": granularity}
    for method, options in ELEMENTWISE_RANKS.items():  # no weights: the all-gather protocol
        out[f"{method}-ranks-allgather"] = {"check": True, "method": method, "options": options,
                                            "protocol": "allgather"}
    for method, options in STASH_METHODS.items():
        out[f"{method}-stash"] = {"check": True, "method": method, "options": options, "mode": "stash",
                                  "num_tasks": 3}
    return out


SCENARIOS = _scenarios()


def _worker(rank: int, world: int, scenarios: dict) -> dict:
    """ddp_helpers' scenario worker with a reference that keeps a MethodState per bucket."""
    original = ddp_helpers.reference_combined
    fused = ddp_helpers.bmk.fused_bucket_moo
    states: dict = {}

    class _Calls:
        name = None
        count = 0

    def stateful_fused(rows, **kwargs):
        kwargs["method_state"] = states.setdefault((_Calls.name, _Calls.count), ddp_helpers.bmk.MethodState(strict=False))
        _Calls.count += 1
        opts = {k: v for k, v in kwargs.items() if k not in ("method", "segments", "method_state")}
        step = ddp_helpers.bmk.WeightStep(kwargs["method"], opts)
        if not step.needs_state:
            kwargs.pop("method_state")
        return fused(rows, **kwargs)

    def reference(*args, **kwargs):
        _Calls.count = 0
        return original(*args, **kwargs)

    ddp_helpers.reference_combined = reference
    ddp_helpers.bmk.fused_bucket_moo = stateful_fused
    out = {}
    try:
        for name, cfg in scenarios.items():
            _Calls.name = name
            try:
                out[name] = ddp_helpers.train(rank, world, cfg)
            except BaseException:  # noqa: BLE001
                import traceback
                out[name] = {"error": traceback.format_exc()}
            ddp_helpers.dist.barrier()
    finally:
        ddp_helpers.bmk.fused_bucket_moo = fused
        ddp_helpers.reference_combined = original
    return out


@pytest.fixture(scope="module")
def world2():
    return ddp_helpers.run_distributed(_worker, 2, SCENARIOS)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_method_through_the_ddp_hook(world2, name):
    ref, other = ddp_helpers.case_results(world2, name)
    assert torch.equal(other["params"], ref["params"]), f"{name}: replicas differ"
    assert len(ref["errs"]) == 3
    assert all(e <= 1e-4 for e in ref["errs"]), f"{name}: relative error per step {ref['errs']}"
    assert torch.isfinite(ref["params"]).all()
