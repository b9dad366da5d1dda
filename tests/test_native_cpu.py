"""The native ``cpu`` backend (bucketmoo_kernels._cpu) against the torch reference.

Covers gram / combine / fused over T, dtypes and segment layouts, list vs stacked input,
out aliasing, every native solver against the method's torch function (random and
degenerate Grams), thread-count independence, the ISA variants, ``torch.library.opcheck``
on every op, and the input checks of the binding. Skipped when the extension is not built.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bucketmoo_kernels as bm
from bucketmoo_kernels.inputs import Segments, as_task_grads
from bucketmoo_kernels.methods import cagrad, dual_cone, mgda, pcgrad, simplex
from bucketmoo_kernels.methods.batched_solvers import nonneg_qp_residual
from bucketmoo_kernels.reference import combine_reference, gram_reference

from tests.utils import DTYPES, LAYOUTS, assert_close, offsets, random_grads

native = pytest.importorskip("bucketmoo_kernels.native")
if native._cpu is None:
    pytest.skip(f"the CPU extension is not built: {native.load_errors().get('_cpu')}",
                allow_module_level=True)

ops = torch.ops.bucketmoo
ROOT = Path(__file__).resolve().parents[1]
CHUNK = 16384  # csrc/cpu/bucketmoo_cpu.h kChunk: sizes above it exercise the chunk reduction


def _segments(layout: str, n: int) -> Segments:
    return bm.inputs.as_segments(LAYOUTS[layout](n), n)


def _gram_tol(dtype):
    return dict(atol=1e-5, rtol=1e-6)


# ---------------------------------------------------------------- gram / combine / fused
@pytest.mark.parametrize("num_tasks", [2, 5, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_fused_combine_gives_the_reference_bits(num_tasks, dtype):
    """Over several chunks of the native loops: the fused op's combine, with its own weights,
    gives the bits of the float64 reference combine (the fused op against the oracle over
    T, dtypes and layouts is in test_conformance.py)."""
    n = 2 * CHUNK + 37 * num_tasks
    grads = random_grads(num_tasks, n, dtype, generator=torch.Generator().manual_seed(num_tasks))
    segs = LAYOUTS["uneven"](n)
    out, info = bm.fused_bucket_moo(grads, segments=segs, backend="cpu", return_info=True)
    assert_close(info.gram, bm.gram(grads, segs, backend="torch"), what="gram", **_gram_tol(dtype))
    assert torch.equal(out, bm.combine(grads, info.weights, segs, backend="torch"))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_gram_and_combine_sizes(dtype, n):
    grads = random_grads(3, n, dtype, generator=torch.Generator().manual_seed(n))
    segs = Segments.single(n) if n else Segments(torch.tensor([0, 0]))
    tg = as_task_grads(grads)
    assert_close(bm.gram(grads, segs, backend="cpu"), gram_reference(tg, segs), what="gram",
                 **_gram_tol(dtype))
    weights = torch.tensor([[0.5, -0.25, 2.0]])
    out = bm.combine(grads, weights, segs, backend="cpu")
    expected = combine_reference(tg, weights, segs, torch.empty_like(out))
    assert torch.equal(out, expected)


def test_more_tasks_than_eight_uses_the_iterative_solver():
    grads = random_grads(11, 900, generator=torch.Generator().manual_seed(3))
    out, info = bm.fused_bucket_moo(grads, segments=100, backend="cpu", return_info=True)
    gram64 = info.gram.double()
    w_ref = mgda.mgda_weights(gram64)  # pgd for T > 8
    w = info.weights.double()
    obj = torch.einsum("st,stu,su->s", w, gram64, w)
    obj_ref = torch.einsum("st,stu,su->s", w_ref, gram64, w_ref)
    scale = gram64.diagonal(dim1=-2, dim2=-1).amax(-1)
    assert (obj <= obj_ref + 1e-6 * scale).all()
    expected = bm.combine(grads, info.weights, 100, backend="torch")
    assert torch.equal(out, expected)


def test_list_and_stacked_and_strided_inputs_agree():
    grads = random_grads(4, 3000, generator=torch.Generator().manual_seed(1))
    segs = offsets(100, 0, 2000, 900)
    a = bm.fused_bucket_moo(grads, segments=segs, backend="cpu")
    b = bm.fused_bucket_moo(list(grads.unbind(0)), segments=segs, backend="cpu")
    wide = torch.zeros(4, 3000, 2)
    wide[..., 0] = grads
    c = bm.fused_bucket_moo([wide[t, :, 0] for t in range(4)], segments=segs, backend="cpu")
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("row", [0, 2])
def test_out_may_alias_an_input(dtype, row):
    grads = random_grads(3, 2 * CHUNK + 11, dtype, generator=torch.Generator().manual_seed(row))
    expected = bm.fused_bucket_moo(grads.clone(), segments=5000, backend="cpu")
    result = bm.fused_bucket_moo(grads, segments=5000, out=grads[row], backend="cpu")
    assert result.data_ptr() == grads[row].data_ptr()
    assert torch.equal(grads[row], expected)
    rows = [r.clone() for r in grads.unbind(0)]
    expected = bm.fused_bucket_moo([r.clone() for r in rows], backend="cpu")
    bm.fused_bucket_moo(rows, out=rows[row], backend="cpu")
    assert torch.equal(rows[row], expected)


def test_strided_out_is_written():
    grads = random_grads(3, 500, generator=torch.Generator().manual_seed(2))
    buf = torch.zeros(1000)
    out = buf[::2]
    bm.fused_bucket_moo(grads, out=out, backend="cpu")
    assert torch.equal(out, bm.fused_bucket_moo(grads, backend="cpu"))
    assert (buf[1::2] == 0).all()


# ---------------------------------------------------------------- threads and ISA variants
def _run_all(grads, segs):
    g = bm.gram(grads, segs, backend="cpu")
    w = bm.solve(g, "mgda", backend="cpu")
    out = bm.combine(grads, w, segs, backend="cpu")
    return g, w, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_bit_identical_with_one_and_two_threads(dtype):
    n = 7 * CHUNK + 321
    grads = random_grads(4, n, dtype, generator=torch.Generator().manual_seed(5))
    layouts = [Segments.single(n), Segments.chunks(n, 3 * CHUNK + 7),
               bm.inputs.as_segments(LAYOUTS["uneven"](n), n)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [_run_all(grads, s) for s in layouts]
        torch.set_num_threads(2)
        two = [_run_all(grads, s) for s in layouts]
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


_ISA_SCRIPT = """
import sys, torch, bucketmoo_kernels as bm
from bucketmoo_kernels import native
g = torch.Generator().manual_seed(9)
out = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    grads = (torch.randn(5, 40000, generator=g) * 3).to(dtype)
    gram = bm.gram(grads, 1000, backend="cpu")
    w = torch.rand(gram.shape[0], 5, generator=g)
    out += [gram, bm.combine(grads, w, 1000, backend="cpu")]
torch.save((native.cpu_isa(), out), sys.argv[1])
"""


ISA_VARIANTS = ("avx2", "avx512")  # each compared with the baseline loops


# Runs every script of ISA_SCRIPTS (the list at the end of this module) in the one process of
# an ISA: each script saves ``(native.cpu_isa(), outputs)`` to ``sys.argv[1]``; a script that
# raises leaves its traceback in a ``.err`` file instead.
_ISA_DRIVER = """
import pathlib, sys, traceback
args = sys.argv[1:]
for script, out in zip(args[0::2], args[1::2]):
    sys.argv = ["-c", out]
    try:
        exec(compile(pathlib.Path(script).read_text(), script, "exec"), {"__name__": "__main__"})
    except BaseException:
        pathlib.Path(out + ".err").write_text(traceback.format_exc())
"""


@pytest.fixture(scope="module")
def isa_run(tmp_path_factory):
    """isa_run(script, isa) -> (the variant that ran, the script's outputs), with
    BUCKETMOO_CPU_ISA=isa (a variant this CPU lacks gives the best one it has). One subprocess
    per isa runs every script of ISA_SCRIPTS, in the same order for every isa (importing torch
    and the package costs more than most scripts)."""
    tmp = tmp_path_factory.mktemp("isa")
    cache = {}

    def run(script, isa):
        key = (script, isa)
        if key not in cache:
            scripts = list(dict.fromkeys([*ISA_SCRIPTS, script]))
            args = []
            for i, text in enumerate(scripts):
                source = tmp / f"script{i}.py"
                source.write_text(text)
                args += [str(source), str(tmp / f"{i}-{isa}.pt")]
            env = dict(os.environ, BUCKETMOO_CPU_ISA=isa)
            subprocess.run([sys.executable, "-c", _ISA_DRIVER, *args], check=True, env=env, cwd=ROOT)
            for i, text in enumerate(scripts):
                err = tmp / f"{i}-{isa}.pt.err"
                cache[(text, isa)] = ("error", err.read_text()) if err.exists() else torch.load(tmp / f"{i}-{isa}.pt")
        ran, result = cache[key]
        if ran == "error":
            pytest.fail(f"the script failed with BUCKETMOO_CPU_ISA={isa}:\n{result}")
        return ran, result
    return run


def _assert_same_bits_as_baseline(isa_run, script, isa):
    base_isa, base = isa_run(script, "baseline")
    got_isa, got = isa_run(script, isa)
    assert base_isa == "baseline"
    if got_isa != isa:
        pytest.skip(f"this CPU cannot run the {isa} loops (BUCKETMOO_CPU_ISA={isa} ran {got_isa})")
    assert len(base) == len(got)
    for i, (a, b) in enumerate(zip(base, got)):
        assert torch.equal(a, b), f"output {i}: {isa} differs from baseline"


@pytest.mark.slow  # a subprocess per case (or a long sweep): seconds each
def test_isa_env_falls_back_to_the_best_variant(isa_run):
    """An unknown BUCKETMOO_CPU_ISA value runs the variant that no value picks."""
    code = "from bucketmoo_kernels import native; print(native.cpu_isa())"
    picked = {"baseline": isa_run(_ISA_SCRIPT, "baseline")[0]}  # the process isa_run starts anyway
    for value in (None, "bogus"):
        env = dict(os.environ)
        env.pop("BUCKETMOO_CPU_ISA", None)
        if value is not None:
            env["BUCKETMOO_CPU_ISA"] = value
        picked[value] = subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT,
                                       capture_output=True, text=True).stdout.strip()
    assert picked["bogus"] == picked[None] and picked[None] in ("baseline",) + ISA_VARIANTS
    assert picked["baseline"] == "baseline"


@pytest.mark.slow
@pytest.mark.parametrize("isa", ISA_VARIANTS)
def test_isa_variants_give_the_same_bits(isa_run, isa):
    """All variants sum in the same order and every product is exact in float64, so they
    must agree bit for bit."""
    _assert_same_bits_as_baseline(isa_run, _ISA_SCRIPT, isa)


_ISA_HALF_BITS_SCRIPT = """
import sys, torch, bucketmoo_kernels as bm
from bucketmoo_kernels import native
torch.set_num_threads(1)  # the flush-denormal mode is the calling thread's (MXCSR)
g = torch.Generator().manual_seed(11)
halves = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
out = []
for flush in (False, True):
    if flush and not torch.set_flush_denormal(True):
        break
    for dtype in (torch.bfloat16, torch.float16):
        x = halves.view(dtype)  # every bit pattern: NaN payloads, +-inf, subnormals
        n = x.numel()
        for num_tasks in (1, 2, 3, 7, 8, 9):
            grads = torch.stack([x.roll(37 * t) for t in range(num_tasks)])
            ws = [1.0, 0.5, 0.25, 1.5, 2.0, -1.0, 3.0e-5, 1.0 + 2.0 ** -20]
            w = torch.rand(len(ws), num_tasks, generator=g) * 2 ** -12
            w[:, 0] = torch.tensor(ws)
            segs = torch.tensor([0, 5, 8200, 8207, 20000, 33333, 40000, 50001, n])
            # the raw bits: torch.equal would treat every NaN as unequal
            out.append(bm.combine(grads, w, segs, backend="cpu").view(torch.int16))
            out.append(bm.combine(grads, w * 1.0e-9, segs, backend="cpu").view(torch.int16))
torch.set_flush_denormal(False)
torch.save((native.cpu_isa(), out), sys.argv[1])
"""


@pytest.mark.slow  # a subprocess per case (or a long sweep): seconds each
@pytest.mark.parametrize("isa", ISA_VARIANTS)
def test_isa_variants_round_every_half_value_to_the_same_bits(isa_run, isa):
    """The 16-bit combine output (rounded in vector registers on AVX2 / AVX-512, by the scalar
    to_bf16 / to_fp16 on the baseline): every bit pattern, results that are NaN (the exact
    NaN bits), inf, overflow, subnormal or ties, T with and without register sums (1..9),
    with and without DAZ/FTZ: the same bits in every variant."""
    _assert_same_bits_as_baseline(isa_run, _ISA_HALF_BITS_SCRIPT, isa)


# ---------------------------------------------------------------- the fused sweep
METHOD_CASES = [("mean", {}), ("mgda", {}), ("mgda", {"solver": "pgd", "max_iter": 60, "tol": 0.0}),
                ("pcgrad", {"seed": 3}), ("cagrad", {"c": 0.5, "rescale": 2}), ("upgrad", {}),
                ("dualproj", {"reg_eps": 1e-3})]
LOSSES = [0.5, 2.0, 0.0, 3.0, 1.0, 0.25, 4.0, 1.5, 0.75, 2.5, 1.25, 0.125]


def _two_pass(grads, segs, method, opts, normalization, normalize_weights):
    """gram, then the (native) weight step, then combine: the reference for the fused sweep."""
    losses = LOSSES[:grads.shape[0]]
    g = bm.gram(grads, segs, backend="cpu")
    w = bm.solve(g, method, backend="cpu", normalization=normalization, losses=losses,
                 normalize_weights=normalize_weights, **opts)
    return g, w, bm.combine(grads, w, segs, backend="cpu")


def _one_sweep(grads, segs, method, opts, normalization, normalize_weights, out=None):
    tg = as_task_grads(grads)
    segments = bm.inputs.as_segments(segs, tg.numel)
    step = bm.WeightStep(method, opts, normalization=normalization,
                         normalize_weights=normalize_weights)
    out = torch.empty(tg.numel, dtype=tg.dtype) if out is None else out
    losses = step.loss_table(LOSSES[:tg.num_tasks], segments.num_segments, tg.num_tasks, tg.device)
    gram, weights = bm.get_backend("cpu", "cpu").fused(tg, segments, out, step, losses)
    return gram, weights, out


def _assert_same_bits(a, b):
    for x, y, what in zip(a, b, ("gram", "weights", "out")):
        assert torch.equal(x, y), f"{what} differs between the fused sweep and the two passes"


@pytest.mark.parametrize("method,opts", METHOD_CASES, ids=lambda v: str(v) if isinstance(v, str) else "")
@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
@pytest.mark.parametrize("num_tasks", [pytest.param(t, marks=() if t == 3 else pytest.mark.slow) for t in [1, 2, 3, 4, 8]])
def test_fused_sweep_is_bit_identical_to_the_two_passes(method, opts, normalization, num_tasks):
    if method == "cagrad" and num_tasks > 8:
        pytest.skip("cagrad is exact for T <= 8")
    if method in ("upgrad", "dualproj") and (num_tasks != 3 or normalization in ("l2", "loss")):
        pytest.skip("the dual-cone methods: T = 3 with none and loss+ (CI time; same op call)")
    n = 2 * CHUNK + 999
    gen = torch.Generator().manual_seed(num_tasks)
    for dtype in DTYPES:
        grads = random_grads(num_tasks, n, dtype, generator=gen)
        for layout in ("one", "uneven", "empty+len1"):
            segs = LAYOUTS[layout](n)
            for normalize_weights in (True, False):
                args = (grads, segs, method, opts, normalization, normalize_weights)
                _assert_same_bits(_one_sweep(*args), _two_pass(*args))


@pytest.mark.slow  # a subprocess per case (or a long sweep): seconds each
def test_weight_step_matches_the_torch_pipeline():
    """The native weight step (normalisation, method, rescale) against api._solve on the
    torch backend, which runs the methods' torch functions."""
    gen = torch.Generator().manual_seed(11)
    for num_tasks in (2, 3, 5, 8, 12):
        grams = bm.gram(random_grads(num_tasks, 600, generator=gen), 41, backend="torch")
        grams[3] = 0.0  # a zero segment
        for method, opts in METHOD_CASES:
            if method == "cagrad" and num_tasks > 8:
                continue
            for normalization in ("none", "l2", "loss", "loss+"):
                for normalize_weights in (True, False):
                    kw = dict(normalization=normalization, losses=LOSSES[:num_tasks],
                              normalize_weights=normalize_weights, **opts)
                    step = bm.WeightStep(method, opts, normalization=normalization,
                                         normalize_weights=normalize_weights)
                    table = step.loss_table(LOSSES[:num_tasks], grams.shape[0], num_tasks, grams.device)
                    orders = (pcgrad.pcgrad_orders(num_tasks, opts.get("seed", 0))
                              if method == "pcgrad" else None)
                    native_w = ops.weights(grams, orders, table, *step.native_codes(num_tasks))
                    assert torch.equal(native_w, bm.solve(grams, method, backend="cpu", **kw))
                    tol = 1e-5 if opts.get("solver") == "pgd" else 1e-6
                    assert_close(native_w, bm.solve(grams, method, backend="torch", **kw),
                                 atol=tol, rtol=tol, what=f"{method} {normalization} T={num_tasks}")


_GROUPS_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from tests import test_native_cpu as t
from tests.utils import offsets, random_grads
n = 5 * t.CHUNK + 77
layouts = [None, 3000, offsets(0, 100, n - 1100, 0, 1000), offsets(*[n // 40] * 39, n - 39 * (n // 40))]
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    grads = random_grads(4, n, dtype, generator=torch.Generator().manual_seed(2))
    for segs in layouts:
        for method, opts in t.METHOD_CASES:
            args = (grads, segs, method, opts, "l2", True)
            t._assert_same_bits(t._one_sweep(*args), t._two_pass(*args))
        aliased = grads.clone()
        args = (aliased, segs, "mgda", {}, "none", True)
        expected = t._two_pass(grads, *args[1:])
        t._assert_same_bits(t._one_sweep(*args, out=aliased[2]), expected)
print("ok")
"""


@pytest.mark.slow  # a subprocess per case (or a long sweep): seconds each
@pytest.mark.parametrize("group_bytes", [1, 4096, 300_000])
def test_fused_sweep_with_small_groups(group_bytes):
    """Many groups (each segment, or a few, per group; segments larger than a group) and an
    output that aliases an input: still the two passes' bits."""
    env = dict(os.environ, BUCKETMOO_CPU_FUSED_GROUP_BYTES=str(group_bytes))
    done = subprocess.run([sys.executable, "-c", _GROUPS_SCRIPT, str(ROOT)], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_fused_sweep_threads_and_api_path(monkeypatch):
    n = 6 * CHUNK + 5
    grads = random_grads(3, n, torch.bfloat16, generator=torch.Generator().manual_seed(6))
    segs = LAYOUTS["uneven"](n)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _one_sweep(grads, segs, "mgda", {}, "none", True)
        torch.set_num_threads(2)
        two = _one_sweep(grads, segs, "mgda", {}, "none", True)
    finally:
        torch.set_num_threads(before)
    _assert_same_bits(one, two)
    # fused_bucket_moo takes the sweep with out=None or check_finite=False, else two passes.
    calls = []
    backend = bm.get_backend("cpu", "cpu")
    real = backend.fused
    monkeypatch.setattr(backend, "fused", lambda *a: calls.append(1) or real(*a))
    out = bm.fused_bucket_moo(grads, segments=segs, backend="cpu")
    bm.fused_bucket_moo(grads, segments=segs, backend="cpu", out=torch.empty_like(out),
                        check_finite=False)
    assert len(calls) == 2
    kept = torch.empty_like(out)
    bm.fused_bucket_moo(grads, segments=segs, backend="cpu", out=kept)
    assert len(calls) == 2 and torch.equal(kept, out) and torch.equal(out, one[2])


def test_native_weight_step_matches_the_python_weight_step(monkeypatch):
    """With the native weight step and the sweep off (a module without those kernels), the
    Python weight step around the methods' torch functions gives the same weights to rounding."""
    grads = random_grads(4, 3000, generator=torch.Generator().manual_seed(12))
    on, info_on = bm.fused_bucket_moo(grads, segments=700, backend="cpu", normalization="l2",
                                      return_info=True)
    backend = bm.get_backend("cpu", "cpu")
    monkeypatch.setattr(backend, "has_weight_step", False)
    monkeypatch.setattr(backend, "has_fused_sweep", False)
    calls = []
    monkeypatch.setattr(torch.ops.bucketmoo, "weights", lambda *a: calls.append(1))
    off, info_off = bm.fused_bucket_moo(grads, segments=700, backend="cpu", normalization="l2",
                                        return_info=True)
    assert not calls and torch.equal(info_on.gram, info_off.gram)
    assert_close(info_off.weights, info_on.weights, atol=1e-7, rtol=1e-6, what="weights")


def test_fused_sweep_and_non_finite_gradients():
    n = 3 * CHUNK
    grads = random_grads(3, n, generator=torch.Generator().manual_seed(7))
    grads[1, 5] = float("nan")
    segs = offsets(CHUNK, 2 * CHUNK)
    with pytest.raises(ValueError, match=r"segment\(s\) \[0\]"):
        bm.fused_bucket_moo(grads, segments=segs, backend="cpu")
    out = bm.fused_bucket_moo(grads, segments=segs, backend="cpu", check_finite=False)
    assert out[:CHUNK].isnan().all() and torch.isfinite(out[CHUNK:]).all()
    expected = bm.fused_bucket_moo(grads[:, CHUNK:], backend="cpu")
    assert torch.equal(out[CHUNK:], expected)


_ISA_SWEEP_SCRIPT = """
import sys, torch, bucketmoo_kernels as bm
from bucketmoo_kernels import native
g = torch.Generator().manual_seed(10)
n = 2 * 16384 + 3 * 256 + 5  # two chunks, full blocks and a tail
halves = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
out = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    finite = halves.view(dtype) if dtype != torch.float32 else torch.randn(65536, generator=g)
    finite = finite[torch.isfinite(finite)]
    for num_tasks in range(1, 11):
        grads = (torch.randn(num_tasks, n, generator=g) * 3).to(dtype)
        grads[:, :finite.numel() // 2] = finite[torch.randperm(finite.numel(), generator=g)[:finite.numel() // 2]]
        segs = torch.tensor([0, 7, 300, 16390, n])
        gram = bm.gram(grads, segs, backend="cpu")
        w = torch.rand(4, num_tasks, generator=g) * 2 - 0.5
        out += [gram, bm.combine(grads, w, segs, backend="cpu")]
torch.save((native.cpu_isa(), out), sys.argv[1])
"""


@pytest.mark.slow
@pytest.mark.parametrize("isa", ISA_VARIANTS)
def test_isa_variants_give_the_same_bits_for_every_task_count(isa_run, isa):
    """T = 1..10 (each T has its own register tiles, per variant), all dtypes, every finite
    bf16/fp16 value (subnormals included), full blocks, tails and two chunks."""
    _assert_same_bits_as_baseline(isa_run, _ISA_SWEEP_SCRIPT, isa)


@pytest.mark.parametrize("num_tasks", range(1, 11))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_gram_and_combine_every_task_count(num_tasks, dtype):
    """Every T (register tiles of T <= 8, the generic loop above), segments cutting blocks
    and chunks at odd places."""
    n = CHUNK + 5 * 256 + 13
    grads = random_grads(num_tasks, n, dtype, generator=torch.Generator().manual_seed(num_tasks))
    segs = Segments(offsets(1, 255, 256, 1000, CHUNK - 1000, n - CHUNK - 512))
    tg = as_task_grads(grads)
    assert_close(bm.gram(grads, segs, backend="cpu"), gram_reference(tg, segs), what="gram",
                 **_gram_tol(dtype))
    weights = torch.rand(segs.num_segments, num_tasks, generator=torch.Generator().manual_seed(0))
    out = bm.combine(grads, weights, segs, backend="cpu")
    assert torch.equal(out, combine_reference(tg, weights, segs, torch.empty_like(out)))


# ---------------------------------------------------------------- half-precision conversions
def _every_value(dtype, finite_only=False):
    """All 65536 bit patterns of a 16-bit dtype (subnormals, +-0, +-inf, NaNs)."""
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    return values[torch.isfinite(values)] if finite_only else values


def _assert_same_values(actual, expected, what):
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"{what}: NaN positions differ"
    bits_a = actual[~nan].view(torch.int16)
    bits_e = expected[~nan].view(torch.int16)
    bad = torch.nonzero(bits_a != bits_e).flatten()
    assert bad.numel() == 0, (f"{what}: {bad.numel()} values differ, e.g. "
                              f"{actual[~nan][bad[:4]].tolist()} vs {expected[~nan][bad[:4]].tolist()}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("num_tasks", [1, 3, 9])
def test_combine_of_every_half_value_matches_torch(dtype, num_tasks):
    """Every bit pattern through combine with weights that keep, halve (subnormal results and
    round-to-even ties), scale (rounding), double (overflow to inf) and negate: the same values
    as torch's own float64 -> dtype conversion; NaN stays NaN, inf stays inf."""
    x = _every_value(dtype)
    n = x.numel()
    grads = torch.stack([x.roll(37 * t) for t in range(num_tasks)])
    segs = Segments(offsets(*([n // 8] * 8)))
    weights = torch.zeros(8, num_tasks)
    for s, w0 in enumerate([1.0, 0.5, 0.25, 1.5, 0.1, 2.0, -1.0, 3.0e-5]):
        weights[s, 0] = w0
        weights[s, 1:] = 0.0 if s % 2 else 2.0 ** -(s + 12)
    out = bm.combine(grads, weights, segs, backend="cpu")
    lengths = segs.lengths
    w64 = torch.repeat_interleave(weights.double(), lengths, dim=0).T
    g64 = grads.double()
    expected64 = w64[0] * g64[0]
    for t in range(1, num_tasks):  # task order, as the kernel sums (0 * inf is NaN there too)
        expected64 = expected64 + w64[t] * g64[t]
    _assert_same_values(out, expected64.to(dtype), f"combine {dtype} T={num_tasks}")


def test_combine_with_zero_weight_and_inf_is_nan():
    """0 * inf is NaN in float64: the combine computes it, it does not skip zero weights."""
    x = torch.tensor([float("inf"), 1.0, float("nan")], dtype=torch.float16).repeat(300)
    grads = torch.stack([torch.ones_like(x), x])
    out = bm.combine(grads, torch.tensor([[1.0, 0.0]]), backend="cpu")
    expected = (grads.double()[0] + 0.0 * grads.double()[1]).to(torch.float16)
    _assert_same_values(out, expected, "combine 0 * inf")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_gram_of_every_finite_half_value(dtype):
    """Every finite bit pattern, sorted by magnitude into segments of one block each, so that a
    wrong conversion of any value (a subnormal included) shows in its segment's Gram."""
    x = _every_value(dtype, finite_only=True)
    x = x[torch.argsort(x.double().abs(), stable=True)]
    n = x.numel() // 256 * 256
    x = x[:n]
    grads = torch.stack([x, -x.roll(1), x.flip(0)])
    segs = Segments.chunks(n, 256)
    got = bm.gram(grads, segs, backend="cpu")
    assert_close(got, gram_reference(as_task_grads(grads), segs), atol=0.0, rtol=1e-6, what="gram")


def _fp16_subnormals_under_flush_denormal():
    """[gram, exact gram, combine, exact combine] of float16 rows of subnormals, computed by
    the cpu backend with DAZ/FTZ set (torch.set_flush_denormal), or None where the CPU has
    no such mode."""
    sub = _every_value(torch.float16, finite_only=True)
    sub = sub[(sub != 0) & (sub.double().abs() < 2.0 ** -14)]  # the 2046 nonzero subnormals
    n = 4096 + 256 + 7  # full blocks and a tail; below the parallel threshold (calling thread)
    grads = torch.stack([sub.repeat(3)[:n], sub.flip(0).repeat(3)[:n], sub.roll(5).repeat(3)[:n]])
    g64 = grads.double()
    gram_exact = (g64 @ g64.T).float()[None]  # integer multiples of 2^-48: exact
    weights = torch.tensor([[0.5, 0.25, 0.125]])
    combined = (0.5 * g64[0] + 0.25 * g64[1] + 0.125 * g64[2]).to(torch.float16)
    before = torch.get_num_threads()
    if not torch.set_flush_denormal(True):
        return None
    try:
        torch.set_num_threads(1)
        gram = bm.gram(grads, backend="cpu")
        out = bm.combine(grads, weights, backend="cpu")
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(before)
    return [gram, gram_exact, out, combined]


_FLUSH_SCRIPT = """
import sys, torch
from bucketmoo_kernels import native
from tests.test_native_cpu import _fp16_subnormals_under_flush_denormal as case
torch.save((native.cpu_isa(), case()), sys.argv[1])
"""


@pytest.mark.slow  # a subprocess per case (or a long sweep): seconds each
@pytest.mark.parametrize("isa", ("baseline",) + ISA_VARIANTS)
def test_fp16_subnormals_survive_flush_denormal_mode(isa_run, isa):
    """float16 subnormals convert exactly in every variant even with DAZ/FTZ set: the gram of
    subnormal-only rows is exact in float64, and the combine rounds to subnormal halves."""
    ran, result = isa_run(_FLUSH_SCRIPT, isa)
    if ran != isa:
        pytest.skip(f"this CPU cannot run the {isa} loops (BUCKETMOO_CPU_ISA={isa} ran {ran})")
    if result is None:
        pytest.skip("flush-denormal mode is not supported on this CPU")
    gram, gram_exact, out, combined = result
    assert torch.equal(gram, gram_exact)
    assert torch.equal(out, combined)
    assert (out != 0).sum() > out.numel() // 2


# ---------------------------------------------------------------- solvers vs torch methods
def _random_grams(num_seg, num_tasks, seed, rank=None):
    gen = torch.Generator().manual_seed(seed)
    n = rank if rank is not None else num_tasks + 5
    g = torch.randn(num_seg, num_tasks, n, generator=gen, dtype=torch.float64)
    g[:, 1::2] -= 0.7 * g[:, :1]  # conflicts
    return g @ g.transpose(1, 2)


def _degenerate_grams(num_tasks):
    """Zero, identical, colinear +-, rank one/two, tiny and huge scales: [S, T, T] f64."""
    gen = torch.Generator().manual_seed(num_tasks)
    v = torch.randn(6, generator=gen, dtype=torch.float64)
    cases = [torch.zeros(num_tasks, 6, dtype=torch.float64),
             v.expand(num_tasks, 6).clone(),
             torch.stack([v * (1 if t % 2 else -2) for t in range(num_tasks)]),
             torch.randn(num_tasks, 1, generator=gen, dtype=torch.float64) * v,
             torch.randn(num_tasks, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 6, generator=gen, dtype=torch.float64),
             torch.randn(num_tasks, 6, generator=gen, dtype=torch.float64) * 1e-30,
             torch.randn(num_tasks, 6, generator=gen, dtype=torch.float64) * 1e30]
    cases[1][0] *= 0  # one zero gradient among identical ones
    g = torch.stack(cases)
    return g @ g.transpose(1, 2)


def _d_distance(w1, w2, gram):
    """|d1 - d2|^2 / max diag: distance of the combined gradients, from the Gram only."""
    diff = (w1 - w2).nan_to_num(float("inf"))
    num = torch.einsum("st,stu,su->s", diff, gram, diff).abs()
    return num / gram.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-300)


def _assert_simplex(w):
    assert torch.isfinite(w).all()
    assert (w >= 0).all()
    assert_close(w.sum(-1), torch.ones(w.shape[0], dtype=w.dtype), atol=1e-12, rtol=0, what="sum")


@pytest.mark.parametrize("num_tasks, solver", [
    (t, s) for t in range(1, 9) for s in ("auto", "closed_form", "exact", "pgd")
    if s != "closed_form" or t == 2  # the closed form exists for T = 2 only
])
def test_mgda_solvers_match_torch(num_tasks, solver):
    code = mgda.MGDA_SOLVERS.index(solver)
    for gram in (_random_grams(20, num_tasks, num_tasks), _degenerate_grams(num_tasks)):
        kw = dict(max_iter=300, tol=0.0) if solver == "pgd" else {}
        w = ops.solve_mgda(gram, code, kw.get("max_iter", 500), kw.get("tol", 1e-10))
        w_ref = mgda.mgda_weights(gram, solver=solver, **kw)
        _assert_simplex(w)
        # The min-norm point d is unique even where w is not: compare d (and w where unique).
        assert (_d_distance(w, w_ref, gram) <= 1e-9).all()
    random = _random_grams(20, num_tasks, num_tasks)
    w = ops.solve_mgda(random, code, 300, 0.0)
    tol = 1e-6 if solver == "pgd" else 1e-9
    assert_close(w, mgda.mgda_weights(random, solver=solver, max_iter=300, tol=0.0), atol=tol, rtol=0,
                 what="weights on full-rank Grams")


def test_mgda_pgd_many_tasks_matches_torch():
    gram = _random_grams(10, 20, 1, rank=30)
    w = ops.solve_mgda(gram, 3, 200, 0.0)
    assert_close(w, mgda.mgda_pgd(gram, max_iter=200, tol=0.0), atol=1e-7, rtol=0, what="pgd T=20")


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize("seed", [0, 7])
def test_pcgrad_matches_torch(num_tasks, seed):
    orders = pcgrad.pcgrad_orders(num_tasks, seed)
    for gram in (_random_grams(30, num_tasks, seed), _degenerate_grams(num_tasks)):
        w = ops.solve_pcgrad(gram, orders)
        assert_close(w, pcgrad.pcgrad_weights(gram, seed=seed), atol=1e-12, rtol=1e-9, what="pcgrad")


@pytest.mark.parametrize("num_tasks", range(1, 9))
@pytest.mark.parametrize("c,rescale", [(0.0, 1), (0.4, 1), (0.4, 0), (1.0, 2), (2.5, 1)])
def test_cagrad_matches_torch(num_tasks, c, rescale):
    random = _random_grams(20, num_tasks, num_tasks + 11)
    w = ops.solve_cagrad(random, c, rescale)
    assert_close(w, cagrad.cagrad_weights(random, c=c, rescale=rescale), atol=1e-8, rtol=0,
                 what="cagrad weights")
    degenerate = _degenerate_grams(num_tasks)
    # the op's weights go through the record's finish in the weight step (d = 0 at a
    # Pareto-stationary segment when c >= 1), as the torch function's do
    w = cagrad.cagrad_stationary(degenerate, ops.solve_cagrad(degenerate, c, rescale), {"c": c})
    w_ref = cagrad.cagrad_weights(degenerate, c=c, rescale=rescale)
    assert torch.isfinite(w).all()
    assert (_d_distance(w, w_ref, degenerate) <= 1e-8).all()


DUAL_CONE = {"upgrad": (4, dual_cone.upgrad_weights), "dualproj": (5, dual_cone.dualproj_weights)}


def _dual_cone_cases(num_tasks):
    """[S, T, T] f64: full rank, rank 1..3 (below T), the degenerate set, and a random batch
    at scales 1e-12..1e8 with zero segments among them."""
    scales = torch.tensor([1e-12, 1e-6, 1.0, 1e3, 1e8], dtype=torch.float64)
    scaled = _random_grams(10, num_tasks, num_tasks) * scales.repeat(2)[:, None, None]
    scaled[[2, 7]] = 0.0
    return torch.cat([_random_grams(20, num_tasks, num_tasks + 1),
                      _random_grams(12, num_tasks, num_tasks + 2, rank=max(1, min(3, num_tasks - 1))),
                      _degenerate_grams(num_tasks), scaled])


def _dual_cone_converged(gram, weights_fn, **opts):
    """The torch function's weights, and whether every one of its QPs met the 1e-12 KKT
    residual (then its answer is the exact minimiser up to rounding)."""
    a = dual_cone.regularised_gram(gram, opts.get("norm_eps", 0.0), opts.get("reg_eps", 1e-4))
    num_tasks = gram.shape[-1]
    prefs = (torch.eye(num_tasks, dtype=gram.dtype) / num_tasks if weights_fn is dual_cone.upgrad_weights
             else torch.full((1, num_tasks), 1.0 / num_tasks, dtype=gram.dtype))
    u = prefs.expand(gram.shape[0], -1, -1)
    v = dual_cone.dual_cone_weights(gram, u, norm_eps=opts.get("norm_eps", 0.0),
                                    reg_eps=opts.get("reg_eps", 1e-4), max_iter=200)
    a_k = a[:, None].expand(-1, u.shape[1], -1, -1).reshape(-1, num_tasks, num_tasks)
    b = torch.einsum("btu,bu->bt", a_k, u.reshape(-1, num_tasks))
    res = nonneg_qp_residual(a_k, b, (v - u).reshape(-1, num_tasks)).reshape(gram.shape[0], -1)
    weights = v.sum(1) if weights_fn is dual_cone.upgrad_weights else v[:, 0]  # as weights_fn
    return weights, (res <= 1e-12).all(-1)


@pytest.mark.parametrize("method", list(DUAL_CONE))
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 5, 10, 16])
def test_dual_cone_matches_torch(method, num_tasks):
    """UPGrad / DualProj (float64 op) against the torch function where that solved every QP
    to its 1e-12 KKT residual: the minimiser is unique (reg_eps > 0), so both agree to
    rounding times the condition number of A = G / trace + reg_eps I (at most (1 + reg_eps) /
    reg_eps): 1e-10 relative at the default reg_eps = 1e-4, 1e-7 at 1e-7. The native solver
    itself always meets the 1e-12 residual here. The answer does not depend on the scale."""
    code, fn = DUAL_CONE[method]
    every = _dual_cone_cases(num_tasks)
    # The ill-conditioned variant on every 4th case (the torch solver needs all its 200
    # iterations there, which costs seconds at T = 16 on the whole set).
    for grams, opts in ((every, {}), (every[::4].contiguous(), {"reg_eps": 1e-7, "norm_eps": 1e-4})):
        reg = opts.get("reg_eps", 1e-4)
        w = ops.solve_dual_cone(grams, code, opts.get("norm_eps", 0.0), reg, 200)
        w_ref, exact = _dual_cone_converged(grams, fn, **opts)
        assert exact.float().mean() >= 0.85, "the torch solver should converge on almost every case"
        tol = 1e-14 * (1 + reg) / reg
        assert_close(w[exact], w_ref[exact], atol=tol * float(w_ref.abs().max()), rtol=tol,
                     what=f"{method} T={num_tasks} {opts}")
        assert torch.isfinite(w).all() and (w >= 0).all()
        if method == "dualproj":  # w = u + x: the native x meets the KKT stop on every case
            a = dual_cone.regularised_gram(grams, opts.get("norm_eps", 0.0), reg)
            u = torch.full_like(w, 1.0 / num_tasks)
            res = nonneg_qp_residual(a, torch.einsum("stu,su->st", a, u), w - u)
            assert (res <= 1e-12).all(), f"native KKT residual {float(res.max()):.1e}"
    grams = every
    zero = grams[-8]  # a zero segment: the preference itself (1/T each, for both methods)
    assert torch.equal(ops.solve_dual_cone(zero[None], code, 0.0, 1e-4, 200)[0],
                       torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64))
    ten = ops.solve_dual_cone(grams[:10], code, 0.0, 1e-4, 200)
    assert_close(ops.solve_dual_cone(grams[:10] * 1e6, code, 0.0, 1e-4, 200), ten, atol=1e-12, rtol=1e-12,
                 what="scaled by 1e6")


def test_dual_cone_weight_step_and_fallbacks():
    """The weights op runs the dual-cone methods natively up to T = 16 (the API's cpu backend
    then equals the op); a pref_vector, reg_eps = 0 or T = 17 go to the torch function."""
    for method in DUAL_CONE:
        step = bm.WeightStep(method)
        assert step.native_codes(16) is not None and step.native_codes(17) is None
        assert bm.WeightStep(method, {"pref_vector": [0.5, 0.5]}).native_codes(2) is None
        assert bm.WeightStep(method, {"reg_eps": 0.0}).native_codes(2) is None
        grams = _random_grams(9, 6, 3).float()
        native_w = ops.weights(grams, None, None, *step.native_codes(6))
        assert torch.equal(bm.solve(grams, method, backend="cpu"), native_w)
        assert_close(native_w, bm.solve(grams, method, backend="torch"), atol=1e-6, rtol=1e-6, what=method)
        pref = [0.2, 0.1, 0.3, 0.1, 0.2, 0.1]
        assert torch.equal(bm.solve(grams, method, backend="cpu", pref_vector=pref),
                           bm.solve(grams, method, backend="torch", pref_vector=pref))


def test_native_solve_through_the_api_matches_torch():
    grams = bm.gram(random_grads(5, 300, generator=torch.Generator().manual_seed(0)), 37, backend="torch")
    for method in ("mgda", "pcgrad", "cagrad", "mean", "upgrad", "dualproj"):
        assert_close(bm.solve(grams, method, backend="cpu"), bm.solve(grams, method, backend="torch"),
                     atol=1e-6, rtol=0, what=method)


def test_header_constants_match_simplex_contract():
    text = (ROOT / "csrc" / "common" / "bucketmoo_solvers.h").read_text()

    def const(name):
        return float(re.search(rf"{name}\s*=\s*([0-9.e+-]+);", text).group(1))

    assert const("kRidgeRel") == simplex.RIDGE_REL
    assert const("kRidgeAbs") == simplex.RIDGE_ABS
    assert const("kTieRel") == simplex.TIE_REL
    assert const("kFeasibleTol") == simplex.FEASIBLE_TOL
    assert int(const("kMaxExactTasks")) == simplex.MAX_EXACT_TASKS


# ---------------------------------------------------------------- the ops themselves
def test_schemas_match_the_python_copy():
    for name, schema in native.SCHEMAS.items():
        assert str(getattr(ops, name).default._schema) == f"bucketmoo::{schema}"


def _small_args():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(50, generator=gen) for _ in range(3)]
    off = offsets(10, 0, 40)
    gram = _random_grams(3, 3, 0)
    return grads, off, gram


# (orders, losses, method, solver, max_iter, tol, c, rescale, normalization, normalize_weights)
_PCGRAD_LOSS_ARGS = (pcgrad.pcgrad_orders(3, 0), torch.rand(3, 3, dtype=torch.float64) + 0.5,
                     2, 0, 0, 0.0, 0.0, 0, 3, True)


@pytest.mark.parametrize("op", ["gram", "solve_mgda", "solve_pcgrad", "solve_cagrad", "solve_dual_cone",
                                "combine_", "weights", "fused_"])
def test_opcheck(op):
    grads, off, gram = _small_args()
    args = {
        "gram": (grads, off),
        "solve_mgda": (gram, 0, 100, 1e-10),
        "solve_pcgrad": (gram, pcgrad.pcgrad_orders(3, 0)),
        "solve_cagrad": (gram, 0.4, 1),
        "solve_dual_cone": (gram, 4, 0.0, 1e-4, 200),
        "combine_": (torch.empty(50), grads, torch.rand(3, 3), off),
        "weights": (gram.float(), *_PCGRAD_LOSS_ARGS),
        "fused_": (torch.empty(50), grads, off, *_PCGRAD_LOSS_ARGS),
    }[op]
    torch.library.opcheck(getattr(ops, op).default, args)


def test_fakes_on_cuda_tensors():
    """The fake implementations serve the cuda backend too (one set per op, whatever the
    device): on fake CUDA inputs (no GPU needed, no kernel runs) every op gives outputs of the
    right shape and dtype on the inputs' CUDA device, as Dynamo needs to trace that backend."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def check(t, shape, dtype):
        assert (tuple(t.shape), t.dtype, t.device.type) == (shape, dtype, "cuda")

    with FakeTensorMode():
        grads = list(torch.empty(3, 50, device="cuda").unbind(0))
        off = torch.empty(5, dtype=torch.int64, device="cuda")
        gram = torch.empty(4, 3, 3, dtype=torch.float64, device="cuda")
        orders = torch.empty(3, 2, dtype=torch.int64, device="cuda")
        losses = torch.empty(4, 3, dtype=torch.float64, device="cuda")
        method = (2, 0, 0, 0.0, 0.0, 0, 3, True)
        check(ops.gram(grads, off), (4, 3, 3), torch.float32)
        check(ops.solve_mgda(gram, 0, 100, 1e-10), (4, 3), torch.float64)
        check(ops.solve_pcgrad(gram, orders), (4, 3), torch.float64)
        check(ops.solve_cagrad(gram, 0.4, 1), (4, 3), torch.float64)
        check(ops.weights(gram.float(), orders, losses, *method), (4, 3), torch.float32)
        assert ops.combine_(torch.empty(50, device="cuda"), grads, torch.empty(4, 3, device="cuda"), off) is None
        gram_out, weights = ops.fused_(torch.empty(50, device="cuda"), grads, off, orders, losses, *method)
        check(gram_out, (4, 3, 3), torch.float32)
        check(weights, (4, 3), torch.float32)


def test_ops_compile_with_fullgraph():
    grads, off, _ = _small_args()

    def fused(g0, g1, g2, offs):
        gram = ops.gram([g0, g1, g2], offs)
        w = ops.solve_mgda(gram.double(), 0, 100, 1e-10).float()
        out = torch.empty_like(g0)
        ops.combine_(out, [g0, g1, g2], w, offs)
        return out

    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*grads, off), fused(*grads, off))

    def one_sweep(g0, g1, g2, offs):
        out = torch.empty_like(g0)
        gram, w = ops.fused_(out, [g0, g1, g2], offs, None, None, 1, 0, 100, 1e-10, 0.0, 0, 0, True)
        return out, gram, w

    compiled = torch.compile(one_sweep, fullgraph=True, backend="aot_eager")
    for x, y in zip(compiled(*grads, off), one_sweep(*grads, off)):
        assert torch.equal(x, y)


def _raises(match, fn, *args):
    with pytest.raises(RuntimeError, match=match):
        fn(*args)


def test_bad_inputs_raise_clear_errors_before_writing():
    grads, off, gram = _small_args()
    out = torch.full((50,), 7.0)
    w = torch.rand(3, 3)
    _raises("grads must be float32, bfloat16 or float16", ops.gram, [g.double() for g in grads], off)
    _raises(r"grads\[1\] has dtype", ops.gram, [grads[0], grads[1].half(), grads[2]], off)
    _raises(r"grads\[2\] has 49 elements", ops.gram, [grads[0], grads[1], grads[2][:49]], off)
    _raises("at least one task", ops.gram, [], off)
    _raises("must be 1-D", ops.gram, [g.view(5, 10) for g in grads], off)
    _raises("unit stride", ops.gram, [torch.randn(100)[::2] for _ in range(3)], off)
    _raises("offsets must be int64", ops.gram, grads, off.int())
    _raises("offsets must start at 0 and end at N=50", ops.gram, grads, offsets(10, 0, 41))
    _raises("non-decreasing", ops.gram, grads, torch.tensor([0, 30, 20, 50]))
    _raises("S\\+1 >= 2", ops.gram, grads, torch.tensor([0]))
    # combine_: every check runs before anything is written
    _raises("weights must have shape", ops.combine_, out, grads, torch.rand(2, 3), off)
    _raises("weights must be float32", ops.combine_, out, grads, w.double(), off)
    _raises("out must have the gradients' dtype", ops.combine_, out.half(), grads, w, off)
    _raises("out must be a 1-D tensor of N=50", ops.combine_, torch.empty(49), grads, w, off)
    _raises("offsets must start at 0", ops.combine_, out, grads, w, offsets(10, 0, 39))
    assert (out == 7.0).all()
    # solvers
    _raises("gram must be float64", ops.solve_mgda, gram.float(), 0, 10, 0.0)
    _raises("gram must have shape", ops.solve_mgda, gram[:, :2], 0, 10, 0.0)
    _raises("solver must be 0", ops.solve_mgda, gram, 4, 10, 0.0)
    _raises("closed-form solver needs T = 2", ops.solve_mgda, gram, 1, 10, 0.0)
    _raises("exact solver handles at most 8", ops.solve_mgda, _random_grams(1, 9, 0), 2, 10, 0.0)
    _raises("1 <= T <= 32", ops.solve_mgda, _random_grams(1, 33, 0, rank=3), 3, 10, 0.0)
    _raises("cagrad: the native solver handles 1 <= T <= 8", ops.solve_cagrad, _random_grams(1, 9, 0), 0.4, 1)
    _raises("c must be >= 0", ops.solve_cagrad, gram, -1.0, 1)
    _raises("rescale must be 0, 1 or 2", ops.solve_cagrad, gram, 0.4, 3)
    _raises("method must be 4 \\(upgrad\\) or 5", ops.solve_dual_cone, gram, 1, 0.0, 1e-4, 10)
    _raises("1 <= T <= 16", ops.solve_dual_cone, _random_grams(1, 17, 0), 4, 0.0, 1e-4, 10)
    _raises("needs reg_eps > 0", ops.solve_dual_cone, gram, 5, 0.0, 0.0, 10)
    _raises("norm_eps must be >= 0", ops.solve_dual_cone, gram, 5, -1.0, 1e-4, 10)
    _raises("max_iter must be >= 0", ops.solve_dual_cone, gram, 5, 0.0, 1e-4, -1)
    _raises("orders must have shape", ops.solve_pcgrad, gram, torch.zeros(3, 3, dtype=torch.int64))
    _raises("another task index", ops.solve_pcgrad, gram, torch.tensor([[0, 1], [0, 2], [0, 1]]))
    # the weight step and the fused sweep
    g32 = gram.float()
    mgda_args = (1, 0, 100, 1e-10, 0.0, 0, 0, True)  # method .. normalize_weights

    def with_(**kw):
        names = ("method", "solver", "max_iter", "tol", "c", "rescale", "normalization",
                 "normalize_weights")
        return tuple(kw.get(k, v) for k, v in zip(names, mgda_args))

    _raises("gram must be float32", ops.weights, gram, None, None, *mgda_args)
    _raises(r"method must be 0 \(mean\)", ops.weights, g32, None, None, *with_(method=6))
    _raises(r"normalization must be 0 \(none\)", ops.weights, g32, None, None, *with_(normalization=4))
    _raises("max_iter must be >= 0", ops.weights, g32, None, None, *with_(max_iter=-1))
    _raises("needs orders", ops.weights, g32, None, None, *with_(method=2))
    _raises("another task index", ops.weights, g32, torch.tensor([[0, 1], [0, 2], [0, 1]]), None,
            *with_(method=2))
    _raises("needs losses", ops.weights, g32, None, None, *with_(normalization=2))
    _raises(r"losses must be a contiguous float64 \[S, T\] = \[3, 3\]", ops.weights, g32, None,
            torch.ones(3), *with_(normalization=3))
    _raises("rescale must be 0, 1 or 2", ops.fused_, out, grads, off, None, None,
            *with_(method=3, rescale=5))
    _raises("offsets must start at 0", ops.fused_, out, grads, offsets(10, 0, 39), None, None,
            *mgda_args)
    _raises("out must have the gradients' dtype", ops.fused_, out.half(), grads, off, None, None,
            *mgda_args)
    assert (out == 7.0).all()


def test_backend_errors_and_fallbacks():
    with pytest.raises(RuntimeError, match="runs on cpu tensors"):
        bm.get_backend("cpu", "meta")
    missing = native.NativeBackend("cpu", "cpu", None, "bucketmoo_kernels._cpu did not load (x)")
    assert "did not load" in missing.unavailable_reason(torch.device("cpu"))
    # Options the native solver rejects go to the torch function, which raises ValueError.
    with pytest.raises(ValueError, match="closed-form"):
        bm.solve(_random_grams(1, 3, 0).float(), "mgda", backend="cpu", solver="closed_form")
    with pytest.raises(ValueError, match="cagrad option c must be >= 0"):
        bm.solve(_random_grams(1, 3, 0).float(), "cagrad", backend="cpu", c=-1.0)


def test_task_limit_of_a_module_falls_back_to_the_reference():
    class Limited:  # a compiled module whose kernels take at most 2 tasks (like _cuda's 8)
        @staticmethod
        def max_tasks():
            return 2

    backend = native.NativeBackend("limited", "cpu", Limited(), None)
    grads = random_grads(3, 120, generator=torch.Generator().manual_seed(4))
    tg, segs = as_task_grads(grads), Segments.chunks(120, 50)
    assert torch.equal(backend.gram(tg, segs), gram_reference(tg, segs))
    w = torch.rand(3, 3)
    out = torch.empty(120)
    backend.combine(tg, w, segs, out)
    assert torch.equal(out, combine_reference(tg, w, segs, torch.empty(120)))


@pytest.mark.slow
def test_large_fp32_combine_with_streaming_stores():
    """Outputs >= 64 MB that alias no input take the non-temporal store path (unaligned
    start and odd tail included)."""
    n = (16 << 20) + 3
    grads = torch.randn(2, n, generator=torch.Generator().manual_seed(8))
    buf = torch.empty(n + 1)
    out = buf[1:]
    segs = Segments(torch.tensor([0, 5, n // 2, n], dtype=torch.int64))
    weights = torch.tensor([[0.5, 0.5], [1.5, -0.25], [0.125, 3.0]])
    bm.combine(grads, weights, segs, out=out, backend="cpu")
    lengths = segs.lengths
    expected = (torch.repeat_interleave(weights.double(), lengths, dim=0).T * grads.double()).sum(0)
    assert torch.equal(out, expected.float())


_MISSING_SCRIPT = """
import sys
sys.modules["bucketmoo_kernels._cpu"] = None   # as if the extension were not built
sys.modules["bucketmoo_kernels._cuda"] = None
import torch, bucketmoo_kernels as bm
reason = bm.available_backends("cpu")["cpu"]
assert reason is not None and "did not load" in reason, reason
assert bm.get_backend("auto", "cpu").name == "torch"
try:
    bm.gram(torch.randn(2, 10), backend="cpu")
except RuntimeError as exc:
    assert "did not load" in str(exc), exc
else:
    raise AssertionError("backend='cpu' without the extension must raise")
# the schemas are still defined (from Python), with their fake implementations
out = torch.ops.bucketmoo.gram([torch.empty(5, device="meta")] * 3, torch.empty(3, dtype=torch.int64, device="meta"))
assert out.shape == (2, 3, 3) and out.dtype == torch.float32
print("ok")
"""


@pytest.mark.slow  # a subprocess per case (or a long sweep): seconds each
def test_missing_extension_never_breaks_import():
    result = subprocess.run([sys.executable, "-c", _MISSING_SCRIPT], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


#: The scripts :func:`isa_run` runs in one process per ISA.
ISA_SCRIPTS = (_ISA_SCRIPT, _ISA_HALF_BITS_SCRIPT, _ISA_SWEEP_SCRIPT, _FLUSH_SCRIPT)
