"""Every code path of the Triton Gram and combine kernels against the float64 reference, exactly.

Inputs are small integers (tests/utils.py ``small_int_grads``) and combine weights multiples
of 1/4 (``quarter_weights``): every partial sum is exact in float32, so the kernels must equal
the float64 reference with ``atol = 0`` (one dropped, doubled or misplaced element, tile or
slot shows), whatever the summation order.

The layouts are built from the kernels' constants so that they reach every path, and each test
first checks on the kernels' own tables that they do (``_gram_paths`` / ``_combine_paths``
mirror ``_tile_gram`` and ``_combine_block``):

* Gram (``gram.py``): a packed run of small segments, a segment of at most one block (one
  masked block), a masked head up to the 16-column boundary, the unmasked body loop, a masked
  tail, tiles without head or tail; a segment over more tiles than the reduction handles at
  once (``REDUCE_SLOTS``: several rounds, the last one partial), one with fewer, an empty one.
  Paths by dtype and T: fp32 with T <= 8 (outer products), fp32 with T > 8 and 16-bit inputs
  (``tl.dot``), T == TP (no row mask) and T < TP, stacked rows and separate rows.
* combine (``combine.py``): full unmasked blocks and the masked last block, each inside one
  segment (``steps == 0``) and across segments (binary search), with an empty segment.

Under the interpreter (no GPU) the constants are small (``chunk = 64``, ``block = 16``,
``reduce_slots = 4``, combine ``block = 16``): the same code paths at a few hundred elements.
With a GPU the ``gpu`` tests run the GPU constants (``GRAM_CHUNK`` 16384, ``REDUCE_SLOTS`` 32,
the default blocks) on ~900k elements, where 16-bit inputs take the ``tl.dot`` path without
upcasting (``UPCAST=False``, which the interpreter never runs).
"""

import itertools

import pytest
import torch

pytest.importorskip("triton")

from bucketmoo_kernels.inputs import Segments, as_task_grads  # noqa: E402
from bucketmoo_kernels.reference import combine_reference, gram_reference  # noqa: E402
from bucketmoo_kernels.triton import combine_triton, gram_triton  # noqa: E402
from bucketmoo_kernels.triton import tiles as tiles_mod  # noqa: E402
from bucketmoo_kernels.triton.combine import combine_block  # noqa: E402
from bucketmoo_kernels.triton.gram import GRAM_CHUNK, REDUCE_SLOTS, gram_block  # noqa: E402
from bucketmoo_kernels.triton.tiles import block_table, next_pow2, tile_table  # noqa: E402
from tests.utils import DTYPES, assert_close, quarter_weights, random_grads, small_int_grads  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Small constants for the interpreter: the same paths at a few hundred elements.
SMALL = dict(chunk=64, block=16, reduce_slots=4)
SMALL_COMBINE_BLOCK = 16

FAST_UNDER_INTERPRETER = {
    "test_gram_every_path_is_exact[T3-float32-list]", "test_gram_every_path_is_exact[T4-bfloat16-stacked]",
    "test_combine_every_path_is_exact[T3-float32-list]",
    "test_combine_bits_do_not_depend_on_block_size_or_path",
}


def dname(dtype):
    return str(dtype).replace("torch.", "")


# ---- layouts and the paths they reach ----------------------------------------------------------

def gram_path_layout(chunk, block, slots):
    """Offsets (a list) reaching every path of the Gram kernels for these constants (see the
    module docstring): tiny segments packed in chunk 0; a segment from 21 over
    ``slots + slots // 2 + 3`` tiles (first tile: head and body; last: 5 columns, one masked
    block); an empty segment; a single-tile segment with head, body and tail; a segment over
    three tiles whose last tile starts aligned and ends with a tail."""
    multi = slots + slots // 2 + 3
    q = multi - 1  # chunk index of the multi-tile segment's last tile
    a = q * chunk + 5
    b = q * chunk + 16 + 2 * block + 7  # head 5 -> 16, two full blocks, a 7-column tail
    n = (q + 2) * chunk + 2 * block + 5
    assert b < (q + 1) * chunk, "the single-tile segment must fit in its chunk"
    return [0, 3, 10, 21, a, a, b, n]


def _tile_pieces(start, end, block):
    """What _tile_gram runs for columns start:end (mirrors its branches)."""
    if end - start <= block:
        return {"one masked block"}
    body = (start + 15) // 16 * 16
    pieces = {"head"} if start < body else {"no head"}
    num_full = (end - body) // block
    if num_full:
        pieces.add("body")
    pieces.add("tail" if body + num_full * block < end else "no tail")
    return pieces


def _gram_paths(segments, chunk, block, slots):
    """The paths the Gram kernels take for this layout, read off the kernels' tile table."""
    offsets = segments.offsets.tolist()
    tables = tile_table(segments, chunk, torch.device(DEVICE))
    paths = set()
    for seg, start, end, ntiles, _slot, _first, count in tables.table.cpu().tolist():
        ranges = [(offsets[s], offsets[s + 1]) for s in range(seg, seg + count)] if count > 1 else [(start, end)]
        if count > 1:
            paths.add("packed run")
        for lo, hi in ranges:
            if hi > lo:
                paths |= _tile_pieces(lo, hi, block)
            else:
                paths.add("empty segment")
    for _seg, _first, ntiles in tables.reduce.cpu().tolist()[:tables.num_multi]:
        paths.add("reduction: several rounds, last partial" if ntiles > slots and ntiles % slots
                  else "reduction: one round" if ntiles < slots else "reduction: other")
    return paths


GRAM_PATHS = {"packed run", "one masked block", "head", "no head", "body", "tail", "no tail", "empty segment",
              "reduction: several rounds, last partial", "reduction: one round"}


def combine_path_layouts(block):
    """Two layouts whose blocks take all four (full / masked last) x (one segment / search)
    combinations, with an empty segment inside a searched block."""
    b = block
    return [[0, 5, 5, 2 * b + 3, 6 * b, 8 * b + 2, 8 * b + 7],  # last block: masked, search
            [0, 3 * b + 1, 5 * b + 9]]                         # last block: masked, one segment


def _combine_paths(segments, block):
    table = block_table(segments, block, torch.device(DEVICE)).cpu()
    n = segments.numel
    paths = set()
    for pid, (_first, _last, steps) in enumerate(table.tolist()):
        full = (pid + 1) * block <= n
        paths.add(("full" if full else "masked") + (", one segment" if steps == 0 else ", search"))
    return paths


COMBINE_PATHS = {"full, one segment", "full, search", "masked, one segment", "masked, search"}


def _reduce_slots_used(num_tasks, reduce_slots):
    """The slots one reduction round loads (gram.py _launch_gram caps them by T)."""
    return min(reduce_slots, max(1, 2048 // next_pow2(num_tasks * num_tasks)))


def _forms(host, form):
    grads = host.to(DEVICE)
    return as_task_grads([g.clone() for g in grads] if form == "list" else grads)


# ---- gram ---------------------------------------------------------------------------------------

def _check_gram(num_tasks, dtype, form, chunk, block, reduce_slots):
    slots = _reduce_slots_used(num_tasks, reduce_slots)
    segs = Segments(torch.tensor(gram_path_layout(chunk, block, slots)))
    assert _gram_paths(segs, chunk, block, slots) >= GRAM_PATHS
    gen = torch.Generator().manual_seed(num_tasks)
    host = small_int_grads(num_tasks, segs.numel, dtype, generator=gen)
    got = gram_triton(_forms(host, form), segs, chunk=chunk, block=block, reduce_slots=reduce_slots)
    expected = gram_reference(as_task_grads(host), segs)
    assert_close(got, expected, atol=0, rtol=0, what=f"gram T={num_tasks} {dname(dtype)} {form} chunk={chunk}")


GRAM_GRID = [pytest.param(t, d, f, id=f"T{t}-{dname(d)}-{f}")
             for t, d, f in itertools.product([1, 3, 4, 9], DTYPES, ["stacked", "list"])]


@pytest.mark.parametrize("num_tasks, dtype, form", GRAM_GRID)
def test_gram_every_path_is_exact(num_tasks, dtype, form):
    """Small constants (the interpreter's sizes); on a GPU the same launches compiled."""
    _check_gram(num_tasks, dtype, form, **SMALL)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tasks, dtype, form",
                         [pytest.param(t, d, f, id=f"T{t}-{dname(d)}-{f}")
                          for t, d, f in itertools.product([3, 4, 9], DTYPES, ["stacked", "list"])])
def test_gram_every_path_is_exact_at_gpu_constants(num_tasks, dtype, form):
    """GRAM_CHUNK 16384, REDUCE_SLOTS 32 and the default block; bf16/fp16 run tl.dot on the
    16-bit values (UPCAST=False), fp32 with T = 9 tl.dot in "ieee" precision."""
    assert not tiles_mod.INTERPRET and GRAM_CHUNK == 16384 and REDUCE_SLOTS == 32
    _check_gram(num_tasks, dtype, form, chunk=GRAM_CHUNK, block=gram_block(num_tasks, dtype),
                reduce_slots=REDUCE_SLOTS)


# ---- combine ------------------------------------------------------------------------------------

def _check_combine(num_tasks, dtype, form, block):
    covered = set()
    for bounds in combine_path_layouts(block):
        segs = Segments(torch.tensor(bounds))
        covered |= _combine_paths(segs, block)
        gen = torch.Generator().manual_seed(20 + num_tasks)
        host = small_int_grads(num_tasks, segs.numel, dtype, generator=gen)
        weights = quarter_weights(segs.num_segments, num_tasks, generator=gen)
        expected = torch.empty(segs.numel, dtype=torch.float64)
        combine_reference(as_task_grads(host), weights, segs, expected)
        out = torch.empty(segs.numel, dtype=dtype, device=DEVICE)
        combine_triton(_forms(host, form), weights.to(DEVICE), segs, out, block=block)
        assert_close(out, expected, atol=0, rtol=0, what=f"combine T={num_tasks} {dname(dtype)} {form} {bounds}")
    assert covered >= COMBINE_PATHS


@pytest.mark.parametrize("num_tasks, dtype, form", GRAM_GRID)
def test_combine_every_path_is_exact(num_tasks, dtype, form):
    _check_combine(num_tasks, dtype, form, SMALL_COMBINE_BLOCK)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tasks, dtype, form",
                         [pytest.param(t, d, f, id=f"T{t}-{dname(d)}-{f}")
                          for t, d, f in itertools.product([3, 4, 9], DTYPES, ["stacked", "list"])])
def test_combine_every_path_is_exact_at_the_default_block(num_tasks, dtype, form):
    _check_combine(num_tasks, dtype, form, combine_block(num_tasks))


def test_combine_bits_do_not_depend_on_block_size_or_path():
    """combine.py's guarantee: each element is one float32 fma chain in task order, so the
    bits do not depend on the block size or on the path a block takes. Random (inexact)
    inputs, T = 5: every block size and a layout that sends the same elements through the
    search path instead of the one-segment path give identical bits."""
    n, num_tasks = 300, 5
    grads = random_grads(num_tasks, n, torch.float32, device=DEVICE,
                         generator=torch.Generator().manual_seed(3))
    tg = as_task_grads(grads)
    weights = torch.rand(1, num_tasks, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    one = Segments(torch.tensor([0, n]))
    # The same weights for every segment of a layout cut at odd places: its blocks search.
    cut = Segments(torch.tensor([0, 1, 2, 3, 100, 101, 233, 234, 235, 299, n]))
    cut_weights = weights.expand(cut.num_segments, num_tasks).contiguous()
    first = None
    for block in (16, 64, 512):
        for segs, w in ((one, weights), (cut, cut_weights)):
            out = torch.empty(n, dtype=torch.float32, device=DEVICE)
            combine_triton(tg, w, segs, out, block=block)
            if first is None:
                first = out
            torch.testing.assert_close(out, first, atol=0, rtol=0, msg=f"block {block}, {segs.num_segments} segments")
    assert "full, search" in _combine_paths(cut, 64) and "full, one segment" in _combine_paths(one, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_combine_bits_equal_the_cuda_backend(dtype):
    """Both backends compute w_0 g_0, then fma(w_t, g_t, acc) in task order, rounded once:
    identical bits on random inputs, aligned rows, a layout with boundaries inside blocks."""
    import bucketmoo_kernels as bm

    reason = bm.available_backends("cuda").get("cuda")
    if reason is not None:
        pytest.skip(f"the cuda backend is unavailable: {reason}")
    n, num_tasks = 100_003, 5
    grads = random_grads(num_tasks, n, dtype, device=DEVICE, generator=torch.Generator().manual_seed(6))
    segs = Segments(torch.tensor([0, 7, 7, 40_000, 40_001, 77_777, n]))
    weights = torch.rand(segs.num_segments, num_tasks, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    rows = [g.clone() for g in grads]
    got = bm.combine(rows, weights, segs, backend="triton")
    expected = bm.combine(rows, weights, segs, backend="cuda")
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
