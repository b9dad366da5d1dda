"""ConFIG (Liu et al. 2024, "ConFIG: Towards Conflict-free Training of Physics Informed
Neural Networks", Eq. 2), in Gram terms.

With unit gradients u_t = g_t / |g_t| (zero gradients give zero rows), the direction is
b = U^+ p = U^T (U U^T)^+ p for the preference vector p (default all ones), its unit vector
e = b / |b|, and the update (sum_t g_t . e) e. Every quantity comes from the Gram: the unit
Gram is G_tu / (|g_t| |g_u|), and the weights on the raw gradients are
(sum_t g_t . e) c_t / (|g_t| |b|) with c = (U U^T)^+ p.
"""

from __future__ import annotations

import torch

from .task_vectors import task_vector
from .options import AtLeast, Option
from .registry import register
from .spectral import RCOND, pinv_psd

__all__ = ["config_weights"]


def config_weights(gram: torch.Tensor, *, pref_vector=None, rcond: float = RCOND) -> torch.Tensor:
    """ConFIG weights: ``[S, T, T]`` f64 -> ``[S, T]`` f64 (torchjd's scale)."""
    pref = task_vector(pref_vector, "pref_vector", "config", gram, 1.0)
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    nonzero = norms > 0
    inv_norm = torch.where(nonzero, 1.0 / torch.where(nonzero, norms, 1.0), torch.zeros_like(norms))
    unit_gram = gram * inv_norm[:, :, None] * inv_norm[:, None, :]
    coef = torch.einsum("stu,su->st", pinv_psd(unit_gram, rcond), pref)  # b = U^T coef
    b_norm = torch.einsum("st,stu,su->s", coef, unit_gram, coef).clamp_min(0).sqrt()
    raw = coef * inv_norm / b_norm.clamp_min(1e-12)[:, None]  # e = sum_t raw_t g_t
    length = torch.einsum("stu,su->s", gram, raw)  # sum_t g_t . e
    return length[:, None] * raw


register("config", config_weights, options={"pref_vector": Option(None, per_task=True),
                                             "rcond": Option(RCOND, AtLeast(0.0))})
