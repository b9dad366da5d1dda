"""The native backends ``cpu`` (C++/OpenMP, :mod:`bucketmoo_kernels._cpu`) and ``cuda``
(:mod:`bucketmoo_kernels._cuda`).

Both compiled modules register the same ``torch.ops.bucketmoo`` operators (schemas in
``python/bucketmoo_ops.h``), one implementation per dispatch key:

* ``gram(Tensor[] grads, Tensor offsets) -> Tensor``: ``[S, T, T]`` float32
* ``solve_mgda(Tensor gram, int solver, int max_iter, float tol) -> Tensor``: ``[S, T]`` f64
* ``solve_pcgrad(Tensor gram, Tensor orders) -> Tensor``: ``[S, T]`` f64
* ``solve_cagrad(Tensor gram, float c, int rescale) -> Tensor``: ``[S, T]`` f64
* ``combine_(Tensor(a!) out, Tensor[] grads, Tensor weights, Tensor offsets) -> ()``
* ``weights(Tensor gram, Tensor? orders, Tensor? losses, <method>) -> Tensor``: the whole
  weight step (normalisation, method, rescale), ``[S, T]`` float32 from a float32 Gram
* ``fused_(Tensor(a!) out, Tensor[] grads, Tensor offsets, Tensor? orders, Tensor? losses,
  <method>) -> (Tensor, Tensor)``: gram, weights and combine in one cache-blocked sweep (CPU)

This module loads each compiled module in a try/except (a missing or broken build never
breaks ``import bucketmoo_kernels``; the reason is kept and shown when the backend is asked
for by name), registers the fake (meta) implementations so the ops trace under
``torch.compile``, and registers the two backends with :mod:`bucketmoo_kernels.dispatch`.
"""

from __future__ import annotations

import logging
import os

import torch

from .dispatch import register_backend
from .inputs import Segments, TaskGrads
from .reference import combine_reference, gram_reference
from .methods.normalization import USES_LOSSES, check_normalization, loss_table
from .methods.pcgrad import pcgrad_orders_on
from .methods.simplex import MAX_EXACT_TASKS

__all__ = ["SCHEMAS", "METHOD_CODES", "MGDA_SOLVER_CODES", "MAX_NATIVE_TASKS", "NativeBackend", "cpu_isa",
           "load_errors"]

logger = logging.getLogger("bucketmoo_kernels")

#: The operator schemas, identical to python/bucketmoo_ops.h (a test compares them).
SCHEMAS = {
    "gram": "gram(Tensor[] grads, Tensor offsets) -> Tensor",
    "solve_mgda": "solve_mgda(Tensor gram, int solver, int max_iter, float tol) -> Tensor",
    "solve_pcgrad": "solve_pcgrad(Tensor gram, Tensor orders) -> Tensor",
    "solve_cagrad": "solve_cagrad(Tensor gram, float c, int rescale) -> Tensor",
    "combine_": "combine_(Tensor(a!) out, Tensor[] grads, Tensor weights, Tensor offsets) -> ()",
    "weights": "weights(Tensor gram, Tensor? orders, Tensor? losses, int method, int solver, "
               "int max_iter, float tol, float c, int rescale, int normalization, "
               "bool normalize_weights) -> Tensor",
    "fused_": "fused_(Tensor(a!) out, Tensor[] grads, Tensor offsets, Tensor? orders, "
              "Tensor? losses, int method, int solver, int max_iter, float tol, float c, "
              "int rescale, int normalization, bool normalize_weights) -> (Tensor, Tensor)",
}
#: ``method`` argument of ``weights`` / ``fused_`` (solver::Method).
METHOD_CODES = {"mean": 0, "mgda": 1, "pcgrad": 2, "cagrad": 3}
#: ``solver`` argument of ``solve_mgda``.
MGDA_SOLVER_CODES = {"auto": 0, "closed_form": 1, "exact": 2, "pgd": 3}
#: The native iterative MGDA solver and PCGrad handle up to this many tasks (fixed-size
#: arrays in csrc/common/bucketmoo_solvers.h); above it the method's torch function runs.
MAX_NATIVE_TASKS = 32

_errors: dict[str, str] = {}


def _import(name: str):
    try:
        module = __import__(f"bucketmoo_kernels.{name}", fromlist=[name])
    except Exception as exc:  # noqa: BLE001  (any failure: extension not built or not loadable)
        _errors[name] = f"bucketmoo_kernels.{name} did not load ({type(exc).__name__}: {exc})"
        logger.debug("bucketmoo_kernels: %s", _errors[name])
        return None
    return module


def _ops_defined() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw("bucketmoo::gram", "")
    except Exception:  # noqa: BLE001
        return False
    return True


_cpu = _import("_cpu")
if _cpu is None and not _ops_defined():
    # Only the CUDA module may be there: it carries implementations but no schemas.
    _lib = torch.library.Library("bucketmoo", "DEF")  # kept alive for the process lifetime
    for _schema in SCHEMAS.values():
        _lib.define(_schema)
_cuda = _import("_cuda")


def load_errors() -> dict[str, str]:
    """``{module: reason}`` for the compiled modules that did not load."""
    return dict(_errors)


def cpu_isa() -> str | None:
    """Instruction-set variant of the CPU loops in use (``"avx2"``/``"baseline"``), or None."""
    return _cpu.isa() if _cpu is not None else None


# ---------------------------------------------------------------- fake implementations
def _register_fakes() -> None:
    @torch.library.register_fake("bucketmoo::gram")
    def _gram_fake(grads, offsets):
        num_tasks = len(grads)
        return grads[0].new_empty((offsets.shape[0] - 1, num_tasks, num_tasks), dtype=torch.float32)

    @torch.library.register_fake("bucketmoo::solve_mgda")
    def _solve_mgda_fake(gram, solver, max_iter, tol):
        return gram.new_empty(gram.shape[:2], dtype=torch.float64)

    @torch.library.register_fake("bucketmoo::solve_pcgrad")
    def _solve_pcgrad_fake(gram, orders):
        return gram.new_empty(gram.shape[:2], dtype=torch.float64)

    @torch.library.register_fake("bucketmoo::solve_cagrad")
    def _solve_cagrad_fake(gram, c, rescale):
        return gram.new_empty(gram.shape[:2], dtype=torch.float64)

    @torch.library.register_fake("bucketmoo::combine_")
    def _combine_fake(out, grads, weights, offsets):
        return None

    @torch.library.register_fake("bucketmoo::weights")
    def _weights_fake(gram, orders, losses, *method_args):
        return gram.new_empty(gram.shape[:2], dtype=torch.float32)

    @torch.library.register_fake("bucketmoo::fused_")
    def _fused_fake(out, grads, offsets, orders, losses, *method_args):
        num_seg, num_tasks = offsets.shape[0] - 1, len(grads)
        return (grads[0].new_empty((num_seg, num_tasks, num_tasks), dtype=torch.float32),
                grads[0].new_empty((num_seg, num_tasks), dtype=torch.float32))


if _ops_defined():
    _register_fakes()


# ---------------------------------------------------------------- the backends
def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.numel() <= 1 or t.stride(0) == 1 else t.contiguous()


class NativeBackend:
    """``cpu`` or ``cuda``: the ``torch.ops.bucketmoo`` operators of a compiled module.

    Gram and combine run natively up to the module's task limit (``max_tasks()`` of the
    module when it has one: the CUDA kernels take T <= 8; the CPU ones any T) and through
    the torch reference above it (logged once). The native solvers cover ``mgda`` (all
    solvers; T <= 32), ``pcgrad`` (T <= 32) and ``cagrad`` (T <= 8). Any other method, or a
    configuration the native solver rejects, returns None from :meth:`solve` so that the
    method's torch function runs (and raises its own error for bad options). Where the
    module has them, :meth:`weights` runs the whole weight step natively (``mean`` too) and
    :meth:`fused` the CPU's one-sweep gram + weights + combine; both return None where they
    do not apply, and the caller takes the step-by-step path.
    """

    def __init__(self, name: str, device_type: str, module, error: str | None):
        self.name = name
        self.device_type = device_type
        self._module = module
        self._error = error
        limit = getattr(module, "max_tasks", None)
        self.max_tasks = int(limit()) if callable(limit) else None
        self._logged_fallback = False
        key = "CPU" if device_type == "cpu" else "CUDA"

        def has_kernel(op: str) -> bool:
            return module is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
                f"bucketmoo::{op}", key)

        #: whether the module runs the whole weight step (``weights``: cpu and cuda) and the
        #: fused sweep (``fused_``: cpu)
        #: ``BUCKETMOO_NATIVE_WEIGHTS=0`` (read once) turns both off: the weight step then runs
        #: in Python around the native solvers, as before they existed (for bisecting).
        native_weights = os.environ.get("BUCKETMOO_NATIVE_WEIGHTS", "1").strip() != "0"
        self.has_weight_step = native_weights and has_kernel("weights")
        self.has_fused_sweep = native_weights and has_kernel("fused_")

    def _native_tasks(self, num_tasks: int) -> bool:
        if self.max_tasks is None or num_tasks <= self.max_tasks:
            return True
        if not self._logged_fallback:
            self._logged_fallback = True
            logger.info("bucketmoo_kernels: the %s kernels take at most %d tasks; T = %d runs the "
                        "torch reference for gram/combine", self.name, self.max_tasks, num_tasks)
        return False

    def unavailable_reason(self, device: torch.device) -> str | None:
        if self._module is None:
            return self._error or f"the {self.name} extension is not built"
        if torch.device(device).type != self.device_type:
            return f"the {self.name} backend runs on {self.device_type} tensors; got {torch.device(device)}"
        return None

    def gram(self, grads: TaskGrads, segments: Segments) -> torch.Tensor:
        if not self._native_tasks(grads.num_tasks):
            return gram_reference(grads, segments)
        rows = [_unit_stride(g) for g in grads.rows]
        return torch.ops.bucketmoo.gram(rows, segments.on(grads.device))

    @staticmethod
    def _mgda_args(num_tasks: int, options: dict) -> tuple[int, int, float] | None:
        """(solver code, max_iter, tol) of a configuration the native MGDA solvers run."""
        code = MGDA_SOLVER_CODES.get(options.get("solver", "auto"))
        if code is None or num_tasks > MAX_NATIVE_TASKS:
            return None
        resolved = code if code else (1 if num_tasks == 2 else 2 if num_tasks <= MAX_EXACT_TASKS else 3)
        if num_tasks > 1 and ((resolved == 1 and num_tasks != 2) or
                              (resolved == 2 and num_tasks > MAX_EXACT_TASKS)):
            return None  # the torch function raises the documented ValueError
        max_iter, tol = int(options.get("max_iter", 500)), float(options.get("tol", 1e-10))
        return None if max_iter < 0 else (code, max_iter, tol)

    @staticmethod
    def _cagrad_args(num_tasks: int, options: dict) -> tuple[float, int] | None:
        c, rescale = float(options.get("c", 0.4)), options.get("rescale", 1)
        if num_tasks > MAX_EXACT_TASKS or c < 0 or rescale not in (0, 1, 2):
            return None
        return c, int(rescale)

    def solve(self, gram: torch.Tensor, method, options: dict) -> torch.Tensor | None:
        num_tasks = gram.shape[-1]
        gram = gram.to(torch.float64).contiguous()
        if method.name == "mgda":
            args = self._mgda_args(num_tasks, options)
            return None if args is None else torch.ops.bucketmoo.solve_mgda(gram, *args)
        if method.name == "pcgrad":
            if num_tasks > MAX_NATIVE_TASKS:
                return None
            orders = pcgrad_orders_on(num_tasks, int(options.get("seed", 0)), str(gram.device))
            return torch.ops.bucketmoo.solve_pcgrad(gram, orders)
        if method.name == "cagrad":
            args = self._cagrad_args(num_tasks, options)
            return None if args is None else torch.ops.bucketmoo.solve_cagrad(gram, *args)
        return None

    def _method_args(self, method, options: dict, num_seg: int, num_tasks: int,
                     normalization: str, losses, normalize_weights: bool,
                     device: torch.device) -> tuple | None:
        """The ``orders, losses, <method>`` arguments of ``weights``/``fused_``, or None where
        the native weight step does not run this configuration (the caller then takes the
        torch path, which raises the documented errors for bad options)."""
        norm = check_normalization(normalization)
        if not self.has_weight_step or method.name not in METHOD_CODES or num_tasks > MAX_NATIVE_TASKS:
            return None
        orders, solver, max_iter, tol, c, rescale = None, 0, 0, 0.0, 0.0, 0
        if method.name == "mgda":
            args = self._mgda_args(num_tasks, options)
            if args is None:
                return None
            solver, max_iter, tol = args
        elif method.name == "pcgrad":
            orders = pcgrad_orders_on(num_tasks, int(options.get("seed", 0)), str(device))
        elif method.name == "cagrad":
            args = self._cagrad_args(num_tasks, options)
            if args is None:
                return None
            c, rescale = args
        table = (loss_table(losses, normalization, num_seg, num_tasks, device)
                 if normalization in USES_LOSSES else None)
        return (orders, table, METHOD_CODES[method.name], solver, max_iter, tol, c, rescale, norm,
                bool(normalize_weights))

    def weights(self, gram: torch.Tensor, method, options: dict, normalization: str, losses,
                normalize_weights: bool) -> torch.Tensor | None:
        """The whole weight step natively: ``[S, T, T]`` float32 -> ``[S, T]`` float32, or None."""
        num_seg, num_tasks = gram.shape[0], gram.shape[-1]
        args = self._method_args(method, options, num_seg, num_tasks, normalization, losses,
                                 normalize_weights, gram.device)
        if args is None:
            return None
        return torch.ops.bucketmoo.weights(gram.to(torch.float32).contiguous(), *args)

    def fused(self, grads: TaskGrads, segments: Segments, out: torch.Tensor, method,
              options: dict, normalization: str, losses,
              normalize_weights: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Gram, weights and combine in one cache-blocked sweep (``fused_``), writing ``out``;
        returns ``(gram, weights)``, or None (nothing written) where it does not apply."""
        if not self.has_fused_sweep or (out.numel() > 1 and out.stride(0) != 1):
            return None
        args = self._method_args(method, options, segments.num_segments, grads.num_tasks,
                                 normalization, losses, normalize_weights, grads.device)
        if args is None:
            return None
        rows = [_unit_stride(g) for g in grads.rows]
        return torch.ops.bucketmoo.fused_(out, rows, segments.on(grads.device), *args)

    def combine(self, grads: TaskGrads, weights: torch.Tensor, segments: Segments,
                out: torch.Tensor) -> None:
        if not self._native_tasks(grads.num_tasks):
            combine_reference(grads, weights, segments, out)
            return
        rows = [_unit_stride(g) for g in grads.rows]
        weights = weights.to(torch.float32).contiguous()
        offsets = segments.on(grads.device)
        if out.numel() <= 1 or out.stride(0) == 1:
            torch.ops.bucketmoo.combine_(out, rows, weights, offsets)
        else:  # a strided out: combine aside, then copy in (reads finish before the copy)
            tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
            torch.ops.bucketmoo.combine_(tmp, rows, weights, offsets)
            out.copy_(tmp)


register_backend(NativeBackend("cpu", "cpu", _cpu, _errors.get("_cpu")))
register_backend(NativeBackend("cuda", "cuda", _cuda, _errors.get("_cuda")))
