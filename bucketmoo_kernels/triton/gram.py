"""Triton ``gram``: per-segment Gram matrices of T task gradients in one launch.

Work split: a tile table (built on the host from the segment offsets, cached) cuts every
segment into tiles of at most ``chunk`` elements; one program per tile. A program streams its
tile in ``[TP, BLOCK_N]`` blocks and accumulates ``X X^T`` in float32: with ``tl.dot`` for
bf16/fp16 (TP = T padded to 16), with per-column outer products for fp32 and T <= 8.

A segment with one tile stores its Gram directly; runs of consecutive small segments are packed
into one program (up to 64 segments whose starts fall in one chunk-sized window), so a layout
of millions of tiny segments does not launch millions of programs. A segment with several tiles stores each
tile's partial Gram into a workspace slot and bumps the segment's arrival counter (acq_rel
atomic); the program that arrives last sums the segment's partials *in slot order* (fixed,
independent of which program finished when) and resets the counter. The result is therefore
bit-identical from call to call, which DDP replicas rely on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..inputs import Segments, TaskGrads
from .tiles import INTERPRET, TILE_COLS, gram_counters, next_pow2, on_device, row_addressing, tile_table

__all__ = ["gram_triton", "GRAM_BLOCK", "GRAM_CHUNK"]

#: Elements per block (inner loop step, tl.dot path) and per tile (work of one program).
GRAM_BLOCK = 1024 if INTERPRET else 256
GRAM_CHUNK = 8192 if INTERPRET else 16384


@triton.jit
def _row_offsets(t, stride_t, d0, d1, d2, d3, d4, d5, d6, d7, USE_DELTAS: tl.constexpr):
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
def _tile_gram(x_ptr, row_off, row_ok, start, end, TP: tl.constexpr, BLOCK_N: tl.constexpr,
               UPCAST: tl.constexpr, USE_DOT: tl.constexpr):
    """float32 ``[TP, TP]`` Gram of columns ``start:end`` of the (padded) task rows."""
    cols0 = tl.arange(0, BLOCK_N)
    length = (end - start).to(tl.int32)
    if USE_DOT:
        # Tensor cores for 16-bit inputs (exact products, fp32 accumulation); fp32 with T > 8.
        acc = tl.zeros([TP, TP], dtype=tl.float32)
        for i in range(0, length, BLOCK_N):
            cols = start + i + cols0
            mask = row_ok[:, None] & (cols < end)[None, :]
            x = tl.load(x_ptr + row_off[:, None] + cols[None, :], mask=mask, other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
            acc = tl.dot(x, tl.trans(x), acc, input_precision="ieee")
    else:
        # fp32, T <= 8: per-column outer products on the CUDA cores. Exact fp32 (no TF32) and
        # T^2 instead of 16^2 multiply-adds per column, which an "ieee" tl.dot would spend.
        acc3 = tl.zeros([TP, TP, BLOCK_N], dtype=tl.float32)
        for i in range(0, length, BLOCK_N):
            cols = start + i + cols0
            mask = row_ok[:, None] & (cols < end)[None, :]
            x = tl.load(x_ptr + row_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            acc3 += x[:, None, :] * x[None, :, :]
        acc = tl.sum(acc3, axis=2)
    return acc


@triton.jit
def _gram_kernel(x_ptr, stride_t, d0, d1, d2, d3, d4, d5, d6, d7, tiles_ptr, offsets_ptr, partial_ptr,
                 count_ptr, out_ptr, T: tl.constexpr, TP: tl.constexpr, BLOCK_N: tl.constexpr,
                 NCOLS: tl.constexpr, USE_DELTAS: tl.constexpr, UPCAST: tl.constexpr, USE_DOT: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = tiles_ptr + pid * NCOLS
    seg = tl.load(row + 0)
    start = tl.load(row + 1)
    end = tl.load(row + 2)
    ntiles = tl.load(row + 3)
    slot = tl.load(row + 4)
    first_slot = tl.load(row + 5)
    num_segs = tl.load(row + 6)

    t = tl.arange(0, TP)
    row_ok = t < T
    row_off = _row_offsets(t, stride_t, d0, d1, d2, d3, d4, d5, d6, d7, USE_DELTAS)
    ii = t[:, None]
    jj = t[None, :]
    tt_mask = (ii < T) & (jj < T)
    tt_off = ii * T + jj
    if num_segs > 1:
        # A packed run of small segments (one tile each): one Gram per segment, stored directly.
        for k in range(0, num_segs):
            s = seg + k
            acc_s = _tile_gram(x_ptr, row_off, row_ok, tl.load(offsets_ptr + s), tl.load(offsets_ptr + s + 1),
                               TP, BLOCK_N, UPCAST, USE_DOT)
            tl.store(out_ptr + s * (T * T) + tt_off, acc_s, mask=tt_mask)
    else:
        acc = _tile_gram(x_ptr, row_off, row_ok, start, end, TP, BLOCK_N, UPCAST, USE_DOT)
        if ntiles == 1:
            tl.store(out_ptr + seg * (T * T) + tt_off, acc, mask=tt_mask)
        else:
            tl.store(partial_ptr + slot * (T * T) + tt_off, acc, mask=tt_mask)
            tl.debug_barrier()  # every thread's partial is written before the release below
            arrived = tl.atomic_add(count_ptr + seg, 1, sem="acq_rel")
            if arrived == ntiles - 1:
                total = tl.zeros([TP, TP], dtype=tl.float32)
                for k in range(0, ntiles):
                    total += tl.load(partial_ptr + (first_slot + k) * (T * T) + tt_off, mask=tt_mask,
                                     other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + seg * (T * T) + tt_off, total, mask=tt_mask)
                tl.store(count_ptr + seg, 0)


def _launch_gram(grads: TaskGrads, segments: Segments, chunk: int, block: int | None) -> torch.Tensor:
    num_tasks = grads.num_tasks
    device = grads.device
    if grads.numel == 0:  # nothing to read (and an empty tensor may have a null pointer)
        return torch.zeros(segments.num_segments, num_tasks, num_tasks, dtype=torch.float32, device=device)
    tiles = tile_table(segments, chunk, device)
    out = torch.empty(segments.num_segments, num_tasks, num_tasks, dtype=torch.float32, device=device)
    partial = torch.empty(max(1, tiles.num_slots) * num_tasks * num_tasks, dtype=torch.float32,
                          device=device)
    counters = gram_counters(segments, device)
    rows = row_addressing(grads)
    use_dot = rows.base.dtype != torch.float32 or num_tasks > 8
    if use_dot:
        tp = max(16, next_pow2(num_tasks))  # tl.dot needs every dimension >= 16
    else:
        tp = max(2, next_pow2(num_tasks))
        if block is None:
            block = max(16, min(1024, (32768 if INTERPRET else 8192) // (tp * tp)))
    block = GRAM_BLOCK if block is None else block
    upcast = INTERPRET or rows.base.dtype == torch.float32
    with on_device(device):
        _gram_kernel[(tiles.num_tiles,)](
            rows.base, rows.stride, *rows.deltas, tiles.table, segments.on(device), partial, counters, out,
            T=num_tasks, TP=tp, BLOCK_N=block, NCOLS=TILE_COLS, USE_DELTAS=rows.use_deltas,
            UPCAST=upcast, USE_DOT=use_dot, num_warps=4)
    return out


def gram_triton(grads: TaskGrads, segments: Segments, *, chunk: int | None = None,
                block: int | None = None) -> torch.Tensor:
    """Per-segment Gram matrices ``M_s = G_s G_s^T`` in one kernel launch.

    Args:
        grads: T gradients of length N, fp32 / bf16 / fp16 (stacked ``[T, N]`` view with unit
            inner stride, or up to 8 separate unit-stride rows read in place; otherwise they
            are stacked first).
        segments: S segments covering ``0..N`` (empty segments give zero matrices).
        chunk: elements per program (tile); long segments are split into tiles of this size.
        block: elements per inner step (a power of two >= 16; None: by dtype and T).
    Returns:
        ``[S, T, T]`` float32, accumulated in float32; bit-identical from call to call.
    """
    chunk = GRAM_CHUNK if chunk is None else int(chunk)
    if chunk <= 0:
        raise ValueError(f"chunk must be a positive number of elements; got {chunk}")
    if block is not None and (int(block) < 16 or int(block) & (int(block) - 1)):
        raise ValueError(f"block must be a power of two >= 16; got {block}")
    return _launch_gram(grads, segments, chunk, block)
