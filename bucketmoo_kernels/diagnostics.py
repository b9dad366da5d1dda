"""Cheap per-segment diagnostics, all computed from the Gram matrix and the weights.

Every function takes ``gram [S, T, T]`` (and ``weights [S, T]``) and returns a small
tensor on the same device, without a host sync; :func:`underflowed_tasks` also reads the
gradients (one pass).

The range of float32 Grams: the Gram is accumulated in float32, so a gradient's squared
entries must stay in float32's normal range. Entries below about 1e-19 in magnitude square to
below 1.2e-38 (subnormal, losing digits; zero below about 4e-23): a task whose gradient is
that small everywhere gets a zero Gram row, and every method then treats it as a zero
gradient (its own zero-gradient rule) without an error. :func:`underflowed_tasks` reports
such tasks. At the other end, squared norms above 3.4e38 overflow to Inf (the non-finite
policy: NaN weights for that segment).
"""

from __future__ import annotations

import torch

from .methods.mgda import mgda_weights

__all__ = ["task_cosine", "combined_sqnorm", "mean_sqnorm", "conflict_share", "min_norm_residual",
           "underflowed_tasks"]


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


def underflowed_tasks(gram: torch.Tensor, grads, segments=None) -> torch.Tensor:
    """``[S, T]`` bool: the tasks whose squared gradient norm in a segment is below float32's
    normal range (zero or subnormal in ``gram``) although their gradient there is not zero --
    float32 underflow, not a zero gradient. ``grads`` and ``segments`` as given to
    :func:`~bucketmoo_kernels.gram`."""
    from .inputs import as_segments, as_task_grads

    task_grads = as_task_grads(grads)
    segs = as_segments(segments, task_grads.numel)
    tiny = torch.finfo(torch.float32).tiny
    low = gram.diagonal(dim1=-2, dim2=-1) < tiny  # [S, T]
    offsets = segs.on(task_grads.device)
    nonzero = torch.stack([(row != 0).to(torch.int64).cumsum(0) for row in task_grads.rows])  # [T, N]
    nonzero = torch.cat([torch.zeros(task_grads.num_tasks, 1, dtype=torch.int64, device=nonzero.device),
                         nonzero], 1)
    counts = nonzero[:, offsets[1:]] - nonzero[:, offsets[:-1]]  # [T, S]
    return low.to(counts.device) & (counts.T > 0)
