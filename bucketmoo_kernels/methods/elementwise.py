"""Element-wise combines: methods that are not functions of the Gram, so they have no
per-segment weights and replace the combine step instead.

* ``graddrop`` (Chen et al. 2020, "Just Pick a Sign: Optimizing Deep Multitask Models with
  Gradient Sign Dropout", Algorithm 1 lines 10-15): per element, the positive sign purity
  P = (1 + sum_t g_t / sum_t |g_t|) / 2 and a uniform U; task t's value is kept if it is
  positive and P > U, or negative and P < U, and the output is
  sum_t (leak_t + (1 - leak_t) kept_t) g_t. U comes from :mod:`.counter_rng` as a function of
  (``seed``, element index), so every rank draws the same U for the same element.
* ``trimmed_mean`` (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
  Statistical Rates"): per element, drop the ``trim_number`` largest and smallest task values
  and average the rest (needs T >= 2 trim_number + 1).

Both run as torch ops on any device (no native kernel: they are one read of the T gradients
and one write, memory-bound like the combine, and torch's fused elementwise ops are close to
that), in float32 for fp32/bf16/fp16 gradients (float64 for float64), chunk by chunk so that
the extra memory stays bounded and ``out`` may be the storage of one of the gradients.
``normalize_weights`` does not apply (the paper's scale: GradDrop sums, trimmed mean averages).
"""

from __future__ import annotations

import torch

from .counter_rng import uniform
from .options import AtLeast, Between, Option, seed_option
from .registry import get_method, register
from .task_vectors import device_constant

__all__ = ["is_elementwise", "combine_elementwise", "graddrop_combine", "trimmed_mean_combine"]

#: Elements per chunk (bounds the temporary [T, chunk] tensors).
CHUNK = 1 << 20


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def graddrop_combine(block: torch.Tensor, start: int, *, leak=None, seed: int = 0) -> torch.Tensor:
    """GradDrop of ``block [T, n]`` (elements ``start .. start + n`` of the bucket) -> ``[n]``."""
    num_tasks, n = block.shape
    if leak is None:
        leak_t = torch.zeros(num_tasks, dtype=block.dtype, device=block.device)
    else:
        leak_t = device_constant(leak, block.dtype, block.device)  # copied once, then cached
        if leak_t.shape != (num_tasks,):
            raise ValueError(f"graddrop option leak must have T = {num_tasks} values; got shape {tuple(leak_t.shape)}")
    purity = 0.5 * (1 + block.sum(0) / block.abs().sum(0))
    u = uniform(int(seed), 0, torch.arange(start, start + n, device=block.device)).to(block.dtype)
    kept = ((purity > u) & (block > 0)) | ((purity < u) & (block < 0))
    factor = leak_t[:, None] + (1 - leak_t[:, None]) * kept.to(block.dtype)
    return (factor * block).sum(0)


def trimmed_mean_combine(block: torch.Tensor, start: int, *, trim_number: int = 1) -> torch.Tensor:
    """Trimmed mean over tasks of ``block [T, n]`` -> ``[n]``."""
    num_tasks = block.shape[0]
    if trim_number < 0 or num_tasks < 2 * trim_number + 1:
        raise ValueError(f"trimmed_mean with trim_number = {trim_number} needs T >= {2 * trim_number + 1} "
                         f"tasks (and trim_number >= 0); got T = {num_tasks}")
    ordered = block.sort(dim=0).values
    return ordered[trim_number:num_tasks - trim_number].mean(0)


def is_elementwise(name: str) -> bool:
    """Whether the registered method ``name`` is element-wise (its record's ``kind``)."""
    return get_method(name).is_elementwise


def combine_elementwise(rows, name: str, options: dict, out: torch.Tensor, segments=None) -> torch.Tensor:
    """Run element-wise method ``name`` on the task gradients ``rows`` (T 1-D tensors of
    length N, or ``[T, N]``) into ``out [N]``.

    The non-finite policy of every method: a segment of ``segments`` (a
    :class:`~bucketmoo_kernels.inputs.Segments`; None: one segment) in which a task value is
    NaN or infinite comes out NaN, whole; the other segments are unchanged. No host sync."""
    combine = get_method(name).combine
    rows = list(rows)
    numel = rows[0].numel()
    dtype = _compute_dtype(rows[0].dtype)
    bad = torch.zeros(numel, dtype=torch.bool, device=out.device)
    for start in range(0, numel, CHUNK):
        stop = min(numel, start + CHUNK)
        block = torch.stack([r[start:stop].to(dtype) for r in rows])
        bad[start:stop] = ~torch.isfinite(block).all(0)
        out[start:stop].copy_(combine(block, start, **options))
    if numel:
        # a segment with a non-finite input element comes out NaN, whole
        if segments is None:
            out.masked_fill_(bad.any(), float("nan"))
        else:
            offsets = segments.on(out.device)
            seen = torch.cat([torch.zeros(1, dtype=torch.int64, device=out.device), bad.cumsum(0)])
            bad_segment = (seen[offsets[1:]] - seen[offsets[:-1]]) > 0
            out.masked_fill_(torch.repeat_interleave(bad_segment, offsets[1:] - offsets[:-1],
                                                     output_size=numel), float("nan"))
    return out


def _check_trim(options) -> None:
    if options["trim_number"] < 0:
        raise ValueError(f"trimmed_mean option trim_number must be >= 0; got {options['trim_number']}")


register("graddrop", kind="elementwise", combine=graddrop_combine,
         options={"leak": Option(None, Between(0.0, 1.0), per_task=True), "seed": seed_option()})
register("trimmed_mean", kind="elementwise", combine=trimmed_mean_combine,
         options={"trim_number": Option(1, AtLeast(0))},
         min_tasks=lambda options: 2 * int(options["trim_number"]) + 1, tasks_doc="T >= 2 trim_number + 1")
