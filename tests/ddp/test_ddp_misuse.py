"""Misuse of the DDP hook that used to train silently on wrong gradients or abort inside gloo.

* ranks built with different settings: the first hook call raises the same ``ValueError``
  on every rank, naming the setting and its value per rank (before the fix: a different
  ``method`` / ``task_of_rank`` trained on wrong gradients, a different ``granularity``
  aborted the process with a gloo "collective mismatch");
* a NaN / Inf gradient, or a finite gradient whose squares overflow float32: the bucket's
  weights are NaN on every backend, the combined gradient is NaN on every rank (so AMP's
  GradScaler skips the step), and the diagnostics say which bucket was not finite (before:
  the torch backend applied finite 0.5/0.5 weights to an overflowing bucket and recorded them);
* construction-time validation of every option value (fast, no process group).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import bucketmoo_kernels as bmk
from bucketmoo_kernels.ddp import BucketMOOState, bucket_moo_hook
from ddp_helpers import batch, loss_of, make_model, run_distributed

# Each family: (kwargs of rank 0, kwargs of rank 1, the setting name the error must give).
MISMATCHES = {
    "method": ({"method": "mgda"}, {"method": "pcgrad"}, "method"),
    "method_option": ({"method": "mgda"}, {"method": "mgda", "tol": 1e-6}, "method"),
    "granularity": ({"granularity": "bucket"}, {"granularity": "param"}, "granularity"),
    "task_of_rank": ({"task_of_rank": [0, 1]}, {"task_of_rank": [1, 0]}, "task_of_rank"),
    "protocol": ({"protocol": "sharded"}, {"protocol": "allgather"}, "protocol"),
    "compress": ({}, {"compress": "bf16"}, "compress"),
    "normalization": ({}, {"normalization": "l2"}, "normalization"),
    "normalize_weights": ({}, {"normalize_weights": False}, "normalize_weights"),
    "overlap": ({}, {"overlap": False}, "overlap"),
    "mode": ({}, {"mode": "stash", "num_tasks": 2}, "mode"),
    "backend": ({"backend": "torch"}, {"backend": "cpu"}, "backend"),
    "bucket_cap_mb": ({"bucket_cap_mb": 0.0004}, {"bucket_cap_mb": 0.001}, "bucket_cap_mb"),
}


def _one_backward(rank: int, kwargs: dict) -> dict:
    ddp = torch.nn.parallel.DistributedDataParallel(make_model(), bucket_cap_mb=0.0004)
    state = BucketMOOState(**kwargs)
    ddp.register_comm_hook(state, bucket_moo_hook)
    loss = loss_of(ddp, batch(0, rank, 0))
    try:
        if state.mode == "stash":
            with state.task(0):
                loss.backward()
        else:
            loss.backward()
    except Exception as exc:  # noqa: BLE001  (the type and message are the result)
        return {"type": type(exc).__name__, "is_value_error": isinstance(exc, ValueError), "msg": str(exc)}
    finally:
        del ddp
    return {"type": None, "grads": [p.grad.clone() for p in state.bucket_params[0]]}


def _mismatch_worker(rank: int, world: int, cases: dict) -> dict:
    out = {}
    for name, (kw0, kw1, _) in cases.items():
        out[name] = _one_backward(rank, kw0 if rank == 0 else kw1)
        dist.barrier()
    out["agree"] = _one_backward(rank, {"method": "mgda"})
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_settings_mismatch_raises_value_error_on_every_rank_naming_the_setting():
    results = run_distributed(_mismatch_worker, 2, MISMATCHES)
    for name, (kw0, kw1, setting) in MISMATCHES.items():
        for rank, res in enumerate(results):
            got = res[name]
            assert got["type"] is not None, f"{name}: rank {rank} trained without an error"
            assert got["is_value_error"], f"{name}: rank {rank} raised {got['type']}: {got['msg']}"
            msg = got["msg"]
            assert f"  {setting}: rank 0: " in msg and "rank 1: " in msg, f"{name}: {msg}"
            # only the differing family is named
            others = [s for s in {v[2] for v in MISMATCHES.values()} if s != setting]
            assert not any(f"  {s}: rank 0" in msg for s in others), f"{name}: {msg}"
        assert results[0][name]["msg"] == results[1][name]["msg"]
    assert [r["agree"]["type"] for r in results] == [None, None]  # equal settings run


# ----------------------------------------------------------------------------- non-finite
BACKENDS = ["torch", "cpu", "triton"]


def _nonfinite_worker(rank: int, world: int, backends: list) -> dict:
    return {backend: _nonfinite_cases(rank, backend) for backend in backends}


def _nonfinite_cases(rank: int, backend: str) -> dict:
    out = {}
    for case in ("nan", "overflow"):
        ddp = torch.nn.parallel.DistributedDataParallel(make_model(), bucket_cap_mb=0.0004)
        state = BucketMOOState(method="mgda", backend=backend, record_diagnostics=True)
        ddp.register_comm_hook(state, bucket_moo_hook)
        x, y = batch(0, rank, 0)
        loss = loss_of(ddp, (x, y))
        if rank == 1:
            # NaN: a NaN loss scale. Overflow: finite gradients whose squares overflow float32.
            loss = loss * (float("nan") if case == "nan" else 1e25)
        loss.backward()
        grads = {id(p): p.grad for p in ddp.module.parameters()}
        out[case] = {
            "bucket_finite": [bool(torch.isfinite(torch.cat([grads[id(p)].reshape(-1) for p in ps])).any())
                              for _, ps in sorted(state.bucket_params.items())],
            "grad_bits": torch.cat([p.grad.reshape(-1) for p in ddp.module.parameters()]),
            "summary": state.diagnostics.summary(),
            "weights": [r.weights for r in state.diagnostics.records],
            "finite": [r.finite for r in state.diagnostics.records],
        }
        del ddp
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def nonfinite_results():
    return run_distributed(_nonfinite_worker, 2, BACKENDS)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_gram_gives_nan_weights_and_nan_buckets_on_every_backend(nonfinite_results, backend):
    for case in ("nan", "overflow"):
        for rank, res in enumerate(nonfinite_results):
            got = res[backend][case]
            # every bucket's combined gradient is entirely NaN: a GradScaler skips the step
            assert not any(got["bucket_finite"]), f"{backend} {case} rank {rank}: a bucket kept finite values"
            assert torch.isnan(got["grad_bits"]).all()
            # the diagnostics say so: every record non-finite, NaN weights (not 0.5/0.5)
            assert got["summary"]["nonfinite"].tolist() == [1] * len(got["weights"])
            assert all(torch.isnan(w).all() for w in got["weights"])
            assert not any(bool(f.any()) for f in got["finite"])


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,exc,words", [
    ({"overlap": "false"}, TypeError, "overlap must be a bool"),
    ({"overlap": 0}, TypeError, "overlap must be a bool"),
    ({"normalize_weights": 1}, TypeError, "normalize_weights must be a bool"),
    ({"record_diagnostics": "yes"}, TypeError, "record_diagnostics must be a bool"),
    ({"task_of_rank": [0, 1, 0.7, 1.9]}, TypeError, "task_of_rank[2] must be an int"),
    ({"task_of_rank": [0, True]}, TypeError, "task_of_rank[1] must be an int"),
    ({"task_of_rank": "01"}, TypeError, "task_of_rank must be a sequence of ints"),
    ({"task_of_rank": [0, -1]}, ValueError, "rank 1 has task id -1"),
    ({"task_of_rank": [0, 1, 2, 3], "num_tasks": 2}, ValueError, "rank 2 has task id 2"),
    ({"num_tasks": 2.0}, ValueError, "num_tasks must be a positive int"),
    ({"max_diagnostic_steps": 1.5}, ValueError, "max_diagnostic_steps must be a positive int"),
    ({"bucket_cap_mb": -1}, ValueError, "bucket_cap_mb must be"),
    ({"bucket_cap_mb": "25"}, ValueError, "bucket_cap_mb must be"),
    ({"max_iter": "abc"}, TypeError, "option max_iter must be an int"),
    ({"max_iter": 10.0}, TypeError, "option max_iter must be an int"),
    ({"max_iter": 0}, ValueError, "option max_iter must be >= 1"),
    ({"tol": -1e-3}, ValueError, "option tol must be >= 0"),
    ({"tol": float("nan")}, ValueError, "option tol must be a finite number"),
    ({"tol": "small"}, TypeError, "option tol must be a real number"),
    ({"solver": "fast"}, ValueError, "option solver must be one of"),
    ({"solver": 1}, TypeError, "option solver must be a str"),
    ({"method": "cagrad", "c": -0.1}, ValueError, "option c must be >= 0"),
    ({"method": "cagrad", "rescale": 3}, ValueError, "option rescale must be one of"),
    ({"method": "cagrad", "rescale": 1.0}, TypeError, "option rescale must be an int"),
    ({"method": "pcgrad", "seed": 1.5}, TypeError, "option seed must be an int"),
])
def test_construction_validates_option_values(kwargs, exc, words):
    with pytest.raises(exc) as info:
        BucketMOOState(**kwargs)
    assert words in str(info.value)
    method = kwargs.get("method", "mgda")
    options = {k: v for k, v in kwargs.items() if k in bmk.methods.get_method(method).defaults}
    if options:  # the same check where the functional API takes the options
        with pytest.raises(exc) as info:
            bmk.fused_bucket_moo(torch.ones(2, 4), method=method, **options)
        assert words in str(info.value)


def test_valid_values_are_kept_exactly():
    import numpy as np

    state = BucketMOOState(task_of_rank=[np.int64(1), 0], overlap=np.bool_(False), max_iter=np.int32(7),
                           tol=0, bucket_cap_mb=0.5)
    assert state.task_of_rank == (1, 0) and type(state.task_of_rank[0]) is int
    assert state.overlap is False and state.bucket_cap_mb == 0.5
    assert state.method_call_options() == {"max_iter": 7, "tol": 0}
    with pytest.raises(AttributeError, match="settings are fixed"):
        state.method = "pcgrad"
    state.record_diagnostics = True  # may be switched between steps
    assert state.record_diagnostics and state.settings.record_diagnostics
    with pytest.raises(TypeError, match="record_diagnostics must be a bool"):
        state.record_diagnostics = "no"


def test_settings_digest_names_each_family():
    from bucketmoo_kernels.distributed.settings import AGREED

    base = BucketMOOState().settings
    assert len(base.digest()) == len(AGREED) and base.digest() == BucketMOOState().settings.digest()
    for name, (kw0, kw1, setting) in MISMATCHES.items():
        a, b = BucketMOOState(**kw0).settings, BucketMOOState(**kw1).settings
        differ = [f for f, x, y in zip(AGREED, a.digest(), b.digest()) if x != y]
        assert differ == [setting], (name, differ)
