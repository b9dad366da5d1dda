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

from ..distributed.protocol import TaskLayout, combine_shard, reduce_gram, scatter_tasks, solve_weights
from ..distributed.runtime import StepCounter
from ..inputs import Segments

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
        counter: shared step counter of all installed groups.
    """

    def __init__(self, state, param_sizes: list[int], divide_factor, index: int, name: str,
                 counter: StepCounter):
        self.state = state
        self.param_sizes = param_sizes
        self.divide_factor = divide_factor
        self.index = index
        self.name = name
        self.counter = counter

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op,
                 async_op: bool = False):
        state = self.state
        settings = state.settings
        world = dist.get_world_size(group)
        shard = output_tensor.numel()
        # First reduction: the ranks agree on the settings (ValueError naming the differences).
        state.check_once(output_tensor.device, "allreduce" if settings.plain_average else "sharded")
        if settings.plain_average:
            # Plain averaging is FSDP's own reduce-scatter: bit-identical to stock FSDP2.
            dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group)
            self.counter.tick()
            return None
        tasks = TaskLayout.build(settings.task_of_rank, world, settings.num_tasks)
        # The granularity's layout of this rank's shard (cached by the state; for "param",
        # the pieces of the group's parameters, whose sizes must add up to the shard).
        local, _ = state.segments_for(self.index, shard, self.param_sizes)
        # Steps 1-3 of the tasks-on-ranks protocol; the flat input is already rank-major.
        sharded = scatter_tasks(input_tensor, Segments.single(input_tensor.numel()), tasks, group=group,
                                wire_dtype=settings.wire_dtype, backend=settings.backend, local_segments=local)
        gram_matrix = reduce_gram(sharded.partial_gram, group)
        weights = solve_weights(gram_matrix, state.weight_step(), **state.solve_kwargs(self.index))
        scale = reduce_output_scale(op, world, self.divide_factor())
        scaled = weights * scale if scale != 1.0 else weights
        # Step 4: the combined shard is the reduce-scatter output.
        if sharded.rows.dtype == output_tensor.dtype:
            combine_shard(sharded, scaled, out=output_tensor, backend=settings.backend)
        else:  # compressed wire: combine in the wire dtype, then widen
            output_tensor.copy_(combine_shard(sharded, scaled, backend=settings.backend))
        state.note_extra_bytes(sharded.extra_bytes)
        state.record(self.index, gram_matrix, weights)
        self.counter.tick()
        return None
