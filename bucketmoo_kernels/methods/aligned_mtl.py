"""Aligned-MTL (Senushkin et al. 2023, "Independent Component Alignment for Multi-Task
Learning", Algorithm 1), in Gram terms as in torchjd.

With G = V diag(lambda) V^T restricted to its rank r (eigenvalues above ``rcond`` times the
largest), the balance transformation is B = sqrt(s) V diag(lambda^-1/2) V^T and the weights
are B p, with p the preference vector (default 1/T each) and s the ``scale_mode``: ``min``
(the smallest kept eigenvalue, default), ``median`` (torch.median's lower middle) or ``rmse``
(their mean, as in the original code). A zero Gram (rank 0) gives B = I.
"""

from __future__ import annotations

import torch

from .task_vectors import task_vector
from .options import AtLeast, OneOf, Option
from .registry import register
from .spectral import RCOND, eigh_with_rank, finite_segments

__all__ = ["aligned_mtl_weights", "SCALE_MODES"]

SCALE_MODES = ("min", "median", "rmse")


def aligned_mtl_weights(gram: torch.Tensor, *, pref_vector=None, scale_mode: str = "min",
                        rcond: float = RCOND) -> torch.Tensor:
    """Aligned-MTL weights: ``[S, T, T]`` f64 -> ``[S, T]`` f64."""
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"aligned_mtl scale_mode must be one of {', '.join(SCALE_MODES)}; got {scale_mode!r}")
    num_tasks = gram.shape[-1]
    pref = task_vector(pref_vector, "pref_vector", "aligned_mtl", gram, 1.0 / num_tasks)
    evals, evecs, keep = eigh_with_rank(gram, rcond)
    rank = keep.sum(-1)  # [S]
    kept = torch.where(keep, evals, torch.zeros_like(evals))
    if scale_mode == "min":
        scale = torch.where(keep, evals, torch.full_like(evals, float("inf"))).amin(-1)
    elif scale_mode == "rmse":
        scale = kept.sum(-1) / rank.clamp_min(1)
    else:  # the lower middle of the kept eigenvalues (what torch.median returns)
        ascending = torch.where(keep, evals, torch.full_like(evals, float("inf"))).sort(-1).values
        index = ((rank - 1).clamp_min(0) // 2)[:, None]
        scale = ascending.gather(-1, index).squeeze(-1)
    scale = torch.where(rank > 0, scale, torch.zeros_like(scale))
    inv_sqrt = torch.where(keep, kept.clamp_min(torch.finfo(gram.dtype).tiny).rsqrt(), torch.zeros_like(kept))
    balance = scale.sqrt()[:, None, None] * torch.einsum("sik,sk,sjk->sij", evecs, inv_sqrt, evecs)
    eye = torch.eye(num_tasks, dtype=gram.dtype, device=gram.device)
    balance = torch.where((rank > 0)[:, None, None], balance, eye)
    weights = torch.einsum("stu,su->st", balance, pref)
    return torch.where(finite_segments(gram)[:, None], weights, torch.full_like(weights, float("nan")))


register("aligned_mtl", aligned_mtl_weights, options={"pref_vector": Option(None, per_task=True),
                                                       "scale_mode": Option("min", OneOf(SCALE_MODES)),
                                                       "rcond": Option(RCOND, AtLeast(0.0))})
