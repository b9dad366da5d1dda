"""Bucket-Level MOO as FSDP2's gradient reduce-scatter (tasks on ranks).

FSDP2 (``torch.distributed.fsdp.fully_shard``) reduce-scatters the gradient of each
parameter group. ``FSDPModule.set_custom_reduce_scatter(comm)`` lets us replace that step:
``comm(output_tensor, input_tensor, group, op)`` receives the group's flat gradient
``[world * shard]`` laid out rank-major (chunk r is rank r's shard of every parameter, zero
padded) and must write this rank's ``[shard]`` output.

With one task per rank (or per group of ranks) the local input is that task's gradient, and
the MOO protocol replaces the reduce-scatter:

1. ``all_to_all_single``: rank p receives chunk p of every rank -> ``[world, shard]``; rows
   of ranks that train the same task are averaged -> ``[T, shard]``;
2. the partial Gram of this shard per segment, ``all_reduce`` (SUM) of the tiny
   ``[S, T, T]`` tensor -> the Gram of the whole group;
3. every rank solves the same weights from the same all-reduced Gram;
4. this rank combines its shard straight into ``output_tensor``.

The bytes on the wire are those of FSDP's own reduce-scatter (an all-to-all of the same
input) plus the tiny all-reduce; there is no all-gather, since FSDP keeps gradients sharded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed.engine import BucketEngine

__all__ = ["BucketMOOReduceScatter", "reduce_output_scale"]

try:  # torch >= 2.8 (checked on 2.13): the custom-comm interface of FSDP2
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter as _ReduceScatterBase
except ImportError:  # pragma: no cover - older torch
    _ReduceScatterBase = object


def reduce_output_scale(op, world_size: int, divide_factor: float | None) -> float:
    """Factor that turns a weights-sum-to-one combination into what ``op`` would produce.

    FSDP passes ``AVG`` (output = mean of the inputs: factor 1), ``SUM`` (used for fp16 or
    forced sum reduction; FSDP divides before and after the comm itself: factor = world
    size), or ``PREMUL_SUM(1/f)`` when a gradient divide factor f is set (factor world / f).
    """
    if op == dist.ReduceOp.AVG:
        return 1.0
    if op == dist.ReduceOp.SUM:
        return float(world_size)
    if divide_factor is None:
        raise ValueError(f"unsupported reduce op {op!r} for the bucket-MOO reduce-scatter: expected AVG, SUM "
                         "or PREMUL_SUM with a gradient divide factor")
    return world_size / float(divide_factor)


class BucketMOOReduceScatter(_ReduceScatterBase):
    """FSDP2 custom reduce-scatter running Bucket-Level MOO for one parameter group.

    Args:
        state: the :class:`~bucketmoo_kernels.distributed.BucketMOOState` (method and options,
            granularity, task mapping, compression, diagnostics).
        param_sizes: the per-rank shard length of every parameter of the group, in
            reduce-scatter order (FSDP's padding included: it pads with zeros, which add
            nothing to a Gram matrix); used by ``granularity="param"``.
        divide_factor: callable returning the group's ``gradient_divide_factor`` (or None).
        index: the group's index (diagnostics), ``name`` its module path (errors).
        engine: the :class:`~bucketmoo_kernels.distributed.engine.BucketEngine` shared by all
            installed groups (``reductions_per_step`` = their number: it counts the steps).
    """

    def __init__(self, state, param_sizes: list[int], divide_factor, index: int, name: str, engine: BucketEngine):
        self.state = state
        self.param_sizes = param_sizes
        self.divide_factor = divide_factor
        self.index = index
        self.name = name
        self.engine = engine

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op,
                 async_op: bool = False):
        state = self.state
        # First reduction: the ranks agree on the settings (ValueError naming the differences).
        state.check_once(output_tensor.device, "allreduce" if state.settings.plain_average else "sharded")
        if state.settings.plain_average:
            # Plain averaging is FSDP's own reduce-scatter: bit-identical to stock FSDP2.
            dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group)
        else:
            # The flat input is rank-major: the engine's reduce-scatter writes this rank's
            # combined shard as the output (the granularity's layout is the shard's).
            scale = reduce_output_scale(op, dist.get_world_size(group), self.divide_factor())
            self.engine.group = group  # FSDP's reduce-scatter group, given with each call
            self.engine.reduce(self.index, input_tensor, self.param_sizes, out=output_tensor, weight_scale=scale)
        self.engine.end_of_reduction()
        return None
