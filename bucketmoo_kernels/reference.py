"""The pure-torch reference of gram / combine: written for clarity, the oracle of every test.

It accumulates in float64 on any device and runs everywhere; the ``torch`` backend is
this module. The solve step's reference is each method's own function in
:mod:`bucketmoo_kernels.methods` (already pure torch).
"""

from __future__ import annotations

import torch

from .backend import Backend
from .inputs import Segments, TaskGrads

__all__ = ["gram_reference", "combine_reference", "TorchBackend"]


def _segment_views(grads: torch.Tensor, segments: Segments) -> tuple[torch.Tensor, ...]:
    """The ``[T, n_s]`` column blocks of ``grads [T, N]``, one per segment (views)."""
    return torch.split(grads, segments.length_list, dim=1)


def gram_reference(grads: TaskGrads, segments: Segments) -> torch.Tensor:
    """Per-segment Gram matrices ``M_s = G_s G_s^T``.

    Args:
        grads: T gradients of length N (fp32 / bf16 / fp16).
        segments: S segments covering 0..N.
    Returns:
        ``[S, T, T]`` float32 (accumulated in float64).
    """
    stacked = grads.as_stacked().to(torch.float64)
    grams = [block @ block.T for block in _segment_views(stacked, segments)]
    return torch.stack(grams).to(torch.float32)


def combine_reference(grads: TaskGrads, weights: torch.Tensor, segments: Segments,
                      out: torch.Tensor) -> torch.Tensor:
    """``out[n] = sum_t weights[s(n), t] * grads[t][n]`` (float64 sum, cast to out's dtype).

    ``out`` may alias one of the gradients: the result is built aside, then copied in.
    """
    stacked = grads.as_stacked().to(torch.float64)
    w = weights.to(torch.float64)
    blocks = _segment_views(stacked, segments)
    combined = torch.cat([w[s] @ block for s, block in enumerate(blocks)]) if blocks else stacked[0]
    return out.copy_(combined)


class TorchBackend(Backend):
    """The reference as a backend: runs on every device, always available. Its weight step
    is the methods' own torch functions (the :class:`Backend` defaults)."""

    name = "torch"

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None

    def gram(self, grads: TaskGrads, segments: Segments) -> torch.Tensor:
        return gram_reference(grads, segments)

    def combine(self, grads: TaskGrads, weights: torch.Tensor, segments: Segments,
                out: torch.Tensor) -> None:
        combine_reference(grads, weights, segments, out)
