"""Per-step, per-bucket diagnostics of the DDP hook, computed from the all-reduced Gram.

Recorded only when ``BucketMOOState(record_diagnostics=True)``; when off the hook does not
touch this module (zero cost). Everything is derived from the Gram matrix and the weights
(:mod:`bucketmoo_kernels.diagnostics`), so recording adds no pass over the gradients; the
min-norm residual runs one exact MGDA solve per segment (float64, T x T).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from .. import diagnostics as _diag

__all__ = ["BucketRecord", "DiagnosticsLog"]

FIELDS = ("weights", "cosine", "combined_norm", "mean_norm", "residual", "finite")


@dataclass(frozen=True)
class BucketRecord:
    """What the hook saw on one bucket (index -1: the global granularity's single record).

    Attributes:
        step: optimizer step (the state's step counter when the bucket was reduced).
        bucket: DDP bucket index.
        weights: ``[S, T]`` float32 weights of the bucket's segments.
        cosine: ``[S, T, T]`` task cosine similarities (negative: conflict).
        combined_norm: ``[S]`` norm of the combined gradient.
        mean_norm: ``[S]`` norm of the plain average (what DDP would have applied).
        residual: ``[S]`` norm of the min-norm point (0: Pareto stationary segment).
        finite: ``[S]`` bool, whether the segment's Gram was finite. Where it was not (a NaN/Inf
            gradient, or squares that overflow float32) the weights are NaN, the combined
            gradient of the segment is NaN (so AMP's GradScaler skips the step), and the
            other fields of the segment are NaN too.
    """

    step: int
    bucket: int
    weights: torch.Tensor
    cosine: torch.Tensor
    combined_norm: torch.Tensor
    mean_norm: torch.Tensor
    residual: torch.Tensor
    finite: torch.Tensor

    @classmethod
    def from_gram(cls, step: int, bucket: int, gram: torch.Tensor, weights: torch.Tensor) -> "BucketRecord":
        gram = gram.detach().to("cpu", torch.float64)
        weights = weights.detach().to("cpu", torch.float64)
        finite = torch.isfinite(gram).flatten(1).all(-1)
        cosine = torch.where(finite[:, None, None], _diag.task_cosine(gram), float("nan"))
        return cls(
            step=step,
            bucket=bucket,
            weights=weights.to(torch.float32),
            cosine=cosine.to(torch.float32),
            combined_norm=_diag.combined_sqnorm(gram, weights).clamp_min(0).sqrt().to(torch.float32),
            mean_norm=_diag.mean_sqnorm(gram).clamp_min(0).sqrt().to(torch.float32),
            residual=_residual(gram),
            finite=finite,
        )


def _residual(gram: torch.Tensor) -> torch.Tensor:
    """The min-norm residual of the finite segments; NaN for the others (no solve on them)."""
    finite = torch.isfinite(gram).flatten(1).all(-1)
    out = torch.full((gram.shape[0],), float("nan"), dtype=torch.float32)
    if bool(finite.any()):
        out[finite] = _diag.min_norm_residual(gram[finite]).to(torch.float32)
    return out


class DiagnosticsLog:
    """A bounded log of :class:`BucketRecord` (the last ``max_steps`` steps)."""

    def __init__(self, max_steps: int = 1000):
        self.max_steps = max_steps
        self._records: deque[BucketRecord] = deque()

    def append(self, record: BucketRecord) -> None:
        self._records.append(record)
        while self._records and record.step - self._records[0].step >= self.max_steps:
            self._records.popleft()

    def clear(self) -> None:
        self._records.clear()

    def __len__(self) -> int:
        return len(self._records)

    @property
    def records(self) -> list[BucketRecord]:
        return list(self._records)

    def steps(self) -> list[int]:
        return sorted({r.step for r in self._records})

    def buckets(self) -> list[int]:
        return sorted({r.bucket for r in self._records})

    def to_tensors(self, bucket: int) -> dict[str, torch.Tensor]:
        """The records of one bucket stacked over steps.

        Returns:
            ``{"step": [K] int64, "weights": [K, S, T], "cosine": [K, S, T, T],
            "combined_norm": [K, S], "mean_norm": [K, S], "residual": [K, S]}``.
        Raises:
            KeyError: no record of ``bucket``.
            ValueError: the bucket's segment count changed between steps (DDP rebuilt its
                buckets after the first step); pass records of one layout, e.g. steps >= 1.
        """
        recs = [r for r in self._records if r.bucket == bucket]
        if not recs:
            raise KeyError(f"no diagnostics recorded for bucket {bucket}; recorded buckets: {self.buckets()}")
        shapes = {tuple(r.weights.shape) for r in recs}
        if len(shapes) != 1:
            raise ValueError(
                f"bucket {bucket} changed its layout between steps (weights shapes {sorted(shapes)}): DDP "
                "rebuilds its buckets after the first iteration; use records from step 1 on"
            )
        out = {"step": torch.tensor([r.step for r in recs], dtype=torch.int64)}
        for name in FIELDS:
            out[name] = torch.stack([getattr(r, name) for r in recs])
        return out

    def summary(self) -> dict[str, torch.Tensor]:
        """Per record (one row per step and bucket) scalar summaries, averaged over segments:
        ``step``, ``bucket``, ``min_cosine``, ``combined_norm``, ``mean_norm``, ``residual``, and
        ``nonfinite`` (how many segments of the record had a non-finite Gram)."""
        recs = list(self._records)
        t = lambda xs, dt=torch.float32: torch.tensor(xs, dtype=dt)  # noqa: E731
        min_cos = []
        for r in recs:
            c = r.cosine
            num = c.shape[-1]
            off = ~torch.eye(num, dtype=torch.bool)
            min_cos.append(float(c[:, off].min()) if num > 1 and c.numel() else 1.0)
        return {
            "step": t([r.step for r in recs], torch.int64),
            "bucket": t([r.bucket for r in recs], torch.int64),
            "min_cosine": t(min_cos),
            "combined_norm": t([float(r.combined_norm.norm()) for r in recs]),
            "mean_norm": t([float(r.mean_norm.norm()) for r in recs]),
            "residual": t([float(r.residual.norm()) for r in recs]),
            "nonfinite": t([int((~r.finite).sum()) for r in recs], torch.int64),
        }
