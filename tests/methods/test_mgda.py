"""MGDA solvers: simplex feasibility, KKT, optimality against scipy, equivariance, degenerate input."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from bucketmoo_kernels.methods.mgda import mgda_closed_form, mgda_exact, mgda_pgd, mgda_weights
from bucketmoo_kernels.methods.simplex import project_to_simplex

# Objective tolerance relative to the Gram scale: the ridge (1e-9 of the mean diagonal)
# plus float64 rounding.
OBJ_RTOL = 2e-9


def gram_of(grads: torch.Tensor) -> torch.Tensor:
    g = grads.to(torch.float64)
    return (g @ g.T)[None]


def random_gram(num_tasks: int, n: int, seed: int, shared: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(num_tasks, n, generator=gen, dtype=torch.float64)
    g += shared * torch.randn(n, generator=gen, dtype=torch.float64)
    return gram_of(g)


def scipy_min_norm(m: np.ndarray) -> tuple[np.ndarray, float]:
    """Dense QP oracle: SLSQP on the simplex from several starts, best objective kept."""
    t = m.shape[0]
    best = None
    starts = [np.full(t, 1.0 / t)] + [np.eye(t)[i] * 0.9 + 0.1 / t for i in range(t)]
    for x0 in starts:
        res = minimize(lambda w: w @ m @ w, x0, jac=lambda w: 2 * m @ w, bounds=[(0, 1)] * t,
                       constraints=({"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones(t)},),
                       method="SLSQP", options={"ftol": 1e-15, "maxiter": 500})
        w = np.clip(res.x, 0, None)
        w /= w.sum()
        val = w @ m @ w
        if best is None or val < best[1]:
            best = (w, val)
    return best


def check_kkt(m: torch.Tensor, w: torch.Tensor, tol: float) -> None:
    """Min over the simplex of w^T M w: (M w)_i >= w^T M w for all i, equality on the support."""
    mw = m @ w
    lam = w @ mw
    scale = m.diagonal().max().clamp_min(1e-300)
    assert (mw >= lam - tol * scale).all(), f"(Mw) below lambda: {mw - lam}"
    support = w > 1e-6
    assert ((mw[support] - lam).abs() <= tol * scale * 10).all(), f"support not stationary: {mw - lam}"


@pytest.mark.parametrize("num_tasks", range(2, 9))
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shared", [0.0, 2.0, -1.0])
def test_exact_is_optimal_feasible_and_kkt(num_tasks, seed, shared):
    n = 3 * num_tasks if seed % 2 else max(2, num_tasks // 2)  # also rank-deficient Grams
    m = random_gram(num_tasks, n, seed, shared)
    w = mgda_weights(m)[0]
    assert torch.all(w >= 0) and abs(w.sum().item() - 1) < 1e-12
    obj = (w @ m[0] @ w).item()
    _, ref = scipy_min_norm(m[0].numpy())
    scale = m[0].diagonal().max().item()
    assert obj <= ref + OBJ_RTOL * scale, f"objective {obj} worse than scipy {ref}"
    check_kkt(m[0], w, 1e-8)


@pytest.mark.parametrize("seed", [pytest.param(s, marks=() if s == 0 else pytest.mark.slow) for s in range(20)])
def test_closed_form_equals_general_solvers_at_two_tasks(seed):
    m = random_gram(2, 5, seed, shared=float(seed % 3) - 1)
    closed = mgda_closed_form(m)
    torch.testing.assert_close(mgda_exact(m), closed, atol=1e-12, rtol=0)
    torch.testing.assert_close(mgda_pgd(m, max_iter=3000, tol=0), closed, atol=1e-6, rtol=0)


@pytest.mark.parametrize("num_tasks", [3, 6, 12, 16])
def test_pgd_reaches_the_optimum(num_tasks):
    m = random_gram(num_tasks, 4 * num_tasks, seed=num_tasks, shared=1.0)
    w = mgda_pgd(m, max_iter=5000, tol=1e-13)[0]
    _, ref = scipy_min_norm(m[0].numpy())
    assert (w @ m[0] @ w).item() <= ref + 1e-7 * m[0].diagonal().max().item()
    if num_tasks <= 8:
        torch.testing.assert_close(w, mgda_exact(m)[0], atol=1e-4, rtol=0)


@settings(max_examples=40, deadline=None)
@given(num_tasks=st.integers(2, 7), seed=st.integers(0, 10_000), n=st.integers(1, 12))
def test_permutation_equivariance(num_tasks, seed, n):
    m = random_gram(num_tasks, n + num_tasks, seed, shared=0.5)  # full rank: unique optimum
    perm = torch.randperm(num_tasks, generator=torch.Generator().manual_seed(seed))
    w = mgda_weights(m)[0]
    w_perm = mgda_weights(m[:, perm][:, :, perm])[0]
    torch.testing.assert_close(w_perm, w[perm], atol=1e-9, rtol=0)


@settings(max_examples=30, deadline=None)
@given(num_tasks=st.integers(2, 8), seed=st.integers(0, 10_000),
       scale=st.sampled_from([1e-30, 1e-12, 1.0, 1e12, 1e30]))
def test_scale_invariance_and_tiny_huge_magnitudes(num_tasks, seed, scale):
    m = random_gram(num_tasks, 2 * num_tasks, seed, shared=1.0)
    w = mgda_weights(m)[0]
    w_scaled = mgda_weights(m * scale)[0]
    assert torch.isfinite(w_scaled).all()
    torch.testing.assert_close(w_scaled, w, atol=1e-8, rtol=0)


def test_identical_gradients_give_equal_weights():
    g = torch.randn(1, 10, dtype=torch.float64).expand(5, -1)
    for num_tasks in (2, 3, 5):
        w = mgda_weights(gram_of(g[:num_tasks]))[0]
        # The ridged system is rank-1 + 1e-9 I: the weights carry ~1e-7 of rounding.
        torch.testing.assert_close(w, torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64),
                                   atol=1e-6, rtol=0)


def test_zero_gradients_give_equal_weights():
    for num_tasks in (2, 4, 8):
        w = mgda_weights(torch.zeros(3, num_tasks, num_tasks, dtype=torch.float64))
        torch.testing.assert_close(w, torch.full((3, num_tasks), 1.0 / num_tasks, dtype=torch.float64))


def test_colinear_gradients_pick_the_shortest():
    g = torch.randn(10, dtype=torch.float64)
    grads = torch.stack([3 * g, g, 2 * g])
    w = mgda_weights(gram_of(grads))[0]
    torch.testing.assert_close(w, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))


def test_opposite_gradients_cancel():
    g = torch.randn(10, dtype=torch.float64)
    w = mgda_weights(gram_of(torch.stack([g, -2 * g])))[0]
    torch.testing.assert_close(w, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))


def test_orthogonal_gradients_weight_inversely_to_squared_norm():
    norms = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    grads = torch.diag(norms)
    w = mgda_weights(gram_of(grads))[0]
    expected = 1 / norms**2
    torch.testing.assert_close(w, expected / expected.sum())


def test_one_task_is_weight_one():
    assert mgda_weights(torch.ones(2, 1, 1, dtype=torch.float64)).tolist() == [[1.0], [1.0]]


def test_batched_segments_are_independent():
    grams = torch.cat([random_gram(4, 9, s, 1.0) for s in range(5)])
    batched = mgda_weights(grams)
    for s in range(5):
        torch.testing.assert_close(batched[s], mgda_weights(grams[s:s + 1])[0], atol=0, rtol=0)


def test_bad_solver_name():
    with pytest.raises(ValueError, match="solver"):
        mgda_weights(random_gram(3, 4, 0), solver="newton")
    with pytest.raises(ValueError, match="at most 8"):
        mgda_weights(random_gram(9, 12, 0), solver="exact")


@pytest.mark.parametrize("seed", range(10))
def test_simplex_projection_matches_qp(seed):
    v = torch.randn(1, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 3
    p = project_to_simplex(v)[0].numpy()
    res = minimize(lambda x: ((x - v[0].numpy()) ** 2).sum(), np.full(6, 1 / 6), bounds=[(0, 1)] * 6,
                   constraints=({"type": "eq", "fun": lambda x: x.sum() - 1},), method="SLSQP",
                   options={"ftol": 1e-14})
    np.testing.assert_allclose(p, res.x, atol=1e-6)
