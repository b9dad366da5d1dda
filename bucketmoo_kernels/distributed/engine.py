"""``BucketEngine``: the per-bucket work that the DDP hook, FSDP2's reduce-scatter and the
DeepSpeed patch share.

A front end translates its engine's objects into flat tensors and calls

* :meth:`BucketEngine.reduce` for a bucket of tasks on ranks (rank r's ``flat`` holds the
  gradient of its task): the sharded or the all-gather protocol, at the state's granularity,
  pipelined (``overlap``) when the front end keeps its buffers alive until the future
  completes, held until :meth:`finish_backward` for ``granularity="global"``;
* :meth:`BucketEngine.combine_rows` for stash mode, whose rows are the stashed buckets;
* :meth:`BucketEngine.finish_backward` after the backward's last bucket (finishes the bucket in
  flight and the held ones) and :meth:`BucketEngine.finish_step` once per optimizer step (the
  one step counter, ``state.step``).

The engine reads the settings and keeps its counters, caches and method states in the state's
runtime (what a checkpoint saves); the buckets in flight are typed :class:`PendingBucket`
records it holds only until their combine is launched. Weights come from
:func:`~bucketmoo_kernels.weight_step.compute_weights` with the weight step in force and a
kernel backend resolved once per device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..api import combine, fused_bucket_moo, gram
from ..dispatch import get_backend
from ..inputs import Segments
from ..weight_step import compute_weights
from . import collectives
from .protocol import (ScatterHandle, ShardedTasks, TaskLayout, allgather_tasks, combine_shard, finish_scatter_tasks,
                       gather_combined, reduce_gram, scatter_tasks, start_gather_combined, start_scatter_tasks)

__all__ = ["BucketEngine", "PendingBucket", "completed_future"]

#: Index of the method state (and of the diagnostics) of ``granularity="global"``.
GLOBAL_INDEX = -1


def completed_future(tensor: torch.Tensor) -> torch.futures.Future:
    """A future that already holds ``tensor``."""
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(tensor)
    return fut


def _chain(source: torch.futures.Future, target: torch.futures.Future) -> None:
    """Complete ``target`` with ``source``'s value (or exception) when ``source`` completes."""

    def done(f: torch.futures.Future) -> None:
        try:
            target.set_result(f.value())
        except BaseException as exc:  # noqa: BLE001  (handed to the front end through the future)
            target.set_exception(exc)

    source.add_done_callback(done)


@dataclass
class PendingBucket:
    """A bucket whose combine is not launched yet.

    Attributes:
        index: the bucket's index in its backward.
        out: where the combined gradient goes (the bucket itself unless the front end gave ``out``).
        future: completes with ``out`` once it holds the combined gradient.
        scatter: sharded protocol, the all-to-all in flight.
        sharded: sharded protocol, this rank's shard of every task after the all-to-all.
        rows: all-gather protocol and stash mode, the ``[T, n]`` task rows (a tensor or a list).
        gram: ``[S, T, T]`` Gram of the rows (for ``sharded``: ``sharded.partial_gram``).
        average_after: stash mode with ``stash_reduce="combined"``: average ``out`` over the
            ranks once combined.
    """

    index: int
    out: torch.Tensor
    future: torch.futures.Future
    scatter: ScatterHandle | None = None
    sharded: ShardedTasks | None = None
    rows: torch.Tensor | Sequence[torch.Tensor] | None = None
    gram: torch.Tensor | None = None
    average_after: bool = False

    def finish_scatter(self) -> int:
        """Wait for the all-to-all (if still in flight); returns the bytes it allocated (0 if done
        or not sharded). The receive buffer stays held by ``scatter`` until the record (or
        ``scatter``) is dropped."""
        if self.scatter is None or self.sharded is not None:
            return 0
        self.sharded = finish_scatter_tasks(self.scatter)
        self.gram = self.sharded.partial_gram
        return self.sharded.extra_bytes


class BucketEngine:
    """The bucket-level MOO reduction of one front end over one ``BucketMOOState``.

    Args:
        state: the :class:`~bucketmoo_kernels.distributed.BucketMOOState`.
        group: the process group the front end reduces over (None: the state's).
        holds_buffers: the front end keeps ``flat`` and ``out`` valid until the returned future
            completes (DDP does); then the sharded protocol pipelines the buckets when the state
            says ``overlap=True``, and ``global`` holds the all-to-alls in flight. False
            (DeepSpeed reuses its bucket buffer): every bucket's exchange finishes in its call.
        reductions_per_step: count the reductions and advance the step after this many
            (FSDP2: one per parameter group); None: the front end calls :meth:`finish_step`.
    """

    def __init__(self, state, group=None, *, holds_buffers: bool = True, reductions_per_step: int | None = None):
        self.state = state
        self.group = group if group is not None else state.process_group
        self.holds_buffers = bool(holds_buffers)
        self.reductions_per_step = reductions_per_step
        self._reductions = 0
        self._pending: list[PendingBucket] = []
        self._inflight: PendingBucket | None = None
        self._tasks: dict[int, TaskLayout] = {}
        self._backends: dict[str, object] = {}
        self._device = torch.device("cpu")  # of the last bucket: where the method states are gathered

    # ------------------------------------------------------------------ what the front ends call
    def reduce(self, index: int, flat: torch.Tensor, param_sizes: Sequence[int] | None = None,
               out: torch.Tensor | None = None, *, wire_dtype: torch.dtype | None = None,
               weight_scale: float = 1.0) -> torch.futures.Future:
        """Combine bucket ``index`` of tasks on ranks; ``flat`` is this rank's task gradient.

        Args:
            index: the bucket's index in this backward (0 starts a backward).
            flat: ``[n]`` contiguous; replaced by the combined bucket unless ``out`` is given.
            param_sizes: the bucket's parameter sizes (``granularity="param"``).
            out: where the combined gradient goes: ``[n]``, or this rank's shard ``[n / P]`` of a
                rank-major ``flat`` (a reduce-scatter: no all-gather; ``param_sizes`` are then the
                shard's pieces).
            wire_dtype: dtype on the wire (default: the state's ``compress``).
            weight_scale: factor applied to the weights of a reduce-scatter's output.
        Returns:
            A future holding the combined gradient (``out`` or ``flat``).
        """
        settings, runtime = self.state.settings, self.state.runtime
        if index == 0:
            self._begin_backward()
        self._device = flat.device
        tasks = self.task_layout()
        wire = wire_dtype or settings.wire_dtype
        backend = settings.backend
        kind = settings.granularity_kind[0]
        target = flat if out is None else out
        if kind == "global":
            record = PendingBucket(index, target, torch.futures.Future())
            if settings.protocol == "sharded":
                record.scatter = start_scatter_tasks(flat, Segments.single(flat.numel()), tasks, group=self.group,
                                                     wire_dtype=wire, backend=backend)
                if not self.holds_buffers:  # the buffer is reused: take the shards out now
                    runtime.add_step_extra_bytes(record.finish_scatter())
                    record.scatter = None
            else:
                record.rows, extra = allgather_tasks(flat, tasks, group=self.group, wire_dtype=wire)
                record.gram = gram(record.rows, None, backend=backend)
                runtime.add_step_extra_bytes(extra)
            self._pending.append(record)
            return record.future
        if out is not None and out.numel() != flat.numel():
            return self._reduce_scatter(index, flat, param_sizes, out, tasks, wire, weight_scale)
        segs, shards = runtime.segments_for(settings.granularity_kind, index, flat.numel(),
                                            param_sizes if kind == "param" else None)
        if settings.protocol == "sharded":
            local = runtime.shard_segments_for(segs, shards, collectives.group_rank(self.group), tasks.world_size)
            if settings.overlap and self.holds_buffers:
                self._finish_inflight()  # the previous bucket: its all-to-all ran during this backward
                handle = start_scatter_tasks(flat, segs, tasks, group=self.group, wire_dtype=wire, backend=backend,
                                             local_segments=local)
                self._inflight = PendingBucket(index, target, torch.futures.Future(), scatter=handle)
                return self._inflight.future
            sharded = scatter_tasks(flat, segs, tasks, group=self.group, wire_dtype=wire, backend=backend,
                                    local_segments=local)
            gram_matrix = reduce_gram(sharded.partial_gram, self.group)
            weights = self._weights(gram_matrix, index)
            extra = sharded.extra_bytes + gather_combined(sharded, weights, target, group=self.group, backend=backend)
        else:
            rows, extra = allgather_tasks(flat, tasks, group=self.group, wire_dtype=wire)
            gram_matrix, weights, extra_fused = self._fused(index, rows, segs, target)
            extra += extra_fused
        runtime.note_extra_bytes(extra)
        self.state.record(index, gram_matrix, weights)
        return completed_future(target)

    def combine_rows(self, index: int, rows: Sequence[torch.Tensor], flat: torch.Tensor,
                     param_sizes: Sequence[int] | None = None) -> torch.futures.Future:
        """Stash mode: combine the task rows of bucket ``index`` (the stashed buckets and the last
        task's own) into ``flat``; with ``stash_reduce="combined"`` then average it over the ranks."""
        settings, runtime = self.state.settings, self.state.runtime
        if index == 0:
            self._begin_backward()
        self._device = flat.device
        average = settings.stash_reduce == "combined" and collectives.group_size(self.group) > 1
        kind = settings.granularity_kind[0]
        if kind == "global":
            record = PendingBucket(index, flat, torch.futures.Future(), rows=rows,
                                   gram=gram(rows, None, backend=settings.backend), average_after=average)
            self._pending.append(record)
            return record.future
        segs, _ = runtime.segments_for(settings.granularity_kind, index, flat.numel(),
                                       param_sizes if kind == "param" else None)
        gram_matrix, weights, _ = self._fused(index, rows, segs, flat)
        if average:
            self._average(flat)
        self.state.record(index, gram_matrix, weights)
        return completed_future(flat)

    def finish_backward(self) -> None:
        """After the backward's last bucket: finish the bucket in flight and the held buckets
        (``global``: one solve on the summed Gram); in stash mode with ``stash_reduce="combined"``
        gather every rank's method states (see ``BucketMOOState.state_dict``)."""
        self._finish_inflight()
        self._finish_global()
        state = self.state
        if (state.settings.mode == "stash" and state.settings.stash_reduce == "combined"
                and collectives.group_size(self.group) > 1 and state.weight_step().needs_state):
            state.gather_rank_method_states(self._device)

    def finish_step(self) -> None:
        """One optimizer step is done: advance ``state.step`` (the seed of PCGrad-style methods)."""
        self.state.runtime.finish_step()

    def end_of_reduction(self) -> None:
        """With ``reductions_per_step``: count one reduction; after the step's last one, finish the
        backward and the step."""
        if self.reductions_per_step is None:
            raise RuntimeError("end_of_reduction needs BucketEngine(reductions_per_step=...)")
        self._reductions += 1
        if self._reductions == self.reductions_per_step:
            self._reductions = 0
            self.finish_backward()
            self.finish_step()

    def task_layout(self) -> TaskLayout:
        """The state's ``task_of_rank`` validated for this engine's group (built once per size)."""
        world = collectives.group_size(self.group)
        tasks = self._tasks.get(world)
        if tasks is None:
            settings = self.state.settings
            tasks = self._tasks[world] = TaskLayout.build(settings.task_of_rank, world, settings.num_tasks)
        return tasks

    # ------------------------------------------------------------------ the steps
    def _begin_backward(self) -> None:
        """The first bucket of a backward: forget what a failed backward left in flight."""
        self._pending = []
        self._inflight = None
        self.state.runtime.begin_backward()

    def _weights(self, gram_matrix: torch.Tensor, index: int) -> torch.Tensor:
        """``[S, T, T]`` Gram -> ``[S, T]`` weights with the weight step in force (and bucket
        ``index``'s method state for a stateful one); the same on every rank for the same Gram."""
        runtime = self.state.runtime
        step = self.state.weight_step()
        num_segments, num_tasks = gram_matrix.shape[0], gram_matrix.shape[-1]
        step.check_tasks(num_tasks)
        table = step.loss_table(runtime.losses, num_segments, num_tasks, gram_matrix.device)
        method_state = runtime.method_state_for(index) if step.needs_state else None
        return compute_weights(gram_matrix.to(torch.float32), step, table, self._backend(gram_matrix.device),
                               method_state)

    def _backend(self, device: torch.device):
        key = str(device)
        backend = self._backends.get(key)
        if backend is None:
            backend = self._backends[key] = get_backend(self.state.settings.backend, device)
        return backend

    def _fused(self, index: int, rows, segs: Segments, target: torch.Tensor):
        """Gram, weights and combine of whole task rows into ``target`` in one call (the all-gather
        protocol and stash mode); returns ``(gram, weights, extra bytes)``."""
        runtime, settings = self.state.runtime, self.state.settings
        step = self.state.weight_step()
        dtype = rows.dtype if isinstance(rows, torch.Tensor) else rows[0].dtype
        out = target if dtype == target.dtype else torch.empty_like(target, dtype=dtype)
        kwargs = dict(losses=runtime.losses)
        if step.needs_state:
            kwargs["method_state"] = runtime.method_state_for(index)
        out, info = fused_bucket_moo(rows, segments=segs, out=out, weight_step=step, backend=settings.backend,
                                     check_finite=False, return_info=True, **kwargs)
        extra = 0
        if out is not target:  # compressed rows: combined in the wire dtype, widened into the target
            extra = out.numel() * out.element_size()
            target.copy_(out)
        return info.gram, info.weights, extra

    def _reduce_scatter(self, index: int, flat: torch.Tensor, param_sizes, out: torch.Tensor, tasks: TaskLayout,
                        wire, weight_scale: float) -> torch.futures.Future:
        """Steps 1-3 of the sharded protocol on a rank-major ``flat``; the combined shard is ``out``."""
        settings, runtime = self.state.settings, self.state.runtime
        local, _ = runtime.segments_for(settings.granularity_kind, index, out.numel(), param_sizes)
        sharded = scatter_tasks(flat, Segments.single(flat.numel()), tasks, group=self.group, wire_dtype=wire,
                                backend=settings.backend, local_segments=local)
        gram_matrix = reduce_gram(sharded.partial_gram, self.group)
        weights = self._weights(gram_matrix, index)
        scaled = weights * weight_scale if weight_scale != 1.0 else weights
        if sharded.rows.dtype == out.dtype:
            combine_shard(sharded, scaled, out=out, backend=settings.backend)
        else:  # compressed wire: combine in the wire dtype, then widen
            out.copy_(combine_shard(sharded, scaled, backend=settings.backend))
        runtime.note_extra_bytes(sharded.extra_bytes)
        self.state.record(index, gram_matrix, weights)
        return completed_future(out)

    def _finish_inflight(self) -> None:
        """Finish the bucket whose all-to-all is in flight: Gram, all-reduce, solve, combine,
        launch the all-gather; its future completes when the all-gather lands."""
        record, self._inflight = self._inflight, None
        if record is None:
            return
        try:
            record.finish_scatter()
            gram_matrix = reduce_gram(record.gram, self.group)
            weights = self._weights(gram_matrix, record.index)
            gather, extra = start_gather_combined(record.sharded, weights, record.out, group=self.group,
                                                  backend=self.state.settings.backend)
        except BaseException as exc:
            record.future.set_exception(exc)
            raise
        self.state.runtime.note_extra_bytes(record.sharded.extra_bytes + extra)
        self.state.record(record.index, gram_matrix, weights)
        _chain(gather, record.future)

    def _finish_global(self) -> None:
        """``granularity="global"``: every held bucket with one weight vector solved from the sum
        of their Grams (in bucket order, the same on every rank)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        settings, runtime = self.state.settings, self.state.runtime
        runtime.add_step_extra_bytes(sum(record.finish_scatter() for record in pending))
        for record in pending:
            record.scatter = None  # the receive buffers: only the task rows are needed from here
        total = torch.stack([record.gram for record in pending]).sum(0)  # [1, T, T]
        sharded = pending[0].sharded is not None
        if sharded:
            total = reduce_gram(total, self.group)
        weights = self._weights(total, GLOBAL_INDEX)
        gather_extra = 0
        done = []
        for record in pending:
            if record.sharded is not None:
                gather, extra = start_gather_combined(record.sharded, weights, record.out, group=self.group,
                                                      backend=settings.backend)
                gather_extra += extra
                _chain(gather, record.future)
                continue
            rows = record.rows
            dtype = rows.dtype if isinstance(rows, torch.Tensor) else rows[0].dtype
            if dtype == record.out.dtype:
                combine(rows, weights, None, out=record.out, backend=settings.backend)
            else:  # compressed rows: combine in the wire dtype, then widen into the bucket
                record.out.copy_(combine(rows, weights, None, backend=settings.backend))
            if record.average_after:
                self._average(record.out)
            done.append(record)
        runtime.note_extra_bytes(runtime.add_step_extra_bytes(0) + gather_extra)
        self.state.record(GLOBAL_INDEX, total, weights)
        for record in done:
            record.future.set_result(record.out)

    def _average(self, buf: torch.Tensor) -> None:
        # DDP's reducer multiplies by 1/world before its all-reduce; the same, bit for bit.
        world = collectives.group_size(self.group)
        buf.mul_(1.0 / world)
        collectives.all_reduce_sum(buf, self.group)
