"""Krum and Multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent"), from the Gram.

Pairwise distances |g_i - g_j| = sqrt(G_ii + G_jj - 2 G_ij). Each task scores the sum of its
T - f - 2 smallest distances to the others (f = ``n_byzantine``); the ``n_selected`` tasks of
lowest score get weight 1 / n_selected each. Ties go to the lower task index. Needs
T >= f + 3 and T >= n_selected.
"""

from __future__ import annotations

import torch

from .options import AtLeast, Option
from .registry import register

__all__ = ["krum_weights"]


def krum_weights(gram: torch.Tensor, *, n_byzantine: int = 0, n_selected: int = 1) -> torch.Tensor:
    """(Multi-)Krum weights: ``[S, T, T]`` f64 -> ``[S, T]`` f64."""
    num_seg, num_tasks, _ = gram.shape
    if n_byzantine < 0 or n_selected < 1:
        raise ValueError(f"krum needs n_byzantine >= 0 and n_selected >= 1; got {n_byzantine}, {n_selected}")
    if num_tasks < n_byzantine + 3 or num_tasks < n_selected:
        raise ValueError(
            f"krum with n_byzantine = {n_byzantine}, n_selected = {n_selected} needs at least "
            f"{max(n_byzantine + 3, n_selected)} tasks; got T = {num_tasks}"
        )
    sq = gram.diagonal(dim1=-2, dim2=-1)
    dist = (sq[:, :, None] + sq[:, None, :] - 2 * gram).clamp_min(0).sqrt()
    eye = torch.eye(num_tasks, dtype=torch.bool, device=gram.device)
    dist = torch.where(eye, torch.zeros_like(dist), dist)  # exactly zero to itself
    closest = dist.sort(-1).values[:, :, 1:num_tasks - n_byzantine - 1]  # drop self
    scores = closest.sum(-1)  # [S, T]
    order = torch.sort(scores, dim=-1, stable=True).indices[:, :n_selected]
    weights = torch.zeros_like(scores)
    return weights.scatter(1, order, 1.0 / n_selected)


def krum_min_tasks(options) -> int:
    """The fewest tasks Krum takes: n_byzantine + 3, and at least n_selected."""
    return max(int(options["n_byzantine"]) + 3, int(options["n_selected"]))


register("krum", krum_weights, options={"n_byzantine": Option(0, AtLeast(0)), "n_selected": Option(1, AtLeast(1))},
         min_tasks=krum_min_tasks, tasks_doc="T >= max(n_byzantine + 3, n_selected)")
