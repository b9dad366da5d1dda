"""The Triton Gram's multi-tile reduction, its tables and its state between calls.

The directory is ``triton_kernels`` rather than ``triton``: a ``tests/triton`` folder without
``__init__.py`` would be importable as a namespace package called ``triton`` while ``tests/`` is
on ``sys.path`` (pytest's prepend import mode puts it there).

Interpreter tests (CPU, ``TRITON_INTERPRET=1`` from tests/conftest.py) are kept small; the
``gpu`` tests need a CUDA device (CUDA graphs, streams).
"""

import pytest
import torch

pytest.importorskip("triton")

from bucketmoo_kernels.inputs import Segments, as_task_grads  # noqa: E402
from bucketmoo_kernels.reference import gram_reference  # noqa: E402
from bucketmoo_kernels.triton import gram_triton  # noqa: E402
from bucketmoo_kernels.triton import tiles as tiles_mod  # noqa: E402
from bucketmoo_kernels.triton.gram import gram_block  # noqa: E402
from bucketmoo_kernels.triton.tiles import tile_table  # noqa: E402
from tests.utils import assert_close, random_grads  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tiles_by_brute_force(offsets, chunk):
    """(segment, start, end) of every tile: each segment cut at the multiples of chunk."""
    out = []
    for s in range(len(offsets) - 1):
        lo, hi = offsets[s], offsets[s + 1]
        if lo == hi:
            out.append((s, lo, hi))
            continue
        start = lo
        while start < hi:
            end = min(hi, (start // chunk + 1) * chunk)
            out.append((s, start, end))
            start = end
    return out


@pytest.mark.parametrize("chunk", [16, 48, 64])
def test_tile_table_cuts_at_global_multiples_and_lists_every_multi_tile_segment(chunk):
    lengths = [0, 5, 130, 0, 0, 17, 64, 1, 200, 3, 0]
    segs = Segments.from_lengths(lengths)
    offsets = segs.offsets.tolist()
    table = tile_table(segs, chunk, torch.device(DEVICE))
    rows = table.table.cpu().tolist()
    expected = _tiles_by_brute_force(offsets, chunk)
    # Unpack packed runs (column 6: segments in the program) back into one tile per segment.
    got = []
    for seg, start, end, ntiles, slot, first_slot, count in rows:
        if count > 1:
            got += [(s, offsets[s], offsets[s + 1]) for s in range(seg, seg + count)]
        else:
            got.append((seg, start, end))
    assert got == expected
    # Inner tiles start on a chunk boundary (aligned loads when chunk % 16 == 0).
    for s, start, end in expected:
        if start != offsets[s]:
            assert start % chunk == 0
    # Slots: one per tile of a multi-tile segment, consecutive per segment, in tile order.
    per_seg = {}
    for seg, start, end, ntiles, slot, first_slot, count in rows:
        if ntiles > 1:
            per_seg.setdefault(seg, []).append((slot, first_slot, ntiles))
    assert table.num_slots == sum(len(v) for v in per_seg.values())
    reduce = table.reduce.cpu().tolist()[:table.num_multi]
    assert table.num_multi == len(per_seg)
    assert [r[0] for r in reduce] == sorted(per_seg)
    for seg, first, ntiles in reduce:
        slots = [v[0] for v in per_seg[seg]]
        assert slots == list(range(first, first + ntiles)) and len(slots) == ntiles
        assert all(v[1] == first for v in per_seg[seg])


@pytest.mark.slow
def test_multi_tile_sum_is_the_exact_sum_of_the_tile_grams():
    """The reduction launch sums a segment's tile Grams in float64 before the one rounding to
    float32. For these sizes the float64 sum of the float32 partials is exact, whatever the
    order, so the result must equal float32(sum of the tile Grams computed on their own)
    bit for bit: an off-by-one slot, a missed or doubled tile, or a float32 running sum fails."""
    gen = torch.Generator().manual_seed(5)
    n, chunk = 300, 48
    grads = torch.randn(3, n, generator=gen).to(DEVICE)
    segs = Segments(torch.tensor([0, 37, 280, n]))  # the middle segment has 6 tiles
    tg = as_task_grads(grads)
    got = gram_triton(tg, segs, chunk=chunk, block=16)
    # Each tile on its own (as a segment of a layout cut at the same places): the same
    # start/end, so the same per-tile arithmetic.
    bounds = [0, 37, 280, n]
    cuts = sorted(set(bounds) | set(range(chunk, n, chunk)))
    tile_segs = Segments(torch.tensor(cuts))
    parts = gram_triton(tg, tile_segs, chunk=chunk, block=16)
    assert tile_table(tile_segs, chunk, torch.device(DEVICE)).num_slots == 0  # all single-tile
    for s in range(3):
        first, last = cuts.index(bounds[s]), cuts.index(bounds[s + 1])
        expected = parts[first:last].double().sum(0).float()
        torch.testing.assert_close(got[s], expected, atol=0, rtol=0, msg=f"segment {s}")
    assert_close(got, gram_reference(tg, segs), atol=2e-6 * n, rtol=1e-5, what="gram")


@pytest.mark.slow
def test_no_state_survives_a_call(monkeypatch):
    """What a CUDA graph replays: the same launches with the same scratch memory, in any order
    with other graphs. Nothing may depend on what an earlier call left behind: every scratch
    and output buffer the Gram takes from torch.empty is filled with NaN here (the caching
    allocator hands out such memory), and two layouts with multi-tile segments are called
    interleaved in both orders; each result must equal its first bits and the reference."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)
    gen = torch.Generator().manual_seed(9)
    grads = torch.randn(4, 200, generator=gen).to(DEVICE)
    tg = as_task_grads(grads)
    layouts = {"a": Segments(torch.tensor([0, 3, 150, 200])), "b": Segments(torch.tensor([0, 100, 100, 200]))}
    first = {k: gram_triton(tg, s, chunk=48, block=16) for k, s in layouts.items()}
    for k, s in layouts.items():
        assert_close(first[k], gram_reference(tg, s), atol=2e-6 * 200, rtol=1e-5, what=f"gram {k}")
    for order in ("ab", "ba"):
        for k in order:
            torch.testing.assert_close(gram_triton(tg, layouts[k], chunk=48, block=16), first[k], atol=0, rtol=0)


def test_gram_block_scales_with_the_number_of_tasks():
    """The tl.dot path loads [TP, BLOCK_N] per step: BLOCK_N shrinks as TP grows (no spills)."""
    from bucketmoo_kernels.triton.gram import _DOT_VALUES

    for dtype in (torch.bfloat16, torch.float16):
        blocks = [gram_block(t, dtype) for t in (2, 16, 17, 32, 33, 64)]
        assert blocks == sorted(blocks, reverse=True)
        for t, b in zip((2, 16, 17, 32, 33, 64), blocks):
            tp = max(16, 1 << (t - 1).bit_length())
            assert b & (b - 1) == 0 and (tp * b <= _DOT_VALUES or b == 32)
    assert gram_block(20, torch.float32) == gram_block(20, torch.bfloat16)  # fp32, T > 8: tl.dot


def test_a_table_is_not_built_during_graph_capture(monkeypatch):
    """Copying a table from pageable host memory cannot be captured: refused with a message
    that says what to do (the check runs before any CUDA call, so it is testable on CPU)."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="warm-up"):
        tiles_mod.to_device_table(torch.zeros(3, dtype=torch.int64), torch.device("cuda"), "test table")


# ---- GPU -------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_two_captured_graphs_replayed_in_both_orders():
    """Two CUDA graphs of the Gram (layouts with multi-tile segments, captured on the shared
    capture stream) replayed A B B A and B A A B on fresh gradients: every replay equals the
    eager result bit for bit."""
    torch.manual_seed(0)
    n = 300_000
    layouts = {"a": Segments(torch.tensor([0, 7, 200_000, n])), "b": Segments(torch.tensor([0, 150_000, n]))}
    static = {k: torch.randn(4, n, device="cuda", dtype=torch.bfloat16) for k in layouts}
    graphs, outs = {}, {}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile, build and cache the tables
        for k, segs in layouts.items():
            gram_triton(as_task_grads(static[k]), segs)
    torch.cuda.current_stream().wait_stream(side)
    for k, segs in layouts.items():
        graphs[k] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[k]):
            outs[k] = gram_triton(as_task_grads(static[k]), segs)
    for order in ("abba", "baab"):
        for k in order:
            static[k].copy_(torch.randn_like(static[k]))
            graphs[k].replay()
            eager = gram_triton(as_task_grads(static[k]), layouts[k])
            torch.cuda.synchronize()
            torch.testing.assert_close(outs[k], eager, atol=0, rtol=0)


@pytest.mark.gpu
def test_cached_tables_outlive_kernels_queued_on_another_stream():
    """A table built on the default stream, read by a kernel queued on a side stream behind a
    long sleep, then dropped: without record_stream the allocator would hand its memory to the
    default stream's next allocation (filled with garbage below) before the side kernel ran."""
    torch.manual_seed(1)
    n = 1 << 20
    grads = torch.randn(3, n, device="cuda")
    tg = as_task_grads(grads)
    segs = Segments.chunks(n, 1000)
    expected = gram_triton(tg, segs)  # builds the tables on the default stream
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU cycles
        got = gram_triton(tg, segs)
    del segs  # frees the cached tables (weak key)
    import gc
    gc.collect()
    junk = [torch.full((n // 100,), -1, dtype=torch.int64, device="cuda") for _ in range(8)]
    torch.cuda.synchronize()
    del junk
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.gpu
def test_gram_from_a_side_stream_matches_the_default_stream():
    torch.manual_seed(2)
    grads = torch.randn(5, 100_003, device="cuda", dtype=torch.float16)
    tg = as_task_grads(grads)
    segs = Segments(torch.tensor([0, 1, 50_000, 100_003]))
    expected = gram_triton(tg, segs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = gram_triton(tg, segs)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
