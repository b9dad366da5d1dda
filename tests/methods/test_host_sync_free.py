"""No host synchronisation in any method's weight step on an accelerator: a CPU proxy.

Every method runs on Gram matrices on the ``meta`` device (shapes, no data). Its device is
not ``cpu``, so the code takes the accelerator path (fixed iteration counts, no convergence
flag read: :func:`~bucketmoo_kernels.methods.batched_solvers.may_stop_early`), and a
dispatch mode raises on every operator that reads device data on the host on CUDA when it
is given a meta tensor: ``.item()`` / ``bool()`` / ``int()`` (``_local_scalar_dense``), a
copy to the CPU (``.cpu()``, ``.tolist()`` of a device tensor), the LU error check of
``torch.linalg.solve`` (``_linalg_check_errors``), ``torch.linalg.eigh`` / ``svd`` (they read
their info on the host on CUDA: torch's documentation says they synchronise), and
data-dependent shapes (``nonzero``, ``masked_select``, boolean indexing), and copies from host
memory to the device (synchronous on CUDA, refused in graph capture) after a warm-up call.
Python control flow on device data fails on meta tensors by itself. CPU tensors made from Python values
(PCGrad's task orders, the counter RNG's key) are host data and allowed.

A second test runs the accelerator path on real CPU data (``fixed_iterations()``) and
compares it with the CPU path, so the iterations an accelerator runs are also checked for
their answer.

Methods whose weight step still synchronised would be listed in ``KNOWN_SYNC`` as strict
xfails (none now: the eigen-decomposition of imtl_g, aligned_mtl and config runs as Jacobi
sweeps off the CPU, :func:`~bucketmoo_kernels.methods.batched_solvers.jacobi_eigh`, checked
against ``torch.linalg.eigh`` here).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import bucketmoo_kernels as bmk
from bucketmoo_kernels.dispatch import get_backend
from bucketmoo_kernels.methods import MethodState, available_methods
from bucketmoo_kernels.methods.batched_solvers import fixed_iterations, jacobi_eigh
from bucketmoo_kernels.methods.elementwise import is_elementwise
from bucketmoo_kernels.weight_step import WeightStep, compute_weights

from method_cases import gram_of, task_matrix

aten = torch.ops.aten

#: Operators that read device data on the host (a device sync on CUDA).
SYNCING_OPS = {
    aten._local_scalar_dense.default, aten._linalg_check_errors.default, aten._linalg_eigh.default,
    aten._linalg_svd.default, aten.nonzero.default, aten.masked_select.default, aten.equal.default,
    aten.is_nonzero.default, aten.allclose.default, aten.unique_dim.default, aten._unique2.default,
}

#: method -> why its weight step still synchronises on CUDA; its cases are strict xfails.
#: (Empty since imtl_g, aligned_mtl and config take batched_solvers.jacobi_eigh off the CPU.)
KNOWN_SYNC: dict[str, str] = {}

#: Extra option sets per method (each also runs with the defaults): every solver path.
VARIANTS = {
    "mgda": [{"solver": "closed_form"}, {"solver": "exact"}, {"solver": "pgd"}, {"ema": 0.5}],
    "cagrad": [{"solver": "iterative"}, {"rescale": 0}],
    "constant": [{"weights": [1.0, 2.0, 3.0]}],
    "nash_mtl": [{"max_norm": 0.0}],
    "fairgrad": [{"alpha": 2.0}],
    "krum": [{"n_byzantine": 0, "n_selected": 2}],
}
NEEDS_OPTIONS = {"constant"}  # no usable defaults
#: Iteration counts for the trap (every loop repeats the same operators, so one round shows
#: what an iteration does, and each count still reaches the loop's convergence check; MGDA's
#: PGD checks at iteration 50 only, so its case runs 50 and is marked slow: meta tensors cost
#: milliseconds per operator).
FEW_ITERATIONS = {"mgda": {"max_iter": 50}, "cagrad": {"max_iter": 1}, "nash_mtl": {"max_iter": 2},
                  "fairgrad": {"max_iter": 2}, "upgrad": {"max_iter": 1}, "dualproj": {"max_iter": 1}}
SLOW_CASES = ({"solver": "pgd"},)
SLOW_METHODS: set[str] = set()


class HostSync(AssertionError):
    pass


class HostSyncTrap(TorchDispatchMode):
    """Raise :class:`HostSync` on an operator that reads meta-device (device) data on the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_device = any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tree_leaves((args, kwargs)))
        if on_device:
            to_host = func in (aten._to_copy.default, aten.to.device, aten.to.dtype_layout) and \
                str(kwargs.get("device", args[1] if func is aten.to.device else "meta")) == "cpu"
            if func in SYNCING_OPS or to_host:
                raise HostSync(f"{func} on a device tensor: a host sync on CUDA")
        if func is aten._to_copy.default and str(kwargs.get("device")) == "meta" and args[0].device.type == "cpu":
            raise HostSync("a copy from host memory to the device (a synchronous copy on CUDA, refused "
                           "in graph capture)")
        return func(*args, **kwargs)


class HostDataFactoryTrap(TorchFunctionMode):
    """Raise :class:`HostSync` on ``torch.tensor(host data, device=<device>)`` and the like: the
    factory copies host memory to the device without passing through the dispatcher."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and \
                torch.device(kwargs.get("device") or "cpu").type == "meta":
            raise HostSync(f"torch.{func.__name__}(host data, device=...): a copy from host memory to the device")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync():
    """Both traps: host reads of device data and copies of host data to the device."""
    with HostDataFactoryTrap(), HostSyncTrap():
        yield


def _cases():
    out = []
    for method in available_methods():
        if is_elementwise(method):
            continue
        sets = ([] if method in NEEDS_OPTIONS else [{}]) + VARIANTS.get(method, [])
        for options in sets:
            label = method + ("" if not options else "-" + "-".join(f"{k}={v}" for k, v in options.items()))
            marks = [pytest.mark.xfail(raises=HostSync, strict=True, reason=KNOWN_SYNC[method])] \
                if method in KNOWN_SYNC else []
            if options in SLOW_CASES or (method in SLOW_METHODS and not options):
                marks.append(pytest.mark.slow)
            out.append(pytest.param(method, options, id=label, marks=marks))
    return out


def _meta_gram(num_seg: int, num_tasks: int) -> torch.Tensor:
    return torch.empty(num_seg, num_tasks, num_tasks, dtype=torch.float32, device="meta")


@pytest.mark.parametrize("method, options", _cases())
def test_weight_step_has_no_host_sync(method, options, monkeypatch):
    from bucketmoo_kernels.methods import batched_solvers, dual_cone, pcd, spectral

    full_qp = batched_solvers.nonneg_qp
    short_qp = lambda *a, **k: full_qp(*a, **dict(k, max_iter=1, polish_steps=1))  # noqa: E731
    monkeypatch.setattr(pcd, "nonneg_qp", short_qp)  # (PCD's count is fixed at 400)
    monkeypatch.setattr(dual_cone, "nonneg_qp", short_qp)
    monkeypatch.setattr(spectral, "jacobi_eigh", lambda sym: batched_solvers.jacobi_eigh(sym, sweeps=1))
    step = WeightStep(method, {**FEW_ITERATIONS.get(method, {}), **options})
    num_tasks = 2 if options.get("solver") == "closed_form" else 3
    gram = _meta_gram(2, num_tasks)
    state = MethodState() if step.needs_state or "seed" in step.options else None
    backend = get_backend("torch", torch.device("cpu"))
    # A warm-up call outside the trap, as before a CUDA graph capture: it creates the state's
    # tensors and the cached device constants; after it, nothing may touch the host.
    compute_weights(gram, step, None, backend, state)
    with no_host_sync():
        for _ in range(2):
            weights = compute_weights(gram, step, None, backend, state)
    assert weights.shape == (2, num_tasks) and weights.device.type == "meta"


@pytest.mark.parametrize("normalization", ["l2", "loss"])
def test_normalizations_have_no_host_sync(normalization):
    step = WeightStep("pcgrad", {}, normalization=normalization)
    losses = torch.empty(2, 3, dtype=torch.float64, device="meta") if normalization == "loss" else None
    with no_host_sync():
        weights = compute_weights(_meta_gram(2, 3), step, losses, get_backend("torch", torch.device("cpu")))
    assert weights.shape == (2, 3)


def test_the_trap_catches_host_reads():
    gram = _meta_gram(1, 2)
    for read in (lambda: bool((gram > 0).all()), lambda: gram.sum().item(), lambda: gram.cpu(),
                 lambda: torch.linalg.solve(gram.double(), gram.double()), lambda: torch.linalg.eigh(gram),
                 lambda: gram.nonzero(), lambda: torch.tensor([1.0, 2.0]).to("meta"),
                 lambda: torch.tensor([1.0, 2.0], device=gram.device), lambda: torch.as_tensor([1.0], device="meta")):
        with no_host_sync(), pytest.raises((HostSync, RuntimeError, NotImplementedError)):
            read()
    with no_host_sync():  # what the methods use instead
        torch.linalg.solve_ex(gram.double(), gram.double(), check_errors=False)


@pytest.mark.parametrize("method", [m for m in available_methods() if not is_elementwise(m)])
def test_fixed_iteration_path_gives_the_cpu_answer(method):
    """The accelerator path (full iteration counts) on real data equals the CPU path (early
    stop) to the solvers' tolerance; stateful methods over two steps."""
    options = {"weights": [1.0, 2.0, 3.0, 4.0]} if method == "constant" else {}
    grams = torch.cat([gram_of(task_matrix(4, "full_rank", seed)) for seed in range(2)]).float()
    results = []
    for fixed in (False, True):
        state = MethodState()
        with fixed_iterations() if fixed else _nothing():
            outs = [bmk.solve(grams, method, backend="torch", method_state=state, **options) for _ in range(2)]
        results.append(torch.stack(outs))
    torch.testing.assert_close(results[1], results[0], atol=2e-6, rtol=1e-5)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("kind", ["full_rank", "rank_deficient"])
def test_jacobi_eigh_matches_torch_eigh(num_tasks, kind):
    """The sync-free eigen-decomposition against LAPACK's: eigenvalues to 1e-13 of the largest,
    V diag(e) V^T = G and V^T V = I to 1e-13 (float32-rounded Grams, as the API's)."""
    grams = torch.cat([gram_of(task_matrix(num_tasks, kind, seed)) for seed in range(4)]).float().double()
    evals, evecs = jacobi_eigh(grams)
    ref = torch.linalg.eigh(grams).eigenvalues
    scale = grams.abs().amax()
    assert (evals - ref).abs().max() <= 1e-13 * scale
    rebuilt = evecs @ torch.diag_embed(evals) @ evecs.transpose(-1, -2)
    assert (rebuilt - grams).abs().max() <= 1e-13 * scale
    eye = torch.eye(num_tasks, dtype=torch.float64)
    assert (evecs.transpose(-1, -2) @ evecs - eye).abs().max() <= 1e-13
    assert (evals[:, 1:] >= evals[:, :-1]).all()
