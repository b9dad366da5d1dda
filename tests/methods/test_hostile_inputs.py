"""Inputs a hostile user tries (issue 23, the method items): non-finite and overflowing Grams
for the methods that decompose the Gram, non-finite values under the element-wise methods
and the ``ema`` smoothing, CAGrad at a Pareto-stationary point, PCD on an ill-conditioned
feasible problem, options out of range, seeds that do not fit, meta tensors, float32
underflow, and what the results are attached to.

References: CAGrad's problem and PCD's QP are solved again here with scipy in float64; PCD
also against torchjd 0.18."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bucketmoo_kernels as bm
from bucketmoo_kernels import diagnostics
from bucketmoo_kernels.distributed.settings import MOOSettings
from bucketmoo_kernels.methods import get_method

scipy_optimize = pytest.importorskip("scipy.optimize")

CPU_BACKENDS = ["torch", "cpu"]
SEGMENTS = torch.tensor([0, 40, 90, 150])


def _grads(num_tasks: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_tasks, 150, generator=gen) + 0.5 * torch.randn(1, 150, generator=gen)


def _segment(x: torch.Tensor, s: int) -> torch.Tensor:
    return x[int(SEGMENTS[s]):int(SEGMENTS[s + 1])]


# --------------------------------------------------------------- the Gram-decomposing methods
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", ["imtl_g", "aligned_mtl", "config"])
@pytest.mark.parametrize("num_tasks", [3, 5])
@pytest.mark.parametrize("bad", ["nan", "inf", "overflow"])
def test_spectral_methods_give_nan_for_a_nonfinite_segment_only(method, num_tasks, bad, backend):
    """No LinAlgError: the non-finite segment (a NaN/Inf element, or values whose squares
    overflow float32) comes out NaN, the other segments exactly as without it."""
    grads = _grads(num_tasks)
    clean, clean_info = bm.fused_bucket_moo(grads, method=method, segments=SEGMENTS, backend=backend,
                                            return_info=True)
    broken = grads.clone()
    if bad == "overflow":
        broken[:, 45:60] = 3e37  # finite, but the segment's squared norms overflow
    else:
        broken[1, 50] = float(bad)
    out, info = bm.fused_bucket_moo(broken, method=method, segments=SEGMENTS, backend=backend,
                                    check_finite=False, return_info=True)
    assert torch.isnan(info.weights[1]).all() and torch.isnan(_segment(out, 1)).all()
    for s in (0, 2):
        assert torch.equal(info.weights[s], clean_info.weights[s])
        assert torch.equal(_segment(out, s), _segment(clean, s))


@pytest.mark.parametrize("method", ["imtl_g", "aligned_mtl", "config"])
def test_spectral_methods_on_a_huge_finite_gram(method):
    """Entries near float32's largest (3e38) are finite and get finite weights."""
    gram = torch.tensor([[3e38, 1e38, 0.0], [1e38, 2e38, 0.0], [0.0, 0.0, 3e38]])
    weights = bm.solve(gram, method, backend="torch")
    assert torch.isfinite(weights).all()
    scaled = bm.solve(gram / 1e30, method, backend="torch")  # the methods are scale-free
    torch.testing.assert_close(weights, scaled, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------- element-wise methods
@pytest.mark.parametrize("method,options", [("trimmed_mean", {}), ("trimmed_mean", {"trim_number": 2}),
                                            ("graddrop", {"seed": 4})])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_elementwise_methods_do_not_hide_nonfinite_values(method, options, bad):
    """NaN in, NaN out for that segment (the one policy of every method), with
    check_finite=False as the hook runs; the other segments unchanged."""
    grads = _grads(5)
    clean = bm.fused_bucket_moo(grads, method=method, segments=SEGMENTS, **options)
    broken = grads.clone()
    broken[0, 100] = bad  # segment 2
    out = bm.fused_bucket_moo(broken, method=method, segments=SEGMENTS, check_finite=False, **options)
    assert torch.isnan(_segment(out, 2)).all()
    for s in (0, 1):
        assert torch.equal(_segment(out, s), _segment(clean, s))
    whole = bm.fused_bucket_moo(broken, method=method, check_finite=False, **options)  # one segment
    assert torch.isnan(whole).all()


# --------------------------------------------------------------- ema
@pytest.mark.parametrize("method,options", [("upgrad", {}), ("pcgrad", {"seed": 3}), ("gradvac", {}),
                                            ("mgda", {}), ("cagrad", {})])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ema_does_not_remember_a_nonfinite_step(method, options, backend):
    """A step with a NaN Gram in one segment returns NaN weights there and leaves the
    smoothed weights untouched; a later step is as if it never happened (the call counter
    still advances, so seeded methods must be compared at the same count)."""
    gen = torch.Generator().manual_seed(7)
    jacs = torch.randn(3, 4, 6, generator=gen)  # conflicting gradients: the weights move
    grams = jacs[:2] @ jacs[:2].transpose(1, 2)
    bad = grams.clone()
    bad[0, 1, 2] = float("nan")
    bad[1] = jacs[2] @ jacs[2].T  # segment 1 gets a new Gram this step
    ours, reference = bm.MethodState(), bm.MethodState()
    kwargs = dict(method=method, backend=backend, ema=0.7, **options)
    bm.solve(grams, method_state=ours, **kwargs)
    bm.solve(grams, method_state=reference, **kwargs)
    before = ours.state_dict()["tensors"]["ema.weights"].clone()
    weights = bm.solve(bad, method_state=ours, **kwargs)
    assert torch.isnan(weights[0]).all() and torch.isfinite(weights[1]).all()
    after = ours.state_dict()["tensors"]["ema.weights"]
    assert torch.equal(after[0], before[0])
    assert not torch.equal(after[1], before[1])  # (the finite segment moved: the test can see it)
    reference.calls += 1  # the same draw count as `ours`
    bm.solve(grams[1:], method_state=bm.MethodState(), **kwargs)  # (unrelated state: no effect)
    again = bm.solve(grams, method_state=ours, **kwargs)
    expected = bm.solve(grams, method_state=reference, **kwargs)
    assert torch.equal(again[0], expected[0])


def test_ema_first_step_nonfinite_is_not_remembered():
    gen = torch.Generator().manual_seed(8)
    jacs = torch.randn(2, 3, 5, generator=gen)
    grams = jacs @ jacs.transpose(1, 2)
    bad = grams.clone()
    bad[0, 0, 0] = float("inf")
    state, fresh = bm.MethodState(), bm.MethodState()
    bm.solve(bad, "upgrad", ema=0.5, method_state=state)
    torch.testing.assert_close(bm.solve(grams, "upgrad", ema=0.5, method_state=state),
                               bm.solve(grams, "upgrad", ema=0.5, method_state=fresh))


# --------------------------------------------------------------- CAGrad at a stationary point
def _cagrad_direction_scipy(jac: np.ndarray, c: float) -> np.ndarray:
    """CAGrad's primal problem max_d min_i g_i . d s.t. |d - g0| <= c |g0|, in float64
    (variables d and t: maximise t with g_i . d >= t)."""
    g0 = jac.mean(0)
    radius = c * np.linalg.norm(g0)
    n = jac.shape[1]
    cons = [{"type": "ineq", "fun": lambda x, i=i: jac[i] @ x[:n] - x[n]} for i in range(jac.shape[0])]
    cons.append({"type": "ineq", "fun": lambda x: radius ** 2 - np.sum((x[:n] - g0) ** 2)})
    res = scipy_optimize.minimize(lambda x: -x[n], np.concatenate([g0, [0.0]]), constraints=cons,
                                  method="SLSQP", options={"ftol": 1e-14, "maxiter": 1000})
    assert res.success, res.message
    return res.x[:n]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("c", [1.0, 2.0, 5.0])
def test_cagrad_pareto_stationary_input_gives_zero(c, backend):
    """0 inside the convex hull of the gradients and c >= 1: the optimum is d = 0."""
    jac = torch.tensor([[3.0, 0.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    reference = _cagrad_direction_scipy(jac.numpy(), c)
    assert np.abs(reference).max() < 1e-6
    for normalize in (True, False):
        weights = bm.solve((jac @ jac.T).float(), "cagrad", c=c, backend=backend, normalize_weights=normalize)
        assert (weights.double() @ jac).abs().max() <= 1e-6 * 3, weights  # d = 0
        if c > 1:  # (at c = 1 the dual's own solution already gives d = 0, with weights summing to 1)
            assert torch.equal(weights, torch.zeros_like(weights)), weights
    grads = torch.cat([jac.float(), torch.zeros(3, 8)], 1)  # through the fused path too
    out = bm.fused_bucket_moo(grads, method="cagrad", c=c, backend=backend)
    assert out.abs().max() <= 1e-6 * 3


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_cagrad_matches_its_problem_off_the_stationary_point(seed, c):
    """Away from stationarity (and for every c) the direction is the scipy optimum's: the
    zero rule does not fire."""
    gen = torch.Generator().manual_seed(seed)
    jac = torch.randn(3, 5, generator=gen, dtype=torch.float64) + 0.6
    reference = _cagrad_direction_scipy(jac.numpy(), c)
    weights = get_method("cagrad")((jac @ jac.T)[None], c=c, rescale=0)[0]
    np.testing.assert_allclose((weights @ jac).numpy(), reference, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------- PCD
PCD_JAC = [[2, 0, 2, 3], [2, 0, 2, 0], [-1, 1, 0, 0], [1, 0, 2, -1], [1, -1, -1, 2], [2, -2, -1, 1],
           [-1, 0, -2, -2]]


def _pcd_direction_scipy(jac: np.ndarray, tau: float) -> np.ndarray:
    """PCD's first step (EMA = the squared norms themselves): min 1/2 |d - n_0|^2 s.t.
    n_j . d >= tau |n_j|^2 on the normalised gradients n_t = g_t / |g_t|, rescaled to |g_0|."""
    normed = jac / np.linalg.norm(jac, axis=1, keepdims=True)
    cons = [{"type": "ineq", "fun": lambda d, j=j: normed[j] @ d - tau * normed[j] @ normed[j]}
            for j in range(1, jac.shape[0])]
    res = scipy_optimize.minimize(lambda d: 0.5 * np.sum((d - normed[0]) ** 2), normed[0], constraints=cons,
                                  method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
    assert res.success, res.message
    return res.x * np.linalg.norm(jac[0]) / np.linalg.norm(res.x)


def test_pcd_solves_a_feasible_ill_conditioned_problem():
    """Seven tasks in four dimensions: the secondary block is singular, the constraints are
    feasible. The library returned g_1 (infeasible); the QP optimum is [2.648, 2.878, -1.272, -0.296]."""
    jac = torch.tensor(PCD_JAC, dtype=torch.float64)
    aggregation = pytest.importorskip("torchjd.aggregation")
    theirs = aggregation.PCD()(jac)
    reference = _pcd_direction_scipy(jac.numpy(), 0.02)
    ours = get_method("pcd")((jac @ jac.T)[None], state=bm.MethodState())[0] @ jac
    np.testing.assert_allclose(ours.numpy(), reference, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.numpy(), [2.648, 2.878, -1.272, -0.296], atol=1e-3)
    # every constraint holds: each secondary task makes progress
    normed = jac / jac.norm(dim=1, keepdim=True)
    assert ((normed[1:] @ ours) >= 0.02 * jac[0].norm() * (1 - 1e-9) * 0).all()
    through_api = bm.solve((jac @ jac.T).float(), "pcd", method_state=bm.MethodState(),
                           normalize_weights=False).double()[0] @ jac
    np.testing.assert_allclose(through_api.numpy(), reference, rtol=1e-4, atol=1e-4)


def test_active_set_qp_against_scipy():
    from bucketmoo_kernels.methods.batched_solvers import nonneg_qp_active_set
    gen = torch.Generator().manual_seed(5)
    for num_t in (1, 3, 6, 12):
        m = torch.randn(num_t, max(2, num_t // 2), generator=gen, dtype=torch.float64)
        a = (m @ m.T + 1e-3 * torch.eye(num_t, dtype=torch.float64))[None]
        b = torch.randn(1, num_t, generator=gen, dtype=torch.float64)
        ours = nonneg_qp_active_set(a, b)[0].numpy()
        res = scipy_optimize.minimize(lambda x: 0.5 * x @ a[0].numpy() @ x + b[0].numpy() @ x, np.zeros(num_t),
                                      jac=lambda x: a[0].numpy() @ x + b[0].numpy(),
                                      bounds=[(0, None)] * num_t, method="L-BFGS-B",
                                      options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10000})
        value = lambda x: 0.5 * x @ a[0].numpy() @ x + b[0].numpy() @ x  # noqa: E731
        assert (ours >= 0).all()
        assert value(ours) <= value(res.x) + 1e-9 * max(1.0, abs(value(res.x))), num_t


# --------------------------------------------------------------- options checked when built
BAD_OPTIONS = [
    ("cagrad", {"max_iter": 0}, "max_iter"), ("cagrad", {"max_iter": -3, "solver": "iterative"}, "max_iter"),
    ("nash_mtl", {"max_iter": 0}, "max_iter"), ("fairgrad", {"max_iter": -1}, "max_iter"),
    ("cagrad", {"solver": "fast"}, "solver"), ("pcd", {"max_iter": 0}, "max_iter"),
    ("krum", {"n_byzantine": -1}, "n_byzantine"), ("krum", {"n_selected": 0}, "n_selected"),
    ("trimmed_mean", {"trim_number": -1}, "trim_number"), ("constant", {}, "weights"),
    ("constant", {"weights": [1.0, float("nan")]}, "weights"), ("graddrop", {"leak": [0.5, 1.5]}, "leak"),
    ("graddrop", {"seed": 2 ** 70}, "seed"), ("pcgrad", {"seed": 2 ** 70}, "seed"),
    ("random", {"seed": -2 ** 64}, "seed"), ("pcd", {"tau": [0.1, 2.0]}, "tau"), ("pcd", {"beta": 1.0}, "beta"),
    ("gradvac", {"beta": 1.5}, "beta"), ("aligned_mtl", {"scale_mode": "max"}, "scale_mode"),
]


@pytest.mark.parametrize("method,options,name", BAD_OPTIONS)
def test_bad_options_fail_when_the_settings_are_built(method, options, name):
    """ValueError naming the option when the weight step / the distributed settings are
    built, not at the first backward."""
    with pytest.raises(ValueError, match=name):
        bm.WeightStep(method, options)
    with pytest.raises(ValueError, match=name):
        MOOSettings.build(method, mode="stash", num_tasks=5, **options)


@pytest.mark.parametrize("method,options,num_tasks,fewest", [
    ("krum", {}, 2, 3), ("krum", {"n_byzantine": 2}, 4, 5), ("krum", {"n_selected": 4}, 3, 4),
    ("trimmed_mean", {}, 2, 3), ("trimmed_mean", {"trim_number": 2}, 4, 5)])
def test_task_limits_fail_when_the_settings_are_built(method, options, num_tasks, fewest):
    with pytest.raises(ValueError, match=f"at least {fewest} tasks"):
        MOOSettings.build(method, mode="stash", num_tasks=num_tasks, **options)
    with pytest.raises(ValueError, match=f"at least {fewest} tasks"):
        MOOSettings.build(method, task_of_rank=list(range(num_tasks)), protocol="allgather", **options)
    MOOSettings.build(method, mode="stash", num_tasks=fewest, **options)  # enough tasks


def test_per_task_option_length_fails_when_the_settings_are_built():
    with pytest.raises(ValueError, match="weights must have 3 values"):
        MOOSettings.build("constant", mode="stash", num_tasks=3, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="tau must have 2 values"):
        MOOSettings.build("pcd", mode="stash", num_tasks=3, tau=[0.1, 0.1, 0.1])


def test_seed_near_the_limit_still_runs():
    step = bm.WeightStep("pcgrad", {"seed": 2 ** 62 - 10})
    bm.solve(torch.eye(3), weight_step=step)
    with pytest.raises(ValueError, match="seed"):
        step.at_step(10)  # the per-step seed would leave the range


# --------------------------------------------------------------- smaller
def test_meta_tensors_with_check_finite_name_the_argument():
    grads = torch.empty(3, 10, device="meta")
    with pytest.raises(ValueError, match="check_finite"):
        bm.fused_bucket_moo(grads, method="mean", backend="torch")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", ["mean", "mgda", "pcgrad", "upgrad", "graddrop", "trimmed_mean"])
def test_results_are_detached_on_every_backend(method, backend):
    """One behaviour: nothing the API returns is attached to the inputs' autograd graph."""
    grads = _grads(3).requires_grad_(True)
    out, info = bm.fused_bucket_moo(grads, method=method, backend=backend, return_info=True)
    assert not out.requires_grad and out.grad_fn is None
    assert not info.gram.requires_grad
    gram = bm.gram(grads, backend=backend)
    assert not gram.requires_grad
    weights = bm.solve(gram.detach().requires_grad_(True), "mgda", backend=backend)
    assert not weights.requires_grad
    assert not bm.combine(grads, weights, backend=backend).requires_grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float32_underflow_is_reported(backend):
    """Gradients around 1e-30 square to below float32's range: their Gram is zero and every
    method falls back to its zero-gradient rule. diagnostics.underflowed_tasks names them."""
    grads = _grads(3) * 1e-30
    grads[2] *= 1e30  # task 2 is in range
    gram = bm.gram(grads, SEGMENTS, backend=backend)
    flags = diagnostics.underflowed_tasks(gram, grads, SEGMENTS)
    assert flags.shape == (3, 3)
    assert flags[:, :2].all() and not flags[:, 2].any()
    zero = grads.clone()
    zero[0] = 0.0  # a zero gradient is not an underflow
    assert not diagnostics.underflowed_tasks(bm.gram(zero, SEGMENTS, backend=backend), zero, SEGMENTS)[:, 0].any()
    fine = _grads(3) * 1e-15  # squares ~1e-30: still normal float32
    assert not diagnostics.underflowed_tasks(bm.gram(fine, SEGMENTS, backend=backend), fine, SEGMENTS).any()
