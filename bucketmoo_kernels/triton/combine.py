"""Triton ``combine``: ``out[n] = sum_t w[s(n), t] * g_t[n]`` in one launch.

One program per block of ``BLOCK_N`` consecutive elements, whatever the segment layout, so
millions of tiny segments cost no more programs than one big one. Every block but the last
is full and starts at a multiple of ``BLOCK_N``: it loads and stores without a column mask
(``tl.multiple_of``), so the accesses vectorise whatever N is; only the last block is masked.
A small host table (cached per segments object, device and block) gives each block the
segment of its first element and the number of binary-search steps needed to cover the
segments it touches: zero for a block inside one segment (the common case: the T weights are
loaded once, as scalars), else each element finds its segment by a binary search over the
offsets and gathers its weights.

What is bit for bit: every element is ``w_0 g_0``, then one float32 ``fma(w_t, g_t, acc)``
per task in task order, rounded once to ``out``'s dtype. The task rows are loaded one at a
time and the sum is element-wise code, never a reduction over a tensor axis (whose order
Triton picks from the register layout, which changes with the block size and between the
two weight paths). So the bits do not depend on the block size, on the masked or unmasked
path, on the one-segment or binary-search path, nor on the segment layout beyond the weights
it selects; they are the bits of the CUDA backend's combine (the same fma chain), and the
interpreter's (it rounds ``tl.fma`` once). Tested in tests/triton_kernels/test_code_paths.py.

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
def _task_row(x_ptr, t: tl.constexpr, stride_t, d0, d1, d2, d3, d4, d5, d6, d7, cols, col_ok,
              USE_DELTAS: tl.constexpr, MASKED: tl.constexpr):
    """Columns ``cols`` of task row ``t``, as float32 (``[BLOCK_N]``)."""
    row = row_offsets(tl.full([1], t, tl.int32), stride_t, d0, d1, d2, d3, d4, d5, d6, d7, USE_DELTAS)
    if MASKED:
        x = tl.load(x_ptr + row + cols, mask=col_ok, other=0.0)
    else:
        x = tl.load(x_ptr + row + cols)
    return x.to(tl.float32)


@triton.jit
def _weighted_sum(x_ptr, stride_t, d0, d1, d2, d3, d4, d5, d6, d7, w_ptr, w_index, cols, col_ok,
                  T: tl.constexpr, USE_DELTAS: tl.constexpr, MASKED: tl.constexpr, GATHER: tl.constexpr):
    """``fma(w_{T-1}, g_{T-1}, ... fma(w_1, g_1, w_0 * g_0))`` in float32, task by task, the
    weights of task t at ``w_ptr + w_index + t`` (GATHER: ``w_index`` is per element, else one
    scalar for the block)."""
    x = _task_row(x_ptr, 0, stride_t, d0, d1, d2, d3, d4, d5, d6, d7, cols, col_ok, USE_DELTAS, MASKED)
    if GATHER:
        w = tl.load(w_ptr + w_index, mask=col_ok, other=0.0)
    else:
        w = tl.load(w_ptr + w_index)
    y = x * w
    for t in tl.static_range(1, T):
        x = _task_row(x_ptr, t, stride_t, d0, d1, d2, d3, d4, d5, d6, d7, cols, col_ok, USE_DELTAS, MASKED)
        if GATHER:
            w = tl.load(w_ptr + w_index + t, mask=col_ok, other=0.0)
        else:
            w = tl.load(w_ptr + w_index + t)
        y = tl.fma(w, x, y)
    return y


@triton.jit
def _combine_block(x_ptr, stride_t, d0, d1, d2, d3, d4, d5, d6, d7, w_ptr, offsets_ptr, out_ptr, cols, col_ok,
                   first_seg, last_seg, steps, T: tl.constexpr, BLOCK_N: tl.constexpr, USE_DELTAS: tl.constexpr,
                   MASKED: tl.constexpr):
    """Combine the columns ``cols`` (``col_ok`` is used only when MASKED: the last block).

    Every element is summed task by task with one float32 fma per task (:func:`_weighted_sum`):
    element-wise code with no reduction over a tensor axis, so the order and the roundings are
    the same whatever the block size, the register layout or which path a block takes, and the
    same as in csrc/cuda/combine.cu (``w_0 g_0``, then ``fmaf(w_t, g_t, acc)``)."""
    if steps == 0:
        y = _weighted_sum(x_ptr, stride_t, d0, d1, d2, d3, d4, d5, d6, d7, w_ptr, first_seg * T, cols, col_ok,
                          T, USE_DELTAS, MASKED, False)
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
        y = _weighted_sum(x_ptr, stride_t, d0, d1, d2, d3, d4, d5, d6, d7, w_ptr, lo * T, cols, col_ok,
                          T, USE_DELTAS, MASKED, True)
    if MASKED:
        tl.store(out_ptr + cols, y.to(out_ptr.dtype.element_ty), mask=col_ok)
    else:
        tl.store(out_ptr + cols, y.to(out_ptr.dtype.element_ty))


@triton.jit
def _combine_kernel(x_ptr, stride_t, d0, d1, d2, d3, d4, d5, d6, d7, w_ptr, blocks_ptr, offsets_ptr,
                    out_ptr, N, T: tl.constexpr, BLOCK_N: tl.constexpr, USE_DELTAS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    first_seg = tl.load(blocks_ptr + pid * 3)
    last_seg = tl.load(blocks_ptr + pid * 3 + 1)
    steps = tl.load(blocks_ptr + pid * 3 + 2).to(tl.int32)
    # The block start is a multiple of BLOCK_N (>= 16): aligned, and every block but the last
    # is full, so it loads and stores without a column mask (vectorisable whatever N is).
    cols = tl.multiple_of(pid * BLOCK_N, 16) + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if (pid + 1) * BLOCK_N <= N:
        _combine_block(x_ptr, stride_t, d0, d1, d2, d3, d4, d5, d6, d7, w_ptr, offsets_ptr, out_ptr, cols, col_ok,
                       first_seg, last_seg, steps, T, BLOCK_N, USE_DELTAS, False)
    else:
        _combine_block(x_ptr, stride_t, d0, d1, d2, d3, d4, d5, d6, d7, w_ptr, offsets_ptr, out_ptr, cols, col_ok,
                       first_seg, last_seg, steps, T, BLOCK_N, USE_DELTAS, True)


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
            grads.numel, T=num_tasks, BLOCK_N=block,
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
