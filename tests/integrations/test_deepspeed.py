"""``apply_bucket_moo`` on DeepSpeed ZeRO stages 0-2 (2 gloo processes, DeepSpeed's CPU accelerator).

One spawn runs every scenario of ``ds_workers.py`` (DeepSpeed's import and first
``initialize`` take most of the time); the tests below check its outcomes:

* ``method="mean"`` ends with parameters bitwise equal to the same engine without the
  integration, for every reduction path (stage 0; stage 1 and 2 with contiguous gradients on
  and off, reduce-scatter on and off, overlap_comm on and off);
* ``mgda`` with ``granularity="param"`` and ``"global"`` matches the float64 reference of
  ``integration_helpers`` (rank r trains task r);
* replicas are bit-identical; ``state.step`` counts optimizer steps;
* a checkpoint saved and resumed equals the uninterrupted run;
* ZeRO-3, a world that does not fit the tasks, a non-engine, stash mode and a second
  application are refused with a clear message.
"""

from __future__ import annotations

import pytest
import torch

import ds_workers  # noqa: E402
from integration_helpers import reference_run, run_two_ranks  # noqa: E402


# fp32 DeepSpeed vs the float64 reference after STEPS SGD steps.
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def outcomes():
    # imported here, not at collection: importing deepspeed takes seconds
    pytest.importorskip("deepspeed", reason="needs the deepspeed extra: pip install 'bucketmoo_kernels[deepspeed]'")
    ranks = run_two_ranks(ds_workers.all_scenarios)
    return {"ranks": [r["results"] for r in ranks], "times": ranks[0]["times"]}


def _ok(outcomes, name: str, rank: int = 0) -> dict:
    res = outcomes["ranks"][rank][name]
    assert "error" not in res, f"scenario {name} failed on rank {rank}:\n{res['error']}"
    return res


def _assert_replicas_identical(outcomes, name: str) -> None:
    a, b = _ok(outcomes, name, 0), _ok(outcomes, name, 1)
    assert torch.equal(a["params"], b["params"]), f"{name}: the two replicas differ"


pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.parametrize("variant", list(ds_workers.VARIANTS))
def test_mean_is_bitwise_deepspeed(outcomes, variant):
    plain = _ok(outcomes, f"{variant}/plain")
    mean = _ok(outcomes, f"{variant}/mean")
    assert torch.equal(plain["params"], mean["params"])
    assert mean["step"] == ds_workers.STEPS
    _assert_replicas_identical(outcomes, f"{variant}/mean")
    # and the engine did train: parameters moved away from the initial ones
    init = torch.cat([p.detach().reshape(-1) for p in ds_workers.make_model().parameters()])
    assert not torch.equal(plain["params"], init)


@pytest.mark.parametrize("variant", list(ds_workers.VARIANTS))
def test_mgda_param_matches_float64_reference(outcomes, variant):
    name = f"{variant}/mgda-param"
    res = _ok(outcomes, name)
    ref = reference_run(ds_workers.STEPS, "param")
    torch.testing.assert_close(res["params"].double(), ref, rtol=RTOL, atol=ATOL)
    # the MOO run is not the average: the check can fail
    mean_ref = reference_run(ds_workers.STEPS, "param", method="mean")
    assert (res["params"].double() - mean_ref).abs().max() > 100 * ATOL
    assert res["step"] == ds_workers.STEPS
    _assert_replicas_identical(outcomes, name)


@pytest.mark.parametrize("variant", ["z0", "z1", "z2", "z2-noncontig"])
def test_mgda_global_matches_float64_reference(outcomes, variant):
    name = f"{variant}/mgda-global"
    res = _ok(outcomes, name)
    ref = reference_run(ds_workers.STEPS, "global")
    torch.testing.assert_close(res["params"].double(), ref, rtol=RTOL, atol=ATOL)
    assert res["step"] == ds_workers.STEPS
    _assert_replicas_identical(outcomes, name)


@pytest.mark.parametrize("variant", ["z0", "z1", "z2"])
def test_gradient_accumulation(outcomes, variant):
    # stages 0 and 1 reduce once per optimizer step: MGDA of the accumulated task gradients;
    # stage 2 reduces every micro-batch: the sum of the micro-batches' combinations
    name = f"{variant}/mgda-param-gas2"
    res = _ok(outcomes, name)
    per_micro = variant == "z2"
    ref = reference_run(ds_workers.STEPS, "param", accumulate=2, combine_each_micro_batch=per_micro)
    other = reference_run(ds_workers.STEPS, "param", accumulate=2, combine_each_micro_batch=not per_micro)
    torch.testing.assert_close(res["params"].double(), ref, rtol=RTOL, atol=ATOL)
    assert (res["params"].double() - other).abs().max() > 100 * ATOL  # the two semantics differ here
    assert res["step"] == ds_workers.STEPS
    _assert_replicas_identical(outcomes, name)


def test_mgda_bucket_replicas_and_steps(outcomes):
    res = _ok(outcomes, "z2/mgda-bucket")
    assert res["step"] == ds_workers.STEPS
    _assert_replicas_identical(outcomes, "z2/mgda-bucket")
    # ZeRO buckets of this model differ from its parameters: not the param-level result
    param = _ok(outcomes, "z2/mgda-param")
    assert not torch.equal(res["params"], param["params"])


def test_mean_through_the_protocol_matches_deepspeed(outcomes):
    # record_diagnostics makes 'mean' run the MOO protocol (weights 1/2, 1/2)
    res = _ok(outcomes, "z2/mean-protocol")
    plain = _ok(outcomes, "z2/plain")
    torch.testing.assert_close(res["params"], plain["params"], rtol=1e-6, atol=1e-7)
    assert res["records"] > 0
    _assert_replicas_identical(outcomes, "z2/mean-protocol")


def test_checkpoint_resume_equals_uninterrupted(outcomes):
    resumed = _ok(outcomes, "z2/ckpt")
    full = _ok(outcomes, "z2/mgda-param")
    assert torch.equal(resumed["params"], full["params"])
    assert resumed["step_after_load"] == 2 and resumed["step"] == ds_workers.STEPS
    assert resumed["client_mine"] == 7 and not resumed["client_has_state"]
    _assert_replicas_identical(outcomes, "z2/ckpt")


def test_misuse_is_refused(outcomes):
    errors = _ok(outcomes, "misuse")
    kind, msg = errors["zero3"]
    assert kind == "NotImplementedError" and "ZeRO stage 3" in msg and "FSDP2" in msg
    kind, msg = errors["tasks"]
    assert kind == "ValueError" and "task" in msg
    kind, msg = errors["stash"]
    assert kind == "NotImplementedError" and "mode='stash'" in msg
    kind, msg = errors["not_engine"]
    assert kind == "TypeError" and "DeepSpeedEngine" in msg
    kind, msg = errors["twice"]
    assert kind == "RuntimeError" and "already applied" in msg


def test_report_durations(outcomes, capsys):
    with capsys.disabled():
        total = sum(outcomes["times"].values())
        print(f"\n[deepspeed scenarios: {total:.1f} s in all; slowest "
              f"{max(outcomes['times'], key=outcomes['times'].get)}]")
