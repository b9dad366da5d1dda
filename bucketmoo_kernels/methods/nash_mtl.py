"""Nash-MTL (Navon et al. 2022, "Multi-Task Learning as a Bargaining Game"), the weights of
its Algorithm 1 solved to convergence.

The Nash bargaining solution is the a > 0 with G a = 1 / a (element-wise), G the Gram divided
by its Frobenius norm (as in the official code and torchjd). It is the minimiser of the
strictly convex, self-concordant 1/2 a^T G a - sum_t log a_t, which we find by damped Newton
(:func:`.batched_solvers.damped_newton`, stopping at a Newton decrement^2 / 2 below ``tol``
or after ``max_iter`` steps). The official code and torchjd instead run up to 20 convex-
concave steps through cvxpy/ECOS and stop once |G a - 1/a| < 1e-3; the exact solution is the
fixed point both approach. Then, as there, if |J^T a| > ``max_norm`` > 0 the weights are
scaled down to that norm.

Degenerate input: a ridge (:data:`.simplex.RIDGE_REL` of the mean diagonal) keeps the
solution finite when the gradients have a positive null combination (e.g. g_2 = -g_1);
tasks with a zero gradient get weight 0 (their a would be infinite); a zero Gram gives zero
weights. torchjd's stateful options (warm start across calls, ``update_weights_every``) are
not needed: the solution does not depend on the starting point.
"""

from __future__ import annotations

import torch

from .batched_solvers import damped_newton
from .task_vectors import zero_gradient_tasks
from .options import AtLeast, Option
from .registry import register
from .simplex import RIDGE_ABS, RIDGE_REL

__all__ = ["nash_mtl_weights", "positive_fixed_point"]


def positive_fixed_point(gram: torch.Tensor, power: float, *, max_iter: int, tol: float) -> torch.Tensor:
    """The x > 0 with Gn x = x^-power, Gn = gram / |gram|_F + ridge, per segment; zero-gradient
    tasks and zero Grams get 0. Returns ``(x [S, T], fro [S])``."""
    num_seg, num_tasks, _ = gram.shape
    fro = gram.flatten(1).norm(dim=-1)
    zero_task = zero_gradient_tasks(gram) | (fro == 0)[:, None]
    eye = torch.eye(num_tasks, dtype=gram.dtype, device=gram.device)
    normed = gram / torch.where(fro > 0, fro, 1.0)[:, None, None]
    ridge = RIDGE_REL * normed.diagonal(dim1=-2, dim2=-1).mean(-1) + RIDGE_ABS
    normed = normed + ridge[:, None, None] * eye
    # Zero tasks become decoupled unit rows: their coordinate converges to 1, then is zeroed.
    pair = zero_task[:, :, None] | zero_task[:, None, :]
    normed = torch.where(pair, eye, normed)

    if power == 1.0:
        def barrier(x):
            return torch.log(x).sum(-1)
    else:
        def barrier(x):
            return (x.pow(1.0 - power) / (1.0 - power)).sum(-1)

    def objective(x):
        quad = 0.5 * torch.einsum("skt,stu,sku->sk", x, normed, x)
        value = quad - barrier(x.clamp_min(torch.finfo(x.dtype).tiny))
        return torch.where((x > 0).all(-1), value, torch.full_like(value, float("inf")))

    def grad_hess(x):
        grad = torch.einsum("stu,su->st", normed, x) - x.pow(-power)
        hess = normed + torch.diag_embed(power * x.pow(-power - 1.0))
        return grad, hess

    x0 = normed.diagonal(dim1=-2, dim2=-1).pow(-1.0 / (1.0 + power))
    x = damped_newton(objective, grad_hess, x0, max_iter=max_iter, tol=tol)
    return torch.where(zero_task, torch.zeros_like(x), x), fro


def nash_mtl_weights(gram: torch.Tensor, *, max_norm: float = 1.0, max_iter: int = 100,
                     tol: float = 1e-20) -> torch.Tensor:
    """Nash-MTL weights: ``[S, T, T]`` f64 -> ``[S, T]`` f64 (torchjd's scale)."""
    if max_norm < 0:
        raise ValueError(f"nash_mtl max_norm must be >= 0; got {max_norm}")
    alpha, _ = positive_fixed_point(gram, 1.0, max_iter=max_iter, tol=tol)
    if max_norm > 0:
        norm = torch.einsum("st,stu,su->s", alpha, gram, alpha).clamp_min(0).sqrt()
        clip = norm > max_norm
        alpha = torch.where(clip[:, None], alpha * (max_norm / torch.where(clip, norm, 1.0))[:, None], alpha)
    return alpha


register("nash_mtl", nash_mtl_weights, options={"max_norm": Option(1.0, AtLeast(0.0)),
                                                 "max_iter": Option(100, AtLeast(1)),
                                                 "tol": Option(1e-20, AtLeast(0.0))})
