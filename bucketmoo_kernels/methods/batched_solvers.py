"""Batched iterative solvers shared by the methods, float64, no host synchronisation.

* :func:`nonneg_qp`: min 1/2 x^T A x + b^T x subject to x >= 0 (UPGrad, DualProj, CAGrad's
  polish). Accelerated projected gradient (FISTA with adaptive restart) finds the support,
  then a few primal-dual active-set steps (Hintermueller, Ito & Kunisch 2002) solve the
  equality system on it exactly; per problem the candidate with the smaller KKT residual
  wins. When the active-set steps converge the answer is exact up to rounding, otherwise it
  is the projected-gradient iterate (KKT residual documented by :func:`nonneg_qp_residual`).
* :func:`damped_newton`: min of a smooth strictly convex function on the positive orthant
  (Nash-MTL, FairGrad): Newton steps with a batched backtracking line search over a fixed
  ladder of step sizes (every candidate is evaluated at once, so no branch depends on the
  data) and a fraction-to-boundary rule that keeps the iterate positive.

Every loop runs a fixed number of iterations on accelerators (so it can be captured in a CUDA
graph); on the CPU, where reading a flag costs nothing, it stops as soon as every problem has
converged. :func:`may_stop_early` is the one place that decides; :func:`fixed_iterations`
makes the CPU take the accelerator path (what the tests use to check that path without a GPU).
Linear systems go through :func:`solve_systems` (``torch.linalg.solve_ex`` without its error
check: ``torch.linalg.solve`` reads the LU info on the host, a device sync on accelerators); a
singular system gives non-finite entries, which every caller replaces or rejects.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

__all__ = ["nonneg_qp", "nonneg_qp_active_set", "nonneg_qp_residual", "damped_newton", "may_stop_early", "fixed_iterations",
           "solve_systems", "host_reads_free", "jacobi_eigh", "JACOBI_SWEEPS"]

#: True inside :func:`fixed_iterations`: the CPU runs the accelerator path too.
_FIXED_ITERATIONS = False


def host_reads_free(device: torch.device) -> bool:
    """Whether reading tensor data on the host costs nothing on ``device``: the CPU, outside
    :func:`fixed_iterations`. Elsewhere the code takes its sync-free path."""
    return device.type == "cpu" and not _FIXED_ITERATIONS


def may_stop_early(converged: torch.Tensor) -> bool:
    """True when ``converged`` (a bool tensor) is all true and reading it costs no sync: on the
    CPU, outside :func:`fixed_iterations`. On any other device it is never read (a loop then
    runs its full iteration count, which is what a CUDA graph can capture)."""
    return host_reads_free(converged.device) and bool(converged.all())


@contextlib.contextmanager
def fixed_iterations():
    """Inside this block, the solvers run the accelerator path on the CPU too: fixed iteration
    counts, no read of a convergence flag (for tests of that path on a machine without GPU)."""
    global _FIXED_ITERATIONS
    previous, _FIXED_ITERATIONS = _FIXED_ITERATIONS, True
    try:
        yield
    finally:
        _FIXED_ITERATIONS = previous


def solve_systems(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.solve(a, b)`` without the host read of the error flag (no device sync);
    an exactly singular system gives inf/NaN entries instead of raising."""
    return torch.linalg.solve_ex(a, b, check_errors=False).result


def nonneg_qp_residual(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[B]`` natural KKT residual max_i |x_i - max(0, x_i - (Ax + b)_i / A_ii)|, relative to
    max(1, max_i x_i)."""
    diag = a.diagonal(dim1=-2, dim2=-1).clamp_min(torch.finfo(a.dtype).tiny)
    grad = torch.einsum("btu,bu->bt", a, x) + b
    res = (x - (x - grad / diag).clamp_min(0)).abs().amax(-1)
    return res / x.abs().amax(-1).clamp_min(1.0)


def _active_set_step(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One primal-dual active-set step from ``x``: free set {x_i > mu_i / A_ii}, solve there."""
    diag = a.diagonal(dim1=-2, dim2=-1)
    mu = torch.einsum("btu,bu->bt", a, x) + b
    free = x * diag > mu  # mu - A_ii x_i < 0: the constraint is not active
    pair = free[:, :, None] & free[:, None, :]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    system = torch.where(pair, a, eye)
    rhs = torch.where(free, -b, torch.zeros_like(b))
    return solve_systems(system, rhs.unsqueeze(-1)).squeeze(-1)


def nonneg_qp(a: torch.Tensor, b: torch.Tensor, *, max_iter: int = 200, polish_steps: int | None = None,
              tol: float = 1e-12, chunk: int = 25) -> torch.Tensor:
    """Solve min 1/2 x^T A x + b^T x, x >= 0, for ``a [B, T, T]`` symmetric positive definite
    and ``b [B, T]`` (float64). Returns ``x [B, T]``.

    ``polish_steps`` (default T + 2) active-set steps from x = 0, then rounds of ``chunk``
    projected-gradient iterations (``max_iter`` in all), each followed by active-set steps from
    the iterate; per problem the point of least KKT residual so far is kept. On the CPU it
    stops once every residual is <= ``tol``.
    """
    num_b, num_t = b.shape
    if num_b == 0:
        return b.clone()
    polish_steps = num_t + 2 if polish_steps is None else polish_steps
    step = 1.0 / a.abs().sum(-1).amax(-1).clamp_min(torch.finfo(a.dtype).tiny)  # 1 / L, [B]
    x = torch.zeros_like(b)
    y, t_k = x.clone(), torch.ones(num_b, dtype=a.dtype, device=a.device)
    best, best_res = x, nonneg_qp_residual(a, b, x)
    done = 0
    while True:
        # Active-set steps from the current iterate (the first round starts from x = 0,
        # which already settles most small problems).
        cand = x
        for k in range(polish_steps + 1):
            if k > 0:
                cand = _active_set_step(a, b, cand)
            feasible = torch.isfinite(cand).all(-1) & (cand >= 0).all(-1)
            res = torch.where(feasible, nonneg_qp_residual(a, b, cand.clamp_min(0)),
                              torch.full_like(best_res, float("inf")))
            better = res < best_res
            best = torch.where(better[:, None], cand, best)
            best_res = torch.where(better, res, best_res)
            cand = torch.where(torch.isfinite(cand), cand, best)
            if may_stop_early(best_res <= tol):
                return best.clamp_min(0)
        if done >= max_iter:
            return best.clamp_min(0)
        for _ in range(min(chunk, max_iter - done)):
            grad = torch.einsum("btu,bu->bt", a, y) + b
            x_next = (y - step[:, None] * grad).clamp_min(0)
            t_next = (1 + torch.sqrt(1 + 4 * t_k * t_k)) / 2
            uphill = (grad * (x_next - x)).sum(-1) > 0  # adaptive restart
            momentum = torch.where(uphill, torch.zeros_like(t_k), (t_k - 1) / t_next)
            t_next = torch.where(uphill, torch.ones_like(t_next), t_next)
            y = x_next + momentum[:, None] * (x_next - x)
            x, t_k = x_next, t_next
        done += min(chunk, max_iter - done)


def nonneg_qp_active_set(a: torch.Tensor, b: torch.Tensor, *, max_steps: int | None = None) -> torch.Tensor:
    """The same QP, min 1/2 x^T A x + b^T x, x >= 0 (``a [B, T, T]`` symmetric positive
    definite, ``b [B, T]``, float64), by the primal active-set method of Lawson and Hanson:
    exact in finitely many steps (each adds the free coordinate of most negative gradient to
    the passive set, solves the system on it, and steps back to the boundary where a passive
    coordinate would turn negative). ``max_steps`` (default 3 T + 10) bounds the steps; on
    the CPU it stops once every problem is solved. Returns ``x [B, T]``."""
    num_b, num_t = b.shape
    if num_b == 0:
        return b.clone()
    max_steps = 3 * num_t + 10 if max_steps is None else max_steps
    eye = torch.eye(num_t, dtype=a.dtype, device=a.device)
    x = torch.zeros_like(b)
    passive = torch.zeros_like(b, dtype=torch.bool)
    inner = torch.zeros(num_b, dtype=torch.bool, device=b.device)
    done = torch.zeros(num_b, dtype=torch.bool, device=b.device)
    size = b.abs().amax(-1) + a.abs().flatten(1).amax(-1)
    for _ in range(max_steps):
        grad = torch.einsum("btu,bu->bt", a, x) + b
        thresh = 1e-12 * (size * x.abs().amax(-1).clamp_min(1.0))
        enter = ~passive & (-grad > thresh[:, None])
        can_enter = enter.any(-1)
        done = done | (~inner & ~can_enter)
        add = ~inner & ~done
        pick = torch.where(enter, -grad, torch.full_like(grad, -float("inf"))).argmax(-1)
        passive = passive | (add[:, None] & (torch.arange(num_t, device=b.device) == pick[:, None]))
        pair = passive[:, :, None] & passive[:, None, :]
        z = solve_systems(torch.where(pair, a, eye), torch.where(passive, -b, torch.zeros_like(b))[..., None])[..., 0]
        z = torch.where(passive & torch.isfinite(z), z, torch.zeros_like(z))
        full = ((z > 0) | ~passive).all(-1)
        blocking = passive & (z <= 0)
        ratio = torch.where(blocking, x / torch.where(blocking, x - z, 1.0), torch.full_like(x, float("inf")))
        alpha = ratio.amin(-1).clamp(0.0, 1.0)
        first = ratio.argmin(-1)
        partial = x + alpha[:, None] * (z - x)
        drop = passive & ((partial <= 0) | (torch.arange(num_t, device=b.device) == first[:, None]))
        active = ~done
        x = torch.where((active & full)[:, None], z, torch.where((active & ~full)[:, None],
                                                               torch.where(drop, 0.0, partial), x))
        passive = torch.where((active & ~full)[:, None], passive & ~drop, passive)
        inner = active & ~full
        if may_stop_early(done):
            break
    return x.clamp_min(0)


#: The step sizes a damped Newton step tries, largest first.
_STEP_LADDER = tuple(0.5 ** k for k in range(0, 31))


def damped_newton(objective: Callable[[torch.Tensor], torch.Tensor],
                  grad_hess: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                  x0: torch.Tensor, *, max_iter: int, tol: float) -> torch.Tensor:
    """Minimise a strictly convex ``objective`` (``[B, K, T] -> [B, K]``, +inf outside x > 0) from
    ``x0 > 0`` by Newton steps with a batched Armijo line search.

    ``grad_hess(x)`` returns the gradient ``[B, T]`` and Hessian ``[B, T, T]``. A problem whose Newton
    decrement^2 / 2 is below ``tol``, or whose iterate no longer moves (rounding), is done: its
    iterate stays as it is from then on, so every problem's result is the one it would get
    alone, whatever the other problems of the batch (a non-finite one never converges). The
    loop stops (on the CPU) once every problem is done; else after ``max_iter``.
    """
    x = x0
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    # _STEP_LADDER built on the device (no host-to-device copy); powers of two are exact
    ladder = torch.pow(0.5, torch.arange(len(_STEP_LADDER), dtype=x.dtype, device=x.device))  # [K]
    num_b, num_t = x.shape
    for _ in range(max_iter):
        grad, hess = grad_hess(x)
        step = -solve_systems(hess, grad.unsqueeze(-1)).squeeze(-1)
        step = torch.where(torch.isfinite(step), step, torch.zeros_like(step))
        decrement = -(grad * step).sum(-1)  # lambda^2 >= 0
        # Fraction to the boundary: keep every coordinate above 1% of its current value.
        shrink = torch.where(step < 0, -0.99 * x / torch.where(step < 0, step, -1.0),
                             torch.full_like(x, float("inf"))).amin(-1).clamp_max(1.0)  # [B]
        trial_t = shrink[:, None] * ladder[None, :]  # [B, K]
        trials = x[:, None, :] + trial_t[..., None] * step[:, None, :]  # [B, K, T]
        f_trials = objective(trials)
        f_now = objective(x[:, None, :])[:, 0]
        armijo = f_trials <= f_now[:, None] - 1e-4 * trial_t * decrement[:, None]
        armijo = armijo & torch.isfinite(f_trials)
        # The largest accepted step (the ladder is decreasing); none accepted: stay.
        first = torch.where(armijo.any(-1), armijo.to(torch.int8).argmax(-1),
                            torch.full((num_b,), -1, dtype=torch.int64, device=x.device))
        chosen = trials.gather(1, first.clamp_min(0)[:, None, None].expand(-1, 1, num_t)).squeeze(1)
        x_next = torch.where((first >= 0)[:, None], chosen, x)
        # Converged: the decrement is below tol, or rounding stops the iterate from moving.
        stalled = ((x_next - x).abs() <= 4 * torch.finfo(x.dtype).eps * x.abs()).all(-1)
        x = torch.where(done[:, None], x, x_next)
        done = done | (decrement / 2 <= tol) | stalled
        if may_stop_early(done):
            break
    return x


#: Sweeps of :func:`jacobi_eigh`. Jacobi converges quadratically once the off-diagonal part is
#: small; 12 sweeps leave it at rounding level for the T of multi-task training (tested against
#: ``torch.linalg.eigh`` for T = 1..16, full rank and rank-deficient).
JACOBI_SWEEPS = 12


def jacobi_eigh(sym: torch.Tensor, sweeps: int = JACOBI_SWEEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of symmetric ``sym [B, T, T]`` (float64) by parallel Jacobi rotations,
    a fixed number of sweeps, no host read (``torch.linalg.eigh`` reads its error info on the
    host on CUDA). Returns ``(evals [B, T] ascending, evecs [B, T, T])`` like ``eigh``.

    A sweep is T' - 1 steps (T' = T rounded up to even; an odd T gets a zero row and column,
    whose rotations are the identity); each step rotates T'/2 disjoint pairs at once, the
    round-robin pairing i + j = r (mod T' - 1), index T' - 1 with the i where 2 i = r. A pair
    (p < q) gets theta = (a_qq - a_pp) / (2 a_pq), t = sign(theta) / (|theta| + sqrt(theta^2 + 1)),
    c = 1 / sqrt(1 + t^2), s = t c (Golub & Van Loan, Algorithms 8.5.2 and 8.5.3), and
    A <- J^T A J, V <- V J with the block rotation J. The pairing is built from ``arange`` on
    the device: no index tensor is copied from the host.
    """
    num_b, num_t, _ = sym.shape
    even = num_t + (num_t % 2)
    a = sym
    if even != num_t:
        a = torch.nn.functional.pad(sym, (0, 1, 0, 1))
    dev, dt = a.device, a.dtype
    v = torch.eye(even, dtype=dt, device=dev).expand(num_b, even, even)
    idx = torch.arange(even, device=dev)
    m = even - 1
    # The pairing of every step r, built once: partner[r, i]; index m pairs with the i where
    # 2 i = r (mod m), found as 2 i = r + m k for the k that makes it even.
    steps = torch.arange(m, device=dev)[:, None]
    partner = torch.remainder(steps - idx[None, :], m)
    partner = torch.where(partner == idx[None, :], torch.full_like(partner, m), partner)
    partner[:, m] = torch.remainder(torch.where(steps[:, 0] % 2 == 0, steps[:, 0], steps[:, 0] + m) // 2, m)
    pairs = (idx[None, None, :] == partner[:, :, None]).to(dt)  # [m, T', T'], one partner per row
    lower = idx[None, :] < partner  # [m, T']: i is the p of its pair (p < q)
    for _ in range(sweeps if num_t > 1 else 0):
        for r in range(m):
            pair_f, is_p = pairs[r], lower[r]
            diag = a.diagonal(dim1=-2, dim2=-1)
            off = (a * pair_f).sum(-1)  # a[i, partner(i)]
            across = diag @ pair_f.T  # a[partner(i), partner(i)]
            diff = torch.where(is_p, across - diag, diag - across)  # a_qq - a_pp
            nonzero = off != 0
            theta = diff / (2 * torch.where(nonzero, off, torch.ones_like(off)))
            sign = torch.where(theta >= 0, 1.0, -1.0).to(dt)
            t = sign / (theta.abs() + torch.sqrt(theta * theta + 1))  # theta = inf: t = 0
            t = torch.where(nonzero & torch.isfinite(t), t, torch.zeros_like(t))
            c = torch.rsqrt(1 + t * t)
            s = torch.where(is_p, t * c, -t * c)  # J[p, q] = s, J[q, p] = -s
            rot = torch.diag_embed(c) + pair_f * s[:, :, None]
            a = rot.transpose(-1, -2) @ a @ rot
            a = 0.5 * (a + a.transpose(-1, -2))  # p and q must see the same a_pq: J stays orthogonal
            v = v @ rot
    evals = a.diagonal(dim1=-2, dim2=-1)[:, :num_t]
    v = v[:, :num_t, :num_t]
    order = evals.argsort(-1)
    return evals.gather(-1, order), v.gather(-1, order[:, None, :].expand(-1, num_t, -1))
