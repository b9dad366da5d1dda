"""The ``cuda`` backend (csrc/cuda + python/cuda_ops.cpp) against the float64 reference.

Every test here needs a GPU (marker ``gpu``: skipped without CUDA). With a GPU but without
the compiled extension the tests skip with the load error, unless
``BUCKETMOO_REQUIRE_CUDA_EXT=1`` (CI on a GPU machine): then they fail.

Oracles: ``reference.gram_reference`` / ``combine_reference`` (float64, CPU) and the methods'
torch functions (float64, CPU); never hard-coded outputs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import bucketmoo_kernels as bm
from bucketmoo_kernels.inputs import Segments, as_segments, as_task_grads
from bucketmoo_kernels.methods import get_method
from bucketmoo_kernels.methods.cagrad import cagrad_stationary, cagrad_weights
from bucketmoo_kernels.methods.mgda import mgda_weights
from bucketmoo_kernels.methods.pcgrad import pcgrad_orders, pcgrad_weights
from bucketmoo_kernels.reference import combine_reference, gram_reference
from tests.utils import (DTYPE_TOLERANCES, DTYPES, EXACT_BOUND, LAYOUTS, assert_close, offsets, quarter_weights,
                         random_grads, small_int_grads)

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
MAX_TASKS = 8  # csrc/cuda/bucketmoo_cuda.h kMaxTasks
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@pytest.fixture(autouse=True)
def _cuda_backend():
    """Skip (or fail, when the extension is required) if the cuda backend cannot run."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reason = bm.available_backends(DEVICE)["cuda"]
    if reason is not None:
        if os.environ.get("BUCKETMOO_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(f"the cuda backend is required but unavailable: {reason}")
        pytest.skip(f"the cuda backend is unavailable: {reason}")


def _grads(num_tasks, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return random_grads(num_tasks, n, dtype, generator=gen).to(DEVICE)


def _gram_tolerance(n):
    # float32 accumulation of n products of O(1) values: error well below 1e-6 * n.
    return 1e-6 * n + 1e-5, 1e-4


def _reference_gram(grads, segments):
    tg = as_task_grads(grads.cpu() if isinstance(grads, torch.Tensor) else [g.cpu() for g in grads])
    return gram_reference(tg, as_segments(segments, tg.numel))


# ---------------------------------------------------------------------------------- gram
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n", [1, 203, 100_003])
def test_gram_matches_reference(dtype, layout, num_tasks, n):
    grads = _grads(num_tasks, n, dtype)
    segments = LAYOUTS[layout](n)
    got = bm.gram(grads, segments, backend="cuda")
    expected = _reference_gram(grads, segments)
    assert got.dtype == torch.float32 and got.device.type == DEVICE
    atol, rtol = _gram_tolerance(n)
    assert_close(got, expected, atol=atol, rtol=rtol, what=f"gram T={num_tasks} n={n} {layout}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_gram_long_segments_many_tiles(dtype):
    # Several segments spanning many tiles, boundaries inside tiles, one tiny segment between.
    n = (1 << 21) + 5
    grads = _grads(8, n, dtype)
    segments = offsets(700_001, 3, 0, n - 700_004)
    got = bm.gram(grads, segments, backend="cuda")
    atol, rtol = _gram_tolerance(n)
    assert_close(got, _reference_gram(grads, segments), atol=atol, rtol=rtol, what="gram long")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_gram_unaligned_and_list_inputs(dtype):
    # Rows of a [T, N] buffer with N odd (rows not 16-byte aligned: scalar path), the same
    # data as separate aligned tensors (vector path), and rows starting one element in.
    num_tasks, n = 4, 30_001
    stacked = _grads(num_tasks, n, dtype)
    rows = [g.clone() for g in stacked]
    storage = torch.zeros(num_tasks, n + 1, dtype=dtype, device=DEVICE)
    storage[:, 1:] = stacked
    shifted = [storage[t, 1:] for t in range(num_tasks)]
    segments = LAYOUTS["uneven"](n)
    expected = _reference_gram(stacked, segments)
    atol, rtol = _gram_tolerance(n)
    for what, grads in [("stacked", stacked), ("list", rows), ("shifted", shifted)]:
        assert_close(bm.gram(grads, segments, backend="cuda"), expected, atol=atol, rtol=rtol, what=what)


# ---------------------------------------------------------------------------------- exact gram
# Small-integer inputs (tests/utils.py small_int_grads): every partial sum is an exact float32
# integer, so the Gram must equal the float64 reference with atol = 0. The layout below is cut
# in units of the kernel's tile L (csrc/cuda/gram.cu gram_tile, mirrored by _cuda_gram_tile)
# so that each path of gram_partial_kernel / gram_finalize_kernel is hit at least once:
#
#   [0, 3)               short intersection (< L/8: one warp), single tile, starts at t0
#   [3, L/8 + 5)         big intersection (>= L/8: the whole block), single tile; with aligned
#                        rows the vector path runs a scalar head [3, V) and tail (L/8 + 5 is
#                        not a multiple of V = 4 or 8) around the 128-bit body
#   [L/8 + 5, 40 L + 7)  a segment over 41 tiles: first piece starts after t0 (slot 2b + 1),
#                        39 full tiles (block path, aligned body, no head or tail), last
#                        piece of 7 elements on one warp (slot 2b); finalize: 41 slots > 32
#                        lanes, so lanes take their k-th and (k + 32)-th slot
#   [40 L + 7, 40 L + 7) an empty segment (finalize writes zeros)
#   [40 L + 7, +L/4 + 3) big, single tile, head and tail
#   40 x 5 elements      tiny segments, several per warp (pass 1's round robin over 8 warps)
#   [.., N = 42 L + 13)  the rest: crosses into the last, partial tile (N is a multiple of
#                        neither V nor L)
# Stacked [T, N] rows with N odd are misaligned for t >= 1 (the scalar kernel), separate
# tensors are aligned (vector kernel), rows one element into their storage misaligned (scalar).


def _cuda_gram_tile(num_tasks, dtype):
    """csrc/cuda/gram.cu gram_tile: ~128 KiB of gradient bytes per block, 8192..65536."""
    size = 4 if dtype == torch.float32 else 2
    tile = 8192
    while tile < 65536 and tile * 2 * num_tasks * size <= 131072:
        tile *= 2
    return tile


def _gram_path_layout(tile):
    big, first = tile // 8, tile // 8 + 5
    lengths = [3, first - 3, 40 * tile + 7 - first, 0, tile // 4 + 3] + [5] * 40
    used = sum(lengths)
    return offsets(*lengths, 42 * tile + 13 - used), big


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("num_tasks", [1, 3, 8])
def test_gram_is_exact_on_small_integers_on_every_path(dtype, num_tasks):
    tile = _cuda_gram_tile(num_tasks, dtype)
    segments, big = _gram_path_layout(tile)
    n = int(segments[-1])
    lengths = segments.diff().tolist()
    assert n * EXACT_BOUND ** 2 < 2 ** 24 and lengths[1] >= big > lengths[0]
    gen = torch.Generator().manual_seed(num_tasks)
    host = small_int_grads(num_tasks, n, dtype, generator=gen)
    expected = _reference_gram(host, segments)
    stacked = host.to(DEVICE)
    storage = torch.zeros(num_tasks, n + 1, dtype=dtype, device=DEVICE)
    storage[:, 1:] = stacked
    forms = {"aligned rows": [g.clone() for g in stacked], "stacked": stacked,
             "shifted rows": [storage[t, 1:] for t in range(num_tasks)]}
    for what, grads in forms.items():
        got = bm.gram(grads, segments, backend="cuda")
        assert_close(got, expected, atol=0, rtol=0, what=f"gram {what} T={num_tasks} tile={tile}")


# ---------------------------------------------------------------------------------- combine
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 8])
@pytest.mark.parametrize("n", [5, 203, 100_003])
def test_combine_matches_reference(dtype, layout, num_tasks, n):
    grads = _grads(num_tasks, n, dtype)
    segs = as_segments(LAYOUTS[layout](n), n)
    weights = torch.rand(segs.num_segments, num_tasks, generator=torch.Generator().manual_seed(1))
    got = bm.combine(grads, weights.to(DEVICE), segs, backend="cuda")
    expected = torch.empty(n, dtype=torch.float64)
    combine_reference(as_task_grads(grads.cpu()), weights, segs, expected)
    atol, rtol = DTYPE_TOLERANCES[dtype]
    assert got.dtype == dtype
    assert_close(got, expected, atol=atol, rtol=rtol, what=f"combine T={num_tasks} n={n} {layout}")


# Exact combine: small integers times multiples of 1/4 (tests/utils.py), so the float32 sum
# rounds to nothing in any dtype and must equal the float64 reference with atol = 0. The tile
# is 256 threads x 4 vectors of V elements (csrc/cuda/combine.cu combine_tile: 4096 fp32,
# 8192 16-bit). The layout: segment boundaries at non-multiples of V (element path for the
# chunk that crosses one), a one-element and an empty segment, a segment over many tiles
# (vector path, cached weights), a block whose tile holds several segments (binary search
# per chunk), and N not a multiple of V (scalar end of the last tile). Shifted rows and
# output run the element path everywhere.
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("num_tasks", [1, 3, 8])
def test_combine_is_exact_on_small_integers_on_every_path(dtype, num_tasks):
    tile = 256 * 4 * (4 if dtype == torch.float32 else 8)
    segs = as_segments(offsets(5, 1, 0, 3 * tile + 11, 17, 2 * tile - 3, 9 * tile + 6), 14 * tile + 37)
    n = segs.numel
    gen = torch.Generator().manual_seed(10 + num_tasks)
    host = small_int_grads(num_tasks, n, dtype, generator=gen)
    weights = quarter_weights(segs.num_segments, num_tasks, generator=gen)
    expected = torch.empty(n, dtype=torch.float64)
    combine_reference(as_task_grads(host), weights, segs, expected)
    grads = host.to(DEVICE)
    got = bm.combine([g.clone() for g in grads], weights.to(DEVICE), segs, backend="cuda")
    assert_close(got, expected, atol=0, rtol=0, what=f"combine aligned T={num_tasks}")
    storage = torch.zeros(num_tasks, n + 1, dtype=dtype, device=DEVICE)
    storage[:, 1:] = grads
    out = torch.empty(n + 1, dtype=dtype, device=DEVICE)
    bm.combine([storage[t, 1:] for t in range(num_tasks)], weights.to(DEVICE), segs, out=out[1:], backend="cuda")
    assert_close(out[1:], expected, atol=0, rtol=0, what=f"combine shifted T={num_tasks}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_combine_aligned_and_unaligned_paths_agree_bitwise(dtype):
    # The vector and the element path use the same operation order: identical bits.
    num_tasks, n = 3, 10_007
    grads = _grads(num_tasks, n, dtype)
    segs = as_segments(offsets(1000, 1, 0, 5000, n - 6001), n)
    weights = torch.rand(segs.num_segments, num_tasks, device=DEVICE)
    aligned = bm.combine([g.clone() for g in grads], weights, segs, backend="cuda")
    storage = torch.zeros(num_tasks, n + 1, dtype=dtype, device=DEVICE)
    storage[:, 1:] = grads
    out_storage = torch.empty(n + 1, dtype=dtype, device=DEVICE)
    shifted = bm.combine([storage[t, 1:] for t in range(num_tasks)], weights, segs, out=out_storage[1:],
                         backend="cuda")
    assert torch.equal(aligned, shifted)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("row", [0, 2])
def test_out_may_alias_an_input(dtype, row):
    grads = _grads(3, 50_001, dtype)
    segments = LAYOUTS["uneven"](50_001)
    expected = bm.fused_bucket_moo(grads.clone(), segments=segments, backend="cuda")
    bucket = grads[row]  # a view into the stacked tensor, like a DDP bucket buffer
    result = bm.fused_bucket_moo(grads, segments=segments, out=bucket, backend="cuda")
    assert result.data_ptr() == bucket.data_ptr()
    assert torch.equal(bucket, expected)
    rows = [g.clone() for g in _grads(3, 50_001, dtype, seed=1)]
    expected = bm.fused_bucket_moo([r.clone() for r in rows], segments=segments, backend="cuda")
    bm.fused_bucket_moo(rows, segments=segments, out=rows[1], backend="cuda")
    assert torch.equal(rows[1], expected)


def test_out_partially_overlapping_an_input_is_rejected():
    n = 1000
    buf = torch.randn(n + 1, device=DEVICE)
    grads = [buf[:n], torch.randn(n, device=DEVICE)]
    segs = torch.tensor([0, n], device=DEVICE)
    weights = torch.full((1, 2), 0.5, device=DEVICE)
    with pytest.raises(RuntimeError, match="partially overlaps"):
        torch.ops.bucketmoo.combine_(buf[1:], grads, weights, segs)


def test_too_many_tasks_is_a_clear_error():
    grads = _grads(MAX_TASKS + 1, 100, torch.float32)
    with pytest.raises(RuntimeError, match=f"at most {MAX_TASKS}"):
        bm.gram(grads, backend="cuda")


# ---------------------------------------------------------------------------------- solvers
def _random_gram(num_tasks, num_segments, seed=0):
    """float64 [S, T, T] Gram matrices of random (partly conflicting) gradients, plus a
    degenerate segment (identical gradients) and a zero one."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(num_segments, num_tasks, 3 + num_tasks, generator=gen, dtype=torch.float64)
    g[:, 1::2] -= 0.8 * g[:, :1]
    if num_segments >= 3:
        g[1] = g[1, :1].expand_as(g[1])
        g[2] = 0
    return g @ g.transpose(1, 2)


MGDA_CASES = [(2, "auto"), (2, "closed_form"), (2, "exact"), (3, "auto"), (5, "exact"), (8, "auto"),
              (3, "pgd"), (8, "pgd"), (12, "pgd")]


@pytest.mark.parametrize("num_tasks,solver", MGDA_CASES, ids=[f"T{t}-{s}" for t, s in MGDA_CASES])
def test_mgda_solver_matches_torch(num_tasks, solver):
    gram = _random_gram(num_tasks, 37)
    code = {"auto": 0, "closed_form": 1, "exact": 2, "pgd": 3}[solver]
    # tol = 0: a fixed iteration count for pgd, the same in both (early stops differ by design).
    got = torch.ops.bucketmoo.solve_mgda(gram.to(DEVICE), code, 300, 0.0)
    expected = mgda_weights(gram, solver=solver, max_iter=300, tol=0.0)
    assert got.dtype == torch.float64 and got.shape == expected.shape
    assert_close(got, expected, atol=1e-7, rtol=1e-6, what=f"mgda {solver}")


@pytest.mark.parametrize("num_tasks", [1, 2, 4, 8, 12])
def test_pcgrad_solver_matches_torch(num_tasks):
    gram = _random_gram(num_tasks, 29)
    orders = pcgrad_orders(num_tasks, seed=3)
    if num_tasks == 1:
        orders = orders.reshape(1, 0)
    got = torch.ops.bucketmoo.solve_pcgrad(gram.to(DEVICE), orders.to(DEVICE))
    assert_close(got, pcgrad_weights(gram, seed=3), atol=1e-9, rtol=1e-9, what="pcgrad")


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 8])
@pytest.mark.parametrize("c,rescale", [(0.4, 1), (0.0, 0), (1.5, 2)])
def test_cagrad_solver_matches_torch(num_tasks, c, rescale):
    gram = _random_gram(num_tasks, 23)
    got = torch.ops.bucketmoo.solve_cagrad(gram.to(DEVICE), c, rescale)
    got = cagrad_stationary(gram.to(DEVICE), got, {"c": c})  # the record's finish, as the weight step applies it
    assert_close(got, cagrad_weights(gram, c=c, rescale=rescale), atol=1e-7, rtol=1e-6, what="cagrad")


@pytest.mark.parametrize("num_tasks", [1, 2, 5, 16])
@pytest.mark.parametrize("method,code", [("upgrad", 4), ("dualproj", 5)])
def test_dual_cone_solver_matches_torch_and_cpu(num_tasks, method, code):
    """solve_dual_cone on the GPU against the torch function (the minimiser is unique: 1e-10
    relative at reg_eps = 1e-4) and against the same header code on the CPU."""
    gram = _random_gram(num_tasks, 31)
    gram[3] = 0.0  # a zero segment
    got = torch.ops.bucketmoo.solve_dual_cone(gram.to(DEVICE), code, 0.0, 1e-4, 200)
    expected = get_method(method)(gram)
    assert_close(got, expected, atol=1e-10 * float(expected.abs().max()), rtol=1e-10, what=method)
    assert_close(got, torch.ops.bucketmoo.solve_dual_cone(gram, code, 0.0, 1e-4, 200), atol=1e-12,
                 rtol=1e-12, what=f"{method} cuda vs cpu")


# ---------------------------------------------------------------------------------- weight step
WEIGHT_CASES = [("mean", {}), ("mgda", {}), ("mgda", {"solver": "exact"}),
                ("mgda", {"solver": "pgd", "max_iter": 80, "tol": 0.0}), ("pcgrad", {"seed": 4}),
                ("cagrad", {"c": 0.5, "rescale": 2}), ("upgrad", {}), ("dualproj", {})]
LOSSES = [0.5, 2.0, 0.0, 3.0, 1.0, 0.25, 4.0, 1.5, 0.75, 2.5, 1.25, 0.125]


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 5, 8, 12])
@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_weight_step_matches_cpu(num_tasks, normalization):
    """The one-launch weight step (torch.ops.bucketmoo.weights, one warp per segment) against
    the same header code on the CPU, every method, and what bm.solve returns on the GPU."""
    gram = _random_gram(num_tasks, 41).float()
    gram[5] = 0.0  # a zero segment
    for method, options in WEIGHT_CASES:
        if num_tasks > 8 and (method == "cagrad" or options.get("solver") == "exact"):
            continue
        kw = dict(normalization=normalization, losses=LOSSES[:num_tasks], **options)
        for normalize_weights in (True, False):
            got = bm.solve(gram.to(DEVICE), method, backend="cuda", normalize_weights=normalize_weights, **kw)
            expected = bm.solve(gram, method, backend="cpu", normalize_weights=normalize_weights, **kw)
            assert got.dtype == torch.float32 and got.device.type == DEVICE
            tol = 1e-5 if options.get("solver") == "pgd" else 1e-6
            assert_close(got, expected, atol=tol, rtol=tol,
                         what=f"{method} {options} {normalization} T={num_tasks} nw={normalize_weights}")


# ---------------------------------------------------------------------------------- fused
def _reference_fused(grads, method, segments, **options):
    tg = as_task_grads(grads.cpu())
    segs = as_segments(segments, tg.numel)
    gram = gram_reference(tg, segs)
    weights = bm.solve(gram, method, backend="torch", **options)
    out = torch.empty(tg.numel, dtype=torch.float64)
    combine_reference(tg, weights, segs, out)
    return out, weights


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("method", ["mean", "mgda", "pcgrad", "cagrad"])
@pytest.mark.parametrize("num_tasks", [2, 3, 5, 8])
def test_fused_matches_reference(dtype, method, num_tasks):
    n = 20_011
    grads = _grads(num_tasks, n, dtype)
    segments = LAYOUTS["uneven"](n)
    out, info = bm.fused_bucket_moo(grads, method=method, segments=segments, backend="cuda", return_info=True)
    expected, weights = _reference_fused(grads, method, segments)
    assert info.backend == "cuda" and out.dtype == dtype
    assert_close(info.weights, weights, atol=1e-4, rtol=1e-4, what=f"{method} weights")
    atol, rtol = DTYPE_TOLERANCES[dtype]
    assert_close(out, expected, atol=atol, rtol=rtol, what=f"{method} combined")


# ---------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("layout", ["one", "chunk7", "uneven"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_repeated_calls_are_bitwise_identical(layout, dtype):
    n = 1_000_003
    grads = _grads(4, n, dtype)
    segments = LAYOUTS[layout](n)
    first, info = bm.fused_bucket_moo(grads, segments=segments, backend="cuda", return_info=True)
    for _ in range(3):
        again, info2 = bm.fused_bucket_moo(grads, segments=segments, backend="cuda", return_info=True)
        assert torch.equal(info.gram, info2.gram)
        assert torch.equal(info.weights, info2.weights)
        assert torch.equal(first, again)


def test_cuda_graph_replay_equals_eager():
    n, num_tasks = 300_007, 4
    grads = _grads(num_tasks, n, torch.bfloat16)
    segs = Segments.from_lengths([100_000, 7, 0, 200_000])  # built once: its device copy is cached
    out = torch.empty(n, dtype=grads.dtype, device=DEVICE)

    def step():
        bm.fused_bucket_moo(grads, segments=segs, out=out, backend="cuda", check_finite=False)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator, cached offsets)
        step()
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (5, 6):
        grads.copy_(_grads(num_tasks, n, torch.bfloat16, seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        expected = bm.fused_bucket_moo(grads, segments=segs, backend="cuda", check_finite=False)
        assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------- op checks
def test_opcheck_cuda_ops():
    grads = [g for g in _grads(3, 1000, torch.float32)]
    offs = torch.tensor([0, 10, 10, 1000], device=DEVICE)
    gram64 = torch.ops.bucketmoo.gram(grads, offs).double()
    torch.library.opcheck(torch.ops.bucketmoo.gram.default, (grads, offs))
    torch.library.opcheck(torch.ops.bucketmoo.solve_mgda.default, (gram64, 0, 100, 0.0))
    torch.library.opcheck(torch.ops.bucketmoo.solve_cagrad.default, (gram64, 0.4, 1))
    torch.library.opcheck(torch.ops.bucketmoo.solve_dual_cone.default, (gram64, 4, 0.0, 1e-4, 200))
    orders = pcgrad_orders(3, 0).to(DEVICE)
    torch.library.opcheck(torch.ops.bucketmoo.solve_pcgrad.default, (gram64, orders))
    out = torch.empty(1000, device=DEVICE)
    weights = torch.rand(3, 3, device=DEVICE)
    torch.library.opcheck(torch.ops.bucketmoo.combine_.default, (out, grads, weights, offs))
    losses = torch.rand(3, 3, dtype=torch.float64, device=DEVICE) + 0.5
    for args in ((None, None, 1, 0, 100, 0.0, 0.0, 0, 0, True),       # mgda, no normalisation
                 (orders, losses, 2, 0, 0, 0.0, 0.0, 0, 3, False)):   # pcgrad, loss+
        torch.library.opcheck(torch.ops.bucketmoo.weights.default, (gram64.float(), *args))


# ---------------------------------------------------------------------------------- sanitizer
_SANITIZER_SCRIPT = textwrap.dedent("""
    import torch, bucketmoo_kernels as bm
    from bucketmoo_kernels.inputs import Segments
    for dtype in (torch.float32, torch.bfloat16):
        for num_tasks in (2, 3, 8):
            n = 40_003
            grads = torch.randn(num_tasks, n, device="cuda").to(dtype)
            for segments in (None, 7, Segments.from_lengths([10_000, 0, 1, n - 10_001])):
                for method in ("mgda", "pcgrad", "cagrad"):
                    bm.fused_bucket_moo(grads, method=method, segments=segments, backend="cuda")
            shifted = [torch.randn(n + 1, device="cuda").to(dtype)[1:] for _ in range(num_tasks)]
            bm.fused_bucket_moo(shifted, segments=1000, out=shifted[0], backend="cuda")
    eye = torch.eye(12, dtype=torch.float64, device="cuda").expand(5, 12, 12).contiguous()
    torch.ops.bucketmoo.solve_mgda(eye, 3, 50, 0.0)  # pgd, T = 12
    for method in ("mgda", "pcgrad"):  # the weight step's T = 12 kernel
        bm.solve(eye.float(), method, backend="cuda", normalization="l2")
    torch.ops.bucketmoo.solve_pcgrad(eye, torch.stack([torch.tensor([j for j in range(12) if j != i])
                                                       for i in range(12)]).cuda())
    torch.cuda.synchronize()
    print("sanitizer script done")
""")


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_finds_nothing(tool):
    exe = shutil.which("compute-sanitizer") or (
        "/usr/local/cuda/bin/compute-sanitizer" if os.path.exists("/usr/local/cuda/bin/compute-sanitizer") else None)
    if exe is None:
        pytest.skip("compute-sanitizer not found")
    cmd = [exe, f"--tool={tool}", "--error-exitcode=1", "--target-processes=all", sys.executable, "-c",
           _SANITIZER_SCRIPT]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0 and "sanitizer script done" in result.stdout, (
        f"compute-sanitizer --tool={tool} reported errors:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
