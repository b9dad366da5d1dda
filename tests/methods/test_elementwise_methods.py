"""Element-wise combines (GradDrop, trimmed mean) against torchjd 0.18, through
fused_bucket_moo on the torch and CPU backends, in every gradient dtype."""

from __future__ import annotations

import pytest
import torch

import bucketmoo_kernels as bm
from bucketmoo_kernels.methods import counter_rng, elementwise

aggregation = pytest.importorskip("torchjd.aggregation", reason="torchjd is not installed")

BACKENDS = [b for b in ("torch", "cpu") if b in bm.available_backends()]


def _grads(num_tasks, n, seed=0):
    g = torch.randn(num_tasks, n, generator=torch.Generator().manual_seed(seed))
    g[1:] -= 0.5 * g[0]
    return g


def _torchjd_graddrop(jac, seed, leak=None, monkeypatch=None):
    """torchjd's GradDrop with its torch.rand replaced by our counter-based uniforms."""
    def rand(shape, dtype=None, device=None):
        n = shape[0] if isinstance(shape, (tuple, torch.Size)) else shape
        return counter_rng.uniform(seed, 0, torch.arange(n)).to(dtype)
    monkeypatch.setattr(torch, "rand", rand)
    try:
        agg = aggregation.GradDrop(leak=None if leak is None else torch.tensor(leak, dtype=jac.dtype))
        return agg(jac)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tasks", [2, 3, 7])
def test_graddrop_matches_torchjd(backend, num_tasks, monkeypatch):
    grads = _grads(num_tasks, 3000, seed=num_tasks)
    leak = [0.1 * t for t in range(num_tasks)]
    for options in ({"seed": 5}, {"seed": 9, "leak": leak}):
        ours = bm.fused_bucket_moo(grads, method="graddrop", segments=700, backend=backend, **options)
        theirs = _torchjd_graddrop(grads, options["seed"], options.get("leak"), monkeypatch)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_graddrop_masks_are_seeded_and_keep_sign_consistent_values():
    grads = _grads(3, 5000)
    a = bm.fused_bucket_moo(grads, method="graddrop", seed=1)
    assert torch.equal(a, bm.fused_bucket_moo(grads, method="graddrop", seed=1))
    assert not torch.equal(a, bm.fused_bucket_moo(grads, method="graddrop", seed=2))
    # without leak every output element is a sum of same-signed task values
    pos = torch.where(grads > 0, grads, 0).sum(0)
    neg = torch.where(grads < 0, grads, 0).sum(0)
    assert bool((((a - pos).abs() < 1e-5) | ((a - neg).abs() < 1e-5)).all())
    # an element where all tasks agree is always kept
    agree = (grads > 0).all(0) | (grads < 0).all(0)
    torch.testing.assert_close(a[agree], grads.sum(0)[agree])
    # with a MethodState each step draws new masks, the same for every "rank"
    s1, s2 = bm.MethodState(), bm.MethodState()
    first = bm.fused_bucket_moo(grads, method="graddrop", seed=1, method_state=s1)
    assert torch.equal(first, a)
    assert not torch.equal(bm.fused_bucket_moo(grads, method="graddrop", seed=1, method_state=s1), first)
    assert torch.equal(bm.fused_bucket_moo(grads, method="graddrop", seed=1, method_state=s2), first)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tasks,trim", [(3, 1), (6, 2), (9, 0)])
def test_trimmed_mean_matches_torchjd(backend, num_tasks, trim):
    grads = _grads(num_tasks, 2500, seed=3)
    ours = bm.fused_bucket_moo(grads, method="trimmed_mean", trim_number=trim, backend=backend)
    theirs = aggregation.TrimmedMean(trim_number=trim)(grads)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_gradients_and_aliased_out(dtype, monkeypatch):
    grads = _grads(4, 3000, seed=1).to(dtype)
    theirs = aggregation.TrimmedMean(trim_number=1)(grads.float()).to(dtype)
    rows = [grads[t].clone() for t in range(4)]
    out = bm.fused_bucket_moo(rows, method="trimmed_mean", out=rows[0])
    assert out.data_ptr() == rows[0].data_ptr() and out.dtype == dtype
    torch.testing.assert_close(out, theirs, rtol=0, atol=0)
    ours = bm.fused_bucket_moo(grads, method="graddrop", seed=4)
    torch.testing.assert_close(ours, _torchjd_graddrop(grads.float(), 4, None, monkeypatch).to(dtype), rtol=0, atol=0)


def test_chunking_does_not_change_the_result(monkeypatch):
    grads = _grads(3, 1000, seed=2)
    whole = bm.fused_bucket_moo(grads, method="graddrop", seed=3)
    monkeypatch.setattr(elementwise, "CHUNK", 128)
    assert torch.equal(bm.fused_bucket_moo(grads, method="graddrop", seed=3), whole)


def test_errors_and_info():
    with pytest.raises(ValueError, match="element-wise"):
        bm.solve(torch.eye(3), "graddrop")
    with pytest.raises(ValueError, match="T >= 5"):
        bm.fused_bucket_moo(torch.randn(4, 10), method="trimmed_mean", trim_number=2)
    with pytest.raises(ValueError, match="leak"):
        bm.fused_bucket_moo(torch.randn(3, 10), method="graddrop", leak=[0.1, 0.2])
    with pytest.raises(ValueError, match="NaN/Inf"):
        bm.fused_bucket_moo(torch.tensor([[1.0, float("nan")], [1.0, 2.0]]), method="trimmed_mean", trim_number=0)
    out, info = bm.fused_bucket_moo(torch.randn(3, 10), method="trimmed_mean", segments=5, return_info=True)
    assert info.gram.shape == (2, 3, 3) and torch.isnan(info.weights).all()
