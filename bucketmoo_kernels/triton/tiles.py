"""Host-side helpers shared by the Triton kernels: tile tables and row addressing.

Nothing here launches a kernel or synchronises with the device. Tile tables are built once
per :class:`~bucketmoo_kernels.inputs.Segments` object (from its CPU offsets) and cached per
device and chunk length, so a DDP hook that reuses its layout pays for them once.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass

import torch

from ..inputs import Segments, TaskGrads

__all__ = ["INTERPRET", "TILE_COLS", "TileTable", "tile_table", "gram_counters", "RowAddressing",
           "row_addressing", "MAX_POINTER_ROWS", "next_pow2", "on_device", "block_table"]

#: Whether the kernels of this package were created under ``TRITON_INTERPRET=1`` (``triton.jit``
#: reads the variable when it decorates, i.e. when this package is imported).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: Columns of a tile table row: (first) segment, start, end, tiles of the segment, partial slot
#: of the tile (-1 when the segment has a single tile), first partial slot of the segment, and
#: the number of consecutive whole segments the program handles (> 1 only for packed runs of
#: small segments, which all have a single tile).
TILE_COLS = 7
#: At most this many small segments are packed into one Gram program.
MAX_GROUP = 64
#: Separate (non-stacked) task rows are addressed through this many scalar kernel arguments.
MAX_POINTER_ROWS = 8


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def on_device(device: torch.device):
    """Context that makes ``device`` current for a launch (Triton launches on the current
    CUDA device, which need not be the tensors' one)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class TileTable:
    """``table`` int64 ``[num_tiles, TILE_COLS]`` on the device; ``num_slots`` partial slots."""

    table: torch.Tensor
    num_tiles: int
    num_slots: int


_tables: "weakref.WeakKeyDictionary[Segments, dict]" = weakref.WeakKeyDictionary()


def _build_table(offsets: torch.Tensor, chunk: int) -> tuple[torch.Tensor, int]:
    """Split every segment into pieces of at most ``chunk`` elements (an empty segment gets one
    empty piece, so that every segment has a tile that writes its result)."""
    starts, ends = offsets[:-1], offsets[1:]
    lengths = ends - starts
    counts = torch.clamp((lengths + chunk - 1) // chunk, min=1)
    num_tiles = int(counts.sum())
    seg = torch.repeat_interleave(torch.arange(counts.numel(), dtype=torch.int64), counts)
    first_tile = torch.cumsum(counts, 0) - counts
    within = torch.arange(num_tiles, dtype=torch.int64) - first_tile[seg]
    tile_start = starts[seg] + within * chunk
    tile_end = torch.minimum(tile_start + chunk, ends[seg])
    ntiles = counts[seg]
    multi = ntiles > 1
    slot = torch.full((num_tiles,), -1, dtype=torch.int64)
    num_slots = int(multi.sum())
    slot[multi] = torch.arange(num_slots, dtype=torch.int64)
    first_slot = torch.where(multi, slot - within, torch.full_like(slot, -1))
    # Pack runs of consecutive single-tile segments into one program each: those whose start
    # falls in the same chunk-sized window, at most MAX_GROUP segments per program.
    single = ntiles == 1
    window = tile_start // chunk
    group_block = seg // MAX_GROUP
    new = torch.ones(num_tiles, dtype=torch.bool)
    if num_tiles > 1:
        new[1:] = (~single[1:] | ~single[:-1] | (window[1:] != window[:-1])
                   | (group_block[1:] != group_block[:-1]))
    first = torch.nonzero(new).flatten()
    last = torch.cat([first[1:] - 1, torch.tensor([num_tiles - 1], dtype=torch.int64)])
    count = last - first + 1
    table = torch.stack([seg[first], tile_start[first], tile_end[last], ntiles[first], slot[first],
                         first_slot[first], count], dim=1).contiguous()
    return table, num_slots


def tile_table(segments: Segments, chunk: int, device: torch.device) -> TileTable:
    """The (cached) tile table of ``segments`` with tiles of at most ``chunk`` elements."""
    per_seg = _tables.setdefault(segments, {})
    key = ("table", str(device), int(chunk))
    cached = per_seg.get(key)
    if cached is None:
        table, num_slots = _build_table(segments.offsets, int(chunk))
        cached = TileTable(table.to(device), table.shape[0], num_slots)
        per_seg[key] = cached
    return cached


def block_table(segments: Segments, block: int, device: torch.device) -> torch.Tensor:
    """``[ceil(N / block), 3]`` int64 (cached): for each block of ``block`` elements, the
    segments of its first and last elements and the binary-search steps between them
    (0 when the block lies in one segment)."""
    per_seg = _tables.setdefault(segments, {})
    key = ("blocks", str(device), int(block))
    cached = per_seg.get(key)
    if cached is None:
        offsets = segments.offsets
        n = int(offsets[-1])
        starts = torch.arange(0, n, block, dtype=torch.int64)
        lasts = torch.clamp(starts + block - 1, max=n - 1)
        # segment of element e: the largest s with offsets[s] <= e (s < S)
        first = torch.searchsorted(offsets, starts, right=True) - 1
        last = torch.searchsorted(offsets, lasts, right=True) - 1
        span = last - first
        # ceil(log2(span + 1)) = bit length of span: steps that shrink [first, last] to one
        steps = torch.where(span > 0, torch.floor(torch.log2(span.clamp_min(1).double())).long() + 1, 0)
        cached = torch.stack([first, last, steps], dim=1).contiguous().to(device)
        per_seg[key] = cached
    return cached


def gram_counters(segments: Segments, device: torch.device) -> torch.Tensor:
    """``[S]`` int32 arrival counters of the Gram kernel (zero between launches: the program
    that reduces a segment resets its counter). Cached per segments object, device and CUDA
    stream, so launches on one stream (which run in order) share them and launches on
    different streams never do."""
    per_seg = _tables.setdefault(segments, {})
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = ("counters", str(device), stream)
    cached = per_seg.get(key)
    if cached is None:
        cached = torch.zeros(max(1, segments.num_segments), dtype=torch.int32, device=device)
        per_seg[key] = cached
    return cached


@dataclass(frozen=True)
class RowAddressing:
    """How a kernel finds task row t: ``base + t * stride`` (stacked) or ``base + deltas[t]``.

    ``deltas`` are element distances from ``base`` to each row (any sign, any size): rows that
    live in separate allocations are read in place, without a stacking copy.
    """

    base: torch.Tensor
    stride: int
    deltas: tuple[int, ...]
    use_deltas: bool


def row_addressing(grads: TaskGrads) -> RowAddressing:
    """Addressing of ``grads``; a stacking copy only for > MAX_POINTER_ROWS separate rows,
    rows that are not unit-stride, or rows not aligned to their element size."""
    pad = (0,) * MAX_POINTER_ROWS
    if grads.stacked is not None:
        stacked = grads.stacked
        return RowAddressing(stacked, int(stacked.stride(0)) if stacked.shape[0] > 1 else 0, pad, False)
    rows = grads.rows
    if len(rows) <= MAX_POINTER_ROWS and all(r.stride(0) == 1 or r.numel() <= 1 for r in rows):
        size = rows[0].element_size()
        base_ptr = rows[0].data_ptr()
        diffs = [r.data_ptr() - base_ptr for r in rows]
        if all(d % size == 0 for d in diffs):
            deltas = tuple(d // size for d in diffs) + (0,) * (MAX_POINTER_ROWS - len(rows))
            return RowAddressing(rows[0], 0, deltas, True)
    stacked = grads.as_stacked()
    return RowAddressing(stacked, int(stacked.stride(0)), pad, False)
