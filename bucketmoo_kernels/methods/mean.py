"""``mean``: plain averaging, what DDP's all-reduce does. The baseline every method is
compared with."""

from __future__ import annotations

import torch

from .registry import register
from .simplex import MAX_NATIVE_TASKS

__all__ = ["mean_weights"]


def mean_weights(gram: torch.Tensor) -> torch.Tensor:
    """Uniform weights 1/T: ``[S, T, T]`` -> ``[S, T]``."""
    num_seg, num_tasks, _ = gram.shape
    return torch.full((num_seg, num_tasks), 1.0 / num_tasks, dtype=gram.dtype, device=gram.device)


register("mean", mean_weights, native_code=0, native_max_tasks=MAX_NATIVE_TASKS,
         native_args=lambda num_tasks, options: {}, triton_max_tasks={None: None})
