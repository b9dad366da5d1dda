"""The method registry: every aggregation method is one function of the Gram matrix.

A method is ``fn(gram, **options) -> weights`` where ``gram`` is a float64 ``[S, T, T]``
tensor (one Gram matrix per segment) and the result is float64 ``[S, T]``: the method's own
weights in its paper's scale (the public API rescales them to sum to one unless asked not
to). The function must be written with batched torch ops and no host synchronisation, so
it runs unchanged on any device; backends with a native solver for a method use theirs and
are tested against this one.

Adding a method::

    from bucketmoo_kernels import register_method

    @register_method("uniform_plus", defaults={"eps": 0.1})
    def uniform_plus(gram, *, eps):
        ...
        return weights            # [S, T] float64

The registry is also the one place that says, per method, how many tasks it takes
(``max_tasks``), which of its solvers runs for T tasks (``solver_for``), and whether and up
to which T the native weight step (``csrc/common/bucketmoo_solvers.h``) runs it
(``native_code``, ``native_max_tasks``, ``native_args``). :class:`~bucketmoo_kernels.weight_step.WeightStep`
reads these and hands the backends codes, so no backend repeats the rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .options import check_option_values

__all__ = ["Method", "register_method", "get_method", "available_methods", "resolve_options",
           "COMMON_OPTIONS", "split_common_options"]

#: Options every method accepts (not passed to its function): ``ema``, the per-segment weight
#: smoothing of :mod:`.ema` (needs a ``method_state``).
COMMON_OPTIONS = {"ema": 0.0}

MethodFn = Callable[..., torch.Tensor]
#: ``solver_for(num_tasks, options) -> solver name``: which solver runs for T tasks.
SolverFor = Callable[[int, Mapping[str, Any]], str]
#: ``native_args(num_tasks, options) -> dict | None``: the method's fields of the native
#: weight step's codes (``solver``, ``max_iter``, ``tol``, ``c``, ``rescale``; absent ones
#: keep their defaults), or None where the native solver does not run this configuration
#: (the method's torch function then runs and raises its own errors for bad options).
NativeArgs = Callable[[int, Mapping[str, Any]], "dict[str, Any] | None"]


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes:
        name: the name it is registered under.
        fn: ``fn(gram [S,T,T] f64, **options) -> [S,T] f64``, the reference of every backend.
        defaults: its options and their default values (the options it accepts).
        max_tasks: the most tasks it takes on any backend (None: no limit); more raise
            ``ValueError`` before anything runs.
        summary: the first line of ``fn``'s docstring.
        solver_for: which of its solvers runs for T tasks (None: it has one).
        native_code: its ``solver::Method`` code in the native weight step (None: no native
            solver; the torch function runs on every backend).
        native_max_tasks: the most tasks the native weight step takes for it (fixed-size
            arrays); above it the torch function runs.
        native_args: its option fields of the native codes (see ``NativeArgs``).
        stateful: its function takes ``state=`` (a :class:`~.state.MethodState`) and keeps
            per-segment state in it across steps (GradVac, PCD).
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

    def __call__(self, gram: torch.Tensor, state=None, **options: Any) -> torch.Tensor:
        """The method's own weights (no ``ema``: that is the API's job)."""
        method_options, _ = split_common_options(resolve_options(self, options))
        if self.stateful:
            from .state import require_state
            return self.fn(gram, state=require_state(state, self.name), **method_options)
        return self.fn(gram, **method_options)


_METHODS: dict[str, Method] = {}


def register_method(name: str, *, defaults: dict[str, Any] | None = None,
                    max_tasks: int | None = None, overwrite: bool = False,
                    solver_for: SolverFor | None = None, native_code: int | None = None,
                    native_max_tasks: int | None = None, native_args: NativeArgs | None = None,
                    stateful: bool = False):
    """Decorator that registers ``fn(gram [S,T,T] f64, **options) -> [S,T] f64`` as ``name``.

    Only ``defaults`` and ``max_tasks`` concern a new method written in torch; the
    ``solver_for`` and ``native_*`` fields are for the built-in methods that have native
    solvers (see :class:`Method`).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty string; got {name!r}")

    def wrap(fn: MethodFn) -> MethodFn:
        if name in _METHODS and not overwrite:
            raise ValueError(f"method {name!r} is already registered (pass overwrite=True to replace it)")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _METHODS[name] = Method(name, fn, dict(defaults or {}), max_tasks, summary, solver_for,
                                native_code, native_max_tasks, native_args, stateful)
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
    ``TypeError``, values out of range ``ValueError`` (see :mod:`.options`)."""
    unknown = set(options) - set(method.defaults) - set(COMMON_OPTIONS)
    if unknown:
        accepted = ", ".join(sorted(method.defaults) + sorted(COMMON_OPTIONS))
        raise TypeError(
            f"method {method.name!r} got unknown option(s) {', '.join(sorted(unknown))}; "
            f"it accepts: {accepted}"
        )
    check_option_values(method.name, {**COMMON_OPTIONS, **method.defaults}, options)
    resolved = dict(method.defaults)
    resolved.update(options)
    if "ema" in resolved:
        from .ema import check_ema
        check_ema(resolved["ema"])
    return resolved


def split_common_options(options) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(the method's own options, the common ones)`` of resolved ``options``."""
    own = {k: v for k, v in options.items() if k not in COMMON_OPTIONS}
    common = {k: options.get(k, v) for k, v in COMMON_OPTIONS.items()}
    return own, common
