"""The ``bucketmoo_triton`` custom ops (:mod:`bucketmoo_kernels.triton.ops`): each gives the
bits of the launcher it wraps (whose results the other Triton tests check against the float64
references), passes ``torch.library.opcheck`` (schema, fake implementation, aliasing, the
declared mutation of ``combine_``), and the fakes put outputs on the inputs' device, CUDA
included (fake CUDA tensors, so this runs without a GPU).

Under the interpreter each launch takes tens of milliseconds to a second, and opcheck calls
an op several times, so the inputs are tiny: T = 2, N = 40, one segment for the solvers under
opcheck. (T = 3 and the exact MGDA solver under ``torch.compile``: tests/test_compile.py.)
"""

import pytest
import torch

pytest.importorskip("triton")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from bucketmoo_kernels.inputs import as_segments, as_task_grads  # noqa: E402
from bucketmoo_kernels.triton import combine_triton, gram_triton  # noqa: E402
from bucketmoo_kernels.triton.ops import SCHEMAS  # noqa: E402
from bucketmoo_kernels.triton.solve import cagrad_triton, mgda_triton, pcgrad_triton  # noqa: E402
from tests.utils import random_grads  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ops = torch.ops.bucketmoo_triton
# Under the interpreter the rest are ``slow`` (tests/conftest.py): opcheck runs an op several
# times and its first use sets up torch's AOT tracing (seconds).
FAST_UNDER_INTERPRETER = {"test_schemas_are_the_registered_ones", "test_fakes_on_cuda_tensors",
                          "test_bad_arguments_are_named_and_nothing_is_written"}
N = 40
BOUNDS = [0, 7, 7, 40]  # an empty segment; with CHUNK = 16 the last one has three tiles
CHUNK = 16


def _one_gram(num_tasks=2):
    """A float64 ``[1, T, T]`` Gram of conflicting gradients (torch, not a kernel)."""
    grads = random_grads(num_tasks, N, dtype=torch.float64, device=DEVICE)
    return (grads @ grads.T)[None]


def _args(op, num_tasks=2):
    """The op's arguments on DEVICE, with tiny sizes."""
    grads = list(random_grads(num_tasks, N, device=DEVICE).unbind(0))
    if op == "gram":
        return (grads, BOUNDS, CHUNK, None, 8)
    if op == "combine_":
        weights = torch.rand(len(BOUNDS) - 1, num_tasks, device=DEVICE)
        return (torch.full((N,), 7.0, device=DEVICE), grads, weights, BOUNDS, 16)
    gram = _one_gram(num_tasks)
    return {"solve_mgda": (gram, "closed_form", 5),
            "solve_pcgrad_seeded": (gram, 3),
            "solve_cagrad": (gram, 0.4, 1)}[op]


def test_schemas_are_the_registered_ones():
    for name, schema in SCHEMAS.items():
        assert str(getattr(ops, name).default._schema) == f"bucketmoo_triton::{name}{schema}"


def test_ops_give_the_launchers_bits(num_tasks=2):
    grads = random_grads(num_tasks, N, device=DEVICE)
    task_grads, segs = as_task_grads(grads), as_segments(BOUNDS, N)
    gram = ops.gram(list(grads.unbind(0)), BOUNDS, CHUNK, None, 8)
    assert torch.equal(gram, gram_triton(task_grads, segs, chunk=CHUNK, reduce_slots=8))
    gram = gram[2:].double()  # the solvers on one segment: interpreter time grows with S
    for solver in ("closed_form", "exact", "pgd"):
        assert torch.equal(ops.solve_mgda(gram, solver, 5), mgda_triton(gram, solver, 5))
    assert torch.equal(ops.solve_pcgrad_seeded(gram, 3), pcgrad_triton(gram, seed=3))
    assert torch.equal(ops.solve_cagrad(gram, 0.4, 2), cagrad_triton(gram, c=0.4, rescale=2))
    weights = torch.rand(len(BOUNDS) - 1, num_tasks, device=DEVICE)
    out = torch.full((N,), float("nan"), device=DEVICE)
    assert ops.combine_(out, list(grads.unbind(0)), weights, BOUNDS, 16) is None
    expected = combine_triton(task_grads, weights, segs, torch.empty(N, device=DEVICE), block=16)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("op", list(SCHEMAS))
def test_opcheck(op):
    torch.library.opcheck(getattr(ops, op).default, _args(op))


def test_fakes_on_cuda_tensors():
    """Shapes, dtypes and devices of the fake outputs for CUDA inputs (as when Dynamo traces a
    call on CUDA tensors); no kernel runs."""
    with FakeTensorMode():
        grads = list(torch.empty(3, N, device="cuda").unbind(0))
        gram = ops.gram(grads, BOUNDS, CHUNK, None, 8)
        assert (gram.shape, gram.dtype, gram.device.type) == ((3, 3, 3), torch.float32, "cuda")
        gram64 = gram.double()
        for weights in (ops.solve_mgda(gram64, "exact", 5), ops.solve_pcgrad_seeded(gram64, 0),
                        ops.solve_cagrad(gram64, 0.4, 1)):
            assert (weights.shape, weights.dtype, weights.device.type) == ((3, 3), torch.float64, "cuda")
        assert ops.combine_(torch.empty(N, device="cuda"), grads, torch.empty(3, 3, device="cuda"),
                            BOUNDS, None) is None


def test_bad_arguments_are_named_and_nothing_is_written():
    """No kernel runs: every call fails its checks first."""
    grads = list(random_grads(2, N, device=DEVICE).unbind(0))
    with pytest.raises(ValueError, match="solver must be"):
        ops.solve_mgda(_one_gram(), "newton", 5)
    with pytest.raises(ValueError, match="closed-form MGDA solver needs T = 2"):
        ops.solve_mgda(_one_gram(3), "closed_form", 5)
    with pytest.raises(ValueError, match=r"gram must be a floating-point \[S, T, T\]"):
        ops.solve_pcgrad_seeded(_one_gram()[0], 0)
    with pytest.raises(ValueError, match="bounds offsets must start at 0 and end at N=40"):
        ops.gram(grads, [0, 7, 39], CHUNK, None, 8)
    out = torch.full((N,), 7.0, device=DEVICE)
    with pytest.raises(ValueError, match=r"weights must have shape \[S, T\] = \[3, 2\]"):
        ops.combine_(out, grads, torch.rand(2, 2, device=DEVICE), BOUNDS, None)
    with pytest.raises(ValueError, match="bounds offsets must be non-decreasing"):
        ops.combine_(out, grads, torch.rand(3, 2, device=DEVICE), [0, 9, 7, 40], None)
    assert bool((out == 7.0).all())
