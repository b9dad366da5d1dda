"""Triton ``combine``: ``out[n] = sum_t w[s(n), t] * g_t[n]`` in one launch.

One program per tile of the (cached) tile table, so a program never straddles a segment and
loads its T weights once. Each block loads all T values of its columns before it stores, and
no other program touches those columns, so ``out`` may be the storage of one of the inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..inputs import Segments, TaskGrads
from .gram import _row_offsets
from .tiles import INTERPRET, TILE_COLS, next_pow2, on_device, row_addressing, tile_table

__all__ = ["combine_triton", "COMBINE_BLOCK", "COMBINE_CHUNK"]

COMBINE_BLOCK = 1024
COMBINE_CHUNK = 8192 if INTERPRET else 16384


@triton.jit
def _combine_kernel(x_ptr, stride_t, d0, d1, d2, d3, d4, d5, d6, d7, w_ptr, tiles_ptr, out_ptr,
                    T: tl.constexpr, TP: tl.constexpr, BLOCK_N: tl.constexpr, NCOLS: tl.constexpr,
                    USE_DELTAS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = tiles_ptr + pid * NCOLS
    seg = tl.load(row + 0)
    start = tl.load(row + 1)
    end = tl.load(row + 2)

    t = tl.arange(0, TP)
    row_ok = t < T
    row_off = _row_offsets(t, stride_t, d0, d1, d2, d3, d4, d5, d6, d7, USE_DELTAS)
    w = tl.load(w_ptr + seg * T + t, mask=row_ok, other=0.0).to(tl.float32)
    cols0 = tl.arange(0, BLOCK_N)
    length = (end - start).to(tl.int32)
    for i in range(0, length, BLOCK_N):
        cols = start + i + cols0
        col_ok = cols < end
        x = tl.load(x_ptr + row_off[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        y = tl.sum(x * w[:, None], axis=0)
        tl.store(out_ptr + cols, y.to(out_ptr.dtype.element_ty), mask=col_ok)


def _launch_combine(grads: TaskGrads, weights: torch.Tensor, segments: Segments, out: torch.Tensor,
                    chunk: int, block: int) -> None:
    num_tasks = grads.num_tasks
    if grads.numel == 0:  # nothing to write (and an empty tensor may have a null pointer)
        return
    tiles = tile_table(segments, chunk, grads.device)
    rows = row_addressing(grads)
    with on_device(grads.device):
        _combine_kernel[(tiles.num_tiles,)](
            rows.base, rows.stride, *rows.deltas, weights, tiles.table, out,
            T=num_tasks, TP=max(2, next_pow2(num_tasks)), BLOCK_N=block, NCOLS=TILE_COLS,
            USE_DELTAS=rows.use_deltas, num_warps=4)


def combine_triton(grads: TaskGrads, weights: torch.Tensor, segments: Segments, out: torch.Tensor, *,
                   chunk: int | None = None, block: int | None = None) -> torch.Tensor:
    """Combined gradient, one kernel launch, float32 accumulation.

    Args:
        grads: T gradients of length N, fp32 / bf16 / fp16.
        weights: ``[S, T]`` float32, contiguous, on the gradients' device.
        segments: the S segments the weights refer to.
        out: ``[N]`` unit-stride tensor in the gradients' dtype; may be the storage of one of
            the gradients (each block reads all T inputs before writing).
        chunk: elements per program; block: elements per inner step (power of two).
    Returns:
        ``out``.
    """
    chunk = COMBINE_CHUNK if chunk is None else int(chunk)
    block = COMBINE_BLOCK if block is None else int(block)
    if chunk <= 0:
        raise ValueError(f"chunk must be a positive number of elements; got {chunk}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16; got {block}")
    if weights.dtype != torch.float32 or not weights.is_contiguous():
        weights = weights.to(torch.float32).contiguous()
    if out.numel() > 1 and out.stride(0) != 1:
        tmp = torch.empty(out.numel(), dtype=out.dtype, device=out.device)
        _launch_combine(grads, weights, segments, tmp, chunk, block)
        out.copy_(tmp)
        return out
    _launch_combine(grads, weights, segments, out, chunk, block)
    return out
