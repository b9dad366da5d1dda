"""MGDA beyond the exact solver's 8 tasks reaches the optimum of its QP (issue 23, accuracy).

The reference is independent of the library: the min-norm point of the convex hull is the
least-distance problem dual to a non-negative least squares (Lawson & Hanson, ch. 23),

    u = argmin_{u >= 0} |R u|^2 + (1^T u - 1)^2,   R^T R = M,   w* = u / 1^T u,

solved by scipy's Lawson-Hanson NNLS in float64 (exact up to rounding), and then checked
against the KKT conditions of the simplex QP here, so a wrong reference fails too.

Every solver works on M + ridge I (methods/simplex.py: ridge = RIDGE_REL mean(diag M)), so the
objective on the unridged M may lie above the optimum by at most the ridge (w_r minimises
q(w) + r |w|^2, hence q(w_r) <= q* + r (|w*|^2 - |w_r|^2) <= q* + r). The tests hold every
backend to that bound plus rounding, far inside the issue's 1e-6 of max(diag M); before the
polish the PGD solver stopped up to 4e-7 of max(diag M) above it at T = 9..32 on these Grams.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

import bucketmoo_kernels as bm
from bucketmoo_kernels.methods.batched_solvers import fixed_iterations
from bucketmoo_kernels.methods.mgda import mgda_pgd, mgda_weights
from bucketmoo_kernels.methods.simplex import RIDGE_REL

TASKS = (9, 12, 16, 20, 32)
KINDS = ("random", "rank_deficient", "duplicated", "badly_scaled", "stationary")


def task_gradients(num_tasks: int, kind: str, seed: int) -> torch.Tensor:
    """``[T, n]`` float64 task gradients of the given kind."""
    gen = torch.Generator().manual_seed(100 * num_tasks + seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if kind == "random":
        jac = randn(num_tasks, 50)
        jac[1:] -= 0.5 * jac[0]  # conflicts with the first task
    elif kind == "rank_deficient":
        rank = max(1, num_tasks // 3)
        jac = randn(num_tasks, rank) @ randn(rank, 50)
    elif kind == "duplicated":  # every row appears twice (or more)
        base = randn(num_tasks // 2 + 1, 50)
        jac = torch.cat([base, base[: num_tasks - base.shape[0]]])
    elif kind == "badly_scaled":  # row norms from 1e-3 to 1e3
        jac = torch.logspace(-3, 3, num_tasks, dtype=torch.float64)[:, None] * randn(num_tasks, 50)
    elif kind == "stationary":  # 0 is in the hull: the optimum is (about) 0
        base = randn(num_tasks - 1, 6)
        jac = torch.cat([base, -base.sum(0, keepdim=True)])
    else:
        raise ValueError(kind)
    return jac


def reference_min_norm(m: np.ndarray) -> tuple[np.ndarray, float]:
    """Exact min over the simplex of w^T m w (float64 NNLS, see the module docstring), KKT-checked."""
    scale = float(np.max(np.diag(m)))
    evals, evecs = np.linalg.eigh(m / scale)
    root = np.sqrt(np.clip(evals, 0, None))[:, None] * evecs.T  # root^T root = m / scale
    num_tasks = m.shape[0]
    lhs = np.vstack([root, np.ones((1, num_tasks))])
    rhs = np.zeros(num_tasks + 1)
    rhs[-1] = 1.0
    u, _ = scipy.optimize.nnls(lhs, rhs, maxiter=50 * num_tasks)
    w = u / u.sum()
    value = float(w @ m @ w)
    # KKT of min w^T m w on the simplex: (m w)_j >= w^T m w for every j, with equality on the support.
    grad = m @ w
    assert (w >= 0).all() and abs(w.sum() - 1) < 1e-12
    assert (grad >= value - 1e-11 * scale).all(), "reference is not optimal"
    assert (np.abs(grad - value)[w > 1e-9] <= 1e-9 * scale).all(), "reference is not stationary"
    return w, value


def gram_cases(num_tasks: int, seeds=(0, 1)):
    for kind in KINDS:
        for seed in seeds:
            jac = task_gradients(num_tasks, kind, seed)
            yield f"{kind}-{seed}", jac @ jac.T


def assert_at_optimum(gram: torch.Tensor, w: torch.Tensor, what: str, slack: float = 0.0) -> None:
    """``w`` on the simplex, objective within the ridge bound (+ rounding, + ``slack`` relative
    to max diag) of the exact optimum of ``gram`` (float64 [T, T])."""
    gram, w = gram.double(), w.double()
    scale = float(gram.diagonal().max())
    _, best = reference_min_norm(gram.numpy())
    assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-6, (what, w)
    gap = (float(w @ gram @ w) - best) / scale
    bound = RIDGE_REL * float(gram.diagonal().mean()) / scale + 1e-13 + slack
    assert gap <= bound, f"{what}: objective {gap:.3e} of max diag above the optimum (bound {bound:.1e})"
    assert gap <= 1e-6  # the requirement, stated as such


def test_reference_agrees_with_face_enumeration():
    """The NNLS reference is the optimum the exact face enumeration finds (T = 9, 511 faces)."""
    from bucketmoo_kernels.methods.mgda import mgda_exact  # noqa: F401  (T <= 8 only)
    from itertools import combinations
    for name, gram in gram_cases(9, seeds=(0,)):
        m = gram.numpy()
        best = np.inf
        for size in range(1, 10):
            for face in combinations(range(9), size):
                sub = m[np.ix_(face, face)] + 1e-14 * np.eye(size) * m.diagonal().max()
                x = np.linalg.solve(sub, np.ones(size))
                if (x >= 0).all() and x.sum() > 0:
                    w = x / x.sum()
                    best = min(best, float(w @ sub @ w))
        _, value = reference_min_norm(m)
        assert abs(value - best) <= 1e-10 * m.diagonal().max(), name


@pytest.mark.parametrize("num_tasks", TASKS)
def test_torch_default_options_reach_the_optimum(num_tasks):
    cases = list(gram_cases(num_tasks))
    grams = torch.stack([g for _, g in cases])
    weights = mgda_weights(grams)  # the defaults: auto -> pgd for T > 8
    for (name, gram), w in zip(cases, weights):
        assert_at_optimum(gram, w, f"torch T={num_tasks} {name}")


@pytest.mark.parametrize("num_tasks", [9, pytest.param(20, marks=pytest.mark.slow),
                                       pytest.param(32, marks=pytest.mark.slow)])
def test_accelerator_path_reaches_the_optimum(num_tasks):
    """Fixed iteration counts, no convergence flag read (what CUDA runs): the same optimum."""
    cases = list(gram_cases(num_tasks))
    grams = torch.stack([g for _, g in cases])
    with fixed_iterations():
        weights = mgda_weights(grams)
    for (name, gram), w in zip(cases, weights):
        assert_at_optimum(gram, w, f"fixed-iteration T={num_tasks} {name}")


def test_polish_alone_reaches_the_optimum_from_the_centre():
    """With max_iter=0 the polish starts from w = 1/T (full support) and still gets there."""
    for num_tasks in (9, 16, 32):
        cases = list(gram_cases(num_tasks, seeds=(0,)))
        weights = mgda_pgd(torch.stack([g for _, g in cases]), max_iter=0)
        for (name, gram), w in zip(cases, weights):
            assert_at_optimum(gram, w, f"max_iter=0 T={num_tasks} {name}")


def _native_or_skip():
    reason = bm.available_backends("cpu")["cpu"]
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("num_tasks", TASKS)
def test_native_cpu_solver_reaches_the_optimum(num_tasks):
    """The header's mgda_pgd + polish (solver::mgda_solve) on float64 Grams, default options."""
    _native_or_skip()
    cases = list(gram_cases(num_tasks))
    grams = torch.stack([g for _, g in cases]).contiguous()
    weights = torch.ops.bucketmoo.solve_mgda(grams, 0, 500, 1e-10)
    for (name, gram), w in zip(cases, weights):
        assert_at_optimum(gram, w, f"native T={num_tasks} {name}")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("num_tasks", [12, pytest.param(32, marks=pytest.mark.slow)])
def test_public_solve_reaches_the_optimum_of_the_float32_gram(backend, num_tasks):
    """bm.solve takes float32 Grams and returns float32 weights: the optimum of the rounded
    Gram, up to the weights' float32 rounding (a first-order effect: 1e-6 of max diag). Full-rank
    kinds only: rounding a singular Gram to float32 can make it indefinite (no convex QP)."""
    if backend == "cpu":
        _native_or_skip()
    cases = [(n, g) for n, g in gram_cases(num_tasks) if n.startswith(("random", "badly_scaled"))]
    grams = torch.stack([g for _, g in cases]).float()
    assert (torch.linalg.eigvalsh(grams.double()) > 0).all()
    weights = bm.solve(grams, "mgda", backend=backend)
    for (name, _), gram, w in zip(cases, grams, weights):
        assert_at_optimum(gram.double(), w.double() / w.double().sum(), f"{backend} T={num_tasks} {name}",
                          slack=1e-6)


def _triton_or_skip():
    reason = bm.available_backends("cpu")["triton"]
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("num_tasks,kinds", [
    (12, ("rank_deficient", "badly_scaled")),
    pytest.param(9, KINDS, marks=pytest.mark.slow),
    pytest.param(32, KINDS, marks=pytest.mark.slow),
])
def test_triton_pgd_reaches_the_optimum(num_tasks, kinds):
    """The Triton PGD kernel (interpreted here: a few iterations only, the polish finishes)."""
    _triton_or_skip()
    from bucketmoo_kernels.triton.solve import mgda_triton
    cases = [(n, g) for n, g in gram_cases(num_tasks, seeds=(0,)) if n.rsplit("-", 1)[0] in kinds]
    grams = torch.stack([g for _, g in cases]).contiguous()
    weights = mgda_triton(grams, "pgd", max_iter=5)
    for (name, gram), w in zip(cases, weights):
        assert_at_optimum(gram, w, f"triton T={num_tasks} {name}")


def test_exact_solver_numbers_for_small_t_are_unchanged():
    """T <= 8 with the defaults still runs the face enumeration, not PGD + polish."""
    from bucketmoo_kernels.methods.mgda import mgda_exact
    for num_tasks in (3, 5, 8):
        grams = torch.stack([g for _, g in gram_cases(num_tasks, seeds=(0,))])
        assert torch.equal(mgda_weights(grams), mgda_exact(grams))
