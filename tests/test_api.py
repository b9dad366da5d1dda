"""The public API (gram / solve / combine / fused_bucket_moo): weight scales, the l2 and loss
normalisations, the method registry, segment forms, backend choice, input validation and the
failure policy. The checks every backend must pass (fused vs the float64 oracle, methods,
aliasing, input forms) are in ``test_conformance.py``."""

import pytest
import torch

import bucketmoo_kernels as bm
from bucketmoo_kernels.inputs import Segments
from tests.utils import assert_close, offsets, random_grads

CPU_BACKENDS = [name for name, reason in bm.available_backends("cpu").items() if reason is None]


def test_torch_backend_is_always_available():
    assert "torch" in CPU_BACKENDS
    assert bm.get_backend("auto", "cpu").name in CPU_BACKENDS


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
