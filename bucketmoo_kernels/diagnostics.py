"""Cheap per-segment diagnostics, all computed from the Gram matrix and the weights.

Every function takes ``gram [S, T, T]`` (and ``weights [S, T]``) and returns a small
tensor on the same device, without a host sync.
"""

from __future__ import annotations

import torch

from .methods.mgda import mgda_weights

__all__ = ["task_cosine", "combined_sqnorm", "mean_sqnorm", "conflict_share", "min_norm_residual"]


def task_cosine(gram: torch.Tensor) -> torch.Tensor:
    """``[S, T, T]`` cosine similarity between task gradients (0 where a gradient is zero)."""
    norm = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    denom = norm[:, :, None] * norm[:, None, :]
    return torch.where(denom > 0, gram / torch.where(denom > 0, denom, 1.0), torch.zeros_like(gram))


def combined_sqnorm(gram: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[S]`` squared norm of the combined gradient, w^T M w."""
    return torch.einsum("st,stu,su->s", weights.to(gram.dtype), gram, weights.to(gram.dtype))


def mean_sqnorm(gram: torch.Tensor) -> torch.Tensor:
    """``[S]`` squared norm of the plain average gradient, 1^T M 1 / T^2."""
    return gram.sum((-1, -2)) / gram.shape[-1] ** 2


def conflict_share(gram: torch.Tensor) -> torch.Tensor:
    """``[S]`` share of task pairs whose gradients conflict (negative cosine)."""
    num_tasks = gram.shape[-1]
    if num_tasks < 2:
        return torch.zeros(gram.shape[0], device=gram.device)
    upper = torch.triu(torch.ones(num_tasks, num_tasks, dtype=torch.bool, device=gram.device), 1)
    return (gram[:, upper] < 0).float().mean(-1)


def min_norm_residual(gram: torch.Tensor) -> torch.Tensor:
    """``[S]`` norm of the min-norm point of the segment's gradients (0 = Pareto stationary)."""
    w = mgda_weights(gram.to(torch.float64))
    return combined_sqnorm(gram.to(torch.float64), w).clamp_min(0).sqrt().to(torch.float32)
