"""IMTL-G (Liu et al. 2021, "Towards Impartial Multi-task Learning"), in the generalised form
of torchjd (Quinton & Rey 2024) that also handles linearly dependent gradients.

The combined direction has equal projections onto every task's unit gradient:
v = G^+ d with d_t = |g_t| = sqrt(G_tt), weights v / sum(v); zero weights when sum(v) is zero
(relative to sum |v|, so that the rule does not depend on the gradients' scale; torchjd uses
an absolute 1e-12). The pseudo-inverse uses the rank cut-off ``rcond`` of :mod:`.spectral`.
"""

from __future__ import annotations

import torch

from .options import AtLeast, Option
from .registry import register
from .spectral import RCOND, finite_segments, pinv_psd

__all__ = ["imtl_g_weights"]


def imtl_g_weights(gram: torch.Tensor, *, rcond: float = RCOND) -> torch.Tensor:
    """IMTL-G weights: ``[S, T, T]`` f64 -> ``[S, T]`` f64 (sum to 1, or all zero)."""
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    v = torch.einsum("stu,su->st", pinv_psd(gram, rcond), norms)
    total = v.sum(-1, keepdim=True)
    ok = total.abs() > 1e-12 * v.abs().sum(-1, keepdim=True)
    weights = torch.where(ok, v / torch.where(ok, total, 1.0), torch.zeros_like(v))
    return torch.where(finite_segments(gram)[:, None], weights, torch.full_like(weights, float("nan")))


register("imtl_g", imtl_g_weights, options={"rcond": Option(RCOND, AtLeast(0.0))})
