"""PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning"), as weights.

For every task i, in a random order of the other tasks j: if g_i^PC . g_j < 0, project
g_i^PC onto the normal plane of g_j: g_i^PC -= (g_i^PC . g_j / |g_j|^2) g_j. The paper's
update is the sum of the projected gradients; we return their mean (so that without
conflicts PCGrad equals ``mean``), and the public API rescales to sum one by default.

Each projected gradient stays a combination of the task gradients, so we track its
coefficients c_i in R^T; every dot product comes from the Gram matrix:
g_i^PC . g_j = (c_i^T M)_j. The weights are mean_i c_i.

The random orders come from ``seed`` through a CPU ``torch.Generator``: the same seed
gives the same orders on every call, device and rank (pass a per-step seed to vary them).
"""

from __future__ import annotations

import functools

import torch

from ..tracing import assume_constant_result
from .options import seed_option
from .registry import register
from .simplex import MAX_NATIVE_TASKS

__all__ = ["pcgrad_weights", "pcgrad_orders", "pcgrad_order_lists", "pcgrad_orders_on"]


def pcgrad_orders(num_tasks: int, seed: int) -> torch.Tensor:
    """``[T, T-1]`` int64: row i is the order in which task i meets the other tasks."""
    gen = torch.Generator().manual_seed(int(seed))
    rows = []
    for i in range(num_tasks):
        others = torch.tensor([j for j in range(num_tasks) if j != i], dtype=torch.int64)
        rows.append(others[torch.randperm(num_tasks - 1, generator=gen)])
    return torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.int64)


@assume_constant_result
def pcgrad_order_lists(num_tasks: int, seed: int) -> tuple[tuple[int, ...], ...]:
    """:func:`pcgrad_orders` as nested tuples; under ``torch.compile`` it runs at trace time
    and the orders become constants of the graph (its generator cannot be traced)."""
    return tuple(tuple(row) for row in pcgrad_orders(num_tasks, seed).tolist())


def pcgrad_orders_on(num_tasks: int, seed: int, device: str) -> torch.Tensor:
    """:func:`pcgrad_orders` as a ``[T, T-1]`` int64 tensor on ``device``, cached: repeated calls
    with the same seed copy nothing to the device (none inside a CUDA graph after the first).
    The cache is bounded because the DDP hook varies the seed every step. Under
    ``torch.compile`` the orders are a constant of the graph instead."""
    if torch.compiler.is_compiling():
        rows = pcgrad_order_lists(num_tasks, seed)
        return torch.tensor(rows, dtype=torch.int64, device=device).reshape(num_tasks, num_tasks - 1)
    return _pcgrad_orders_cached(num_tasks, seed, device)


@functools.lru_cache(maxsize=256)
def _pcgrad_orders_cached(num_tasks: int, seed: int, device: str) -> torch.Tensor:
    orders = pcgrad_orders(num_tasks, seed).contiguous()
    if num_tasks == 1:
        orders = orders.reshape(1, 0)
    return orders.to(device)


def pcgrad_weights(gram: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """PCGrad weights: ``[S, T, T]`` f64 -> ``[S, T]`` f64 (mean of projected gradients)."""
    num_seg, num_tasks, _ = gram.shape
    orders = pcgrad_order_lists(num_tasks, seed)
    sq_norm = gram.diagonal(dim1=-2, dim2=-1)  # [S, T]
    eye = torch.eye(num_tasks, dtype=gram.dtype, device=gram.device)
    total = torch.zeros(num_seg, num_tasks, dtype=gram.dtype, device=gram.device)
    for i in range(num_tasks):
        coef = eye[i].expand(num_seg, -1).clone()  # c_i, [S, T]
        for j in orders[i]:
            dot = torch.einsum("st,st->s", coef, gram[:, :, j])  # g_i^PC . g_j
            conflict = (dot < 0) & (sq_norm[:, j] > 0)
            scale = torch.where(conflict, dot / torch.where(conflict, sq_norm[:, j], 1.0), 0.0)
            coef[:, j] -= scale
        total += coef
    return total / num_tasks


register("pcgrad", pcgrad_weights, options={"seed": seed_option()}, native_code=2,
         native_max_tasks=MAX_NATIVE_TASKS, native_args=lambda num_tasks, options: {},
         native_orders=True, triton_max_tasks={None: None})


pcgrad_orders_on.cache_info = _pcgrad_orders_cached.cache_info  # type: ignore[attr-defined]
