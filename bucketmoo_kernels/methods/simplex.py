"""Shared pieces of the simplex-constrained solvers (MGDA, CAGrad), batched over segments.

All functions take float64 ``[S, T, T]`` Gram matrices. The numerical constants here are
the contract every backend follows (the Triton, CPU and CUDA solvers use the same ones),
so that they all pick the same solution, also in degenerate cases.
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "RIDGE_REL",
    "RIDGE_ABS",
    "TIE_REL",
    "FEASIBLE_TOL",
    "MAX_EXACT_TASKS",
    "MAX_NATIVE_TASKS",
    "ridge",
    "subset_masks",
    "pick_candidate",
    "project_to_simplex",
]

#: Ridge added to the diagonal before a solve: RIDGE_REL * mean(diag M) + RIDGE_ABS (all solver
#: math is float64, so the absolute floor can be tiny and never biases small Grams). It only
#: removes exact singularity (identical or colinear gradients, segments shorter than T); its
#: effect on the objective is at most that amount.
RIDGE_REL = 1e-9
RIDGE_ABS = 1e-200
#: Candidates whose objective is within TIE_REL * max(diag M) of the best are ties; among
#: ties the one with the most tasks in its support wins (then the lowest subset bitmask).
TIE_REL = 1e-10
#: A candidate weight may be this far below zero (relative) and still count as feasible.
FEASIBLE_TOL = 1e-9
#: The exact (active-set enumeration) solvers handle up to this many tasks: 2**T - 1 systems.
MAX_EXACT_TASKS = 8
#: The native solvers' limit for the iterative MGDA solver, PCGrad and mean (fixed-size
#: arrays, kMaxTasks in csrc/common/bucketmoo_solvers.h); above it the torch function runs.
MAX_NATIVE_TASKS = 32


def ridge(gram: torch.Tensor) -> torch.Tensor:
    """``[S]`` ridge for each segment's Gram matrix."""
    return RIDGE_REL * gram.diagonal(dim1=-2, dim2=-1).mean(-1) + RIDGE_ABS


@functools.lru_cache(maxsize=None)
def _subset_masks_cpu(num_tasks: int) -> torch.Tensor:
    codes = torch.arange(1, 2**num_tasks, dtype=torch.int64)
    bits = torch.arange(num_tasks, dtype=torch.int64)
    return ((codes[:, None] >> bits[None, :]) & 1).bool()


def subset_masks(num_tasks: int, device: torch.device | str) -> torch.Tensor:
    """``[2**T - 1, T]`` bool: row k is the subset with bitmask k + 1 (task t is bit t). Copied
    to ``device`` once and cached (no host-to-device copy in later calls, e.g. inside a CUDA
    graph); shared: do not modify it in place."""
    return _subset_masks_on(num_tasks, str(device))


@functools.lru_cache(maxsize=64)
def _subset_masks_on(num_tasks: int, device: str) -> torch.Tensor:
    return _subset_masks_cpu(num_tasks).to(device)


def pick_candidate(weights: torch.Tensor, objective: torch.Tensor, masks: torch.Tensor,
                   gram: torch.Tensor) -> torch.Tensor:
    """Choose, per segment, the best feasible candidate.

    Args:
        weights: ``[S, K, T]`` candidate weights (one per subset), already summing to 1.
        objective: ``[S, K]`` objective of each candidate.
        masks: ``[K, T]`` subsets.
        gram: ``[S, T, T]`` Gram matrices (for the tie scale).
    Returns:
        ``[S, T]`` weights, clamped at zero and renormalised.
    """
    feasible = torch.isfinite(weights).all(-1) & (weights >= -FEASIBLE_TOL).all(-1)
    objective = torch.where(feasible & torch.isfinite(objective), objective,
                            torch.full_like(objective, float("inf")))
    best = objective.min(dim=1, keepdim=True).values
    scale = gram.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True).clamp_min(0)
    ties = objective <= best + TIE_REL * scale
    size = masks.sum(-1).to(weights.dtype)
    # Most tasks first, then lowest bitmask: score = size * K - index.
    num_k = masks.shape[0]
    index = torch.arange(num_k, device=weights.device, dtype=weights.dtype)
    score = torch.where(ties, size * num_k - index, torch.full_like(objective, -1.0))
    choice = score.argmax(dim=1)
    chosen = weights.gather(1, choice[:, None, None].expand(-1, 1, weights.shape[-1])).squeeze(1)
    chosen = chosen.clamp_min(0)
    return chosen / chosen.sum(-1, keepdim=True)


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``v [S, T]`` onto the probability simplex.

    The sort-based algorithm of Held, Wolfe & Crowder (1974) / Duchi et al. (2008).
    """
    num_tasks = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    k = torch.arange(1, num_tasks + 1, device=v.device, dtype=v.dtype)
    cond = u - css / k > 0
    rho = cond.to(v.dtype).cumsum(-1).argmax(-1, keepdim=True)  # last index where cond holds
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0)
