"""The public API (gram / solve / combine / fused_bucket_moo) on every backend that can run
on CPU tensors here, against the float64 reference; input validation and failure policy."""

import os

import pytest
import torch

import bucketmoo_kernels as bm
from bucketmoo_kernels.inputs import Segments, as_segments, as_task_grads
from bucketmoo_kernels.reference import combine_reference, gram_reference
from tests.utils import DTYPE_TOLERANCES, DTYPES, LAYOUTS, assert_close, offsets, random_grads

CPU_BACKENDS = [name for name, reason in bm.available_backends("cpu").items() if reason is None]


def reference_fused(grads, method="mgda", segments=None, **options):
    """float64 oracle: reference Gram -> method function -> reference combine (float64 output)."""
    tg = as_task_grads(grads)
    segs = as_segments(segments, tg.numel)
    gram = gram_reference(tg, segs)
    weights = bm.solve(gram, method, backend="torch", **options)
    out = torch.empty(tg.numel, dtype=torch.float64)
    combine_reference(tg, weights, segs, out)
    return out, gram, weights


def test_torch_backend_is_always_available():
    assert "torch" in CPU_BACKENDS
    assert bm.get_backend("auto", "cpu").name in CPU_BACKENDS


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("num_tasks", [2, 3, 5, 8])
def test_fused_matches_reference(backend, dtype, layout, num_tasks):
    n = 203
    grads = random_grads(num_tasks, n, dtype)
    segments = LAYOUTS[layout](n)
    out, info = bm.fused_bucket_moo(grads, segments=segments, backend=backend, return_info=True)
    expected, gram, weights = reference_fused(grads, segments=segments)
    atol, rtol = DTYPE_TOLERANCES[dtype]
    assert out.dtype == dtype and out.shape == (n,)
    assert_close(info.gram, gram, atol=1e-4 * n, rtol=1e-5, what="gram")
    assert_close(out, expected, atol=atol, rtol=rtol, what="combined")
    torch.testing.assert_close(info.weights.sum(-1), torch.ones(info.weights.shape[0]), atol=1e-6, rtol=0)
    assert info.backend == backend


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_mean_is_the_plain_average(backend, dtype):
    grads = random_grads(4, 77, dtype)
    out = bm.fused_bucket_moo(grads, method="mean", segments=10, backend=backend)
    atol, rtol = DTYPE_TOLERANCES[dtype]
    assert_close(out, grads.double().mean(0), atol=atol, rtol=rtol, what="mean")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_list_and_stacked_inputs_agree(backend):
    grads = random_grads(3, 100)
    separate = [g.clone() for g in grads]
    a = bm.fused_bucket_moo(grads, segments=offsets(10, 0, 90), backend=backend)
    b = bm.fused_bucket_moo(separate, segments=offsets(10, 0, 90), backend=backend)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("row", [0, 2])
def test_out_may_alias_an_input(backend, dtype, row):
    grads = random_grads(3, 150, dtype)
    expected = bm.fused_bucket_moo(grads.clone(), segments=40, backend=backend)
    bucket = grads[row]  # a view into the stacked tensor, like a DDP bucket buffer
    result = bm.fused_bucket_moo(grads, segments=40, out=bucket, backend=backend)
    assert result.data_ptr() == bucket.data_ptr()
    torch.testing.assert_close(bucket, expected, atol=0, rtol=0)
    rows = [g.clone() for g in random_grads(3, 150, dtype)]
    expected = bm.fused_bucket_moo([r.clone() for r in rows], backend=backend)
    bm.fused_bucket_moo(rows, out=rows[row], backend=backend)
    torch.testing.assert_close(rows[row], expected, atol=0, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", ["mean", "mgda", "pcgrad", "cagrad"])
def test_fused_equals_gram_solve_combine(backend, method):
    grads = random_grads(4, 120)
    fused, info = bm.fused_bucket_moo(grads, method=method, segments=50, backend=backend, return_info=True)
    g = bm.gram(grads, 50, backend=backend)
    w = bm.solve(g, method, backend=backend)
    d = bm.combine(grads, w, 50, backend=backend)
    torch.testing.assert_close(fused, d, atol=0, rtol=0)
    torch.testing.assert_close(info.weights, w, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["mgda", "pcgrad", "cagrad"])
def test_solve_agrees_across_backends(method):
    grams = bm.gram(random_grads(5, 300), 37, backend="torch")
    expected = bm.solve(grams, method, backend="torch")
    for backend in CPU_BACKENDS:
        assert_close(bm.solve(grams, method, backend=backend), expected, atol=1e-5, rtol=0, what=backend)


def test_weights_sum_to_one_or_keep_paper_scale():
    grams = bm.gram(random_grads(4, 64), 16)
    raw = bm.solve(grams, "pcgrad", normalize_weights=False)
    scaled = bm.solve(grams, "pcgrad")
    torch.testing.assert_close(scaled, raw / raw.sum(-1, keepdim=True))
    assert (raw.sum(-1) >= 1 - 1e-6).all()  # projections only add positive multiples


def test_l2_normalization_equals_solving_on_unit_gradients():
    grads = random_grads(3, 80).double() * torch.tensor([[1.0], [10.0], [0.1]], dtype=torch.float64)
    units = grads / grads.norm(dim=1, keepdim=True)
    w_units = bm.solve(bm.gram(units.float()), "mgda")[0].double()
    direction = w_units @ units
    w = bm.solve(bm.gram(grads.float()), "mgda", normalization="l2")[0].double()
    combined = w @ grads
    torch.testing.assert_close(combined / combined.norm(), direction / direction.norm(), atol=1e-5, rtol=0)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0)


def test_loss_normalizations_need_losses():
    gram = bm.gram(random_grads(3, 30))
    with pytest.raises(ValueError, match="losses"):
        bm.solve(gram, normalization="loss")
    w_loss = bm.solve(gram, normalization="loss", losses=[1.0, 2.0, 4.0])
    w_plus = bm.solve(gram, normalization="loss+", losses=torch.tensor([1.0, 2.0, 4.0]))
    assert torch.isfinite(w_loss).all() and torch.isfinite(w_plus).all()
    with pytest.raises(ValueError, match="normalization"):
        bm.solve(gram, normalization="max")


def test_custom_method_via_registry():
    @bm.register_method("test_first_task", defaults={"boost": 1.0}, overwrite=True)
    def first(gram, *, boost):
        w = torch.zeros(gram.shape[:2], dtype=gram.dtype)
        w[:, 0] = boost
        return w

    grads = random_grads(3, 40)
    out = bm.fused_bucket_moo(grads, method="test_first_task", boost=2.0)
    torch.testing.assert_close(out, grads[0])
    assert "test_first_task" in bm.available_methods()


def test_segments_forms_are_equivalent():
    grads = random_grads(3, 50)
    by_int = bm.gram(grads, 20)
    by_tensor = bm.gram(grads, torch.tensor([0, 20, 40, 50]))
    by_list = bm.gram(grads, [0, 20, 40, 50])
    by_object = bm.gram(grads, Segments.chunks(50, 20))
    for other in (by_tensor, by_list, by_object):
        torch.testing.assert_close(other, by_int, atol=0, rtol=0)
    assert Segments.from_lengths([3, 0, 4]).offsets.tolist() == [0, 3, 3, 7]


def test_empty_segments_keep_zero_gram_and_uniform_weights():
    grads = random_grads(4, 10)
    _, info = bm.fused_bucket_moo(grads, segments=offsets(0, 10, 0), return_info=True)
    assert torch.count_nonzero(info.gram[0]) == 0 and torch.count_nonzero(info.gram[2]) == 0
    torch.testing.assert_close(info.weights[0], torch.full((4,), 0.25))


def test_single_task_returns_the_gradient():
    g = random_grads(1, 33)
    torch.testing.assert_close(bm.fused_bucket_moo(g), g[0])


def test_env_var_pins_auto(monkeypatch):
    monkeypatch.setenv("BUCKETMOO_BACKEND", "torch")
    assert bm.get_backend("auto", "cpu").name == "torch"
    monkeypatch.setenv("BUCKETMOO_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend"):
        bm.get_backend("auto", "cpu")


def test_explicit_unavailable_backend_raises():
    reasons = bm.available_backends("cpu")
    missing = [n for n, r in reasons.items() if r is not None]
    assert "cuda" in missing  # no CUDA tensors on a CPU device
    with pytest.raises(RuntimeError, match="cuda"):
        bm.fused_bucket_moo(random_grads(2, 8), backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        bm.fused_bucket_moo(random_grads(2, 8), backend="gpu")


# ---- bad input: a clear error, and ``out`` untouched -------------------------------------

BAD_INPUTS = {
    "rank3": (dict(grads=torch.zeros(2, 3, 4)), ValueError, r"\[T, N\]"),
    "rank1": (dict(grads=torch.zeros(5)), ValueError, r"\[T, N\]"),
    "no tasks": (dict(grads=[]), ValueError, "at least one task"),
    "int dtype": (dict(grads=torch.zeros(2, 4, dtype=torch.int32)), TypeError, "float32, bfloat16 or float16"),
    "fp64": (dict(grads=torch.zeros(2, 4, dtype=torch.float64)), TypeError, "float64"),
    "mixed dtypes": (dict(grads=[torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16)]), TypeError, r"grads\[1\]"),
    "mixed devices": (dict(grads=[torch.zeros(4), torch.zeros(4, device="meta")]), ValueError, "one device"),
    "mixed lengths": (dict(grads=[torch.zeros(4), torch.zeros(5)]), ValueError, "same length"),
    "2-D row": (dict(grads=[torch.zeros(4), torch.zeros(2, 2)]), ValueError, "1-D"),
    "not a tensor": (dict(grads="abc"), TypeError, "grads"),
    "offsets start": (dict(segments=torch.tensor([1, 8])), ValueError, "start at 0"),
    "offsets end": (dict(segments=torch.tensor([0, 7])), ValueError, "end at N=8"),
    "offsets decreasing": (dict(segments=torch.tensor([0, 5, 3, 8])), ValueError, "non-decreasing"),
    "offsets float": (dict(segments=torch.tensor([0.0, 8.0])), TypeError, "integer"),
    "offsets 2-D": (dict(segments=torch.tensor([[0, 8]])), ValueError, "1-D"),
    "chunk zero": (dict(segments=0), ValueError, "positive"),
    "unknown method": (dict(method="nash"), ValueError, "unknown method 'nash'"),
    "unknown option": (dict(method="mgda", c=0.3), TypeError, "unknown option"),
    "too many tasks": (dict(grads=torch.randn(9, 8), method="mgda", solver="exact"), ValueError, "at most 8 tasks"),
    "out dtype": (dict(out=torch.zeros(8, dtype=torch.float16)), TypeError, "out must have"),
    "out shape": (dict(out=torch.zeros(9)), ValueError, "N=8"),
    "non-finite": (dict(grads=torch.tensor([[1.0] * 7 + [float("nan")], [1.0] * 8])), ValueError, "NaN/Inf"),
    "inf": (dict(grads=torch.tensor([[1.0] * 7 + [float("inf")], [1.0] * 8])), ValueError, "NaN/Inf"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_and_leaves_out_untouched(case):
    kwargs, error, pattern = BAD_INPUTS[case]
    kwargs = dict(kwargs)
    grads = kwargs.pop("grads", torch.randn(2, 8))
    out = kwargs.pop("out", None)
    sentinel = torch.full((8,), 7.0)
    if out is None and isinstance(grads, torch.Tensor) and grads.dim() == 2 and grads.dtype == torch.float32 \
            and grads.shape[1] == 8:
        out = sentinel
    before = None if out is None else out.clone()
    with pytest.raises(error, match=pattern):
        bm.fused_bucket_moo(grads, out=out, **kwargs)
    if before is not None:
        torch.testing.assert_close(out, before, atol=0, rtol=0, equal_nan=True)


def test_nonfinite_values_propagate_when_not_checked():
    grads = torch.randn(2, 8)
    grads[0, 3] = float("inf")
    out = bm.fused_bucket_moo(grads, check_finite=False)
    assert not torch.isfinite(out).all()


def test_overflowing_gram_is_reported_as_nonfinite():
    grads = torch.full((2, 8), 1e20)
    with pytest.raises(ValueError, match="overflow"):
        bm.fused_bucket_moo(grads)


def test_info_diagnostics():
    grads = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])])
    _, info = bm.fused_bucket_moo(grads, return_info=True)
    torch.testing.assert_close(info.cosine()[0], torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    torch.testing.assert_close(info.combined_norm(), torch.zeros(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(info.mean_norm(), torch.zeros(1))
    assert bm.diagnostics.conflict_share(info.gram).item() == 1.0
