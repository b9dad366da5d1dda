"""The Triton backend against the float64 torch reference.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` on CPU tensors (set by
``tests/conftest.py``); with one, the very same tests run the compiled kernels on CUDA
tensors. Sizes are small so that the interpreter stays fast.
"""

import itertools
import os

import pytest
import torch

pytest.importorskip("triton")

import bucketmoo_kernels as bm  # noqa: E402
from bucketmoo_kernels.inputs import Segments, as_segments, as_task_grads  # noqa: E402
from bucketmoo_kernels.methods import get_method  # noqa: E402
from bucketmoo_kernels.methods.cagrad import cagrad_weights  # noqa: E402
from bucketmoo_kernels.methods.mgda import mgda_closed_form, mgda_exact, mgda_pgd  # noqa: E402
from bucketmoo_kernels.methods.pcgrad import pcgrad_weights  # noqa: E402
from bucketmoo_kernels.reference import combine_reference, gram_reference  # noqa: E402
from bucketmoo_kernels.triton import (TritonBackend, cagrad_triton, combine_triton,  # noqa: E402
                                      gram_triton, mgda_closed_form_triton, mgda_exact_triton,
                                      mgda_pgd_triton, pcgrad_triton)
from bucketmoo_kernels.weight_step import WeightStep  # noqa: E402
from bucketmoo_kernels.triton.tiles import row_addressing, tile_table  # noqa: E402
from tests.utils import DTYPE_TOLERANCES, DTYPES, LAYOUTS, assert_close, offsets, random_grads  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N = 203  # not a multiple of any block size
# A backend with tiny tiles, so that long segments are split and the partial Grams reduced.
SMALL_TILES = TritonBackend(gram_chunk=48, combine_block=16)


# Under the interpreter (no GPU) each launch takes seconds: these tests (names or ids) stay in
# the fast lane, one or two representatives of every kernel and solver; the rest are ``slow``
# (tests/conftest.py). With a GPU every test is fast.
FAST_UNDER_INTERPRETER = {
    "test_gram_matches_reference[T3-float32-uneven]", "test_gram_matches_reference[T8-bfloat16-empty+len1]",
    "test_combine_matches_reference[T3-float32-uneven]", "test_combine_matches_reference[T5-float16-one]",
    "test_gram_of_empty_input_is_zero", "test_exact_solver_matches_torch[5]",
    "test_exact_solver_with_two_tasks_and_closed_form", "test_pcgrad_matches_torch[0-5]",
    "test_cagrad_matches_torch[0.4-1-3]",
    "test_backend_is_registered_and_says_when_it_cannot_run", "test_solve_falls_back_to_torch_where_it_has_no_kernel",
    "test_runs_under_the_interpreter_on_cpu", "test_pcgrad_orders_cache_is_bounded",
}


def dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


GRID = [pytest.param(t, d, lay, id=f"T{t}-{dname(d)}-{lay}")
        for t, d, lay in itertools.product(range(2, 9), DTYPES, LAYOUTS)]


def grads_and_segments(num_tasks, dtype, layout, n=N):
    grads = random_grads(num_tasks, n, dtype, device=DEVICE)
    segs = as_segments(LAYOUTS[layout](n), n)
    return grads, segs


def gram_tolerance(n):
    # float32 accumulation of n products of O(1) values: a few ulps of the running sum.
    return dict(atol=2e-6 * n, rtol=1e-5)


# ---- gram -----------------------------------------------------------------------------------

@pytest.mark.parametrize("num_tasks, dtype, layout", GRID)
def test_gram_matches_reference(num_tasks, dtype, layout):
    grads, segs = grads_and_segments(num_tasks, dtype, layout)
    expected = gram_reference(as_task_grads(grads), segs)
    for backend in (TritonBackend(), SMALL_TILES) if layout != "chunk7" else (TritonBackend(),):
        got = backend.gram(as_task_grads(grads), segs)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert_close(got, expected, **gram_tolerance(N), what=f"gram chunk={backend.gram_chunk}")


def test_gram_long_segment_split_into_many_tiles_is_deterministic():
    n = 3000
    grads = random_grads(5, n, torch.bfloat16, device=DEVICE)
    segs = Segments(offsets(1, 2500, 0, 499))
    tg = as_task_grads(grads)
    first = gram_triton(tg, segs, chunk=64, block=16)  # the 2500-long segment has 40 tiles
    assert_close(first, gram_reference(tg, segs), **gram_tolerance(n), what="gram")
    for _ in range(2):
        torch.testing.assert_close(gram_triton(tg, segs, chunk=64, block=16), first, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_gram_with_more_than_eight_tasks(dtype):
    # fp32 switches from per-column outer products to tl.dot above 8 tasks.
    grads = random_grads(12, 300, dtype, device=DEVICE)
    segs = Segments(offsets(5, 200, 95))
    tg = as_task_grads(grads)
    got = gram_triton(tg, segs, chunk=128)
    assert_close(got, gram_reference(tg, segs), **gram_tolerance(300), what="gram T=12")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dname)
def test_gram_packs_runs_of_small_segments(dtype):
    gen = torch.Generator().manual_seed(3)
    lengths = (torch.randint(0, 5, (300,), generator=gen) * (torch.rand(300, generator=gen) < 0.7)).tolist()
    lengths[100] = 400  # a long segment split into tiles between two runs of small ones
    segs = Segments.from_lengths(lengths)
    table = tile_table(segs, 64, torch.device(DEVICE)).table.cpu()
    assert int(table[:, 6].max()) > 1 and table.shape[0] < segs.num_segments  # packed
    covered = sorted({s for row in table.tolist() for s in range(row[0], row[0] + row[6])})
    assert covered == list(range(segs.num_segments))  # every segment has a program
    grads = random_grads(4, segs.numel, dtype, device=DEVICE)
    tg = as_task_grads(grads)
    assert_close(gram_triton(tg, segs, chunk=64), gram_reference(tg, segs), **gram_tolerance(400), what="gram")


def test_gram_of_empty_input_is_zero():
    grads = torch.zeros(3, 0, device=DEVICE)
    got = bm.gram(grads, backend="triton")
    assert got.shape == (1, 3, 3) and int(torch.count_nonzero(got)) == 0


# ---- combine --------------------------------------------------------------------------------

@pytest.mark.parametrize("num_tasks, dtype, layout", GRID)
def test_combine_matches_reference(num_tasks, dtype, layout):
    grads, segs = grads_and_segments(num_tasks, dtype, layout)
    gen = torch.Generator().manual_seed(num_tasks)
    weights = torch.rand(segs.num_segments, num_tasks, generator=gen).to(DEVICE)
    weights = weights / weights.sum(-1, keepdim=True)
    tg = as_task_grads(grads)
    expected = torch.empty(N, dtype=torch.float64, device=DEVICE)
    combine_reference(tg, weights, segs, expected)
    atol, rtol = DTYPE_TOLERANCES[dtype]
    for backend in (TritonBackend(), SMALL_TILES):
        out = torch.full((N,), float("nan"), dtype=dtype, device=DEVICE)
        backend.combine(tg, weights, segs, out)
        assert_close(out, expected, atol=atol, rtol=rtol, what=f"combine block={backend.combine_block}")


@pytest.mark.parametrize("block", [16, 64])
def test_combine_blocks_spanning_many_tiny_and_empty_segments(block):
    gen = torch.Generator().manual_seed(block)
    lengths = torch.randint(0, 4, (150,), generator=gen) * (torch.rand(150, generator=gen) < 0.6)
    segs = Segments.from_lengths(lengths.tolist())
    n = segs.numel
    grads = random_grads(3, n, device=DEVICE)
    weights = torch.rand(segs.num_segments, 3, generator=gen).to(DEVICE)
    tg = as_task_grads(grads)
    expected = torch.empty(n, dtype=torch.float64, device=DEVICE)
    combine_reference(tg, weights, segs, expected)
    out = combine_triton(tg, weights, segs, torch.empty(n, device=DEVICE), block=block)
    assert_close(out, expected, *DTYPE_TOLERANCES[torch.float32], what="combine")


# ---- list vs stacked, strided rows, aliasing ----------------------------------------------

@pytest.mark.parametrize("num_tasks", [3, 8, 9])
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_list_and_stacked_inputs_agree_bit_for_bit(num_tasks, dtype):
    grads = random_grads(num_tasks, 150, dtype, device=DEVICE)
    segs = offsets(10, 0, 1, 139)
    separate = [g.clone() for g in grads]  # T separate allocations
    padded = torch.zeros(num_tasks, 163, dtype=dtype, device=DEVICE)
    padded[:, :150] = grads
    strided = padded[:, :150]  # row stride 163: a strided [T, N] view
    if num_tasks <= 8:
        assert row_addressing(as_task_grads(separate)).use_deltas  # read in place, no stacking
    base_gram = bm.gram(grads, segs, backend="triton")
    opts = dict(segments=segs, backend="triton", max_iter=20)  # PGD above 8 tasks: keep it short
    base_out = bm.fused_bucket_moo(grads, **opts)
    for other in (separate, strided):
        torch.testing.assert_close(bm.gram(other, segs, backend="triton"), base_gram, atol=0, rtol=0)
        torch.testing.assert_close(bm.fused_bucket_moo(other, **opts), base_out, atol=0, rtol=0)


def test_non_unit_stride_rows_fall_back_to_stacking():
    grads = random_grads(3, 100, device=DEVICE)
    rows = [torch.zeros(200, device=DEVICE)[::2].copy_(g) for g in grads]  # stride-2 rows
    assert not row_addressing(as_task_grads(rows)).use_deltas
    torch.testing.assert_close(bm.fused_bucket_moo(rows, segments=30, backend="triton"),
                               bm.fused_bucket_moo(grads, segments=30, backend="triton"), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("row", [0, 3])
@pytest.mark.parametrize("form", ["stacked", "list"])
def test_out_may_alias_a_grads_row(dtype, row, form):
    grads = random_grads(4, 170, dtype, device=DEVICE)
    segs = offsets(0, 60, 1, 109)
    expected = bm.fused_bucket_moo(grads.clone(), segments=segs, backend="triton")
    inputs = grads if form == "stacked" else [g.clone() for g in grads]
    bucket = inputs[row]
    result = bm.fused_bucket_moo(inputs, segments=segs, out=bucket, backend="triton")
    assert result.data_ptr() == bucket.data_ptr()
    torch.testing.assert_close(bucket, expected, atol=0, rtol=0)
    # Through the backend directly with tiles that split segments, too.
    inputs = [g.clone() for g in grads]
    w = torch.rand(4, 4, device=DEVICE)
    tg = as_task_grads(inputs)
    ref = torch.empty(170, dtype=torch.float64, device=DEVICE)
    combine_reference(tg, w, as_segments(segs, 170), ref)
    combine_triton(tg, w, as_segments(segs, 170), inputs[row], block=16)
    atol, rtol = DTYPE_TOLERANCES[dtype]
    assert_close(inputs[row], ref, atol=atol, rtol=rtol, what="aliased combine")


# ---- public API with backend="triton" -------------------------------------------------------
# (the fused op against the oracle, the three steps, plain averaging and a single task are
# checked for every backend in test_conformance.py)

def test_backend_is_registered_and_says_when_it_cannot_run(monkeypatch):
    assert bm.get_backend("triton", DEVICE).name == "triton"
    backend = TritonBackend()
    assert backend.unavailable_reason(torch.device(DEVICE)) is None
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in backend.unavailable_reason(torch.device("cpu"))
    assert backend.unavailable_reason(torch.device("meta")) is not None


def test_solve_falls_back_to_torch_where_it_has_no_kernel():
    g = bm.gram(random_grads(3, 40, device=DEVICE), backend="triton").double()
    backend = TritonBackend()
    assert backend.solve(g, WeightStep("mgda", {"solver": "closed_form"})) is None  # T = 3: torch raises
    g9 = bm.gram(random_grads(9, 40, device=DEVICE), backend="triton").double()
    assert backend.solve(g9, WeightStep("cagrad", {"c": 0.4, "rescale": 1})) is None
    assert backend.solve(g9, WeightStep("mgda", {"solver": "exact"})) is None
    with pytest.raises(ValueError, match="closed-form"):
        bm.solve(g, "mgda", backend="triton", solver="closed_form")


# ---- solver ---------------------------------------------------------------------------------

def random_grams(num_tasks, num_seg=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    grams = []
    for s in range(num_seg):
        n = [1, 2, num_tasks - 1, num_tasks, 3 * num_tasks, 50][s % 6]  # low rank and full rank
        g = torch.randn(num_tasks, max(n, 1), generator=gen, dtype=torch.float64)
        g += (s % 3 - 1) * 1.5 * torch.randn(max(n, 1), generator=gen, dtype=torch.float64)
        grams.append(g @ g.T)
    return torch.stack(grams).to(DEVICE)


@pytest.mark.parametrize("num_tasks", range(3, 9))
def test_exact_solver_matches_torch(num_tasks):
    grams = random_grams(num_tasks)
    got, expected = mgda_exact_triton(grams), mgda_exact(grams)
    full_rank = torch.linalg.matrix_rank(grams) == num_tasks
    # Full-rank Grams have a unique minimiser: the same weights.
    assert_close(got[full_rank], expected[full_rank], atol=1e-9, rtol=0, what="weights")
    assert_objective_and_direction_match(grams, got, expected)


def test_exact_solver_with_two_tasks_and_closed_form():
    grams = random_grams(2, num_seg=12)
    assert_close(mgda_closed_form_triton(grams), mgda_closed_form(grams), atol=1e-12, rtol=0, what="closed")
    assert_close(mgda_exact_triton(grams), mgda_closed_form(grams), atol=1e-9, rtol=0, what="exact T=2")
    w = bm.solve(grams, "mgda", backend="triton", solver="exact")
    assert_close(w, bm.solve(grams, "mgda", backend="torch", solver="exact"), atol=1e-7, rtol=0, what="api")


@pytest.mark.parametrize("num_tasks", [2, 3, 5, 8, 11])
@pytest.mark.parametrize("seed", [0, 7])
def test_pcgrad_matches_torch(num_tasks, seed):
    grams = random_grams(num_tasks, seed=seed)
    grams[0] = 0  # zero gradients: no projection
    got = pcgrad_triton(grams, seed=seed)
    assert_close(got, pcgrad_weights(grams, seed=seed), atol=1e-12, rtol=0, what="pcgrad weights")
    torch.testing.assert_close(pcgrad_triton(grams, seed=seed), got, atol=0, rtol=0)


@pytest.mark.parametrize("num_tasks", [2, 3, 5, 8])
@pytest.mark.parametrize("c, rescale", [(0.4, 1), (0.0, 0), (2.0, 2)])
def test_cagrad_matches_torch(num_tasks, c, rescale):
    grams = random_grams(num_tasks, num_seg=6)
    full_rank = torch.linalg.matrix_rank(grams) == num_tasks
    got = cagrad_triton(grams, c=c, rescale=rescale)
    expected = cagrad_weights(grams, c=c, rescale=rescale)
    assert_close(got[full_rank], expected[full_rank], atol=1e-9, rtol=0, what="cagrad weights")
    assert torch.isfinite(got).all()
    w = bm.solve(grams, "cagrad", backend="triton", c=c, rescale=rescale, normalize_weights=False)
    assert_close(w[full_rank], expected[full_rank].float(), atol=1e-6, rtol=1e-6, what="api")


@pytest.mark.parametrize("num_tasks", [2, 4, 8, 11])
def test_pgd_solver_matches_torch(num_tasks):
    grams = random_grams(num_tasks, num_seg=3, seed=1)
    got = mgda_pgd_triton(grams, max_iter=60)
    expected = mgda_pgd(grams, max_iter=60, tol=0.0)
    assert_close(got, expected, atol=1e-9, rtol=0, what="pgd weights")
    if num_tasks > 8:  # solver="auto" uses PGD above 8 tasks
        # The API rounds the Gram to float32; on these low-rank Grams the ridged optimum's
        # weights are not stable under that rounding, so compare with the torch backend on the
        # same float32 Gram, by what is unique (objective and direction).
        w = bm.solve(grams, "mgda", backend="triton", max_iter=60, tol=0.0).double()
        w_torch = bm.solve(grams, "mgda", backend="torch", max_iter=60, tol=0.0).double()
        assert_objective_and_direction_match(grams.float().double(), w / w.sum(-1, keepdim=True),
                                             w_torch / w_torch.sum(-1, keepdim=True))


def assert_objective_and_direction_match(grams, got, expected):
    """Compare what is unique even when the minimiser is not: the objective w^T M w and the
    min-norm direction d = w^T G (through its squared distance (w1-w2)^T M (w1-w2))."""
    scale = grams.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-300)
    obj_got = torch.einsum("st,stu,su->s", got, grams, got)
    obj_exp = torch.einsum("st,stu,su->s", expected, grams, expected)
    assert_close(obj_got / scale, obj_exp / scale, atol=1e-8, rtol=0, what="objective")
    diff = got - expected
    dist2 = torch.einsum("st,stu,su->s", diff, grams, diff).clamp_min(0)
    assert_close((dist2 / scale).sqrt(), torch.zeros_like(scale), atol=1e-4, rtol=0, what="|d1 - d2|")
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got[:, 0]), atol=1e-6, rtol=0)
    assert (got >= 0).all()


DEGENERATE = {
    "zero": lambda t: torch.zeros(t, 30),
    "identical": lambda t: torch.randn(30).expand(t, 30).clone(),
    "colinear": lambda t: torch.randn(30) * torch.arange(1.0, t + 1)[:, None],
    "opposite": lambda t: torch.randn(30) * torch.tensor([(-2.0) ** k for k in range(t)])[:, None],
    "orthogonal": lambda t: torch.eye(t, 30) * torch.arange(1.0, t + 1)[:, None],
    "one-zero-task": lambda t: torch.cat([torch.zeros(1, 30), torch.randn(t - 1, 30)]),
}


@pytest.mark.parametrize("num_tasks", [2, 3, 5, 8])
@pytest.mark.parametrize("case", list(DEGENERATE))
def test_solver_on_degenerate_grams(num_tasks, case):
    grads = DEGENERATE[case](num_tasks).to(DEVICE)
    grams = gram_reference(as_task_grads(grads), Segments.single(30)).double()
    mgda = get_method("mgda")
    for solver in ("auto", "exact") if num_tasks > 2 else ("auto", "exact", "closed_form"):
        options = dict(mgda.defaults, solver=solver)
        got = TritonBackend().solve(grams, WeightStep(mgda, options))  # float64, before the API's float32 cast
        expected = mgda.fn(grams, **options)
        assert torch.isfinite(got).all()
        assert_objective_and_direction_match(grams, got, expected)


@pytest.mark.parametrize("num_tasks", [2, 3, 8])
def test_rank_one_grams_of_length_one_segments(num_tasks):
    # Every segment of length 1 has a rank-1 Gram g g^T: many minimisers when signs agree.
    grads = random_grads(num_tasks, 12, device=DEVICE)
    grads[:, :4] = grads[0, :4].abs()  # identical positive entries
    segs = Segments.chunks(12, 1)
    out, info = bm.fused_bucket_moo(grads, segments=segs, backend="triton", return_info=True)
    mgda = get_method("mgda")
    gram64 = info.gram.double()
    expected_w = mgda.fn(gram64, **mgda.defaults)
    assert_objective_and_direction_match(gram64, TritonBackend().solve(gram64, WeightStep(mgda)), expected_w)
    expected = torch.empty(12, dtype=torch.float64, device=DEVICE)
    combine_reference(as_task_grads(grads), expected_w, segs, expected)
    assert_close(out, expected, atol=1e-4, rtol=1e-4, what="combined")


def test_fused_is_deterministic():
    grads = random_grads(6, 2000, torch.bfloat16, device=DEVICE)
    backend = TritonBackend(gram_chunk=128, combine_block=64)
    segs = Segments(offsets(1, 1500, 0, 7, 492))
    tg = as_task_grads(grads)
    results = []
    for _ in range(2):
        gram = backend.gram(tg, segs)
        w = backend.solve(gram.double(), WeightStep("mgda"))
        out = torch.empty(2000, dtype=torch.bfloat16, device=DEVICE)
        backend.combine(tg, w.float(), segs, out)
        results.append((gram, w, out))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the interpreter set-up")
def test_runs_under_the_interpreter_on_cpu():
    assert os.environ.get("TRITON_INTERPRET") == "1"


_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import bucketmoo_kernels.triton.combine as C
import bucketmoo_kernels.triton.gram as G
import bucketmoo_kernels.triton.solve as S

target = GPUTarget("cuda", 90, 32)
rows = {"stride_t": "i64", **{f"d{i}": "i64" for i in range(8)}}
jobs = []
for dt, deltas in (("*fp32", False), ("*bf16", True)):
    jobs.append((G._gram_kernel, {"x_ptr": dt, **rows, "tiles_ptr": "*i64", "offsets_ptr": "*i64",
                 "partial_ptr": "*fp32",
                 "out_ptr": "*fp32", "T": "constexpr", "TP": "constexpr",
                 "BLOCK_N": "constexpr", "NCOLS": "constexpr", "USE_DELTAS": "constexpr", "UPCAST": "constexpr",
                 "USE_DOT": "constexpr"},
                 {"T": 5, "TP": 16 if deltas else 8, "BLOCK_N": 256 if deltas else 128, "NCOLS": 7,
                  "USE_DELTAS": deltas, "UPCAST": dt == "*fp32", "USE_DOT": deltas}, 4))
    jobs.append((C._combine_kernel, {"x_ptr": dt, **rows, "w_ptr": "*fp32", "blocks_ptr": "*i64",
                 "offsets_ptr": "*i64", "out_ptr": dt, "N": "i64", "T": "constexpr",
                 "BLOCK_N": "constexpr", "USE_DELTAS": "constexpr"},
                 {"T": 5, "BLOCK_N": 2048, "USE_DELTAS": deltas}, 4))
f64 = {"g_ptr": "*fp64", "c_ptr": "*fp64", "w_ptr": "*fp64"}
jobs.append((S._mgda_closed_form_kernel, {**f64, "S": "i32", "BLOCK_S": "constexpr"}, {"BLOCK_S": 256}, 4))
jobs.append((S._mgda_exact_kernel, {**f64, "T": "constexpr", "TP": "constexpr", "KP": "constexpr"},
             {"T": 4, "TP": 4, "KP": 16}, 4))
jobs.append((S._mgda_pgd_kernel, {**f64, "max_iter": "i32", "T": "constexpr", "TP": "constexpr"},
             {"T": 11, "TP": 16}, 4))
jobs.append((S._pcgrad_kernel, {"g_ptr": "*fp64", "order_ptr": "*i32", "w_ptr": "*fp64", "S": "i32",
             "T": "constexpr", "TP": "constexpr", "BLOCK_S": "constexpr"}, {"T": 5, "TP": 8, "BLOCK_S": 32}, 4))
jobs.append((S._cagrad_kernel, {**f64, "p_ptr": "*fp64", "T": "constexpr", "TP": "constexpr", "KP": "constexpr"},
             {"T": 3, "TP": 4, "KP": 8}, 4))
for fn, sig, const, warps in jobs:
    kernel = triton.compile(ASTSource(fn, sig, const), target=target, options={"num_warps": warps})
    assert "cubin" in kernel.asm, fn
print("compiled", len(jobs))
"""


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_a_gpu_without_one():
    """The interpreter never runs Triton's compiler: compile every kernel for sm_90 (PTX and
    cubin) in a fresh process without TRITON_INTERPRET, so that GPU-only errors show up here."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=600)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("no ptxas for Triton's CUDA backend here")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled 9" in result.stdout


def test_pcgrad_orders_cache_is_bounded():
    """The hook's per-step seeds must not grow a device-side cache without bound."""
    from bucketmoo_kernels.triton.solve import _orders_flat

    for seed in range(400):
        _orders_flat(3, seed, "cpu")
    assert _orders_flat.cache_info().currsize <= 256
    flat = _orders_flat(4, 2, "cpu")
    assert flat.dtype == torch.int32 and flat.numel() == 4 * 3 + 1
    assert torch.equal(flat[:-1].view(4, 3).long(), bm.methods.pcgrad.pcgrad_orders(4, 2))
