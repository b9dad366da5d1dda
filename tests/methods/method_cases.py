"""Shared inputs of the method tests: task-gradient matrices and their Grams (float64)."""

from __future__ import annotations

import torch

KINDS = ("full_rank", "rank_deficient")


def task_matrix(num_tasks: int, kind: str, seed: int, dim: int = 40) -> torch.Tensor:
    """``[T, dim]`` float64 task gradients with conflicts: full rank, or of rank ~T/2."""
    gen = torch.Generator().manual_seed(1000 * num_tasks + seed)
    if kind == "full_rank":
        jac = torch.randn(num_tasks, dim, generator=gen, dtype=torch.float64)
    elif kind == "rank_deficient":
        rank = max(1, num_tasks // 2)
        jac = (torch.randn(num_tasks, rank, generator=gen, dtype=torch.float64)
               @ torch.randn(rank, dim, generator=gen, dtype=torch.float64))
    else:
        raise ValueError(kind)
    jac[1:] -= 0.5 * jac[0]  # make the first task conflict with the others
    return jac


def gram_of(jac: torch.Tensor) -> torch.Tensor:
    return (jac @ jac.T)[None]


def degenerate_matrices(num_tasks: int = 4, dim: int = 30) -> dict[str, torch.Tensor]:
    """Zero rows, identical rows, colinear rows (same and opposite directions), all zero."""
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(num_tasks, dim, generator=gen, dtype=torch.float64)
    zero_row = base.clone()
    zero_row[1] = 0
    identical = base[:1].repeat(num_tasks, 1)
    colinear = base.clone()
    colinear[2] = 3.0 * base[0]
    opposite = base.clone()
    opposite[1] = -2.0 * base[0]
    return {"zero_row": zero_row, "identical": identical, "colinear": colinear,
            "opposite": opposite, "all_zero": torch.zeros(num_tasks, dim, dtype=torch.float64)}
