"""PCD, Priority-Constrained Descent (torchjd 0.18's ``PCD``; "Not All Objectives Are Born
Equal", TMLR 2026), stateful per segment.

Task 0 is the primary objective. Options: ``tau`` (a number or T - 1 values in [0, 1]; None
means torchjd's default 0.02), ``beta``, ``eps``. With the gradients normalised by the inverse square root of a
debiased EMA (decay ``beta``) of their squared norms, PCD solves

    min_d 1/2 |d - g_0|^2   s.t.   g_j . d >= tau_j |g_j|^2   (j >= 1)

whose solution is d = g_0 + sum_j mu_j g_j with mu >= 0 the minimiser of the non-negative
QP 1/2 mu^T G_s mu - mu^T b, b_j = tau_j G_jj - G_j0 (G_s: the secondary block). We solve it
with :func:`.batched_solvers.nonneg_qp` on G_s + ridge I (the ridge, 1e-12 of the largest
diagonal, picks one mu among equivalent ones when secondary gradients are dependent; d does
not change); torchjd uses the dual active-set method of Goldfarb and Idnani. If d violates a
constraint by more than 1e-6 of its scale the constraints are infeasible and the weights are
[1, 0, ..., 0]. The direction is then rescaled to the norm of g_0 (zero if it vanishes to
rounding, or if g_0 = 0). The EMA is a ``[S, T]`` tensor in the :class:`~.state.MethodState`;
non-finite segments get NaN weights and leave it untouched.
"""

from __future__ import annotations

import torch

from .batched_solvers import may_stop_early, nonneg_qp, nonneg_qp_active_set, nonneg_qp_residual
from .options import AtLeast, Between, Option
from .task_vectors import device_constant
from .registry import register
from .state import MethodState

__all__ = ["pcd_weights", "QP_TOL"]

#: The KKT residual of the inner QP below which the iterative solution is kept (the
#: default tolerance of :func:`.batched_solvers.nonneg_qp`).
QP_TOL = 1e-12


def _taus(tau, num_tasks: int, like: torch.Tensor) -> torch.Tensor:
    vec = torch.as_tensor(tau, dtype=torch.float64)
    if vec.dim() == 0:
        vec = vec.expand(num_tasks - 1)
    if vec.shape != (num_tasks - 1,):
        raise ValueError(f"pcd option tau must be a number or T - 1 = {num_tasks - 1} values; got shape {tuple(vec.shape)}")
    if not bool(((vec >= 0) & (vec <= 1)).all()):  # the option's host value: no device read
        raise ValueError(f"pcd option tau must lie in [0, 1]; got {tau}")
    on_device = device_constant(tau, torch.float64, like.device)  # copied once, then cached
    return on_device.expand(num_tasks - 1) if on_device.dim() == 0 else on_device


def pcd_weights(gram: torch.Tensor, *, state: MethodState, tau=None, beta: float = 0.999,
                eps: float = 1e-8, max_iter: int = 400) -> torch.Tensor:
    """PCD weights: ``[S, T, T]`` f64 -> ``[S, T]`` f64 (torchjd's scale)."""
    if not 0 <= beta < 1 or not eps >= 0:
        raise ValueError(f"pcd needs 0 <= beta < 1 and eps >= 0; got beta={beta}, eps={eps}")
    num_seg, num_tasks, _ = gram.shape
    finite = torch.isfinite(gram).flatten(1).all(-1)
    safe = torch.where(finite[:, None, None], gram, torch.zeros_like(gram))
    sq_norms = safe.diagonal(dim1=-2, dim2=-1)
    ema = state.get("pcd.sq_norm_ema", (num_seg, num_tasks), gram, lambda: torch.zeros(num_seg, num_tasks))
    count = state.get("pcd.steps", (num_seg,), gram, lambda: torch.zeros(num_seg))
    ema = torch.where(finite[:, None], beta * ema + (1 - beta) * sq_norms, ema)
    count = torch.where(finite, count + 1, count)
    state.set("pcd.sq_norm_ema", ema)
    state.set("pcd.steps", count)
    debiased = ema / (1 - beta ** count.clamp_min(1))[:, None]
    denom = (debiased + eps).sqrt()
    scales = torch.where(denom > 0, 1.0 / torch.where(denom > 0, denom, 1.0), torch.zeros_like(denom))
    weights = torch.zeros(num_seg, num_tasks, dtype=gram.dtype, device=gram.device)
    if num_tasks == 1:
        weights[:, 0] = 1.0
    else:
        ng = safe * scales[:, :, None] * scales[:, None, :]
        taus = _taus(0.02 if tau is None else tau, num_tasks, gram)
        gs = ng[:, 1:, 1:]
        b = taus * gs.diagonal(dim1=-2, dim2=-1) - ng[:, 1:, 0]
        top = ng.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(torch.finfo(gram.dtype).tiny)
        eye = torch.eye(num_tasks - 1, dtype=gram.dtype, device=gram.device)
        qp = gs + (1e-12 * top)[:, None, None] * eye
        mu = nonneg_qp(qp, -b, max_iter=max_iter)
        # where the iterations stopped short (an ill-conditioned secondary block), the exact
        # active-set solution
        residual = nonneg_qp_residual(qp, -b, mu)
        if not may_stop_early(residual <= QP_TOL):
            exact = nonneg_qp_active_set(qp, -b)
            better = (residual > QP_TOL) & (nonneg_qp_residual(qp, -b, exact) < residual)
            mu = torch.where(better[:, None], exact, mu)
        w = torch.cat([torch.ones_like(mu[:, :1]), mu], dim=-1)
        # infeasible constraints: d misses one by more than rounding
        slack = torch.einsum("sjt,st->sj", ng[:, 1:, :], w) - taus * gs.diagonal(dim1=-2, dim2=-1)
        feasible = (slack >= -1e-6 * top[:, None]).all(-1)
        w = torch.where(feasible[:, None], w, torch.eye(num_tasks, dtype=gram.dtype, device=gram.device)[0])
        dir_sq = torch.einsum("st,stu,su->s", w, ng, w)
        magnitude = ((w.abs() * ng.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()).sum(-1)) ** 2
        precision = 10.0 * torch.finfo(torch.float64).eps
        keep = (dir_sq > precision * magnitude) & (sq_norms[:, 0] > 0)
        rescale = (sq_norms[:, 0] / torch.where(keep, dir_sq, 1.0)).sqrt()
        weights = torch.where(keep[:, None], w * scales * rescale[:, None], weights)
    return torch.where(finite[:, None], weights, torch.full_like(weights, float("nan")))


register("pcd", pcd_weights, kind="stateful",
         options={"tau": Option(None, Between(0.0, 1.0), per_task=True, per_task_offset=1),
                  "beta": Option(0.999, Between(0.0, 1.0, open_high=True)), "eps": Option(1e-8, AtLeast(0.0)),
                  "max_iter": Option(400, AtLeast(1))})
