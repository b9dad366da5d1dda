"""Type and range checks of method option values, run when the options are resolved.

Every option's value must have the type of its default (a bool default takes a bool, an
int default an int -- not a bool, not a float --, a float default a finite real number, a
str default a str), and the known options have ranges (MGDA's ``max_iter >= 1`` and
``tol >= 0``, CAGrad's ``c >= 0`` and ``rescale`` in 0/1/2, ...). Errors name the method and
the option, so a bad value fails where the options are given (``BucketMOOState(...)``,
``fused_bucket_moo(...)``), not inside a solver in the middle of a backward.

``tol = 0`` stays valid for MGDA: it runs PGD for exactly ``max_iter`` iterations on the CPU
too (accelerators always do: no early-stop host sync there).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

def _is_numpy_bool(value) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")


__all__ = ["check_option_values", "OPTION_RANGES", "TASK_VECTOR_OPTIONS"]


def _at_least(bound: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= bound else f"must be >= {bound:g}"


def _one_of(*choices: Any) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(map(repr, choices))}"


#: (method, option) -> check returning None or what is wrong.
OPTION_RANGES: dict[tuple[str, str], Callable[[Any], str | None]] = {
    ("mgda", "max_iter"): _at_least(1),
    ("mgda", "tol"): _at_least(0.0),
    ("mgda", "solver"): _one_of("auto", "closed_form", "exact", "pgd"),
    ("cagrad", "c"): _at_least(0.0),
    ("cagrad", "rescale"): _one_of(0, 1, 2),
}


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


#: Options that hold one number per task (a list, tuple, tensor or array; ``[S, T]`` where
#: the method allows it): checked here for being finite real numbers; their length is
#: checked against T when the weight step runs.
TASK_VECTOR_OPTIONS = {("constant", "weights"), ("upgrad", "pref_vector"), ("dualproj", "pref_vector"),
                       ("config", "pref_vector"), ("aligned_mtl", "pref_vector"), ("pcd", "tau"),
                       ("graddrop", "leak")}


def _check_task_vector(method: str, name: str, value: Any) -> None:
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
    if vec.device.type == "cpu" and not bool(torch.isfinite(vec).all()):
        raise ValueError(f"{where} must hold finite numbers; got {value!r}")


def check_option_values(method: str, defaults: dict[str, Any], options: dict[str, Any]) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming the option when a value in ``options`` has the
    wrong type for its default or is out of range. ``None`` defaults accept anything, except the
    per-task vectors of :data:`TASK_VECTOR_OPTIONS` (numbers only)."""
    for name, value in options.items():
        default = defaults.get(name)
        if (method, name) in TASK_VECTOR_OPTIONS:
            _check_task_vector(method, name, value)
        if default is None:
            continue
        typed = _typed(method, name, default, value)
        check = OPTION_RANGES.get((method, name))
        problem = check(typed) if check is not None else None
        if problem is not None:
            raise ValueError(f"{method} option {name} {problem}; got {value!r}")
