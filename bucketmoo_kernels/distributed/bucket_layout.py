"""The bucket layout DDP uses after its first iteration, for the first iteration.

A fresh ``DistributedDataParallel`` (``find_unused_parameters=False``, the default) runs its
first iteration -- its first two with ``static_graph=True`` -- with ONE bucket holding every
parameter, in parameter order, and then rebuilds its buckets: the parameters in the order
their gradients became ready, cut by ``torch.distributed._compute_bucket_assignment_by_size``
with the limits ``[first_bucket_bytes_cap, bucket_bytes_cap]`` (``reducer.cpp``,
``Reducer::rebuild_buckets``; the caps come from ``bucket_cap_mb``: 25 MiB with a 1 MiB first
bucket by default, ``bucket_cap_mb`` MiB for both when it is given). A per-bucket method fed
the single bucket would weight the whole model at once in that iteration, and a run resumed
from a checkpoint (a fresh DDP again) would differ from an uninterrupted one.

:func:`predict_rebuilt_layout` computes the rebuilt layout with DDP's own assignment
function, assuming the gradients become ready in reverse parameter order (true for models
that use their parameters in definition order). The hook then runs the single bucket as
these buckets (:class:`VirtualBucket`: a copy of the bucket's parameters in the rebuilt
order, so the protocol sees exactly the bytes, shards and segments of the rebuilt bucket),
observes the real layout after the rebuild, and keeps it in ``state_dict()``.

A layout is a list of buckets, each a list of parameter indices (positions in DDP's
parameter list, i.e. in the initial single bucket), in bucket order.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["predict_rebuilt_layout", "bucket_caps", "check_layout", "VirtualBucket", "split_bucket"]

_MB = 1024 * 1024
_DEFAULT_CAP_MB = 25


def bucket_caps(bucket_cap_mb: float | None) -> tuple[int, int]:
    """``(first_bucket_bytes_cap, bucket_bytes_cap)`` as ``DistributedDataParallel`` derives them
    from its ``bucket_cap_mb`` argument (``torch/nn/parallel/distributed.py``)."""
    if bucket_cap_mb is None:
        return int(getattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", _MB)), int(_DEFAULT_CAP_MB * _MB)
    cap = int(bucket_cap_mb * _MB)
    return cap, cap


def predict_rebuilt_layout(params: Sequence[torch.Tensor], bucket_cap_mb: float | None) -> list[list[int]]:
    """The buckets DDP builds after its first iteration, for ``params`` in DDP's order and the
    DDP argument ``bucket_cap_mb``; gradients assumed ready in reverse parameter order."""
    first, cap = bucket_caps(bucket_cap_mb)
    order = list(reversed(range(len(params))))
    buckets, _ = dist._compute_bucket_assignment_by_size([params[i] for i in order], [first, cap], [], order)
    return [[int(i) for i in b] for b in buckets]


def check_layout(layout, num_params: int) -> list[list[int]]:
    """``layout`` as a list of lists of ints if it covers every parameter index exactly once."""
    try:
        buckets = [[int(i) for i in b] for b in layout]
    except (TypeError, ValueError):
        raise ValueError(f"bucket_layout must be a list of lists of parameter indices; got {layout!r}") from None
    flat = sorted(i for b in buckets for i in b)
    if flat != list(range(num_params)) or any(not b for b in buckets):
        raise ValueError(f"bucket_layout must cover each of the {num_params} parameter indices exactly once "
                         f"in non-empty buckets; got {buckets}")
    return buckets


class VirtualBucket:
    """A ``GradBucket`` stand-in for one bucket of the rebuilt layout: a copy of its parameters'
    gradients (in the rebuilt order) taken from the single bucket of the first iteration."""

    def __init__(self, buffer: torch.Tensor, index: int, is_last: bool, params: list, views: list):
        self._buffer, self._index, self._is_last, self._params = buffer, index, is_last, params
        self.views = views  # (offset in the single bucket, length) per parameter

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._is_last

    def parameters(self) -> list:
        return self._params

    def write_back(self, single: torch.Tensor) -> None:
        """Copy the combined gradient back into the single bucket's buffer."""
        start = 0
        for offset, length in self.views:
            single[offset:offset + length].copy_(self._buffer[start:start + length])
            start += length


def split_bucket(buf: torch.Tensor, params: list, layout: list[list[int]]) -> list[VirtualBucket] | None:
    """The virtual buckets of ``layout`` over the single bucket ``buf`` holding ``params`` in
    order (None when the parameter sizes do not add up to the buffer)."""
    offsets, start = [], 0
    for p in params:
        offsets.append(start)
        start += p.numel()
    if start != buf.numel():
        return None
    out = []
    for k, bucket in enumerate(layout):
        views = [(offsets[i], params[i].numel()) for i in bucket]
        parts = [buf[o:o + n] for o, n in views]
        flat = torch.cat(parts) if parts else buf.new_zeros(0)
        out.append(VirtualBucket(flat, k, k == len(layout) - 1, [params[i] for i in bucket], views))
    return out
