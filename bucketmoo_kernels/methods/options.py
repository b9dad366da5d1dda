"""Option specs of the methods, and the type and range checks run when the options are resolved.

Each method declares its options next to its code, as :class:`Option` specs (default, range,
whether it holds one value per task) in its :class:`~.registry.Method` record. The checks
below read those specs, so a bad value fails where the options are given
(``BucketMOOState(...)``, ``WeightStep(...)``, ``fused_bucket_moo(...)``), with a message that
names the method and the option, not inside a solver in the middle of a backward.

Types: every option's value must have the type of its default (a bool default takes a bool, an
int default an int -- not a bool, not a float --, a float default a finite real number, a
str default a str). ``None`` defaults accept anything, except the per-task options (a number,
T values or ``[S, T]`` values, all finite; their length is checked against T by
:meth:`~bucketmoo_kernels.weight_step.WeightStep.check_tasks`).

``tol = 0`` stays valid for MGDA: it runs PGD for exactly ``max_iter`` iterations on the CPU
too (accelerators always do: no early-stop host sync there).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = ["Option", "AtLeast", "Between", "OneOf", "check_option_values", "SEED_RANGE", "seed_option"]


def _is_numpy_bool(value) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")


@dataclass(frozen=True)
class AtLeast:
    """The range ``value >= bound``."""

    bound: float

    def __call__(self, value) -> str | None:
        return None if value >= self.bound else f"must be >= {self.bound:g}"

    def __str__(self) -> str:
        return f">= {self.bound:g}"


@dataclass(frozen=True)
class Between:
    """The range ``low <= value <= high`` (``high`` excluded when ``open_high``)."""

    low: float
    high: float
    open_high: bool = False
    text: str = ""

    def __call__(self, value) -> str | None:
        ok = self.low <= value < self.high if self.open_high else self.low <= value <= self.high
        return None if ok else f"must lie in {self}"

    def __str__(self) -> str:
        if self.text:
            return self.text
        low, high = (f"{v}" if isinstance(v, int) else f"{v:g}" for v in (self.low, self.high))
        return f"[{low}, {high}{')' if self.open_high else ']'}"


@dataclass(frozen=True)
class OneOf:
    """The range ``value in choices``."""

    choices: tuple

    def __call__(self, value) -> str | None:
        return None if value in self.choices else f"must be one of {', '.join(map(repr, self.choices))}"

    def __str__(self) -> str:
        return " / ".join(map(str, self.choices))


@dataclass(frozen=True)
class Option:
    """One option of a method.

    Attributes:
        default: its default value; its type is the type every value must have (``None``:
            any type, or for ``per_task`` options numbers only).
        check: its range (:class:`AtLeast`, :class:`Between`, :class:`OneOf` or any callable
            returning None or what is wrong), None for none; a ``per_task`` option's range
            applies to every value.
        per_task: a number or one value per task (a list, tuple, tensor or array; ``[S, T]``
            where the method allows it).
        per_task_offset: a per-task option of T - offset values (PCD's ``tau``: T - 1).
    """

    default: Any = None
    check: Callable[[Any], str | None] | None = None
    per_task: bool = False
    per_task_offset: int = 0

    def describe(self) -> str:
        """``default`` and the range, for the docs table."""
        text = repr(self.default)
        if self.per_task:
            text += ", per task" if not self.per_task_offset else f", per task from task {self.per_task_offset}"
        if self.check is not None:
            text += f" ({self.check})"
        return text


#: The seeds a ``seed`` option takes: the step counter is added to it each step (DDP: ``seed +
#: step``), and the sum must stay a 64-bit integer (``torch.Generator.manual_seed``).
SEED_RANGE = Between(-2 ** 62, 2 ** 62, open_high=True, text="[-2^62, 2^62)")


def seed_option(default: int = 0) -> Option:
    """The ``seed`` option of the methods that draw (``random``, ``pcgrad``, ``gradvac``,
    ``graddrop``)."""
    return Option(default, SEED_RANGE)


def _typed(method: str, name: str, default: Any, value: Any) -> Any:
    where = f"{method} option {name}"
    if isinstance(default, bool):
        if isinstance(value, bool) or _is_numpy_bool(value):
            return bool(value)
        raise TypeError(f"{where} must be a bool (True or False); got {value!r} of type {type(value).__name__}")
    if isinstance(default, int):
        if not isinstance(value, bool):
            try:
                return operator.index(value)
            except TypeError:
                pass
        raise TypeError(f"{where} must be an int; got {value!r} of type {type(value).__name__}")
    if isinstance(default, float):
        if not isinstance(value, bool):
            try:
                number = float(value) if isinstance(value, (int, float)) or hasattr(value, "__float__") else None
            except (TypeError, ValueError):
                number = None
            if number is not None and not isinstance(value, str):
                if not math.isfinite(number):
                    raise ValueError(f"{where} must be a finite number; got {value!r}")
                return value
        raise TypeError(f"{where} must be a real number; got {value!r} of type {type(value).__name__}")
    if isinstance(default, str) and not isinstance(value, str):
        raise TypeError(f"{where} must be a str; got {value!r} of type {type(value).__name__}")
    return value


def _check_task_vector(method: str, name: str, spec: Option, value: Any) -> None:
    import torch

    where = f"{method} option {name}"
    if value is None:
        return
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"{where} must be a number or a list of numbers (one per task); got {value!r}")
    try:
        vec = torch.as_tensor(value, dtype=torch.float64, device="cpu") if not isinstance(value, torch.Tensor) \
            else value.detach()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{where} must be a number or a list of numbers (one per task); got {value!r} "
                        f"({exc})") from None
    if vec.dim() > 2:
        raise ValueError(f"{where} must be a number, T values or [S, T] values; got shape {tuple(vec.shape)}")
    if vec.device.type != "cpu" or vec.numel() == 0:
        return  # a device tensor is not read on the host here (no sync)
    if not bool(torch.isfinite(vec).all()):
        raise ValueError(f"{where} must hold finite numbers; got {value!r}")
    if spec.check is not None:
        for bound in (float(vec.min()), float(vec.max())):
            problem = spec.check(bound)
            if problem is not None:
                raise ValueError(f"{where}: every value {problem}; got {value!r}")


def check_option_values(method: str, specs: Mapping[str, Option], options: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming the option when a value in ``options`` has the
    wrong type for its spec's default or is out of its range."""
    for name, value in options.items():
        spec = specs.get(name)
        if spec is None:
            continue
        if spec.per_task:
            _check_task_vector(method, name, spec, value)
            continue
        if spec.default is None:
            continue
        typed = _typed(method, name, spec.default, value)
        problem = spec.check(typed) if spec.check is not None else None
        if problem is not None:
            raise ValueError(f"{method} option {name} {problem}; got {value!r}")
