"""The pure-torch reference of gram / combine: written for clarity, the oracle of every test.

It accumulates in float64 on any device and runs everywhere; the ``torch`` backend is
this module. The solve step's reference is each method's own function in
:mod:`bucketmoo_kernels.methods` (already pure torch).
"""

from __future__ import annotations

import torch

from .inputs import Segments, TaskGrads

__all__ = ["gram_reference", "combine_reference", "TorchBackend"]


def gram_reference(grads: TaskGrads, segments: Segments) -> torch.Tensor:
    """Per-segment Gram matrices ``M_s = G_s G_s^T``.

    Args:
        grads: T gradients of length N (fp32 / bf16 / fp16).
        segments: S segments covering 0..N.
    Returns:
        ``[S, T, T]`` float32 (accumulated in float64).
    """
    num_tasks, num_seg = grads.num_tasks, segments.num_segments
    device = grads.device
    seg_id = segments.segment_ids(device)
    rows = [g.to(torch.float64) for g in grads.rows]
    gram = torch.zeros(num_seg, num_tasks, num_tasks, dtype=torch.float64, device=device)
    for i in range(num_tasks):
        for j in range(i, num_tasks):
            partial = torch.zeros(num_seg, dtype=torch.float64, device=device)
            partial.index_add_(0, seg_id, rows[i] * rows[j])
            gram[:, i, j] = partial
            gram[:, j, i] = partial
    return gram.to(torch.float32)


def combine_reference(grads: TaskGrads, weights: torch.Tensor, segments: Segments,
                      out: torch.Tensor) -> torch.Tensor:
    """``out[n] = sum_t weights[s(n), t] * grads[t][n]`` (float64 sum, cast to out's dtype).

    ``out`` may alias one of the gradients: the result is built aside, then copied in.
    """
    lengths = segments.lengths.to(weights.device)
    combined = torch.zeros(grads.numel, dtype=torch.float64, device=grads.device)
    for t, g in enumerate(grads.rows):
        per_elem = torch.repeat_interleave(weights[:, t].to(torch.float64), lengths)
        combined += per_elem * g.to(torch.float64)
    return out.copy_(combined)


class TorchBackend:
    """The reference as a backend: runs on every device, always available."""

    name = "torch"

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None

    def gram(self, grads: TaskGrads, segments: Segments) -> torch.Tensor:
        return gram_reference(grads, segments)

    def solve(self, gram: torch.Tensor, method, options: dict) -> torch.Tensor | None:
        return None  # every method's own torch function is the reference solver

    def combine(self, grads: TaskGrads, weights: torch.Tensor, segments: Segments,
                out: torch.Tensor) -> None:
        combine_reference(grads, weights, segments, out)
