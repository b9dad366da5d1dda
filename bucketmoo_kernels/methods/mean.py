"""``mean``: plain averaging, what DDP's all-reduce does. The baseline every method is
compared with."""

from __future__ import annotations

import torch

from .registry import register_method

__all__ = ["mean_weights"]


@register_method("mean")
def mean_weights(gram: torch.Tensor) -> torch.Tensor:
    """Uniform weights 1/T: ``[S, T, T]`` -> ``[S, T]``."""
    num_seg, num_tasks, _ = gram.shape
    return torch.full((num_seg, num_tasks), 1.0 / num_tasks, dtype=gram.dtype, device=gram.device)
