"""Per-task vector options of the methods (preference vectors, fixed weights) and zero-gradient
tasks."""

from __future__ import annotations

import torch

__all__ = ["task_vector", "zero_gradient_tasks"]


def task_vector(value, name: str, method: str, gram: torch.Tensor, default: float | None) -> torch.Tensor:
    """``value`` (None, a number, a length-T sequence or tensor, or ``[S, T]``) as a float64
    ``[S, T]`` tensor on the Gram's device; None gives ``default`` everywhere (or raises when
    ``default`` is None)."""
    num_seg, num_tasks = gram.shape[0], gram.shape[-1]
    if value is None:
        if default is None:
            raise ValueError(f"method {method!r} needs the option {name}=[w_1..w_T] ({num_tasks} values)")
        return torch.full((num_seg, num_tasks), float(default), dtype=torch.float64, device=gram.device)
    vec = torch.as_tensor(value, dtype=torch.float64)
    if vec.device != gram.device:
        vec = vec.to(gram.device)
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
