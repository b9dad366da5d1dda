"""MGDA: the min-norm point of the convex hull of the task gradients.

    w* = argmin_{w in simplex} w^T M w,      d = sum_t w*_t g_t

(Désidéri 2012; Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective
Optimization"). Three solvers, all batched over segments and computed in float64:

* ``closed_form`` (T = 2): gamma = clip((M22 - M12) / (M11 + M22 - 2 M12), 0, 1).
* ``exact`` (T <= 8): enumerate the 2^T - 1 faces of the simplex. On face A the
  equality-constrained minimiser is w_A = M_AA^{-1} 1 / (1^T M_AA^{-1} 1); every feasible
  candidate is a point of the simplex and the optimum's own face yields the optimum, so
  the feasible candidate of least objective *is* the solution. No KKT test is needed.
* ``pgd`` (any T): accelerated projected gradient (FISTA with adaptive restart) with step
  1 / L, L = the largest absolute row sum of M (>= its largest eigenvalue), then an
  active-set polish (:func:`mgda_polish`): from the iterate's support, primal active-set
  steps (solve the face problem, step back to the first bound that blocks, or let the most
  violating task in) until the Frank-Wolfe gap is at most 2 ``MGDA_KKT_TOL`` max(diag M),
  at most ``2 T + 4`` steps. FISTA alone stalls short of the optimum on ill-conditioned
  Grams (1e-7 of max(diag M) above it after 500 iterations); the polish lands on the
  optimum of the ridged problem up to rounding.

Every solver works on M + ridge * I (see :mod:`.simplex`), which only matters when M is
singular; with identical gradients all weights are equal.
"""

from __future__ import annotations

import torch

from .batched_solvers import may_stop_early, solve_systems
from .options import AtLeast, OneOf, Option
from .registry import register
from .simplex import MAX_EXACT_TASKS, MAX_NATIVE_TASKS, pick_candidate, project_to_simplex, ridge, subset_masks

__all__ = ["mgda_weights", "mgda_closed_form", "mgda_exact", "mgda_pgd", "mgda_polish",
           "mgda_polish_pgd", "polish_steps", "mgda_solver_for", "MGDA_SOLVERS", "MGDA_KKT_TOL"]

#: The solver names; a name's index is its code in the native weight step (solver::MgdaSolver).
MGDA_SOLVERS = ("auto", "closed_form", "exact", "pgd")
#: The polish's stopping rule (:func:`mgda_polish`): the multipliers of the tasks outside the
#: support may be this far below zero, relative to max(diag M).
MGDA_KKT_TOL = 1e-13


def _with_ridge(gram: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return gram + ridge(gram)[:, None, None] * eye


def mgda_closed_form(gram: torch.Tensor) -> torch.Tensor:
    """Two tasks: ``[S, 2, 2]`` f64 -> ``[S, 2]`` f64."""
    if gram.shape[-1] != 2:
        raise ValueError(f"the closed-form MGDA solver needs T = 2 tasks; got T = {gram.shape[-1]}")
    m = _with_ridge(gram)
    m11, m12, m22 = m[:, 0, 0], m[:, 0, 1], m[:, 1, 1]
    denom = m11 + m22 - 2 * m12
    gamma = torch.where(denom > 0, (m22 - m12) / denom, torch.full_like(denom, 0.5)).clamp(0, 1)
    return torch.stack([gamma, 1 - gamma], dim=-1)


def mgda_exact(gram: torch.Tensor) -> torch.Tensor:
    """Active-set enumeration, T <= 8: ``[S, T, T]`` f64 -> ``[S, T]`` f64."""
    num_seg, num_tasks, _ = gram.shape
    if num_tasks > MAX_EXACT_TASKS:
        raise ValueError(
            f"the exact MGDA solver handles at most {MAX_EXACT_TASKS} tasks; got T = {num_tasks} "
            "(use solver='pgd')"
        )
    m = _with_ridge(gram)
    masks = subset_masks(num_tasks, gram.device)  # [K, T]
    pair = masks[:, :, None] & masks[:, None, :]  # [K, T, T]
    eye = torch.eye(num_tasks, dtype=gram.dtype, device=gram.device)
    # Rows/cols outside the subset become identity rows with a zero right-hand side.
    systems = torch.where(pair, m[:, None], eye)  # [S, K, T, T]
    rhs = masks.to(gram.dtype).expand(num_seg, -1, -1)  # [S, K, T]
    x = solve_systems(systems, rhs.unsqueeze(-1)).squeeze(-1)
    w = x / x.sum(-1, keepdim=True)
    objective = torch.einsum("skt,stu,sku->sk", w, m, w)
    return pick_candidate(w, objective, masks, gram)


def mgda_pgd(gram: torch.Tensor, max_iter: int = 500, tol: float = 1e-10) -> torch.Tensor:
    """Accelerated projected gradient, any T: ``[S, T, T]`` f64 -> ``[S, T]`` f64.

    Runs ``max_iter`` iterations at most; on the CPU it stops early once no segment's weights
    move by more than ``tol`` (max-abs) in an iteration (checked every 50 iterations; ``tol=0``
    never stops early). On accelerators it always runs ``max_iter`` iterations: no host sync.
    """
    num_seg, num_tasks, _ = gram.shape
    m = _with_ridge(gram)
    step = 1.0 / m.abs().sum(-1).amax(-1).clamp_min(torch.finfo(m.dtype).tiny)  # [S]
    w = torch.full((num_seg, num_tasks), 1.0 / num_tasks, dtype=m.dtype, device=m.device)
    y, t_k = w.clone(), torch.ones(num_seg, dtype=m.dtype, device=m.device)
    for it in range(max_iter):
        grad = 2 * torch.einsum("stu,su->st", m, y)
        w_next = project_to_simplex(y - (step / 2)[:, None] * grad)
        t_next = (1 + torch.sqrt(1 + 4 * t_k * t_k)) / 2
        # Adaptive restart (O'Donoghue & Candes 2015): drop momentum when it points uphill.
        uphill = ((grad * (w_next - w)).sum(-1) > 0)
        momentum = torch.where(uphill, torch.zeros_like(t_k), (t_k - 1) / t_next)
        t_next = torch.where(uphill, torch.ones_like(t_next), t_next)
        y = w_next + momentum[:, None] * (w_next - w)
        moved = (w_next - w).abs().amax()
        w, t_k = w_next, t_next
        if tol > 0 and it % 50 == 49 and may_stop_early(moved <= tol):
            break
    return mgda_polish_pgd(gram, w)


def mgda_polish_pgd(gram: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The end of every PGD solver (torch, Triton): :func:`mgda_polish` of the iterate ``w [S, T]``
    on the ridged ``gram [S, T, T]`` (float64)."""
    return mgda_polish(_with_ridge(gram), w, scale=_tie_scale(gram))


def _tie_scale(gram: torch.Tensor) -> torch.Tensor:
    """``[S]`` max(max diag M, 0): the scale of the polish's stopping rule."""
    return gram.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(0)


def polish_steps(num_tasks: int) -> int:
    """The bound on :func:`mgda_polish`'s active-set steps for T tasks (what an accelerator
    always runs; the CPU stops once every segment meets the stopping rule)."""
    return 2 * num_tasks + 4


def mgda_polish(m: torch.Tensor, w: torch.Tensor, *, scale: torch.Tensor,
                steps: int | None = None) -> torch.Tensor:
    """Primal active-set steps on the simplex QP min w^T m w (``m [S, T, T]`` ridged, positive
    definite; ``w [S, T]`` a point of the simplex, e.g. the PGD iterate) -> ``[S, T]``.

    The free set F starts as the support of ``w``. A step solves the face problem on F
    (y = M_FF^{-1} 1 / 1^T M_FF^{-1} 1, zero outside F). If y > 0 on F, w moves to y; when no
    task outside F has (M y)_j < y^T M y - MGDA_KKT_TOL * scale (the Frank-Wolfe gap, which
    bounds w^T M w - optimum, is then at most 2 MGDA_KKT_TOL * scale) the segment is done,
    else the most violating task joins F. Otherwise w moves towards y up to the first
    coordinate that reaches 0, which leaves F. The objective never increases, so the result
    is never worse than ``w``. At most ``steps`` (default :func:`polish_steps`) steps; every
    step is a batched masked solve, no data-dependent branch, no host read off the CPU.
    """
    num_seg, num_tasks = w.shape
    steps = polish_steps(num_tasks) if steps is None else steps
    eye = torch.eye(num_tasks, dtype=m.dtype, device=m.device)
    diag = m.diagonal(dim1=-2, dim2=-1)
    free = w > 0
    done = torch.zeros(num_seg, dtype=torch.bool, device=w.device)
    limit = MGDA_KKT_TOL * scale
    for _ in range(steps):
        pair = free[:, :, None] & free[:, None, :]
        system = torch.where(pair, m, eye)
        x = solve_systems(system, free.to(m.dtype).unsqueeze(-1)).squeeze(-1)
        y = x / x.sum(-1, keepdim=True)
        usable = torch.isfinite(y).all(-1) & ~done
        inside = usable & ~(free & (y <= 0)).any(-1)
        # Inside: move to y; then the entering task (most negative multiplier / M_jj).
        grad = torch.einsum("stu,su->st", m, y)
        value = (grad * y).sum(-1)
        violation = torch.where(free, torch.zeros_like(y), (value[:, None] - grad) / diag)
        worst, enter = ((value[:, None] - grad) * ~free).amax(-1), violation.argmax(-1)
        kkt = inside & (worst <= limit)
        enters = inside & ~kkt
        # Outside: step towards y until the first free coordinate reaches 0.
        blocking = free & (y <= 0)
        ratio = torch.where(blocking, w / torch.where(blocking, w - y, torch.ones_like(w)),
                            torch.full_like(w, float("inf")))
        alpha, leave = ratio.min(-1)
        partial = usable & ~inside
        stepped = torch.where(free, w + alpha[:, None] * (y - w), torch.zeros_like(w))
        left = (torch.arange(num_tasks, device=w.device)[None, :] == leave[:, None]) | ~(stepped > 0)
        stepped = torch.where(left, torch.zeros_like(stepped), stepped)
        w = torch.where(inside[:, None], y, torch.where(partial[:, None], stepped, w))
        entering = torch.arange(num_tasks, device=w.device)[None, :] == enter[:, None]
        free = torch.where(enters[:, None], free | entering,
                           torch.where(partial[:, None], free & ~left, free))
        done = done | kkt | ~usable
        if may_stop_early(done):
            break
    w = w.clamp_min(0)
    return w / w.sum(-1, keepdim=True)


def mgda_solver_for(num_tasks: int, options) -> str:
    """The solver that runs for T tasks: ``options["solver"]``, or for ``"auto"``
    ``closed_form`` at T = 2, ``exact`` for T <= 8, else ``pgd``. Every backend asks this."""
    solver = options.get("solver", "auto")
    if solver not in MGDA_SOLVERS:
        raise ValueError(f"mgda solver must be one of {', '.join(MGDA_SOLVERS)}; got {solver!r}")
    if solver != "auto":
        return solver
    return "closed_form" if num_tasks == 2 else "exact" if num_tasks <= MAX_EXACT_TASKS else "pgd"


def _mgda_native_args(num_tasks: int, options) -> dict | None:
    """The native codes of a configuration the native solvers run (None: the torch function
    runs, and raises the documented error for an unsupported solver / T)."""
    if options.get("solver", "auto") not in MGDA_SOLVERS:
        return None
    solver = mgda_solver_for(num_tasks, options)
    if num_tasks > 1 and ((solver == "closed_form" and num_tasks != 2) or
                          (solver == "exact" and num_tasks > MAX_EXACT_TASKS)):
        return None
    max_iter, tol = int(options["max_iter"]), float(options["tol"])
    if max_iter < 0:
        return None
    return {"solver": MGDA_SOLVERS.index(solver), "max_iter": max_iter, "tol": tol}


def mgda_weights(gram: torch.Tensor, *, solver: str = "auto", max_iter: int = 500,
                 tol: float = 1e-10) -> torch.Tensor:
    """MGDA min-norm weights: ``[S, T, T]`` f64 -> ``[S, T]`` f64 on the simplex.

    ``solver="auto"`` picks ``closed_form`` for T = 2, ``exact`` for T <= 8, else ``pgd``.
    ``max_iter`` and ``tol`` apply to ``pgd`` only.
    """
    num_tasks = gram.shape[-1]
    solver = mgda_solver_for(num_tasks, {"solver": solver})
    if num_tasks == 1:
        return torch.ones(gram.shape[0], 1, dtype=gram.dtype, device=gram.device)
    if solver == "closed_form":
        return mgda_closed_form(gram)
    if solver == "exact":
        return mgda_exact(gram)
    return mgda_pgd(gram, max_iter=max_iter, tol=tol)


#: The most tasks of the Triton PGD kernel (one program holds a segment's T x T Gram).
MAX_TRITON_PGD_TASKS = 64

register("mgda", mgda_weights,
         options={"solver": Option("auto", OneOf(MGDA_SOLVERS)), "max_iter": Option(500, AtLeast(1)),
                  "tol": Option(1e-10, AtLeast(0.0))},
         solver_for=mgda_solver_for, solver_max_tasks={"closed_form": 2, "exact": MAX_EXACT_TASKS},
         native_code=1, native_max_tasks=MAX_NATIVE_TASKS, native_args=_mgda_native_args,
         triton_max_tasks={"closed_form": 2, "exact": MAX_EXACT_TASKS, "pgd": MAX_TRITON_PGD_TASKS})
