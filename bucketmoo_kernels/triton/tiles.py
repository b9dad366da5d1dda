"""Host-side helpers shared by the Triton kernels: tile tables and row addressing.

Nothing here launches a kernel. Tile, block and offset tables are built on the host from a
:class:`~bucketmoo_kernels.inputs.Segments` object's CPU offsets and cached per segments
object, device and size, so a DDP hook that reuses its layout pays for them once. The first
use on a CUDA device copies the table from pageable host memory, which **waits for that copy**
(a one-time host sync per table); later calls never synchronise. Building a table during CUDA
graph capture is refused with a clear error (call once before capturing, the usual warm-up).

A cached table may be read by kernels on any stream (DDP hook callbacks can run on other
streams than the first caller's): every use from a stream other than the allocating one is
registered with ``Tensor.record_stream``, once per stream, so the caching allocator never
hands the memory to new work while a kernel on another stream may still read it.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass

import torch

from ..inputs import Segments, TaskGrads

__all__ = ["INTERPRET", "TILE_COLS", "TileTable", "tile_table", "RowAddressing", "row_addressing",
           "MAX_POINTER_ROWS", "next_pow2", "on_device", "block_table", "offsets_table", "stream_safe"]

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
    """``table`` int64 ``[num_tiles, TILE_COLS]`` on the device; ``num_slots`` partial slots;
    ``reduce`` int64 ``[num_multi, 3]`` on the device, one row per segment with several
    tiles: (segment, first partial slot, tiles), for the reduction launch (``num_multi`` may
    be 0, then no reduction is launched; ``reduce`` then holds one unused row)."""

    table: torch.Tensor
    num_tiles: int
    num_slots: int
    reduce: torch.Tensor
    num_multi: int


_tables: "weakref.WeakKeyDictionary[Segments, dict]" = weakref.WeakKeyDictionary()


class _DeviceTable:
    """A cached device tensor and the streams it has been registered with."""

    __slots__ = ("tensor", "home", "streams")

    def __init__(self, tensor: torch.Tensor, home: int):
        self.tensor = tensor
        self.home = home  # the stream it was allocated on
        self.streams: set[int] = set()


def _current_stream_id(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def stream_safe(entry: _DeviceTable) -> torch.Tensor:
    """``entry.tensor``, registered (``record_stream``) with the current stream when that is
    not the stream it was allocated on; once per stream."""
    tensor = entry.tensor
    if tensor.device.type == "cuda":
        stream = torch.cuda.current_stream(tensor.device)
        sid = stream.cuda_stream
        if sid != entry.home and sid not in entry.streams:
            tensor.record_stream(stream)
            entry.streams.add(sid)
    return tensor


def to_device_table(host: torch.Tensor, device: torch.device, what: str) -> _DeviceTable:
    """Copy a host table to ``device`` once (a synchronous copy from pageable memory: the host
    waits for it, once per table). Refused during CUDA graph capture, where it would fail."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"bucketmoo_kernels.triton: the {what} of this Segments object is not on {device} yet, "
            "and it cannot be copied there during CUDA graph capture; run the same call once "
            "before capturing (warm-up) so that the table is cached")
    return _DeviceTable(host.to(device), _current_stream_id(device))


def _cached(segments: Segments, key: tuple, device: torch.device, build, what: str) -> torch.Tensor:
    per_seg = _tables.setdefault(segments, {})
    entry = per_seg.get(key)
    if entry is None:
        entry = to_device_table(build(), device, what)
        per_seg[key] = entry
    return stream_safe(entry)


def offsets_table(segments: Segments, device: torch.device) -> torch.Tensor:
    """``segments.offsets`` on ``device`` (cached here, stream-safe; see the module docstring)."""
    return _cached(segments, ("offsets", str(device)), device, lambda: segments.offsets, "offsets")


def _build_table(offsets: torch.Tensor, chunk: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Cut every segment at the multiples of ``chunk`` (global element indices, so that the
    inner tiles of a long segment start on a ``chunk`` boundary: aligned loads when ``chunk``
    is a multiple of 16); an empty segment gets one empty piece, so that every segment has a
    tile that writes its result. Returns the tile table, the number of partial slots and the
    reduction table (see :class:`TileTable`)."""
    starts, ends = offsets[:-1], offsets[1:]
    lengths = ends - starts
    first_cut = starts // chunk
    counts = torch.where(lengths > 0, (ends - 1) // chunk - first_cut + 1, torch.ones_like(lengths))
    num_tiles = int(counts.sum())
    seg = torch.repeat_interleave(torch.arange(counts.numel(), dtype=torch.int64), counts)
    first_tile = torch.cumsum(counts, 0) - counts
    within = torch.arange(num_tiles, dtype=torch.int64) - first_tile[seg]
    tile_start = torch.where(within == 0, starts[seg], (first_cut[seg] + within) * chunk)
    tile_end = torch.minimum((first_cut[seg] + within + 1) * chunk, ends[seg])
    ntiles = counts[seg]
    multi = ntiles > 1
    slot = torch.full((num_tiles,), -1, dtype=torch.int64)
    num_slots = int(multi.sum())
    slot[multi] = torch.arange(num_slots, dtype=torch.int64)
    first_slot = torch.where(multi, slot - within, torch.full_like(slot, -1))
    head = multi & (within == 0)
    reduce = torch.stack([seg[head], slot[head], ntiles[head]], dim=1).contiguous()
    if reduce.shape[0] == 0:
        reduce = torch.zeros(1, 3, dtype=torch.int64)
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
    return table, num_slots, reduce


def tile_table(segments: Segments, chunk: int, device: torch.device) -> TileTable:
    """The (cached, stream-safe) tile table of ``segments`` with tiles of at most ``chunk``
    elements."""
    per_seg = _tables.setdefault(segments, {})
    key = ("table", str(device), int(chunk))
    cached = per_seg.get(key)
    if cached is None:
        table, num_slots, reduce = _build_table(segments.offsets, int(chunk))
        num_multi = int(reduce.shape[0]) if num_slots else 0
        cached = (to_device_table(table, device, "Gram tile table"), table.shape[0], num_slots,
                  to_device_table(reduce, device, "Gram reduction table"), num_multi)
        per_seg[key] = cached
    table_entry, num_tiles, num_slots, reduce_entry, num_multi = cached
    return TileTable(stream_safe(table_entry), num_tiles, num_slots, stream_safe(reduce_entry), num_multi)


def block_table(segments: Segments, block: int, device: torch.device) -> torch.Tensor:
    """``[ceil(N / block), 3]`` int64 (cached, stream-safe): for each block of ``block``
    elements, the segments of its first and last elements and the binary-search steps
    between them (0 when the block lies in one segment)."""

    def build() -> torch.Tensor:
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
        return torch.stack([first, last, steps], dim=1).contiguous()

    return _cached(segments, ("blocks", str(device), int(block)), device, build, "combine block table")


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
