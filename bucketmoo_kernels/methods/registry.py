"""The method registry: one :class:`Method` record per aggregation method.

Each method's record is declared next to its code (``methods/<name>.py``) and says everything
the rest of the library needs to know about it:

* its ``kind``: ``gram`` (a function of the per-segment Gram matrix), ``stateful`` (a function
  of the Gram that keeps per-segment state across steps in a :class:`~.state.MethodState`) or
  ``elementwise`` (not a function of the Gram: it replaces the combine step);
* its options as :class:`~.options.Option` specs (type from the default, range, per-task);
* its task limits (``max_tasks``, ``min_tasks(options)``, the most tasks each explicitly
  chosen solver takes) and which solver runs for T tasks (``solver_for``);
* which backends have a native solver for it and up to which T: the native weight step of
  the ``cpu``/``cuda`` extensions (``native_code``, ``native_max_tasks``, ``native_args``)
  and the Triton kernels (``triton_max_tasks``, per solver).

Option validation (:func:`resolve_options`), :class:`~bucketmoo_kernels.weight_step.WeightStep`
(which hands the backends codes and solver names), the element-wise routing of the API and
the distributed front ends, and the table in ``docs/methods.md`` (:func:`methods_table`) read
the records; no backend or front end repeats those rules.

A Gram method is ``fn(gram, **options) -> weights`` where ``gram`` is a float64 ``[S, T, T]``
tensor (one Gram matrix per segment) and the result is float64 ``[S, T]``: the method's own
weights in its paper's scale (the public API rescales them to sum to one unless asked not
to). The function must be written with batched torch ops and no host synchronisation, so
it runs unchanged on any device; backends with a native solver for a method use theirs and
are tested against this one. An element-wise method is ``combine(block [T, n], start,
**options) -> [n]`` (elements ``start .. start + n`` of the bucket).

Adding a method is one file with its function and its record, plus its import in
``methods/__init__.py``; from user code, the decorator does both::

    from bucketmoo_kernels import register_method

    @register_method("uniform_plus", defaults={"eps": 0.1})
    def uniform_plus(gram, *, eps):
        ...
        return weights            # [S, T] float64
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

from .options import Between, Option, check_option_values

__all__ = ["Method", "Option", "KINDS", "register", "register_method", "get_method", "available_methods",
           "resolve_options", "COMMON_OPTIONS", "split_common_options", "methods_table"]

#: The kinds of method (see the module docstring).
KINDS = ("gram", "stateful", "elementwise")

#: Options every method accepts (not passed to its function): ``ema``, the per-segment weight
#: smoothing of :mod:`.ema` (needs a ``method_state``; not for element-wise methods).
COMMON_SPECS: Mapping[str, Option] = MappingProxyType({"ema": Option(0.0, Between(0.0, 1.0))})
COMMON_OPTIONS = {name: spec.default for name, spec in COMMON_SPECS.items()}

MethodFn = Callable[..., torch.Tensor]
#: ``solver_for(num_tasks, options) -> solver name``: which solver runs for T tasks.
SolverFor = Callable[[int, Mapping[str, Any]], str]
#: ``native_args(num_tasks, options) -> dict | None``: the method's fields of the native
#: weight step's codes (``solver``, ``max_iter``, ``tol``, ``c``, ``rescale``; absent ones
#: keep their defaults), or None where the native solver does not run this configuration
#: (the method's torch function then runs).
NativeArgs = Callable[[int, Mapping[str, Any]], "dict[str, Any] | None"]


def _no_gram_weights(name: str) -> MethodFn:
    def fn(gram: torch.Tensor, **options) -> torch.Tensor:
        raise ValueError(
            f"method {name!r} is element-wise: it has no per-segment weights to solve from a Gram "
            "matrix; use fused_bucket_moo(grads, method=...) (it replaces the combine step)"
        )
    return fn


@dataclass(frozen=True)
class Method:
    """A registered method's record.

    Attributes:
        name: the name it is registered under.
        fn: ``fn(gram [S,T,T] f64, **options) -> [S,T] f64``, the reference of every backend
            (a stateful method's also takes ``state=``; an element-wise method's raises: it
            has no weights).
        defaults: its options and their default values (derived from ``options``).
        max_tasks: the most tasks it takes on any backend (None: no limit); more raise
            ``ValueError`` before anything runs.
        summary: the first line of its docstring.
        solver_for: which of its solvers runs for T tasks (None: it has one).
        native_code: its ``solver::Method`` code in the native weight step of the ``cpu`` and
            ``cuda`` extensions (None: no native solver there).
        native_max_tasks: the most tasks that native weight step takes for it (fixed-size
            arrays); above it the torch function runs.
        native_args: its option fields of the native codes (see ``NativeArgs``).
        stateful: its function takes ``state=`` (``kind == "stateful"``).
        kind: ``gram``, ``stateful`` or ``elementwise``.
        options: its :class:`~.options.Option` specs.
        min_tasks: ``min_tasks(options) -> int``, the fewest tasks it takes with these options
            (None: 1).
        solver_max_tasks: the most tasks each explicitly chosen solver takes
            (``{"exact": 8}``).
        triton_max_tasks: ``{solver: most tasks}`` of the Triton kernels for it (the key None
            for a method with one solver; the value None: any T), or None: no Triton kernel.
        native_orders: the native weight step takes the PCGrad task orders of ``seed``.
        combine: an element-wise method's ``combine(block [T, n], start, **options) -> [n]``.
        check: ``check(options)`` raising ``ValueError`` for a combination of options that is
            refused (run when the options are resolved).
        tasks_doc: ``min_tasks`` in words, for the docs table.
        finish: ``finish(gram, weights, options) -> weights``, applied to a native solver's
            weights too (the torch function applies it itself): CAGrad's d = 0 at a
            Pareto-stationary input.
    """

    name: str
    fn: MethodFn
    defaults: dict[str, Any] = field(default_factory=dict)
    max_tasks: int | None = None
    summary: str = ""
    solver_for: SolverFor | None = None
    native_code: int | None = None
    native_max_tasks: int | None = None
    native_args: NativeArgs | None = None
    stateful: bool = False
    kind: str = "gram"
    options: Mapping[str, Option] = field(default_factory=dict)
    min_tasks: Callable[[Mapping[str, Any]], int] | None = None
    solver_max_tasks: Mapping[str, int] = field(default_factory=dict)
    triton_max_tasks: Mapping[str | None, int | None] | None = None
    native_orders: bool = False
    combine: Callable[..., torch.Tensor] | None = None
    check: Callable[[Mapping[str, Any]], None] | None = None
    tasks_doc: str = ""
    finish: Callable[[torch.Tensor, torch.Tensor, Mapping[str, Any]], torch.Tensor] | None = None

    @property
    def is_elementwise(self) -> bool:
        """Whether it replaces the combine step (no per-segment weights)."""
        return self.kind == "elementwise"

    def check_tasks(self, num_tasks: int, options: Mapping[str, Any]) -> None:
        """``ValueError`` when it does not take ``num_tasks`` tasks with the resolved
        ``options`` (``max_tasks``, ``min_tasks``, the chosen solver's limit, the length of
        the per-task options)."""
        if self.max_tasks is not None and num_tasks > self.max_tasks:
            raise ValueError(f"method {self.name!r} supports at most {self.max_tasks} tasks; got T = {num_tasks}")
        if self.min_tasks is not None:
            fewest = self.min_tasks(options)
            if num_tasks < fewest:
                raise ValueError(f"method {self.name!r} needs at least {fewest} tasks with these options "
                                 f"(T >= {fewest}: {self.tasks_doc}); got T = {num_tasks}")
        solver = options.get("solver")
        if isinstance(solver, str) and solver in self.solver_max_tasks and num_tasks > self.solver_max_tasks[solver]:
            raise ValueError(f"the {solver.replace('_', '-')} solver of {self.name!r} handles at most "
                             f"{self.solver_max_tasks[solver]} tasks; got T = {num_tasks}")
        for name, spec in self.options.items():
            value = options.get(name)
            if not spec.per_task or value is None or isinstance(value, torch.Tensor) and value.dim() == 2:
                continue
            size = torch.as_tensor(value).numel() if not isinstance(value, torch.Tensor) else value.numel()
            dims = torch.as_tensor(value).dim() if not isinstance(value, torch.Tensor) else value.dim()
            want = num_tasks - spec.per_task_offset
            if dims == 1 and size != want:
                raise ValueError(f"{self.name} option {name} must have {want} values (one per task"
                                 f"{'' if not spec.per_task_offset else ' but the first'}); got {size}")

    def __call__(self, gram: torch.Tensor, state=None, **options: Any) -> torch.Tensor:
        """The method's own weights (no ``ema``: that is the API's job)."""
        method_options, _ = split_common_options(resolve_options(self, options))
        if self.stateful:
            from .state import require_state
            return self.fn(gram, state=require_state(state, self.name), **method_options)
        return self.fn(gram, **method_options)


_METHODS: dict[str, Method] = {}


def register(name: str, fn: MethodFn | None = None, *, options: Mapping[str, Option] | None = None,
             kind: str = "gram", overwrite: bool = False, summary: str | None = None,
             **fields: Any) -> Method:
    """Register the record of method ``name`` (the built-in methods call this next to their
    code); returns it. ``options`` maps each option name to its :class:`~.options.Option`
    spec; ``fields`` are the other :class:`Method` attributes. An element-wise method passes
    ``combine=`` instead of ``fn``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty string; got {name!r}")
    if kind not in KINDS:
        raise ValueError(f"method kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if name in _METHODS and not overwrite:
        raise ValueError(f"method {name!r} is already registered (pass overwrite=True to replace it)")
    if kind == "elementwise":
        if fields.get("combine") is None:
            raise ValueError(f"element-wise method {name!r} needs combine=")
        doc_source = fields["combine"]
        fn = _no_gram_weights(name)
    else:
        if fn is None:
            raise ValueError(f"method {name!r} needs its function fn")
        doc_source = fn
    if summary is None:
        summary = (doc_source.__doc__ or "").strip().splitlines()[0] if doc_source.__doc__ else ""
    specs = MappingProxyType(dict(options or {}))
    record = Method(name, fn, {k: spec.default for k, spec in specs.items()}, summary=summary,
                    stateful=kind == "stateful", kind=kind, options=specs, **fields)
    _METHODS[name] = record
    return record


def register_method(name: str, *, defaults: dict[str, Any] | None = None,
                    max_tasks: int | None = None, overwrite: bool = False,
                    solver_for: SolverFor | None = None, native_code: int | None = None,
                    native_max_tasks: int | None = None, native_args: NativeArgs | None = None,
                    stateful: bool = False, options: Mapping[str, Option] | None = None):
    """Decorator that registers ``fn(gram [S,T,T] f64, **options) -> [S,T] f64`` as ``name``.

    ``defaults`` gives the options and their default values (their types are checked; pass
    ``options=`` with :class:`~.options.Option` specs for ranges too). Only ``defaults`` and
    ``max_tasks`` concern a new method written in torch; the ``solver_for`` and ``native_*``
    fields are for methods that have native solvers (see :class:`Method`).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty string; got {name!r}")
    specs = dict(options or {})
    for key, value in (defaults or {}).items():
        specs.setdefault(key, Option(value))

    def wrap(fn: MethodFn) -> MethodFn:
        register(name, fn, options=specs, kind="stateful" if stateful else "gram", overwrite=overwrite,
                 max_tasks=max_tasks, solver_for=solver_for, native_code=native_code,
                 native_max_tasks=native_max_tasks, native_args=native_args)
        return fn

    return wrap


def get_method(name: str) -> Method:
    """The registered method ``name``; ``ValueError`` listing the known ones otherwise."""
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown method {name!r}; available methods: {', '.join(sorted(_METHODS))}"
        ) from None


def available_methods() -> list[str]:
    """Names of all registered methods."""
    return sorted(_METHODS)


def resolve_options(method: Method, options: dict[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with ``options``; unknown option names and values of the wrong type raise
    ``TypeError``, values out of range ``ValueError`` (the record's specs, :mod:`.options`)."""
    unknown = set(options) - set(method.defaults) - set(COMMON_OPTIONS)
    if unknown:
        accepted = ", ".join(sorted(method.defaults) + sorted(COMMON_OPTIONS))
        raise TypeError(
            f"method {method.name!r} got unknown option(s) {', '.join(sorted(unknown))}; "
            f"it accepts: {accepted}"
        )
    if "ema" in options:
        from .ema import check_ema
        check_ema(options["ema"])
    check_option_values(method.name, {**COMMON_SPECS, **method.options}, options)
    resolved = dict(method.defaults)
    resolved.update(options)
    if method.check is not None:
        method.check(resolved)
    return resolved


def split_common_options(options) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(the method's own options, the common ones)`` of resolved ``options``."""
    own = {k: v for k, v in options.items() if k not in COMMON_OPTIONS}
    common = {k: options.get(k, v) for k, v in COMMON_OPTIONS.items()}
    return own, common


def _native_text(method: Method) -> str:
    parts = []
    if method.native_code is not None:
        parts.append(f"cpu, cuda: T <= {method.native_max_tasks}" if method.native_max_tasks
                     else "cpu, cuda")
    if method.triton_max_tasks is not None:
        limits = []
        for solver, most in method.triton_max_tasks.items():
            bound = "any T" if most is None else f"T <= {most}"
            limits.append(bound if solver is None else f"{solver} {bound}")
        parts.append("triton: " + ", ".join(limits))
    return "; ".join(parts) or "torch only"


def is_builtin(method: Method) -> bool:
    """Whether ``method`` is one of the library's own (its code lives in this package)."""
    code = method.combine if method.is_elementwise else method.fn
    return getattr(code, "__module__", "").startswith(__name__.rsplit(".", 1)[0])


def methods_table(builtin_only: bool = True) -> str:
    """The Markdown table of the registered methods' records (kind, options with defaults and
    ranges, task limits, native solvers): the table of ``docs/methods.md`` (the library's
    own methods; ``builtin_only=False`` adds the ones registered by user code)."""
    rows = ["| method | kind | options (default, range) | tasks | native solvers |",
            "|---|---|---|---|---|"]
    for name in available_methods():
        method = _METHODS[name]
        if builtin_only and not is_builtin(method):
            continue
        opts = "; ".join(f"`{k}` {spec.describe()}".replace("|", "\\|") for k, spec in method.options.items())
        tasks = []
        if method.min_tasks is not None:
            tasks.append(method.tasks_doc or "a minimum set by the options")
        if method.max_tasks is not None:
            tasks.append(f"T <= {method.max_tasks}")
        for solver, most in method.solver_max_tasks.items():
            tasks.append(f"{solver}: T <= {most}")
        rows.append(f"| `{name}` | {method.kind} | {opts or '-'} | {', '.join(tasks) or 'any'} | "
                    f"{_native_text(method)} |")
    return "\n".join(rows)
