"""``gram``, ``solve``, ``combine`` and ``fused_bucket_moo`` under
``torch.compile(fullgraph=True)`` on the first call in a fresh process (no earlier eager call
has loaded a backend module or filled a cache), with ``check_finite=False``; the compiled
results must equal the eager ones.

Each case runs in a subprocess (all marked slow). ``aot_eager`` is Dynamo's full trace plus
the fake/meta implementations of the custom ops, without code generation; ``inductor`` the
default compiler. The native ``cpu`` backend compiles with both; the ``triton`` backend (its
launches are the ``bucketmoo_triton`` custom ops while tracing) with ``aot_eager`` under the
Triton interpreter on CPU tensors, as CI runs Triton. The CUDA cases (``cuda`` and ``triton``
with Inductor) need a GPU.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bucketmoo_kernels as bm

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import sys, torch
import bucketmoo_kernels as bm          # imports no backend module yet (they load lazily)
backend, compiler, device, full = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "full"
torch.manual_seed(0)
grads = torch.randn(3, 200, device=device)
offsets = [0, 50, 50, 123, 200]          # Python ints: sizes are trace constants
losses = [0.5, 2.0, 1.0]
weights = torch.rand(4, 3, device=device)

def run(**kw):
    results = (
        bm.gram(grads, offsets, backend=backend),
        bm.solve(bm.gram(grads, offsets, backend=backend), "mgda", backend=backend, **kw),
        bm.combine(grads, weights, offsets, backend=backend),
        bm.fused_bucket_moo(grads, segments=offsets, backend=backend, check_finite=False, **kw),
    )
    if full:
        results += (bm.fused_bucket_moo(grads, method="pcgrad", seed=3, segments=offsets,
                                        backend=backend, check_finite=False,
                                        normalization="loss", losses=losses),)
    return results

compiled = torch.compile(run, fullgraph=True, backend=compiler)
got = compiled()                                  # the first call of the process
expected = run()
if full:
    got, expected = got + compiled(normalization="l2"), expected + run(normalization="l2")
names = ["gram", "solve", "combine", "fused"] + ["fused pcgrad loss"] * full
for name, a, b in zip(names * 2, got, expected):
    tol = 0 if compiler != "inductor" else 1e-5   # Inductor may reorder float ops
    torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
if compiler == "aot_eager":  # out = one gradient row (the DDP bucket case): a mutated graph input
    inplace = lambda g: bm.combine(g, weights, offsets, out=g[0], backend=backend)
    a, b = grads.clone(), grads.clone()
    torch.compile(inplace, fullgraph=True, backend=compiler)(a)
    inplace(b)
    assert torch.equal(a, b) and not torch.equal(a, grads), "combine in place"
if full:  # check_finite=True under compile (no fullgraph): the graph breaks, the check still raises
    bad = grads.clone()
    bad[1, 7] = float("nan")
    out = torch.full((200,), 5.0, device=device)
    checked = torch.compile(lambda x: bm.fused_bucket_moo(x, segments=offsets, out=out, backend=backend),
                            backend=compiler)
    try:
        checked(bad)
    except ValueError as exc:
        assert "not finite" in str(exc) and bool((out == 5.0).all()), exc
    else:
        raise AssertionError("check_finite=True did not raise under torch.compile")
print("ok", bm.get_backend(backend, device).name)
"""


def _run(backend: str, compiler: str, device: str = "cpu", full: bool = True,
         interpret: bool = False) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, backend, compiler, device,
                           "full" if full else "short"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr[-6000:]


def _cpu_backends():
    reasons = bm.available_backends("cpu")
    return [b for b in ("cpu", "torch") if reasons[b] is None]


# The native cpu backend with both compilers; the torch reference backend (the same API code
# around torch ops) only with aot_eager below: under Inductor it cost ~150 s of CPU in CI and
# tests torch's code generation more than this library.
@pytest.mark.slow
@pytest.mark.parametrize("backend,compiler",
                         [(b, c) for b in _cpu_backends() if b == "cpu" for c in ("aot_eager", "inductor")])
def test_first_call_compiles(backend, compiler):
    """Also PCGrad with a loss normalisation, and a second call with another normalisation."""
    _run(backend, compiler)


# The Triton kernels under the interpreter are slow (about a second per MGDA launch): the
# short script (gram, solve, combine, fused; no second call) and no Inductor here.
@pytest.mark.slow
def test_first_call_compiles_triton_under_the_interpreter():
    pytest.importorskip("triton")
    _run("triton", "aot_eager", full=False, interpret=True)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_first_call_compiles_on_cuda(backend):
    """Compiled Triton kernels (no interpreter) and the native CUDA ops, with Inductor."""
    if torch.cuda.is_available() and bm.available_backends("cuda")[backend] is not None:
        pytest.skip(f"backend {backend!r}: {bm.available_backends('cuda')[backend]}")
    _run(backend, "inductor", "cuda")


@pytest.mark.slow
def test_first_call_compiles_torch_backend():
    """The torch reference backend, short script with ``aot_eager`` (its solvers' early stop on
    the CPU reads a flag only outside tracing)."""
    _run("torch", "aot_eager", full=False)
