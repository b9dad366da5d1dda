"""Triton ``combine``: ``out[n] = sum_t w[s(n), t] * g_t[n]`` in one launch.

One program per block of ``BLOCK_N`` consecutive elements, whatever the segment layout, so
millions of tiny segments cost no more programs than one big one. Every block but the last
is full and starts at a multiple of ``BLOCK_N``: it loads and stores without a column mask
(``tl.multiple_of``), so the accesses vectorise whatever N is; only the last block is masked.
Both paths do the same arithmetic, so the bits do not depend on which path a block took. A small host table (cached
per segments object, device and block) gives each block the segment of its first element and
the number of binary-search steps needed to cover the segments it touches: zero for a block
inside one segment (the common case: the T weights are loaded once), else each element finds
its segment by a binary search over the offsets and gathers its weights.

Each program loads all T values of its columns before it stores, and no other program touches
those columns, so ``out`` may be the storage of one of the inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..inputs import Segments, TaskGrads
from .gram import row_offsets
from .tiles import block_table, next_pow2, offsets_table, on_device, row_addressing

__all__ = ["combine_triton", "combine_block"]


def combine_block(num_tasks: int) -> int:
    """Default elements per program: about 4096 loaded values (no register spills at 4 warps
    on sm_90 per ptxas), 256..1024 elements."""
    return max(256, min(1024, 4096 // max(2, next_pow2(num_tasks))))


@triton.jit
def _combine_block(x_ptr, row_off, row_ok, w_ptr, offsets_ptr, out_ptr, cols, col_ok, first_seg, last_seg,
                   steps, T: tl.constexpr, TP: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Combine the columns ``cols`` (``col_ok`` is used only when MASKED: the last block)."""
    t = tl.arange(0, TP)
    ptrs = x_ptr + row_off[:, None] + cols[None, :]
    if MASKED:
        x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    elif T == TP:
        x = tl.load(ptrs).to(tl.float32)
    else:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    if steps == 0:
        w_seg = tl.load(w_ptr + first_seg * T + t, mask=row_ok, other=0.0)  # [TP]
        y = tl.sum(x * w_seg[:, None], axis=0)
    else:
        # Segment of element n: the largest s in [first_seg, last_seg] with offsets[s] <= n
        # (an empty segment shares its offset with the next one and loses). Invariant:
        # offsets[lo] <= n and the answer is <= hi; mid stays in [lo, hi].
        lo = tl.zeros([BLOCK_N], dtype=tl.int64) + first_seg
        hi = tl.zeros([BLOCK_N], dtype=tl.int64) + last_seg
        for _ in range(steps):
            mid = (lo + hi + 1) // 2
            go = tl.load(offsets_ptr + mid, mask=col_ok, other=0) <= cols
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid - 1)
        w_elem = tl.load(w_ptr + lo[None, :] * T + t[:, None], mask=row_ok[:, None] & col_ok[None, :],
                         other=0.0)  # [TP, BLOCK_N]
        y = tl.sum(x * w_elem, axis=0)
    if MASKED:
        tl.store(out_ptr + cols, y.to(out_ptr.dtype.element_ty), mask=col_ok)
    else:
        tl.store(out_ptr + cols, y.to(out_ptr.dtype.element_ty))


@triton.jit
def _combine_kernel(x_ptr, stride_t, d0, d1, d2, d3, d4, d5, d6, d7, w_ptr, blocks_ptr, offsets_ptr,
                    out_ptr, N, T: tl.constexpr, TP: tl.constexpr, BLOCK_N: tl.constexpr,
                    USE_DELTAS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    first_seg = tl.load(blocks_ptr + pid * 3)
    last_seg = tl.load(blocks_ptr + pid * 3 + 1)
    steps = tl.load(blocks_ptr + pid * 3 + 2).to(tl.int32)

    t = tl.arange(0, TP)
    row_ok = t < T
    row_off = row_offsets(t, stride_t, d0, d1, d2, d3, d4, d5, d6, d7, USE_DELTAS)
    # The block start is a multiple of BLOCK_N (>= 16): aligned, and every block but the last
    # is full, so it loads and stores without a column mask (vectorisable whatever N is).
    cols = tl.multiple_of(pid * BLOCK_N, 16) + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if (pid + 1) * BLOCK_N <= N:
        _combine_block(x_ptr, row_off, row_ok, w_ptr, offsets_ptr, out_ptr, cols, col_ok, first_seg, last_seg,
                       steps, T, TP, BLOCK_N, False)
    else:
        _combine_block(x_ptr, row_off, row_ok, w_ptr, offsets_ptr, out_ptr, cols, col_ok, first_seg, last_seg,
                       steps, T, TP, BLOCK_N, True)


def _launch_combine(grads: TaskGrads, weights: torch.Tensor, segments: Segments, out: torch.Tensor,
                    block: int) -> None:
    num_tasks = grads.num_tasks
    if grads.numel == 0:  # nothing to write (and an empty tensor may have a null pointer)
        return
    blocks = block_table(segments, block, grads.device)
    rows = row_addressing(grads)
    with on_device(grads.device):
        _combine_kernel[(blocks.shape[0],)](
            rows.base, rows.stride, *rows.deltas, weights, blocks, offsets_table(segments, grads.device), out,
            grads.numel, T=num_tasks, TP=max(2, next_pow2(num_tasks)), BLOCK_N=block,
            USE_DELTAS=rows.use_deltas, num_warps=4)


def combine_triton(grads: TaskGrads, weights: torch.Tensor, segments: Segments, out: torch.Tensor, *,
                   block: int | None = None) -> torch.Tensor:
    """Combined gradient, one kernel launch, float32 accumulation.

    Args:
        grads: T gradients of length N, fp32 / bf16 / fp16.
        weights: ``[S, T]`` float32 on the gradients' device.
        segments: the S segments the weights refer to.
        out: ``[N]`` tensor in the gradients' dtype; may be the storage of one of the
            gradients (each block reads all T inputs before writing).
        block: elements per program (a power of two >= 16; None: :func:`combine_block`).
    Returns:
        ``out``.
    """
    block = combine_block(grads.num_tasks) if block is None else int(block)
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16; got {block}")
    if weights.dtype != torch.float32 or not weights.is_contiguous():
        weights = weights.to(torch.float32).contiguous()
    if out.numel() > 1 and out.stride(0) != 1:
        tmp = torch.empty(out.numel(), dtype=out.dtype, device=out.device)
        _launch_combine(grads, weights, segments, tmp, block)
        out.copy_(tmp)
        return out
    _launch_combine(grads, weights, segments, out, block)
    return out
