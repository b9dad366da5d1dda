"""Per-task vector options of the methods (preference vectors, fixed weights) and zero-gradient
tasks."""

from __future__ import annotations

import functools

import torch

__all__ = ["task_vector", "zero_gradient_tasks", "device_constant"]


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(type(value).__name__)


@functools.lru_cache(maxsize=256)
def _cached_constant(frozen, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.tensor(frozen, dtype=dtype).to(device)


def device_constant(value, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An option value (a number or a nested list/tuple of numbers, or a tensor) as a ``dtype``
    tensor on ``device``. Python values are copied to the device once and cached, so later
    calls copy nothing from the host (a host-to-device copy synchronises on CUDA and cannot
    be captured in a CUDA graph; capture after a warm-up call). Tensors and other array types
    are converted each call. The result is shared: do not modify it in place."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype)
    try:
        frozen = _freeze(value)
    except TypeError:
        return torch.as_tensor(value, dtype=dtype).to(device)
    return _cached_constant(frozen, dtype, str(device))


def task_vector(value, name: str, method: str, gram: torch.Tensor, default: float | None) -> torch.Tensor:
    """``value`` (None, a number, a length-T sequence or tensor, or ``[S, T]``) as a float64
    ``[S, T]`` tensor on the Gram's device; None gives ``default`` everywhere (or raises when
    ``default`` is None)."""
    num_seg, num_tasks = gram.shape[0], gram.shape[-1]
    if value is None:
        if default is None:
            raise ValueError(f"method {method!r} needs the option {name}=[w_1..w_T] ({num_tasks} values)")
        return torch.full((num_seg, num_tasks), float(default), dtype=torch.float64, device=gram.device)
    vec = device_constant(value, torch.float64, gram.device)
    if vec.shape not in ((num_tasks,), (num_seg, num_tasks)):
        raise ValueError(
            f"method {method!r} option {name} must have T = {num_tasks} entries (or shape "
            f"[S, T] = [{num_seg}, {num_tasks}]); got shape {tuple(vec.shape)}"
        )
    return vec.expand(num_seg, num_tasks)


def zero_gradient_tasks(gram: torch.Tensor, rel: float = 1e-30) -> torch.Tensor:
    """``[S, T]`` bool: tasks whose squared gradient norm is zero, or below ``rel`` times the
    largest of their segment (so small that no float64 solve can tell it from zero)."""
    diag = gram.diagonal(dim1=-2, dim2=-1)
    return diag <= rel * diag.amax(-1, keepdim=True).clamp_min(0)
