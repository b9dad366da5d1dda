"""The tasks-on-ranks protocols on flat tensors (DESIGN.md §4A), independent of DDP.

Every function here takes a flat gradient, a :class:`~bucketmoo_kernels.Segments` layout,
a :class:`TaskLayout` (which rank trains which task) and a process group, never a DDP
``GradBucket``, so the FSDP2 path can reuse steps 1-3 with its reduce-scatter input and
write step 4's combined shard as the reduce-scatter output.

Sharded protocol (P ranks, T tasks, bucket of n elements, shard length m = ceil(n / P)):

1. :func:`scatter_tasks` -- ``all_to_all`` (uneven splits: the last shard may be shorter)
   so that rank p holds shard p of every rank's bucket ([P, m]); average the rows of ranks that train the same
   task -> [T, m]; partial Gram of the shard per segment ([S, T, T], fp32).
2. :func:`reduce_gram` -- ``all_reduce`` (sum) of the partial Grams: every rank now holds
   the Gram of the whole bucket, bit-identical everywhere.
3. :func:`solve_weights` -- the same deterministic solve on every rank -> [S, T].
4. :func:`combine_shard` (own shard) and :func:`gather_combined` (``all_gather`` of the
   combined shards back into the bucket).

Bytes sent per rank: (P-1)/P n in step 1 and (P-1)/P n in step 4 -- the volume of a ring
all-reduce -- plus the S*T*T floats of step 2. Extra memory: the P*m receive buffer, the
T*m task rows (a view of the receive buffer when rank t trains task t), the m-element
combined shard, the P*m gather buffer (skipped when P divides n and there is no
compression: the all-gather then writes the bucket directly) and, with compression, the
half-precision copy of the bucket: O(n) per bucket in flight, at most 2.5 n without
compression.

Replicas stay bit-identical by construction: every element of the final bucket is written
by exactly one rank (the owner of its shard) and all ranks receive the same all-gather.

The all-gather protocol (:func:`allgather_tasks`) gathers every rank's whole bucket
([P, n], P times the memory): simpler, fine for small P, and the baseline to compare with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..api import combine, gram, solve
from ..inputs import Segments
from ..weight_step import WeightStep
from . import collectives

__all__ = ["TaskLayout", "ShardedTasks", "ScatterHandle", "shard_length", "local_shard_length", "shard_segments",
           "start_scatter_tasks", "finish_scatter_tasks", "scatter_tasks", "reduce_gram", "solve_weights",
           "combine_shard", "start_gather_combined", "gather_combined", "sharded_moo", "allgather_tasks"]


@dataclass(frozen=True)
class TaskLayout:
    """Which task every rank of a process group trains.

    Attributes:
        task_of_rank: task id of every group rank (length P).
        num_tasks: T; every task 0..T-1 has the same number of ranks, P / T.
        ranks_of_task: the group ranks of each task, in rank order.
    """

    task_of_rank: tuple[int, ...]
    num_tasks: int
    ranks_of_task: tuple[tuple[int, ...], ...]

    @property
    def world_size(self) -> int:
        return len(self.task_of_rank)

    @property
    def ranks_per_task(self) -> int:
        return self.world_size // self.num_tasks

    @property
    def identity(self) -> bool:
        """Rank t trains task t (the default): the task rows are the received rows as they are."""
        return self.task_of_rank == tuple(range(self.world_size))

    @classmethod
    def build(cls, task_of_rank: Sequence[int] | None, world_size: int,
              num_tasks: int | None = None) -> "TaskLayout":
        """Validate ``task_of_rank`` for a group of ``world_size`` ranks.

        ``None`` means rank r trains task r. Raises ``ValueError`` naming the argument when a
        task id is out of range, a task has no rank, or the ranks do not divide evenly into
        the tasks (every task must have P / T ranks, so that ``mean`` is plain DDP).
        """
        if task_of_rank is None:
            if num_tasks is not None and num_tasks != world_size:
                raise ValueError(
                    f"num_tasks={num_tasks} on a process group of {world_size} ranks: without task_of_rank, rank r "
                    f"trains task r, so num_tasks must equal the world size; launch {num_tasks} processes, or a "
                    f"multiple of {num_tasks} with task_of_rank giving every task the same number of ranks")
            task_of_rank = list(range(world_size))
        try:
            ids = tuple(int(t) for t in task_of_rank)
        except (TypeError, ValueError):
            raise TypeError(f"task_of_rank must be a sequence of ints; got {task_of_rank!r}") from None
        if len(ids) != world_size:
            raise ValueError(
                f"task_of_rank must give one task id per rank of the process group ({world_size} ranks); "
                f"got {len(ids)} entries: {list(ids)}"
            )
        t = num_tasks if num_tasks is not None else (max(ids) + 1 if ids else 0)
        bad = [(r, i) for r, i in enumerate(ids) if not 0 <= i < t]
        if bad:
            raise ValueError(
                f"task_of_rank entries must be task ids in [0, {t}) (num_tasks={t}); "
                f"got rank {bad[0][0]} -> task {bad[0][1]}"
            )
        ranks = tuple(tuple(r for r, i in enumerate(ids) if i == task) for task in range(t))
        missing = [task for task, rs in enumerate(ranks) if not rs]
        if missing:
            raise ValueError(f"task_of_rank assigns no rank to task(s) {missing} of num_tasks={t}: "
                             "every task needs at least one rank")
        sizes = {len(rs) for rs in ranks}
        if len(sizes) != 1:
            raise ValueError(
                f"the world size {world_size} does not divide evenly into {t} tasks: task_of_rank gives "
                f"tasks {[len(rs) for rs in ranks]} ranks; every task needs {world_size}/{t} ranks "
                "(so that the average over ranks of one task is a task gradient and 'mean' is plain DDP)"
            )
        return cls(ids, t, ranks)


def shard_length(numel: int, world_size: int) -> int:
    """m = ceil(numel / P): the length of each rank's shard of a bucket (0 for an empty bucket)."""
    return -(-numel // world_size)


def local_shard_length(numel: int, world_size: int, shard_index: int) -> int:
    """Elements of the bucket that shard ``shard_index`` really holds: m, or less for the last
    shard(s) of a bucket whose length is not a multiple of P (the rest is padding)."""
    m = shard_length(numel, world_size)
    return max(0, min(m, numel - shard_index * m))


def shard_segments(segments: Segments, shard_index: int, shard_len: int) -> Segments:
    """The part of ``segments`` that falls into shard ``shard_index`` (shards of ``shard_len``
    elements starting at ``shard_index * shard_len``), as offsets local to the shard.

    Segment s keeps its index (empty where it misses the shard). The result covers
    ``min(shard_len, N - start)`` elements (clamped at 0): the shard's real data, no padding.
    """
    start = shard_index * shard_len
    length = max(0, min(shard_len, segments.numel - start))
    return Segments((segments.offsets - start).clamp(0, length))


@dataclass
class ShardedTasks:
    """Step 1's output on one rank.

    Attributes:
        rows: ``[T, m_p]`` this rank's shard of every task gradient, in the wire dtype
            (m_p = m, or less for the last shard(s); see :func:`local_shard_length`).
        segments: the segment layout restricted to the shard (same S as the bucket's).
        shard_len: m, the shard stride.
        numel: n, the bucket length.
        partial_gram: ``[S, T, T]`` float32 Gram of the shard (sum over ranks = bucket Gram).
        extra_bytes: bytes this step allocated (receive buffer, send copy, task rows).
    """

    rows: torch.Tensor
    segments: Segments
    shard_len: int
    numel: int
    partial_gram: torch.Tensor
    extra_bytes: int


_INDEX_CACHE: dict[tuple, torch.Tensor] = {}


def _cached_index(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An int64 index tensor on ``device``, built once (no host-to-device copy per bucket)."""
    key = (values, str(device))
    index = _INDEX_CACHE.get(key)
    if index is None:
        index = _INDEX_CACHE[key] = torch.tensor(values, dtype=torch.int64, device=device)
    return index


def _group_rows(received: torch.Tensor, tasks: TaskLayout) -> tuple[torch.Tensor, int]:
    """[P, m] rows of the ranks -> [T, m] task rows (mean over each task's ranks)."""
    if tasks.identity:
        return received, 0
    if tasks.ranks_per_task == 1:
        order = _cached_index(tuple(rs[0] for rs in tasks.ranks_of_task), received.device)
        rows = received.index_select(0, order)
        return rows, rows.numel() * rows.element_size()
    index = _cached_index(tasks.task_of_rank, received.device)
    acc = torch.zeros(tasks.num_tasks, received.shape[1], dtype=torch.float32, device=received.device)
    acc.index_add_(0, index, received.to(torch.float32))
    acc.div_(tasks.ranks_per_task)
    rows = acc.to(received.dtype)
    extra = acc.numel() * 4 + (0 if rows is acc else rows.numel() * rows.element_size())
    return rows, extra


@dataclass
class ScatterHandle:
    """Step 1 in flight (:func:`start_scatter_tasks`): the all-to-all and what finishing needs."""

    work: object
    received: torch.Tensor
    send: torch.Tensor
    tasks: TaskLayout
    segments: Segments
    shard_len: int
    own_len: int
    numel: int
    extra_bytes: int
    backend: str


def start_scatter_tasks(flat: torch.Tensor, segments: Segments, tasks: TaskLayout, *, group=None,
                        wire_dtype: torch.dtype | None = None, backend: str = "auto",
                        local_segments: Segments | None = None) -> ScatterHandle:
    """Step 1, first half: launch the all-to-all of the shards (asynchronous).

    Same arguments as :func:`scatter_tasks`; finish with :func:`finish_scatter_tasks`.
    ``flat`` must not change until then.
    """
    world = tasks.world_size
    rank = collectives.group_rank(group)
    n = flat.numel()
    m = shard_length(n, world)
    own_len = local_shard_length(n, world, rank)
    wire = wire_dtype or flat.dtype
    send = flat if wire == flat.dtype else flat.to(wire)
    extra = 0 if send is flat else send.numel() * send.element_size()
    # Uneven splits: shard p is flat[p*m : min((p+1)*m, n)], so no padded copy is needed.
    received = torch.empty(world * own_len, dtype=wire, device=flat.device)
    extra += received.numel() * received.element_size()
    work = collectives.all_to_all_flat(received, send, group, output_split_sizes=[own_len] * world,
                                       input_split_sizes=[local_shard_length(n, world, p) for p in range(world)],
                                       async_op=True)
    segs = local_segments if local_segments is not None else shard_segments(segments, rank, m)
    return ScatterHandle(work, received, send, tasks, segs, m, own_len, n, extra, backend)


def finish_scatter_tasks(handle: ScatterHandle) -> ShardedTasks:
    """Step 1, second half: wait for the all-to-all, group the rows by task, partial Gram."""
    handle.work.wait()
    rows, rows_extra = _group_rows(handle.received.view(handle.tasks.world_size, handle.own_len), handle.tasks)
    partial = gram(rows, handle.segments, backend=handle.backend)
    return ShardedTasks(rows, handle.segments, handle.shard_len, handle.numel, partial,
                        handle.extra_bytes + rows_extra)


def scatter_tasks(flat: torch.Tensor, segments: Segments, tasks: TaskLayout, *, group=None,
                  wire_dtype: torch.dtype | None = None, backend: str = "auto",
                  local_segments: Segments | None = None) -> ShardedTasks:
    """Step 1: all-to-all the bucket's shards, group them by task, partial Gram.

    Args:
        flat: ``[n]`` this rank's gradient (its task's), fp32 / bf16 / fp16, contiguous.
        segments: layout of the bucket (``S + 1`` offsets over n).
        tasks: which rank trains which task.
        group: process group (None: default group).
        wire_dtype: dtype on the wire (bf16 / fp16 compression); None keeps ``flat.dtype``.
        backend: kernel backend for the Gram.
        local_segments: precomputed ``shard_segments(segments, rank, m)`` (a cache).
    Returns:
        :class:`ShardedTasks` with ``rows [T, m_p]`` in the wire dtype.
    """
    return finish_scatter_tasks(start_scatter_tasks(flat, segments, tasks, group=group, wire_dtype=wire_dtype,
                                                    backend=backend, local_segments=local_segments))


def reduce_gram(partial_gram: torch.Tensor, group=None) -> torch.Tensor:
    """Step 2: sum the partial Grams over ranks, in place; returns the bucket Gram [S, T, T]."""
    collectives.all_reduce_sum(partial_gram, group)
    return partial_gram


def solve_weights(gram_matrix: torch.Tensor, weight_step: WeightStep | str, *, losses=None,
                  backend: str = "auto", options: dict | None = None, normalization: str = "none",
                  normalize_weights: bool = True, method_state=None) -> torch.Tensor:
    """Step 3: ``[S, T, T]`` Gram -> ``[S, T]`` float32 weights (same input, same code: same
    weights on every rank; ``method_state``: the bucket's state for a stateful weight step).

    ``weight_step`` is a prebuilt :class:`~bucketmoo_kernels.weight_step.WeightStep` (what the
    DDP hook and the FSDP path pass), or a method name with ``options``, ``normalization`` and
    ``normalize_weights`` as loose arguments.
    """
    if not isinstance(weight_step, WeightStep):
        weight_step = WeightStep(weight_step, options or {}, normalization=normalization,
                                 normalize_weights=normalize_weights)
    elif options or normalization != "none" or normalize_weights is not True:
        raise TypeError("solve_weights: pass either a WeightStep or a method name with options/normalization/"
                        "normalize_weights, not both")
    return solve(gram_matrix, weight_step=weight_step, backend=backend, losses=losses,
                 method_state=method_state)


def combine_shard(sharded: ShardedTasks, weights: torch.Tensor, out: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """Step 4a: the combined gradient of this rank's shard, ``[m]`` in the wire dtype.

    This is what a reduce-scatter replacement (FSDP2) returns as its output shard.
    """
    return combine(sharded.rows, weights, sharded.segments, out=out, backend=backend)


def start_gather_combined(sharded: ShardedTasks, weights: torch.Tensor, flat: torch.Tensor, *, group=None,
                          backend: str = "auto") -> tuple[torch.futures.Future, int]:
    """Step 4, asynchronous: combine the own shard, launch the all-gather into ``flat``.

    Returns:
        ``(future, extra_bytes)``; the future's value is ``flat`` once it holds the combined
        bucket (its callback only copies, it issues no collective).
    """
    world = collectives.group_size(group)
    m, n = sharded.shard_len, sharded.numel
    own_len = sharded.rows.shape[1]
    own = torch.empty(m, dtype=sharded.rows.dtype, device=flat.device)
    extra = own.numel() * own.element_size()
    if own_len < m:
        own[own_len:].zero_()
    combine_shard(sharded, weights, out=own[:own_len], backend=backend)
    if n == world * m and own.dtype == flat.dtype:
        work = collectives.all_gather_flat(flat, own, group, async_op=True)
        return work.get_future().then(lambda _fut, own=own: flat), extra
    gathered = torch.empty(world * m, dtype=own.dtype, device=flat.device)
    extra += gathered.numel() * gathered.element_size()
    work = collectives.all_gather_flat(gathered, own, group, async_op=True)

    def unpack(_fut, own=own):
        flat.copy_(gathered[:n])
        return flat

    return work.get_future().then(unpack), extra


def gather_combined(sharded: ShardedTasks, weights: torch.Tensor, flat: torch.Tensor, *, group=None,
                    backend: str = "auto") -> int:
    """Step 4: combine the own shard and all-gather the shards into ``flat`` (in place, blocking).

    Returns the number of extra bytes allocated.
    """
    fut, extra = start_gather_combined(sharded, weights, flat, group=group, backend=backend)
    fut.wait()
    return extra


def sharded_moo(flat: torch.Tensor, segments: Segments, tasks: TaskLayout, weight_step: WeightStep | str, *,
                group=None, losses=None, wire_dtype: torch.dtype | None = None, backend: str = "auto",
                local_segments: Segments | None = None, **step_kwargs):
    """Steps 1-4 on one bucket: ``flat`` (this rank's task gradient) is replaced in place by
    the combined gradient of all tasks, identical on every rank.

    ``weight_step`` and ``step_kwargs``: as for :func:`solve_weights`.

    Returns:
        ``(gram [S, T, T] f32, weights [S, T] f32, extra_bytes)``.
    """
    sharded = scatter_tasks(flat, segments, tasks, group=group, wire_dtype=wire_dtype, backend=backend,
                            local_segments=local_segments)
    gram_matrix = reduce_gram(sharded.partial_gram, group)
    weights = solve_weights(gram_matrix, weight_step, losses=losses, backend=backend, **step_kwargs)
    extra = sharded.extra_bytes + gather_combined(sharded, weights, flat, group=group, backend=backend)
    return gram_matrix, weights, extra


def allgather_tasks(flat: torch.Tensor, tasks: TaskLayout, *, group=None,
                    wire_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, int]:
    """All-gather protocol, step 1: every rank receives every rank's whole bucket.

    Returns:
        ``(rows [T, n] in the wire dtype, extra_bytes)``; the caller then runs
        ``fused_bucket_moo`` on the rows (the same on every rank).
    """
    world = tasks.world_size
    n = flat.numel()
    wire = wire_dtype or flat.dtype
    send = flat if wire == flat.dtype else flat.to(wire)
    extra = 0 if send is flat else send.numel() * send.element_size()
    gathered = torch.empty(world * n, dtype=wire, device=flat.device)
    extra += gathered.numel() * gathered.element_size()
    collectives.all_gather_flat(gathered, send, group)
    rows, rows_extra = _group_rows(gathered.view(world, n), tasks)
    return rows, extra + rows_extra
