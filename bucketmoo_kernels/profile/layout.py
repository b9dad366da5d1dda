"""Where the profiler cuts a model's gradient into segments, and which layer each element is in.

The task gradients of the profiled parameters are laid out as rows of one ``[T, N]`` buffer;
a :class:`SegmentLayout` says in which order the parameters sit in that buffer and how it is
cut, for each granularity of the DDP hook:

* ``param``: one segment per parameter, in parameter order;
* ``bucket``: the buckets DDP builds for ``bucket_cap_mb`` (parameters in reverse order, cut
  by DDP's own assignment function, see :mod:`bucketmoo_kernels.distributed.bucket_layout`);
* ``chunk:<n>``: each of those buckets cut into chunks of n elements (the last chunk of a
  bucket is shorter), as the hook's ``chunk:<n>`` does;
* ``global``: one segment for the whole model.

A parameter's *layer* is its module path up to the first numeric index
(``blocks.0.qkv.weight`` -> ``blocks.0``, ``transformer.h.3.mlp.c_fc.bias`` -> ``transformer.h.3``)
or, without one, its module path (``tok.weight`` -> ``tok``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed.bucket_layout import predict_rebuilt_layout
from ..distributed.settings import parse_granularity
from ..inputs import Segments

__all__ = ["SegmentLayout", "build_layout", "layer_of", "check_bucket_cap"]


def layer_of(name: str) -> str:
    """The layer a parameter named ``name`` belongs to (see the module docstring)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


def check_bucket_cap(bucket_cap_mb) -> float | None:
    """``bucket_cap_mb`` as a positive float, or None (DDP's default caps: 1 MiB first bucket, 25 MiB)."""
    if bucket_cap_mb is None:
        return None
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not bucket_cap_mb > 0:
        raise ValueError(f"bucket_cap_mb must be a positive number of MiB (or None for DDP's defaults); "
                         f"got {bucket_cap_mb!r}")
    return float(bucket_cap_mb)


@dataclass(frozen=True)
class SegmentLayout:
    """Order of the parameters in the flat gradient and its segments.

    Attributes:
        granularity: the granularity string (``param``, ``bucket``, ``chunk:<n>``, ``global``).
        order: parameter indices (positions in the profiled parameter list) in flat order.
        offsets: flat offset of every parameter, indexed by parameter index.
        segments: the S segments over the N elements.
        names: a label per segment (the parameter's name, ``bucket 3``, ``chunk 12``, ``global``).
        params: per segment, the names of the parameters it covers (in flat order).
        layer_numel: per segment, how many of its elements belong to each layer.
    """

    granularity: str
    order: tuple[int, ...]
    offsets: tuple[int, ...]
    segments: Segments
    names: tuple[str, ...]
    params: tuple[tuple[str, ...], ...]
    layer_numel: tuple[dict[str, int], ...]

    @property
    def numel(self) -> int:
        return self.segments.numel


def build_layout(names: list[str], params: list[torch.Tensor], granularity: str,
                 bucket_cap_mb: float | None) -> SegmentLayout:
    """The :class:`SegmentLayout` of ``params`` (named ``names``) for ``granularity``."""
    if not isinstance(granularity, str):
        raise ValueError(f"granularity must be 'bucket', 'param', 'global' or 'chunk:<n>'; got {granularity!r}")
    kind, chunk = parse_granularity(granularity)  # ValueError naming granularity
    cap = check_bucket_cap(bucket_cap_mb)
    numels = [p.numel() for p in params]
    if kind in ("param", "global"):
        buckets = [list(range(len(params)))]
    else:
        buckets = predict_rebuilt_layout(params, cap)
    order = [i for bucket in buckets for i in bucket]
    offsets = [0] * len(params)
    start = 0
    for i in order:
        offsets[i] = start
        start += numels[i]
    if kind == "param":
        lengths = [numels[i] for i in order]
        labels = [names[i] for i in order]
    elif kind == "global":
        lengths, labels = [start], ["global"]
    elif kind == "bucket":
        lengths = [sum(numels[i] for i in bucket) for bucket in buckets]
        labels = [f"bucket {k}" for k in range(len(buckets))]
    else:
        lengths = []
        for bucket in buckets:
            size = sum(numels[i] for i in bucket)
            lengths += [min(chunk, size - a) for a in range(0, size, chunk)] or [0]
        labels = [f"chunk {k}" for k in range(len(lengths))]
    segments = Segments.from_lengths(lengths)
    bounds = segments.bounds
    covered, layers = [], []
    j = 0  # two pointers: segments and parameters are both in flat order
    for s in range(segments.num_segments):
        a, b = bounds[s], bounds[s + 1]
        seg_params, seg_layers = [], {}
        while j < len(order) and offsets[order[j]] + numels[order[j]] <= a:
            j += 1
        k = j
        while k < len(order) and offsets[order[k]] < b:
            i = order[k]
            overlap = min(b, offsets[i] + numels[i]) - max(a, offsets[i])
            if overlap > 0:
                seg_params.append(names[i])
                layer = layer_of(names[i])
                seg_layers[layer] = seg_layers.get(layer, 0) + overlap
            k += 1
        covered.append(tuple(seg_params))
        layers.append(seg_layers)
    return SegmentLayout(granularity, tuple(order), tuple(offsets), segments, tuple(labels), tuple(covered),
                         tuple(layers))
