"""Every new Gram method through the FSDP2 path (custom reduce-scatter, tasks on 2 ranks) at
bucket and param granularity, each step against the float64 reference of tests/fsdp (every
task's full gradient on an unsharded copy, the method per FSDP group), replicas
bit-identical. Stateful weight steps keep one MethodState per group in the reference."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fsdp"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ddp"))

import test_fsdp as fsdp_cases  # noqa: E402
from ddp_helpers import case_results, run_distributed  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

METHODS = {
    "upgrad": {}, "dualproj": {}, "imtl_g": {}, "aligned_mtl": {}, "nash_mtl": {}, "fairgrad": {"alpha": 2.0},
    "config": {}, "sum": {}, "constant": {"weights": [0.3, 0.7]}, "random": {"seed": 4},
    "cagrad": {"solver": "iterative"}, "gradvac": {"beta": 0.3}, "pcd": {"tau": 0.1}, "mgda": {"ema": 0.5},
}
CASES = {f"{m}-{g}": {"method": m, "granularity": g, "check": True, "options": o, "steps": 3}
         for m, o in METHODS.items() for g in ("bucket", "param")}


def _worker(rank: int, world: int, cases: dict) -> dict:
    """test_fsdp's training with a reference that keeps a MethodState per FSDP group (the
    reference of the methods without an oracle of their own goes through fused_bucket_moo)."""
    import bucketmoo_kernels as bm

    fused = bm.fused_bucket_moo
    states: dict = {}
    calls = {"name": None, "count": 0}

    def stateful_fused(rows, **kwargs):
        opts = {k: v for k, v in kwargs.items() if k not in ("method", "segments")}
        if bm.WeightStep(kwargs["method"], opts).needs_state:
            key = (calls["name"], calls["count"] % 3)  # three FSDP groups, in a fixed order
            kwargs["method_state"] = states.setdefault(key, bm.MethodState(strict=False))
        calls["count"] += 1
        return fused(rows, **kwargs)

    bm.fused_bucket_moo = stateful_fused
    try:
        out = {}
        for name, cfg in cases.items():
            calls["name"], calls["count"] = name, 0
            try:
                out[name] = fsdp_cases._train(rank, world, cfg)
            except BaseException:  # noqa: BLE001
                import traceback
                out[name] = {"error": traceback.format_exc()}
        return out
    finally:
        bm.fused_bucket_moo = fused


@pytest.fixture(scope="module")
def world2():
    return run_distributed(_worker, 2, CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_method_through_fsdp(world2, name):
    for rank, res in enumerate(case_results(world2, name)):
        errs = res["errors"]
        assert len(errs) == 3 and max(errs) < 1e-4, f"{name} rank {rank}: relative errors {errs}"
    for a, b in zip(world2[0][name]["params"], world2[1][name]["params"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
