"""One non-finite policy on every backend: a segment whose Gram is not finite gets NaN weights.

Before, a NaN Gram gave ``[nan, nan]`` on the cpu backend and ``[0.5, 0.5]`` on the torch
backend, and an overflowing Gram (finite gradients whose squares exceed float32) gave finite
weights, so the combined gradient stayed finite and AMP's GradScaler could not see it. Now
every backend, method and path (``solve``, the weight step inside ``fused_bucket_moo``, the
CPU's one-sweep fused kernel) returns NaN weights for such a segment, so its whole combined
segment is NaN, and leaves the finite segments exactly as they are.
"""

import pytest
import torch

import bucketmoo_kernels as bm

BACKENDS = ["torch", "cpu", "triton"]
METHODS = ["mean", "mgda", "pcgrad", "cagrad"]
NAN, INF = float("nan"), float("inf")


def _backend_or_skip(name):
    reason = bm.available_backends("cpu")[name]
    if reason is not None:
        pytest.skip(reason)


def _grams():
    good = torch.tensor([[4.0, -1.0], [-1.0, 1.0]])
    bad = [torch.tensor([[NAN, 1.0], [1.0, 2.0]]), torch.tensor([[INF, 1.0], [1.0, 2.0]]),
           torch.tensor([[1.0, NAN], [NAN, 2.0]]), torch.tensor([[INF, INF], [INF, INF]])]
    return torch.stack([good, *bad, good * 3])


def _solve_cases():
    # Triton runs under the interpreter here: its CAGrad kernel and the second scale are slow-lane.
    for backend in BACKENDS:
        for method in METHODS:
            for normalize_weights in (True, False):
                slow = backend == "triton" and (method == "cagrad" or not normalize_weights)
                yield pytest.param(backend, method, normalize_weights, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("backend,method,normalize_weights", list(_solve_cases()))
def test_solve_gives_nan_weights_exactly_for_nonfinite_segments(backend, method, normalize_weights):
    _backend_or_skip(backend)
    grams = _grams()
    w = bm.solve(grams, method, backend=backend, normalize_weights=normalize_weights)
    assert torch.isnan(w[1:5]).all(), w
    ref = bm.solve(grams[[0, 5]], method, backend="torch", normalize_weights=normalize_weights)
    assert torch.isfinite(w[[0, 5]]).all()
    torch.testing.assert_close(w[[0, 5]], ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["mgda", "pcgrad"])
@pytest.mark.parametrize("case", ["nan", "inf", "overflow"])
def test_fused_combines_a_nonfinite_segment_to_nan(backend, method, case):
    """Segment 1 of 3 is bad: NaN / Inf in one task, or finite values whose squares overflow."""
    _backend_or_skip(backend)
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(2, 96, generator=gen)
    bad = slice(32, 64)
    if case == "overflow":
        grads[1, bad] = 1e25  # finite, but the Gram overflows float32
    else:
        grads[0, 40] = NAN if case == "nan" else INF
    out, info = bm.fused_bucket_moo(grads, method=method, segments=32, backend=backend, check_finite=False,
                                    return_info=True)
    assert torch.isnan(out[bad]).all(), out[bad]
    assert torch.isnan(info.weights[1]).all() and torch.isfinite(info.weights[[0, 2]]).all()
    for seg in (slice(0, 32), slice(64, 96)):
        expected = bm.fused_bucket_moo(grads[:, seg], method=method, backend="torch")
        torch.testing.assert_close(out[seg], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="NaN/Inf"):  # the checked path still refuses, out untouched
        bm.fused_bucket_moo(grads, method=method, segments=32, backend=backend)
