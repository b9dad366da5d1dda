"""``BucketMOOStrategy`` (Lightning ``DDPStrategy``) on 2 gloo processes, CPU.

One spawn runs every scenario of ``lightning_workers.py``; the tests check its outcomes:
``method="mean"`` (and ``bucket_moo=None``) is bitwise Lightning's own ``DDPStrategy`` on the
same per-task data; ``mgda`` per parameter matches the float64 reference; replicas are
bit-identical; ``state.step`` counts optimizer steps (so the hook ran on CPU, where
Lightning's own ``ddp_comm_hook`` argument is silently ignored); a checkpoint resume equals
the uninterrupted run; a world that does not fit the tasks is refused.
"""

from __future__ import annotations

import pytest
import torch

import lightning_workers  # noqa: E402
from integration_helpers import reference_run, run_two_ranks  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def outcomes():
    # imported here, not at collection: importing lightning takes seconds
    pytest.importorskip("lightning", reason="needs the lightning extra: pip install 'bucketmoo_kernels[lightning]'")
    ranks = run_two_ranks(lightning_workers.all_scenarios)
    return {"ranks": [r["results"] for r in ranks], "times": ranks[0]["times"]}


def _ok(outcomes, name, rank=0):
    res = outcomes["ranks"][rank][name]
    assert "error" not in res, f"scenario {name} failed on rank {rank}:\n{res['error']}"
    return res


def _replicas_identical(outcomes, name):
    assert torch.equal(_ok(outcomes, name, 0)["params"], _ok(outcomes, name, 1)["params"]), name


def test_mean_and_none_are_bitwise_lightning_ddp(outcomes):
    plain = _ok(outcomes, "plain")["params"]
    assert torch.equal(_ok(outcomes, "mean")["params"], plain)
    assert torch.equal(_ok(outcomes, "none")["params"], plain)
    torch.testing.assert_close(plain.double(), reference_run(lightning_workers.STEPS, "param", method="mean"),
                               rtol=RTOL, atol=ATOL)
    assert _ok(outcomes, "mean")["step"] == lightning_workers.STEPS
    for name in ("plain", "mean", "none"):
        _replicas_identical(outcomes, name)


def test_mgda_param_matches_float64_reference_and_the_hook_ran_on_cpu(outcomes):
    res = _ok(outcomes, "mgda-param")
    ref = reference_run(lightning_workers.STEPS, "param")
    torch.testing.assert_close(res["params"].double(), ref, rtol=RTOL, atol=ATOL)
    mean_ref = reference_run(lightning_workers.STEPS, "param", method="mean")
    assert (res["params"].double() - mean_ref).abs().max() > 100 * ATOL
    assert res["step"] == res["global_step"] == lightning_workers.STEPS
    assert res["hook_calls"] >= lightning_workers.STEPS
    _replicas_identical(outcomes, "mgda-param")


def test_gradient_accumulation_combines_the_accumulated_task_gradients(outcomes):
    res = _ok(outcomes, "accumulate")
    ref = reference_run(lightning_workers.STEPS, "param", accumulate=2)
    torch.testing.assert_close(res["params"].double(), ref, rtol=RTOL, atol=ATOL)
    per_micro = reference_run(lightning_workers.STEPS, "param", accumulate=2, combine_each_micro_batch=True)
    assert (res["params"].double() - per_micro).abs().max() > 100 * ATOL
    assert res["step"] == res["global_step"] == lightning_workers.STEPS
    _replicas_identical(outcomes, "accumulate")


def test_diagnostics_reach_the_trainer_loggers(outcomes):
    res = _ok(outcomes, "diagnostics")
    logged = res["metrics"]
    steps = [step for step, _ in logged]  # one record per optimizer step, consecutive steps
    assert len(steps) == lightning_workers.STEPS and steps == list(range(steps[0], steps[0] + len(steps)))
    last = logged[-1][1]
    assert last["bucket_moo/step"] == lightning_workers.STEPS
    weights = [v for k, v in last.items() if k.startswith("bucket_moo/bucket0/weight_")]
    assert sorted(k.rsplit("_", 1)[1] for k in last if k.startswith("bucket_moo/bucket0/weight_")) == ["t0", "t1"]
    assert abs(sum(weights) - 1.0) < 1e-5 and all(w >= 0 for w in weights)
    assert -1.0 <= last["bucket_moo/min_cosine"] <= 1.0
    assert _ok(outcomes, "diagnostics", 1)["metrics"] == []  # only rank 0 logs


def test_lightning_own_ddp_comm_hook_is_skipped_on_cpu(outcomes):
    # Documents why BucketMOOStrategy exists (Lightning 2.6): DDPStrategy(ddp_comm_hook=...)
    # registers nothing on CPU, so this run is plain DDP.
    res = _ok(outcomes, "lightning-own-hook")
    assert res["hook_calls"] == 0 and res["step"] == 0
    assert torch.equal(res["params"], _ok(outcomes, "plain")["params"])


def test_checkpoint_resume_equals_uninterrupted(outcomes):
    full, resumed = _ok(outcomes, "uninterrupted"), _ok(outcomes, "resumed")
    assert torch.equal(full["params"], resumed["params"])
    assert full["step"] == resumed["step"] == 2 * lightning_workers.STEPS
    assert resumed["saved_step"] == lightning_workers.STEPS
    _replicas_identical(outcomes, "resumed")


def test_world_not_divisible_into_tasks_is_refused(outcomes):
    kind, msg = _ok(outcomes, "misuse")["tasks"]
    assert kind == "ValueError" and "num_tasks=3" in msg


def test_report_durations(outcomes, capsys):
    with capsys.disabled():
        print(f"\n[lightning scenarios: {sum(outcomes['times'].values()):.1f} s in all]")
