"""The native backends ``cpu`` (C++/OpenMP, :mod:`bucketmoo_kernels._cpu`) and ``cuda``
(:mod:`bucketmoo_kernels._cuda`).

Both compiled modules register the same ``torch.ops.bucketmoo`` operators (schemas in
``python/bucketmoo_ops.h``), one implementation per dispatch key:

* ``gram(Tensor[] grads, Tensor offsets) -> Tensor``: ``[S, T, T]`` float32
* ``solve_mgda(Tensor gram, int solver, int max_iter, float tol) -> Tensor``: ``[S, T]`` f64
* ``solve_pcgrad(Tensor gram, Tensor orders) -> Tensor``: ``[S, T]`` f64
* ``solve_cagrad(Tensor gram, float c, int rescale) -> Tensor``: ``[S, T]`` f64
* ``solve_dual_cone(Tensor gram, int method, float norm_eps, float reg_eps, int max_iter) ->
  Tensor``: upgrad (4) / dualproj (5) weights, ``[S, T]`` f64
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

import torch

from .dispatch import Backend, register_backend
from .inputs import Segments, TaskGrads
from .methods.pcgrad import pcgrad_orders_on
from .reference import combine_reference, gram_reference
from .weight_step import NativeCodes, WeightStep

__all__ = ["SCHEMAS", "NativeBackend", "cpu_isa", "load_errors"]

logger = logging.getLogger("bucketmoo_kernels")

#: The operator schemas, identical to python/bucketmoo_ops.h (a test compares them).
#: ``solve_mgda``, ``solve_pcgrad``, ``solve_cagrad`` and ``solve_dual_cone`` are not used by the backends (the
#: ``weights`` op runs the whole step); they stay as the tests' float64-in, float64-out handle
#: on the shared native solvers, which are checked against the methods' torch functions at
#: 1e-12 (the ``weights`` op rounds to float32 and could not resolve that).
SCHEMAS = {
    "gram": "gram(Tensor[] grads, Tensor offsets) -> Tensor",
    "solve_mgda": "solve_mgda(Tensor gram, int solver, int max_iter, float tol) -> Tensor",
    "solve_pcgrad": "solve_pcgrad(Tensor gram, Tensor orders) -> Tensor",
    "solve_cagrad": "solve_cagrad(Tensor gram, float c, int rescale) -> Tensor",
    "solve_dual_cone": "solve_dual_cone(Tensor gram, int method, float norm_eps, float reg_eps, "
                       "int max_iter) -> Tensor",
    "combine_": "combine_(Tensor(a!) out, Tensor[] grads, Tensor weights, Tensor offsets) -> ()",
    "weights": "weights(Tensor gram, Tensor? orders, Tensor? losses, int method, int solver, "
               "int max_iter, float tol, float c, int rescale, int normalization, "
               "bool normalize_weights) -> Tensor",
    "fused_": "fused_(Tensor(a!) out, Tensor[] grads, Tensor offsets, Tensor? orders, "
              "Tensor? losses, int method, int solver, int max_iter, float tol, float c, "
              "int rescale, int normalization, bool normalize_weights) -> (Tensor, Tensor)",
}
# The <method> codes of ``weights`` / ``fused_`` come from WeightStep.native_codes (the
# method registry decides which methods, solvers and T run natively).

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

    @torch.library.register_fake("bucketmoo::solve_dual_cone")
    def _solve_dual_cone_fake(gram, method, norm_eps, reg_eps, max_iter):
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


class NativeBackend(Backend):
    """``cpu`` or ``cuda``: the ``torch.ops.bucketmoo`` operators of a compiled module.

    Gram and combine run natively up to the module's task limit (``max_tasks()`` of the
    module when it has one: the CUDA kernels take T <= 8; the CPU ones any T) and through
    the torch reference above it (logged once). :meth:`weights` runs the whole weight step
    natively (``weights`` op) and :meth:`fused` the CPU's one-sweep gram + weights + combine
    (``fused_`` op) wherever :meth:`WeightStep.native_codes` gives codes for this T (mean,
    mgda, pcgrad up to T = 32, cagrad up to T = 8, upgrad and dualproj up to T = 16 without
    a ``pref_vector``, options the native solvers take); else
    both return None and the API runs the method's torch function. There is no separate
    float64 :meth:`solve`: the ``solve_*`` ops stay
    registered only as the tests' float64 handle on the native solvers (see SCHEMAS).
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

        #: whether the module implements the whole weight step (``weights``: cpu and cuda)
        #: and the fused sweep (``fused_``: cpu) for this device
        self.has_weight_step = has_kernel("weights")
        self.has_fused_sweep = has_kernel("fused_")

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
    def _weight_step_args(step: WeightStep, num_tasks: int, losses: torch.Tensor | None,
                          device: torch.device) -> tuple | None:
        """``orders, losses, *codes`` of the ``weights``/``fused_`` ops, or None where the
        native weight step does not run this configuration."""
        codes: NativeCodes | None = step.native_codes(num_tasks)
        if codes is None:
            return None
        orders = (pcgrad_orders_on(num_tasks, int(step.options["seed"]), str(device))
                  if step.method.native_orders else None)
        return (orders, losses, *codes)

    def weights(self, gram: torch.Tensor, step: WeightStep,
                losses: torch.Tensor | None) -> torch.Tensor | None:
        """The whole weight step natively: ``[S, T, T]`` float32 -> ``[S, T]`` float32, or None."""
        if not self.has_weight_step:
            return None
        args = self._weight_step_args(step, gram.shape[-1], losses, gram.device)
        if args is None:
            return None
        return torch.ops.bucketmoo.weights(gram.to(torch.float32).contiguous(), *args)

    def fused(self, grads: TaskGrads, segments: Segments, out: torch.Tensor, step: WeightStep,
              losses: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Gram, weights and combine in one cache-blocked sweep (``fused_``), writing ``out``;
        returns ``(gram, weights)``, or None (nothing written) where it does not apply."""
        if not self.has_fused_sweep or (out.numel() > 1 and out.stride(0) != 1):
            return None
        args = self._weight_step_args(step, grads.num_tasks, losses, grads.device)
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
