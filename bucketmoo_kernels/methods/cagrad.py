"""CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning").

With g0 the average gradient and radius r = c |g0|, CAGrad solves

    w* = argmin_{w in simplex}  g_w . g0 + r |g_w|,        g_w = sum_t w_t g_t

and updates along d = g0 + (r / |g_w*|) g_w*, divided by (1 + c^2) (the official code's
default ``rescale=1``; ``rescale=2`` divides by 1 + c, ``rescale=0`` not at all). In Gram
terms, with a = M 1/T: minimise a^T w + r sqrt(w^T M w).

Exact solver (T <= 8, float64): on face A of the simplex a stationary point satisfies
a_A + r M_AA w / |g_w| = lambda 1. With x = M_AA^{-1} 1, y = M_AA^{-1} a_A and
D = (1^T y)^2 - (1^T x)(a_A^T y - r^2), it is w_A = (lambda x - y) / sqrt(D) with
lambda = (1^T y + sqrt(D)) / (1^T x), when D > 0. Vertices are always candidates. As for
MGDA, the feasible candidate of least objective is the optimum (the objective is convex
and the optimum lies in the relative interior of one face).
"""

from __future__ import annotations

import torch

from .registry import register_method
from .simplex import MAX_EXACT_TASKS, pick_candidate, ridge, subset_masks

__all__ = ["cagrad_weights"]


def _cagrad_inner(m: torch.Tensor, a: torch.Tensor, radius: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """argmin over the simplex of a^T w + radius sqrt(w^T m w), by face enumeration."""
    num_seg, num_tasks, _ = m.shape
    masks = subset_masks(num_tasks, m.device)  # [K, T]
    pair = masks[:, :, None] & masks[:, None, :]
    eye = torch.eye(num_tasks, dtype=m.dtype, device=m.device)
    systems = torch.where(pair, m[:, None], eye)  # [S, K, T, T]
    mask_f = masks.to(m.dtype)
    rhs = torch.stack([mask_f.expand(num_seg, -1, -1), mask_f * a[:, None, :]], dim=-1)  # [S,K,T,2]
    sol = torch.linalg.solve(systems, rhs)
    x, y = sol[..., 0] * mask_f, sol[..., 1] * mask_f
    sx, sy = x.sum(-1), y.sum(-1)
    ay = (a[:, None, :] * y).sum(-1)
    disc = sy * sy - sx * (ay - (radius * radius)[:, None])
    root = disc.clamp_min(0).sqrt()
    lam = (sy + root) / sx
    w = (lam[..., None] * x - y) / root[..., None]
    w = torch.where((disc > 0)[..., None], w, torch.full_like(w, float("nan")))
    single = masks.sum(-1) == 1
    w = torch.where(single[None, :, None], mask_f.expand(num_seg, -1, -1), w)
    quad = torch.einsum("skt,stu,sku->sk", w, m, w).clamp_min(0)
    objective = (a[:, None, :] * w).sum(-1) + radius[:, None] * quad.sqrt()
    return pick_candidate(w, objective, masks, gram)


def cagrad_weights(gram: torch.Tensor, *, c: float = 0.4, rescale: int = 1) -> torch.Tensor:
    """CAGrad weights: ``[S, T, T]`` f64 -> ``[S, T]`` f64 (paper scale; T <= 8)."""
    num_seg, num_tasks, _ = gram.shape
    if num_tasks > MAX_EXACT_TASKS:
        raise ValueError(
            f"cagrad supports at most {MAX_EXACT_TASKS} tasks (exact solver); got T = {num_tasks}"
        )
    if c < 0:
        raise ValueError(f"cagrad option c must be >= 0; got {c}")
    if rescale not in (0, 1, 2):
        raise ValueError(f"cagrad option rescale must be 0, 1 or 2; got {rescale}")
    eye = torch.eye(num_tasks, dtype=gram.dtype, device=gram.device)
    m = gram + ridge(gram)[:, None, None] * eye
    mean_w = torch.full((num_seg, num_tasks), 1.0 / num_tasks, dtype=gram.dtype, device=gram.device)
    a = torch.einsum("stu,su->st", m, mean_w)  # M g0 coefficients
    g0_norm = (a * mean_w).sum(-1).clamp_min(0).sqrt()
    radius = c * g0_norm
    w = _cagrad_inner(m, a, radius, gram) if num_tasks > 1 else torch.ones_like(mean_w)
    gw_norm = torch.einsum("st,stu,su->s", w, gram, w).clamp_min(0).sqrt()
    tiny = 1e-12 * gram.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(0).sqrt()
    lam = torch.where(gw_norm > tiny, radius / torch.where(gw_norm > tiny, gw_norm, 1.0), 0.0)
    weights = mean_w + lam[:, None] * w
    divisor = {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]
    return weights / divisor


def _cagrad_native_args(num_tasks: int, options) -> dict | None:
    """The native codes, or None for bad options (the torch function raises the error)."""
    c, rescale = float(options["c"]), options["rescale"]
    if not c >= 0 or rescale not in (0, 1, 2):
        return None
    return {"c": c, "rescale": int(rescale)}


register_method("cagrad", defaults={"c": 0.4, "rescale": 1}, max_tasks=MAX_EXACT_TASKS,
                native_code=3, native_max_tasks=MAX_EXACT_TASKS,
                native_args=_cagrad_native_args)(cagrad_weights)
