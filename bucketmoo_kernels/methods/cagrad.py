"""CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning").

With g0 the average gradient and radius r = c |g0|, CAGrad solves

    w* = argmin_{w in simplex}  g_w . g0 + r |g_w|,        g_w = sum_t w_t g_t

and updates along d = g0 + (r / |g_w*|) g_w*, divided by (1 + c^2) (the official code's
default ``rescale=1``; ``rescale=2`` divides by 1 + c, ``rescale=0`` not at all). In Gram
terms, with a = M 1/T: minimise a^T w + r sqrt(w^T M w).

Iterative solver (any T): projected gradient with a batched line search, then the exact
stationary point of the face it found (below); see :func:`_cagrad_iterative`.

Exact solver (T <= 8, float64): on face A of the simplex a stationary point satisfies
a_A + r M_AA w / |g_w| = lambda 1. With x = M_AA^{-1} 1, y = M_AA^{-1} a_A and
D = (1^T y)^2 - (1^T x)(a_A^T y - r^2), it is w_A = (lambda x - y) / sqrt(D) with
lambda = (1^T y + sqrt(D)) / (1^T x), when D > 0. Vertices are always candidates. As for
MGDA, the feasible candidate of least objective is the optimum (the objective is convex
and the optimum lies in the relative interior of one face).
"""

from __future__ import annotations

import torch

from .options import AtLeast, OneOf, Option
from .registry import register
from .batched_solvers import may_stop_early, solve_systems
from .simplex import (FEASIBLE_TOL, MAX_EXACT_TASKS, pick_candidate, project_to_simplex, ridge,
                      subset_masks)

__all__ = ["cagrad_weights", "cagrad_solver_for", "cagrad_stationary", "CAGRAD_SOLVERS"]

CAGRAD_SOLVERS = ("auto", "exact", "iterative")


def cagrad_solver_for(num_tasks: int, options) -> str:
    """The solver that runs for T tasks: ``options["solver"]``, or for ``"auto"`` ``exact`` up
    to 8 tasks, else ``iterative``."""
    solver = options.get("solver", "auto")
    if solver != "auto":
        return solver
    return "exact" if num_tasks <= MAX_EXACT_TASKS else "iterative"


def _face_candidates(m: torch.Tensor, a: torch.Tensor, radius: torch.Tensor,
                     masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stationary point of each face ``masks [S, K, T]`` (NaN where there is none) and its
    objective: ``([S, K, T], [S, K])``."""
    num_tasks = m.shape[-1]
    pair = masks[..., :, None] & masks[..., None, :]
    eye = torch.eye(num_tasks, dtype=m.dtype, device=m.device)
    systems = torch.where(pair, m[:, None], eye)  # [S, K, T, T]
    mask_f = masks.to(m.dtype)
    rhs = torch.stack([mask_f, mask_f * a[:, None, :]], dim=-1)  # [S, K, T, 2]
    sol = solve_systems(systems, rhs)
    x, y = sol[..., 0] * mask_f, sol[..., 1] * mask_f
    sx, sy = x.sum(-1), y.sum(-1)
    ay = (a[:, None, :] * y).sum(-1)
    disc = sy * sy - sx * (ay - (radius * radius)[:, None])
    root = disc.clamp_min(0).sqrt()
    lam = (sy + root) / sx
    w = (lam[..., None] * x - y) / root[..., None]
    w = torch.where((disc > 0)[..., None], w, torch.full_like(w, float("nan")))
    single = masks.sum(-1) == 1
    w = torch.where(single[..., None], mask_f, w)
    return w, _objective(m, a, radius, w)


def _objective(m: torch.Tensor, a: torch.Tensor, radius: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a^T w + radius sqrt(w^T m w) for ``w [S, K, T]`` -> ``[S, K]``."""
    quad = torch.einsum("skt,stu,sku->sk", w, m, w).clamp_min(0)
    return (a[:, None, :] * w).sum(-1) + radius[:, None] * quad.sqrt()


def _cagrad_inner(m: torch.Tensor, a: torch.Tensor, radius: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """argmin over the simplex of a^T w + radius sqrt(w^T m w), by face enumeration."""
    num_seg, num_tasks, _ = m.shape
    masks = subset_masks(num_tasks, m.device)  # [K, T]
    w, objective = _face_candidates(m, a, radius, masks.expand(num_seg, -1, -1))
    return pick_candidate(w, objective, masks, gram)


def _gradient(m: torch.Tensor, a: torch.Tensor, radius: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    quad = torch.einsum("st,stu,su->s", w, m, w).clamp_min(torch.finfo(m.dtype).tiny)
    return a + (radius / quad.sqrt())[:, None] * torch.einsum("stu,su->st", m, w)


def _polish(m: torch.Tensor, a: torch.Tensor, radius: torch.Tensor, w: torch.Tensor,
            kkt_tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact stationary point of the face ``w`` lies on, and whether it passes the KKT test
    (gradient equal on the face, no smaller off it, to ``kkt_tol`` of the gradient's scale)."""
    support = w > FEASIBLE_TOL * w.amax(-1, keepdim=True)
    cand, _ = _face_candidates(m, a, radius, support[:, None, :])
    cand = cand[:, 0]
    feasible = torch.isfinite(cand).all(-1) & (cand >= -FEASIBLE_TOL).all(-1)
    cand = torch.where(feasible[:, None], cand.clamp_min(0), w)
    cand = cand / cand.sum(-1, keepdim=True)
    grad = _gradient(m, a, radius, cand)
    lam = (grad * support).sum(-1) / support.sum(-1).clamp_min(1)
    scale = grad.abs().amax(-1).clamp_min(torch.finfo(m.dtype).tiny)
    on_face = torch.where(support, (grad - lam[:, None]).abs(), torch.zeros_like(grad)).amax(-1)
    off_face = torch.where(support, torch.zeros_like(grad), (lam[:, None] - grad).clamp_min(0)).amax(-1)
    ok = feasible & (on_face <= kkt_tol * scale) & (off_face <= kkt_tol * scale)
    return cand, ok


def _cagrad_iterative(m: torch.Tensor, a: torch.Tensor, radius: torch.Tensor, *, max_iter: int,
                      tol: float, chunk: int = 20) -> torch.Tensor:
    """The same minimiser for any T: projected gradient with a batched Armijo search over a
    ladder of steps, in rounds of ``chunk`` steps; after each round, the exact stationary point
    of the face the iterate is on (:func:`_face_candidates`) replaces it where it passes the KKT
    test to ``tol`` (relative). On the CPU it stops once every segment passed."""
    num_seg, num_tasks, _ = m.shape
    # 2^8 .. 2^-30, built on the device (no host-to-device copy); powers of two are exact
    ladder = torch.pow(2.0, torch.arange(8, -31, -1, dtype=m.dtype, device=m.device))
    w = torch.full((num_seg, num_tasks), 1.0 / num_tasks, dtype=m.dtype, device=m.device)
    result = w
    solved = torch.zeros(num_seg, dtype=torch.bool, device=m.device)
    lip = m.abs().sum(-1).amax(-1)  # >= the largest eigenvalue of m
    done = 0
    while done < max_iter:
        for _ in range(min(chunk, max_iter - done)):
            quad = torch.einsum("st,stu,su->s", w, m, w).clamp_min(torch.finfo(m.dtype).tiny)
            grad = _gradient(m, a, radius, w)
            base = quad.sqrt() / (radius * lip).clamp_min(torch.finfo(m.dtype).tiny)  # ~ 1 / curvature
            steps = base[:, None] * ladder[None, :]  # [S, K]
            trials = project_to_simplex((w[:, None, :] - steps[..., None] * grad[:, None, :]).reshape(-1, num_tasks))
            trials = trials.reshape(num_seg, -1, num_tasks)
            f_trials = _objective(m, a, radius, trials)
            f_now = _objective(m, a, radius, w[:, None, :])
            decrease = (grad[:, None, :] * (trials - w[:, None, :])).sum(-1)
            ok = (f_trials <= f_now + 1e-4 * decrease) & torch.isfinite(f_trials)
            first = torch.where(ok.any(-1), ok.to(torch.int8).argmax(-1),
                                torch.full((num_seg,), -1, dtype=torch.int64, device=m.device))
            chosen = trials.gather(1, first.clamp_min(0)[:, None, None].expand(-1, 1, num_tasks)).squeeze(1)
            w = torch.where((first >= 0)[:, None], chosen, w)
        done += min(chunk, max_iter - done)
        polished, ok = _polish(m, a, radius, w, tol)
        fresh = ok & ~solved
        result = torch.where(fresh[:, None], polished, result)
        solved = solved | ok
        if may_stop_early(solved):
            break
    return torch.where(solved[:, None], result, w)


def cagrad_weights(gram: torch.Tensor, *, c: float = 0.4, rescale: int = 1, solver: str = "auto",
                   max_iter: int = 2000, tol: float = 1e-9) -> torch.Tensor:
    """CAGrad weights: ``[S, T, T]`` f64 -> ``[S, T]`` f64 (paper scale, any T).

    ``solver``: ``exact`` (face enumeration, T <= 8), ``iterative`` (any T) or ``auto`` (exact
    up to 8 tasks). ``max_iter`` and ``tol`` apply to ``iterative``.
    """
    num_seg, num_tasks, _ = gram.shape
    if solver == "exact" and num_tasks > MAX_EXACT_TASKS:
        raise ValueError(
            f"the exact cagrad solver handles at most {MAX_EXACT_TASKS} tasks; got T = {num_tasks} "
            "(use solver='iterative' or 'auto')"
        )
    exact = cagrad_solver_for(num_tasks, {"solver": solver}) == "exact"
    eye = torch.eye(num_tasks, dtype=gram.dtype, device=gram.device)
    m = gram + ridge(gram)[:, None, None] * eye
    mean_w = torch.full((num_seg, num_tasks), 1.0 / num_tasks, dtype=gram.dtype, device=gram.device)
    a = torch.einsum("stu,su->st", m, mean_w)  # M g0 coefficients
    g0_norm = (a * mean_w).sum(-1).clamp_min(0).sqrt()
    radius = c * g0_norm
    if num_tasks == 1:
        w = torch.ones_like(mean_w)
    elif exact:
        w = _cagrad_inner(m, a, radius, gram)
    else:
        w = _cagrad_iterative(m, a, radius, max_iter=max_iter, tol=tol)
    gw_norm = torch.einsum("st,stu,su->s", w, gram, w).clamp_min(0).sqrt()
    tiny = 1e-12 * gram.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(0).sqrt()
    lam = torch.where(gw_norm > tiny, radius / torch.where(gw_norm > tiny, gw_norm, 1.0), 0.0)
    weights = mean_w + lam[:, None] * w
    divisor = {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]
    return cagrad_stationary(gram, weights / divisor, {"c": c})


#: How far below zero (relative to max_t |g_t| |d|) the least task progress g_i . d may be
#: before :func:`cagrad_stationary` counts d as wrong: well above the rounding of float32
#: weights. (For c >= 1 a correct d has |d| >= (c - 1) |g0| and g_i . d >= 0; a cosine of
#: -1e-5 between d and a gradient happens only next to a stationary point.)
STATIONARY_TOL = 1e-5


def cagrad_stationary(gram: torch.Tensor, weights: torch.Tensor, options) -> torch.Tensor:
    """Zero weights (d = 0) for the segments where the input is Pareto stationary and c >= 1.

    With c >= 1 the CAGrad problem max_d min_i g_i . d over |d - g0| <= c |g0| contains d = 0,
    so its optimum has min_i g_i . d >= 0; when 0 lies in the convex hull of the gradients that
    optimum is 0 and (0 inside the hull) d = 0 is the only maximiser. The dual solution's
    direction g_w* / |g_w*| is then undefined (|g_w*| = 0, up to the solver's ridge), and the
    formula gives an arbitrary d that decreases some task. So where c >= 1 and some task gets
    g_i . d < 0 beyond rounding, d is the optimum's 0. ``weights [S, T]`` on the gradients of
    ``gram [S, T, T]`` (any positive scale; every backend's result goes through this)."""
    if not float(options["c"]) >= 1.0:
        return weights
    gram64, w64 = gram.to(torch.float64), weights.to(torch.float64)
    progress = torch.einsum("stu,su->st", gram64, w64)  # g_i . d
    norms = gram64.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    d_norm = (progress * w64).sum(-1).clamp_min(0).sqrt()
    wrong = progress.amin(-1) < -STATIONARY_TOL * norms.amax(-1) * d_norm
    return torch.where(wrong[:, None], torch.zeros_like(weights), weights)


def _cagrad_native_args(num_tasks: int, options) -> dict | None:
    """The native codes (the exact solver), or None for the iterative solver (the torch
    function then runs)."""
    if cagrad_solver_for(num_tasks, options) != "exact":
        return None
    return {"c": float(options["c"]), "rescale": int(options["rescale"])}


register("cagrad", cagrad_weights,
         options={"c": Option(0.4, AtLeast(0.0)), "rescale": Option(1, OneOf((0, 1, 2))),
                  "solver": Option("auto", OneOf(CAGRAD_SOLVERS)), "max_iter": Option(2000, AtLeast(1)),
                  "tol": Option(1e-9, AtLeast(0.0))},
         solver_for=cagrad_solver_for, solver_max_tasks={"exact": MAX_EXACT_TASKS},
         native_code=3, native_max_tasks=MAX_EXACT_TASKS, native_args=_cagrad_native_args,
         triton_max_tasks={"exact": MAX_EXACT_TASKS}, finish=cagrad_stationary)
