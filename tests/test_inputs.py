"""Bad input refused before anything is written, on every backend that runs on CPU here:
a caller's ``out`` that partially overlaps a gradient row, and bad losses for the loss
normalisations. Also the prebuilt :class:`WeightStep` path of the API."""

import pytest
import torch

import bucketmoo_kernels as bm
from tests.utils import random_grads

CPU_BACKENDS = [name for name, reason in bm.available_backends("cpu").items() if reason is None]
# The Triton interpreter takes seconds per launch: tests that run kernels mark it slow.
RUNNING_BACKENDS = [pytest.param(b, marks=pytest.mark.slow) if b == "triton" else b for b in CPU_BACKENDS]


def _overlapping_outs(buf: torch.Tensor, n: int):
    """(description, out) pairs that share memory with rows 0/1 of ``buf.view(2, n)`` but are
    not one of them."""
    return [
        ("shifted by one element", buf[1:n + 1]),
        ("straddles rows 0 and 1", buf[n // 2:n // 2 + n]),
        ("strided view of row 0", buf[:2 * n].view(n, 2)[:, 0]),
        ("starts inside row 1", buf[n + 3:2 * n + 3]),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("api", ["fused", "combine"])
def test_out_partially_overlapping_a_row_is_refused(backend, api):
    n = 64
    buf = random_grads(3, n).flatten()
    buf = torch.cat([buf, torch.zeros(8)])  # room after the last row
    grads = buf[:3 * n].view(3, n)
    for what, out in _overlapping_outs(buf, n):
        before = buf.clone()
        with pytest.raises(ValueError, match=r"out partially overlaps grads\[\d\]"):
            if api == "fused":
                bm.fused_bucket_moo(grads, segments=16, out=out, backend=backend, check_finite=False)
            else:
                bm.combine(grads, torch.rand(4, 3), segments=16, out=out, backend=backend)
        assert torch.equal(buf, before), f"{what}: something was written before the refusal"


@pytest.mark.parametrize("backend", RUNNING_BACKENDS)
def test_out_that_is_exactly_a_row_or_disjoint_is_accepted(backend):
    n = 64
    grads = random_grads(3, n)
    expected = bm.fused_bucket_moo(grads.clone(), segments=16, backend="torch").double()
    for row in range(3):
        g = grads.clone()
        out = bm.fused_bucket_moo(g, segments=16, out=g[row], backend=backend)
        assert out.data_ptr() == g[row].data_ptr()
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # Rows given separately; out right after the last row's bytes (adjacent, not overlapping).
    buf = random_grads(1, 4 * n).flatten()
    rows = [buf[t * n:(t + 1) * n] for t in range(3)]
    out = bm.fused_bucket_moo(rows, segments=16, out=buf[3 * n:], backend=backend)
    torch.testing.assert_close(out.double(), bm.fused_bucket_moo(
        [r.clone() for r in rows], segments=16, backend="torch").double(), atol=1e-5, rtol=1e-5)


BAD_LOSSES = {
    "negative": [1.0, -0.5, 2.0],
    "nan": [1.0, float("nan"), 2.0],
    "inf": [float("inf"), 1.0, 2.0],
    "-inf": [1.0, 1.0, float("-inf")],
    "tensor-negative": torch.tensor([1.0, 2.0, -3.0]),
    "tensor-nan": torch.tensor([float("nan"), 2.0, 3.0]),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("normalization", ["loss", "loss+"])
@pytest.mark.parametrize("case", list(BAD_LOSSES))
def test_bad_losses_are_refused_before_anything_is_written(backend, normalization, case):
    grads = random_grads(3, 50)
    out = torch.full((50,), 7.0)
    with pytest.raises(ValueError, match=r"losses\[\d\] = .*finite and >= 0|finite and >= 0; got losses"):
        bm.fused_bucket_moo(grads, segments=20, out=out, backend=backend, normalization=normalization,
                            losses=BAD_LOSSES[case], check_finite=False)
    assert (out == 7.0).all(), "out was written before the losses were checked"
    with pytest.raises(ValueError, match="losses"):
        bm.solve(bm.gram(grads, 20), normalization=normalization, losses=BAD_LOSSES[case], backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("losses", [[1.0, 2.0], [1.0, 2.0, 3.0, 4.0], [[1.0, 2.0, 3.0]] * 2],
                         ids=["short", "long", "wrong-S"])
def test_losses_of_the_wrong_length_are_refused(backend, losses):
    grads = random_grads(3, 50)
    out = torch.full((50,), 7.0)
    with pytest.raises(ValueError, match=r"losses must have shape \[T\] = \[3\]"):
        bm.fused_bucket_moo(grads, segments=20, out=out, backend=backend, normalization="loss",
                            losses=losses, check_finite=False)
    assert (out == 7.0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_zero_loss_leaves_that_task_unscaled(backend):
    """Documented meaning of a zero loss: its scale is replaced by 1 (float64 oracle here)."""
    gram = bm.gram(random_grads(3, 40)).double()
    losses = torch.tensor([0.0, 2.0, 0.5], dtype=torch.float64)
    scales = torch.where(losses > 0, losses, torch.ones_like(losses))
    normed = gram / (scales[None, :, None] * scales[None, None, :])
    w = bm.methods.mgda.mgda_weights(normed) / scales
    expected = w / w.sum(-1, keepdim=True)
    got = bm.solve(gram.float(), "mgda", normalization="loss", losses=losses.tolist(), backend=backend)
    torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", RUNNING_BACKENDS)
def test_prebuilt_weight_step_equals_the_keyword_form(backend):
    grads = random_grads(4, 120)
    losses = [0.5, 1.0, 2.0, 4.0]
    for method, options in (("mgda", {"solver": "pgd", "max_iter": 50}), ("pcgrad", {"seed": 3}),
                            ("cagrad", {"c": 0.2}), ("mean", {})):
        step = bm.WeightStep(method, options, normalization="loss+", normalize_weights=False)
        a, info_a = bm.fused_bucket_moo(grads, segments=30, backend=backend, weight_step=step,
                                        losses=losses, return_info=True)
        b, info_b = bm.fused_bucket_moo(grads, segments=30, backend=backend, method=method,
                                        normalization="loss+", normalize_weights=False, losses=losses,
                                        return_info=True, **options)
        assert torch.equal(a, b) and torch.equal(info_a.weights, info_b.weights)
        assert info_a.method == method
        assert torch.equal(bm.solve(info_a.gram, weight_step=step, losses=losses, backend=backend),
                           info_a.weights)


def test_weight_step_is_validated_once_and_frozen():
    step = bm.WeightStep("mgda", {"solver": "exact"}, normalization="l2")
    assert dict(step.options) == {"solver": "exact", "max_iter": 500, "tol": 1e-10}
    with pytest.raises(TypeError):
        step.options["solver"] = "pgd"  # read-only
    with pytest.raises(AttributeError):
        step.normalization = "none"  # frozen
    assert step.with_options(solver="pgd").options["solver"] == "pgd" and step.options["solver"] == "exact"
    assert step.solver(2) == "exact" and bm.WeightStep("mgda").solver(2) == "closed_form"
    assert bm.WeightStep("mgda").solver(9) == "pgd" and bm.WeightStep("mean").solver(9) is None
    assert step == bm.WeightStep("mgda", {"solver": "exact"}, normalization="l2")
    with pytest.raises(TypeError, match="unknown option"):
        bm.WeightStep("mgda", {"c": 0.4})
    with pytest.raises(ValueError, match="normalization must be one of"):
        bm.WeightStep("mgda", normalization="max")
    with pytest.raises(ValueError, match="unknown method"):
        bm.WeightStep("nope")
    with pytest.raises(TypeError, match="not both"):
        bm.fused_bucket_moo(random_grads(2, 10), weight_step=step, solver="pgd")
    with pytest.raises(TypeError, match="not both"):
        bm.solve(torch.eye(2), weight_step=step, normalization="l2")


def test_native_codes_come_from_the_registry():
    """Which solver runs for T and each method's native task limit (the registry's rules)."""
    codes = bm.WeightStep("mgda").native_codes
    assert codes(2).solver == 1 and codes(8).solver == 2 and codes(9).solver == 3  # resolved, never 0
    assert codes(33) is None  # above the native solvers' 32
    assert bm.WeightStep("mgda", {"solver": "closed_form"}).native_codes(3) is None  # torch raises
    assert bm.WeightStep("cagrad").native_codes(8).method == 3
    assert bm.WeightStep("cagrad").native_codes(9) is None
    with pytest.raises(ValueError, match="cagrad option c must be >= 0"):  # checked when built
        bm.WeightStep("cagrad", {"c": -1.0})
    assert bm.WeightStep("pcgrad", normalization="loss+").native_codes(32).normalization == 3
    bm.WeightStep("cagrad").check_tasks(64)  # no task cap (iterative solver beyond 8)
    with pytest.raises(ValueError, match="at most 8 tasks"):  # the exact MGDA solver's own limit
        bm.solve(torch.eye(9)[None], weight_step=bm.WeightStep("mgda", {"solver": "exact"}))
