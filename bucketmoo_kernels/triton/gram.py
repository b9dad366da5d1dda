"""Triton ``gram``: per-segment Gram matrices of T task gradients.

Work split: a tile table (built on the host from the segment offsets, cached) cuts every
segment at the multiples of ``chunk`` (global element indices); one program per tile. A
program streams its tile in ``[TP, BLOCK_N]`` blocks and accumulates ``X X^T`` in float32:
with ``tl.dot`` for bf16/fp16 (TP = T padded to 16), with per-column outer products for fp32
and T <= 8. Loads are vectorisable: the body of a tile is a run of full blocks that start on a
16-element boundary (``tl.multiple_of``) and are loaded without a column mask; only a head up
to that boundary and the tail are masked (a segment no longer than one block is one masked
block).

A segment with one tile stores its Gram directly; runs of consecutive small segments are packed
into one program (up to 64 segments whose starts fall in one chunk-sized window), so a layout
of millions of tiny segments does not launch millions of programs. A segment with several
tiles stores each tile's partial Gram into its own workspace slot, and a second launch (only
when some segment has several tiles) gives each such segment one program that sums its slots
``REDUCE_SLOTS`` at a time in float64: lane r of a ``[REDUCE_SLOTS, T*T]`` accumulator takes
slots r, r + R, r + 2R, ... in increasing order, then one fixed-shape ``tl.sum`` over the R
lanes. The order depends only on the layout and R, never on scheduling, so the Gram is
bit-identical from call to call. No counters or other state survive a call, so CUDA graph
capture and replay in any order are safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..inputs import Segments, TaskGrads
from .tiles import INTERPRET, TILE_COLS, next_pow2, offsets_table, on_device, row_addressing, tile_table

__all__ = ["gram_triton", "gram_block", "GRAM_CHUNK", "REDUCE_SLOTS"]

#: Elements per tile (work of one program).
GRAM_CHUNK = 8192 if INTERPRET else 16384
#: Partial slots the reduction program loads at once (independent loads in flight).
REDUCE_SLOTS = 8 if INTERPRET else 32
#: Loaded values per inner step of the tl.dot path, ``TP * BLOCK_N`` (4096 fp32 values are
#: 32 registers a thread at 4 warps, next to the [TP, TP] accumulator).
_DOT_VALUES = 16384 if INTERPRET else 4096


def gram_block(num_tasks: int, dtype: torch.dtype) -> int:
    """Default elements per inner step: for ``tl.dot`` (16-bit inputs, fp32 with T > 8)
    ``_DOT_VALUES / TP`` clamped to 32..256 (1024 under the interpreter), so a larger T does
    not spill; for fp32 outer products ``8192 / TP^2`` clamped to 16..1024."""
    if dtype != torch.float32 or num_tasks > 8:
        tp = max(16, next_pow2(num_tasks))
        return max(32, min(1024 if INTERPRET else 256, _DOT_VALUES // tp))
    tp = max(2, next_pow2(num_tasks))
    return max(16, min(1024, (32768 if INTERPRET else 8192) // (tp * tp)))


@triton.jit
def row_offsets(t, stride_t, d0, d1, d2, d3, d4, d5, d6, d7, USE_DELTAS: tl.constexpr):
    """int64 element offset of task row ``t`` (a tensor of task indices) from the base pointer."""
    if USE_DELTAS:
        # (no .to() on the scalars: Triton may specialise an argument equal to 1 to a constexpr)
        off = tl.zeros(t.shape, dtype=tl.int64) + d0
        off = tl.where(t == 1, d1, off)
        off = tl.where(t == 2, d2, off)
        off = tl.where(t == 3, d3, off)
        off = tl.where(t == 4, d4, off)
        off = tl.where(t == 5, d5, off)
        off = tl.where(t == 6, d6, off)
        off = tl.where(t == 7, d7, off)
    else:
        off = t.to(tl.int64) * stride_t
    return off


@triton.jit
def _gram_step(acc, x_ptr, row_off, row_ok, cols, end, MASKED: tl.constexpr, ROWS_FULL: tl.constexpr,
               UPCAST: tl.constexpr, USE_DOT: tl.constexpr):
    """Add the block of columns ``cols`` to ``acc`` (``[TP, TP]`` for tl.dot, else
    ``[TP, TP, BLOCK_N]``). MASKED: mask columns at ``end``; ROWS_FULL: T == TP (no row mask)."""
    ptrs = x_ptr + row_off[:, None] + cols[None, :]
    if MASKED:
        x = tl.load(ptrs, mask=row_ok[:, None] & (cols < end)[None, :], other=0.0)
    elif ROWS_FULL:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    if USE_DOT:
        # Tensor cores for 16-bit inputs (exact products, fp32 accumulation); fp32 with T > 8.
        if UPCAST:
            x = x.to(tl.float32)
        acc = tl.dot(x, tl.trans(x), acc, input_precision="ieee")
    else:
        # fp32, T <= 8: per-column outer products on the CUDA cores. Exact fp32 (no TF32) and
        # T^2 instead of 16^2 multiply-adds per column, which an "ieee" tl.dot would spend.
        x = x.to(tl.float32)
        acc += x[:, None, :] * x[None, :, :]
    return acc


@triton.jit
def _tile_gram(x_ptr, row_off, row_ok, start, end, TP: tl.constexpr, BLOCK_N: tl.constexpr,
               ROWS_FULL: tl.constexpr, UPCAST: tl.constexpr, USE_DOT: tl.constexpr):
    """float32 ``[TP, TP]`` Gram of columns ``start:end`` of the (padded) task rows: a masked
    head up to the next 16-element boundary, full aligned blocks without a column mask, a
    masked tail. A range of at most BLOCK_N columns is one masked block."""
    cols0 = tl.arange(0, BLOCK_N)
    if USE_DOT:
        acc = tl.zeros([TP, TP], dtype=tl.float32)
    else:
        acc = tl.zeros([TP, TP, BLOCK_N], dtype=tl.float32)
    if end - start <= BLOCK_N:
        acc = _gram_step(acc, x_ptr, row_off, row_ok, start + cols0, end, True, ROWS_FULL, UPCAST, USE_DOT)
    else:
        body = tl.multiple_of((start + 15) // 16 * 16, 16)
        if start < body:  # head: fewer than 16 columns
            acc = _gram_step(acc, x_ptr, row_off, row_ok, start + cols0, body, True, ROWS_FULL, UPCAST, USE_DOT)
        num_full = ((end - body) // BLOCK_N).to(tl.int32)
        for i in range(0, num_full):
            cols = tl.multiple_of(body + i * BLOCK_N, 16) + cols0
            acc = _gram_step(acc, x_ptr, row_off, row_ok, cols, end, False, ROWS_FULL, UPCAST, USE_DOT)
        tail = body + num_full * BLOCK_N
        if tail < end:
            acc = _gram_step(acc, x_ptr, row_off, row_ok, tail + cols0, end, True, ROWS_FULL, UPCAST, USE_DOT)
    if not USE_DOT:
        acc = tl.sum(acc, axis=2)
    return acc


@triton.jit
def _gram_kernel(x_ptr, stride_t, d0, d1, d2, d3, d4, d5, d6, d7, tiles_ptr, offsets_ptr, partial_ptr,
                 out_ptr, T: tl.constexpr, TP: tl.constexpr, BLOCK_N: tl.constexpr,
                 NCOLS: tl.constexpr, USE_DELTAS: tl.constexpr, UPCAST: tl.constexpr, USE_DOT: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = tiles_ptr + pid * NCOLS
    seg = tl.load(row + 0)
    start = tl.load(row + 1)
    end = tl.load(row + 2)
    ntiles = tl.load(row + 3)
    slot = tl.load(row + 4)
    num_segs = tl.load(row + 6)

    t = tl.arange(0, TP)
    row_ok = t < T
    row_off = row_offsets(t, stride_t, d0, d1, d2, d3, d4, d5, d6, d7, USE_DELTAS)
    ii = t[:, None]
    jj = t[None, :]
    tt_mask = (ii < T) & (jj < T)
    tt_off = ii * T + jj
    if num_segs > 1:
        # A packed run of small segments (one tile each): one Gram per segment, stored directly.
        for k in range(0, num_segs):
            s = seg + k
            acc_s = _tile_gram(x_ptr, row_off, row_ok, tl.load(offsets_ptr + s), tl.load(offsets_ptr + s + 1),
                               TP, BLOCK_N, T == TP, UPCAST, USE_DOT)
            tl.store(out_ptr + s * (T * T) + tt_off, acc_s, mask=tt_mask)
    else:
        acc = _tile_gram(x_ptr, row_off, row_ok, start, end, TP, BLOCK_N, T == TP, UPCAST, USE_DOT)
        if ntiles == 1:
            tl.store(out_ptr + seg * (T * T) + tt_off, acc, mask=tt_mask)
        else:
            tl.store(partial_ptr + slot * (T * T) + tt_off, acc, mask=tt_mask)


@triton.jit
def _gram_reduce_kernel(partial_ptr, reduce_ptr, out_ptr, TT: tl.constexpr, TTP: tl.constexpr,
                        R: tl.constexpr):
    """One program per multi-tile segment: the sum of its partial Grams (slots first_slot ..
    first_slot + ntiles - 1), R slots at a time in slot order, float64, then one tl.sum."""
    pid = tl.program_id(0).to(tl.int64)
    seg = tl.load(reduce_ptr + pid * 3)
    first_slot = tl.load(reduce_ptr + pid * 3 + 1)
    ntiles = tl.load(reduce_ptr + pid * 3 + 2)
    r = tl.arange(0, R)
    e = tl.arange(0, TTP)
    e_ok = e < TT
    acc = tl.zeros([R, TTP], dtype=tl.float64)
    for k in range(0, ntiles, R):
        idx = k + r
        mask = (idx < ntiles)[:, None] & e_ok[None, :]
        acc += tl.load(partial_ptr + (first_slot + idx)[:, None] * TT + e[None, :], mask=mask,
                       other=0.0).to(tl.float64)
    total = tl.sum(acc, axis=0)
    tl.store(out_ptr + seg * TT + e, total.to(tl.float32), mask=e_ok)


def _launch_gram(grads: TaskGrads, segments: Segments, chunk: int, block: int | None,
                 reduce_slots: int) -> torch.Tensor:
    num_tasks = grads.num_tasks
    device = grads.device
    if grads.numel == 0:  # nothing to read (and an empty tensor may have a null pointer)
        return torch.zeros(segments.num_segments, num_tasks, num_tasks, dtype=torch.float32, device=device)
    tiles = tile_table(segments, chunk, device)
    offsets = offsets_table(segments, device)
    out = torch.empty(segments.num_segments, num_tasks, num_tasks, dtype=torch.float32, device=device)
    partial = torch.empty(max(1, tiles.num_slots) * num_tasks * num_tasks, dtype=torch.float32,
                          device=device)
    rows = row_addressing(grads)
    use_dot = rows.base.dtype != torch.float32 or num_tasks > 8
    tp = max(16, next_pow2(num_tasks)) if use_dot else max(2, next_pow2(num_tasks))  # tl.dot: >= 16
    block = gram_block(num_tasks, rows.base.dtype) if block is None else block
    upcast = INTERPRET or rows.base.dtype == torch.float32
    with on_device(device):
        _gram_kernel[(tiles.num_tiles,)](
            rows.base, rows.stride, *rows.deltas, tiles.table, offsets, partial, out,
            T=num_tasks, TP=tp, BLOCK_N=block, NCOLS=TILE_COLS, USE_DELTAS=rows.use_deltas,
            UPCAST=upcast, USE_DOT=use_dot, num_warps=4)
        if tiles.num_multi:
            tt = num_tasks * num_tasks
            ttp = next_pow2(tt)
            # at most 2048 float64 accumulators (16 a thread at 4 warps): fewer slots at once
            # for large T (a function of T only, so replicas still agree)
            r = min(reduce_slots, max(1, 2048 // ttp))
            _gram_reduce_kernel[(tiles.num_multi,)](partial, tiles.reduce, out, TT=tt, TTP=ttp, R=r, num_warps=4)
    return out


def gram_triton(grads: TaskGrads, segments: Segments, *, chunk: int | None = None,
                block: int | None = None, reduce_slots: int = REDUCE_SLOTS) -> torch.Tensor:
    """Per-segment Gram matrices ``M_s = G_s G_s^T`` in one kernel launch.

    Args:
        grads: T gradients of length N, fp32 / bf16 / fp16 (stacked ``[T, N]`` view with unit
            inner stride, or up to 8 separate unit-stride rows read in place; otherwise they
            are stacked first).
        segments: S segments covering ``0..N`` (empty segments give zero matrices).
        chunk: elements per program (tile); long segments are split into tiles of this size.
        block: elements per inner step (a power of two >= 16; None: :func:`gram_block`).
        reduce_slots: partial slots a reduction program adds at most at once (a power of
            two; capped so that the float64 accumulator has at most 2048 entries; 1 is a
            serial chain of dependent loads, kept for the GPU benchmark). The bits depend on
            it: replicas must use the same value.
    Returns:
        ``[S, T, T]`` float32, accumulated in float32 within a tile and in float64 across the
        tiles of a long segment; bit-identical from call to call.
    """
    chunk = GRAM_CHUNK if chunk is None else int(chunk)
    if chunk <= 0:
        raise ValueError(f"chunk must be a positive number of elements; got {chunk}")
    if block is not None and (int(block) < 16 or int(block) & (int(block) - 1)):
        raise ValueError(f"block must be a power of two >= 16; got {block}")
    if reduce_slots < 1 or reduce_slots & (reduce_slots - 1):
        raise ValueError(f"reduce_slots must be a power of two >= 1; got {reduce_slots}")
    return _launch_gram(grads, segments, chunk, block, int(reduce_slots))
