"""One conformance suite for every backend: ``torch``, ``cpu`` (native), ``triton`` (the
interpreter on CPU tensors without a GPU, compiled kernels on CUDA tensors with one) and
``cuda`` (needs a GPU).

The same public-API checks run on each backend, against the float64 oracles of
:mod:`tests.references` (no library code): the fused op over T, dtypes and segment layouts,
every method with every normalisation (``loss`` / ``loss+`` with a zero loss among the
losses) and both weight scales, plain averaging, list / stacked / strided inputs, ``out``
aliasing an input row, and the three steps against the fused op. Backend-specific kernels
(tiles, ISA variants, chunk sizes, solvers on degenerate Grams) stay in each backend's own
test file.

The Triton interpreter is slow (seconds per call), so on the ``triton`` backend without a GPU
only a representative part of each grid is in the fast lane; the rest is marked ``slow``.
"""

import itertools

import pytest
import torch

import bucketmoo_kernels as bm
from tests import references
from tests.utils import DTYPE_TOLERANCES, DTYPES, LAYOUTS, assert_close, offsets, random_grads

HAS_CUDA = torch.cuda.is_available()
#: backend -> the device its tensors live on in this run
DEVICES = {"torch": "cpu", "cpu": "cpu", "triton": "cuda" if HAS_CUDA else "cpu", "cuda": "cuda"}
INTERPRETED = {"triton"} if not HAS_CUDA else set()
METHODS = ["mean", "mgda", "pcgrad", "cagrad", "upgrad", "dualproj"]
NORMALIZATIONS = ["none", "l2", "loss", "loss+"]


def dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def backend_params(fast_on_interpreter=lambda *values: True, *grids, slow=lambda *values: False):
    """``pytest.param(backend, *values)`` for every backend and every combination of ``grids``;
    the ``cuda`` ones carry the ``gpu`` mark; interpreted ones outside ``fast_on_interpreter``,
    and any for which ``slow(*values)``, the ``slow`` mark."""
    out = []
    for backend in DEVICES:
        for values in itertools.product(*grids) if grids else [()]:
            marks = [pytest.mark.gpu] if backend == "cuda" else []
            if (backend in INTERPRETED and not fast_on_interpreter(*values)) or slow(*values):
                marks.append(pytest.mark.slow)
            ids = "-".join([backend] + [dname(v) if isinstance(v, torch.dtype) else str(v) for v in values])
            out.append(pytest.param(backend, *values, marks=marks, id=ids))
    return out


def _skip_torch_only_method_on_the_interpreter(backend: str, method: str) -> None:
    """Triton has no solver for upgrad/dualproj: there it runs the torch function, which the
    torch backend already checks; under the (slow) interpreter that would only cost CI time."""
    if backend in INTERPRETED and method in ("upgrad", "dualproj"):
        pytest.skip(f"{method} runs its torch function on the triton backend (checked on 'torch')")


@pytest.fixture
def device(request):
    backend = request.node.callspec.params["backend"]
    dev = DEVICES[backend]
    reason = bm.available_backends(dev)[backend]
    if reason is not None:
        pytest.skip(f"backend {backend!r} cannot run on {dev}: {reason}")
    return dev


def _lengths(segments, n):
    return bm.inputs.as_segments(segments, n).lengths.tolist()


def _gram_oracle(grads, segments, n):
    rows = grads.detach().to("cpu", torch.float64)
    return torch.stack([b @ b.T for b in torch.split(rows, _lengths(segments, n), dim=1)])


# ---- the fused op over T, dtypes and segment layouts ----------------------------------------

@pytest.mark.parametrize("backend, num_tasks, dtype, layout", backend_params(
    lambda t, d, lay: (t, lay) in ((3, "uneven"), (5, "empty+len1")) and d == torch.float32,
    [2, 3, 5, 8], DTYPES, list(LAYOUTS),
    slow=lambda t, d, lay: t == 8 and lay == "chunk7"))  # 29 segments x 255 faces in the oracle
def test_fused_matches_the_oracle(backend, device, num_tasks, dtype, layout):
    n = 203  # not a multiple of any block or tile size
    grads = random_grads(num_tasks, n, dtype, device=device)
    segments = LAYOUTS[layout](n)
    out, info = bm.fused_bucket_moo(grads, segments=segments, backend=backend, return_info=True)
    assert info.backend == backend and out.dtype == dtype and out.shape == (n,)
    assert_close(info.gram, _gram_oracle(grads, segments, n), atol=2e-6 * n, rtol=1e-5, what="gram")
    expected = references.combined_per_segment(grads, _lengths(segments, n), "mgda")
    atol, rtol = DTYPE_TOLERANCES[dtype]
    assert_close(out, expected, atol=atol, rtol=rtol, what="combined")
    torch.testing.assert_close(info.weights.sum(-1).cpu(), torch.ones(info.weights.shape[0]), atol=1e-6, rtol=0)


# ---- every method, every normalisation, both weight scales ------------------------------------

#: Under the interpreter: every method once and every normalisation once, both weight scales.
FAST_METHOD_CASES = {("mean", "loss", True), ("mgda", "loss+", True), ("pcgrad", "none", False),
                     ("cagrad", "l2", True)}


@pytest.mark.parametrize("backend, method, normalization, normalize_weights", backend_params(
    lambda m, norm, nw: (m, norm, nw) in FAST_METHOD_CASES, METHODS, NORMALIZATIONS, [True, False]))
def test_methods_and_normalizations_match_the_oracle(backend, device, method, normalization, normalize_weights):
    """The loss normalisations against the oracle that divides each task's gradient by its
    loss (``loss``) or loss times norm (``loss+``) before the method runs; a zero loss counts
    as 1 (the task's gradient is left as it is)."""
    _skip_torch_only_method_on_the_interpreter(backend, method)
    num_tasks, n, chunk = 4, 150, 50
    grads = random_grads(num_tasks, n, device=device, generator=torch.Generator().manual_seed(7))
    losses = [0.5, 2.0, 0.0, 3.0]
    options = {"seed": 3} if method == "pcgrad" else {}
    out = bm.fused_bucket_moo(grads, method=method, segments=chunk, backend=backend, normalization=normalization,
                              losses=losses, normalize_weights=normalize_weights, **options)
    expected = references.combined_per_segment(grads, [chunk] * 3, method, normalization=normalization,
                                               losses=losses, normalize_weights=normalize_weights, **options)
    scale = float(expected.abs().max())
    assert_close(out, expected, atol=2e-5 * scale, rtol=1e-5, what=f"{method} {normalization}")


# ---- plain averaging, input forms, aliasing, the three steps --------------------------------

@pytest.mark.parametrize("backend, dtype", backend_params(lambda d: d == torch.bfloat16, DTYPES))
def test_mean_is_the_plain_average(backend, device, dtype):
    grads = random_grads(4, 77, dtype, device=device)
    out = bm.fused_bucket_moo(grads, method="mean", segments=10, backend=backend)
    atol, rtol = DTYPE_TOLERANCES[dtype]
    assert_close(out, grads.double().mean(0), atol=atol, rtol=rtol, what="mean")


@pytest.mark.parametrize("backend", backend_params(lambda: False))
def test_list_stacked_and_strided_inputs_agree_bit_for_bit(backend, device):
    grads = random_grads(3, 100, device=device)
    segments = offsets(10, 0, 90)
    padded = torch.zeros(3, 117, device=device)
    padded[:, :100] = grads
    stacked = bm.fused_bucket_moo(grads, segments=segments, backend=backend)
    for other in ([g.clone() for g in grads], padded[:, :100]):
        torch.testing.assert_close(bm.fused_bucket_moo(other, segments=segments, backend=backend), stacked,
                                   atol=0, rtol=0)


@pytest.mark.parametrize("backend, dtype, row", backend_params(lambda d, row: False, DTYPES, [0, 2]))
def test_out_may_alias_an_input_row(backend, device, dtype, row):
    grads = random_grads(3, 150, dtype, device=device)
    expected = bm.fused_bucket_moo(grads.clone(), segments=40, backend=backend)
    bucket = grads[row]  # a view into the stacked tensor, like a DDP bucket buffer
    result = bm.fused_bucket_moo(grads, segments=40, out=bucket, backend=backend)
    assert result.data_ptr() == bucket.data_ptr()
    torch.testing.assert_close(bucket, expected, atol=0, rtol=0)
    rows = [g.clone() for g in random_grads(3, 150, dtype, device=device)]
    expected = bm.fused_bucket_moo([r.clone() for r in rows], backend=backend)
    bm.fused_bucket_moo(rows, out=rows[row], backend=backend)
    torch.testing.assert_close(rows[row], expected, atol=0, rtol=0)


@pytest.mark.parametrize("backend, method", backend_params(lambda m: m == "mgda", METHODS))
def test_fused_equals_gram_solve_combine(backend, device, method):
    _skip_torch_only_method_on_the_interpreter(backend, method)
    grads = random_grads(4, 120, device=device)
    fused, info = bm.fused_bucket_moo(grads, method=method, segments=50, backend=backend, return_info=True)
    gram = bm.gram(grads, 50, backend=backend)
    weights = bm.solve(gram, method, backend=backend)
    combined = bm.combine(grads, weights, 50, backend=backend)
    torch.testing.assert_close(fused, combined, atol=0, rtol=0)
    torch.testing.assert_close(info.weights, weights, atol=0, rtol=0)
    torch.testing.assert_close(info.gram, gram, atol=0, rtol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_single_task_returns_the_gradient(backend, device):
    g = random_grads(1, 50, device=device)
    torch.testing.assert_close(bm.fused_bucket_moo(g, segments=7, backend=backend), g[0], atol=0, rtol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_empty_segments_keep_a_zero_gram_and_mean_weights(backend, device):
    grads = random_grads(4, 10, device=device)
    _, info = bm.fused_bucket_moo(grads, segments=offsets(0, 10, 0), backend=backend, return_info=True)
    assert torch.count_nonzero(info.gram[0]) == 0 and torch.count_nonzero(info.gram[2]) == 0
    torch.testing.assert_close(info.weights[0].cpu(), torch.full((4,), 0.25))
    torch.testing.assert_close(info.weights[2].cpu(), torch.full((4,), 0.25))
