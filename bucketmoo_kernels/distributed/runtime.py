"""``MOORuntime``: what the distributed front ends hold while they run.

The counterpart of :class:`~.settings.MOOSettings` (what to compute): counters and
statistics, the per-step diagnostics, the cached segment layouts, the stash step
machine of ``mode="stash"``, the once-per-run checks and the bucket layout of DDP's first
iteration. The :class:`~.engine.BucketEngine` and the front ends use these public methods only;
the buckets in flight are the engine's.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Sequence

import torch

from ..methods.state import MethodState

from ..inputs import Segments
from .bucket_layout import VirtualBucket, check_layout, predict_rebuilt_layout, split_bucket
from .diagnostics import BucketRecord, DiagnosticsLog
from .protocol import shard_length, shard_segments

__all__ = ["MOORuntime"]

logger = logging.getLogger("bucketmoo_kernels")


class MOORuntime:
    """Buffers, caches, counters and the stash step machine of one ``BucketMOOState``.

    Attributes (public, read by users and tests):
        step: completed optimizer steps.
        peak_extra_bytes: largest memory allocated for one bucket in flight (per step for
            ``global`` and ``stash``).
        largest_bucket_bytes: the largest bucket seen.
        stash_reassembled: stashed rows rebuilt from per-parameter views after a DDP rebuild.
        diagnostics: the :class:`DiagnosticsLog`.
        losses: ``[T]`` float64 task losses of this step, or None.
        bucket_params: bucket index -> its parameters, for the last backward.
        bucket_layout: DDP's bucket layout after its rebuild (lists of parameter indices),
            used for the first iteration; ``layout_source`` says where it came from
            (``"predicted"``, ``"observed"`` or ``"loaded"``), None until known.
    """

    def __init__(self, num_tasks: int | None = None, max_diagnostic_steps: int = 1000):
        self.num_tasks = num_tasks
        self.step = 0
        self.peak_extra_bytes = 0
        self.largest_bucket_bytes = 0
        self.stash_reassembled = 0
        self.diagnostics = DiagnosticsLog(max_diagnostic_steps)
        self.bucket_layout: list[list[int]] | None = None
        self.layout_source: str | None = None
        #: Per-bucket state of the stateful methods and of ``ema`` (index -1: ``global``);
        #: the same on every rank, checkpointed.
        self.method_states: dict[int, MethodState] = {}
        #: ``stash_reduce="combined"`` on several ranks: every rank's method states (rank ->
        #: ``snapshot()["method_states"]``), gathered at the end of each step; None otherwise.
        self.rank_method_states: dict[int, dict] | None = None
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Drop everything held between calls (not the counters, diagnostics or bucket layout)."""
        self.losses = None
        self.bucket_params: dict[int, list] = {}
        self.hook_calls = 0
        self.checked = False  # backend / settings agreement done
        self._layouts: dict = {}
        self._step_extra_bytes = 0
        self._stash: dict = {}
        self._current_task: int | None = None
        self._tasks_done: list[int] = []
        self._model_params: list | None = None  # DDP's parameters, in its initial single bucket's order
        self._observing: list[list[int]] | None = None
        self._layout_confirmed = False
        self._weight_step = None

    # ------------------------------------------------------------------ counters
    def note_bucket(self, buf: torch.Tensor) -> None:
        """Count one bucket reduction and its size (``hook_calls``, ``largest_bucket_bytes``)."""
        self.hook_calls += 1
        self.largest_bucket_bytes = max(self.largest_bucket_bytes, buf.numel() * buf.element_size())

    def begin_bucket(self, index: int, buf: torch.Tensor, params: Sequence) -> None:
        """Account for a bucket handed to the hook (statistics, its parameters)."""
        self.note_bucket(buf)
        if index == 0:
            self.bucket_params = {}
        self.bucket_params[index] = list(params)

    def begin_single_bucket(self, buf: torch.Tensor) -> None:
        """Account for DDP's initial single bucket, which the hook runs as the rebuilt buckets."""
        self.note_bucket(buf)

    def begin_backward(self) -> None:
        """The first bucket of a backward: start this step's extra-bytes count afresh."""
        self._step_extra_bytes = 0

    def finish_step(self) -> None:
        self.step += 1

    def note_extra_bytes(self, nbytes: int) -> None:
        self.peak_extra_bytes = max(self.peak_extra_bytes, int(nbytes))

    def add_step_extra_bytes(self, nbytes: int) -> int:
        """Add to this step's running extra bytes (``global``); returns the total."""
        self._step_extra_bytes += int(nbytes)
        return self._step_extra_bytes

    def reset_statistics(self) -> None:
        self.peak_extra_bytes = 0
        self.largest_bucket_bytes = 0

    def record(self, enabled: bool, index: int, gram_matrix: torch.Tensor, weights: torch.Tensor) -> None:
        """Append bucket ``index``'s diagnostics for this step when ``enabled``."""
        if enabled:
            self.diagnostics.append(BucketRecord.from_gram(self.step, index, gram_matrix, weights))

    def weight_step_at(self, settings, step: int):
        """``settings.weight_step_at(step)``, built once per step (PCGrad's per-step seed)."""
        cached = self._weight_step
        if cached is None or cached[0] is not settings or cached[1] != step:
            cached = self._weight_step = (settings, step, settings.weight_step_at(step))
        return cached[2]

    # ------------------------------------------------------------------ segment layouts
    def segments_for(self, granularity: tuple[str, int | None], index: int, numel: int,
                     param_numels: Sequence[int] | None) -> tuple[Segments, dict]:
        """The (cached) segment layout of a bucket for a parsed granularity, and the bucket's
        cache of shard layouts."""
        kind, chunk = granularity
        key = (index, numel, tuple(param_numels) if kind == "param" else None)
        cached = self._layouts.get(key)
        if cached is None:
            if kind == "param":
                if param_numels is None or sum(param_numels) != numel:
                    raise RuntimeError(
                        f"granularity='param' needs the bucket's parameter sizes to add up to its length; "
                        f"bucket {index} has {numel} elements but its parameters {param_numels}"
                    )
                segs = Segments.from_lengths(param_numels)
            elif kind == "chunk":
                segs = Segments.chunks(numel, chunk)
            else:
                segs = Segments.single(numel)
            cached = {"segments": segs, "shards": {}}
            if len(self._layouts) > 4096:
                self._layouts.clear()
            self._layouts[key] = cached
        return cached["segments"], cached["shards"]

    @staticmethod
    def shard_segments_for(segments: Segments, shards: dict, rank: int, world: int) -> Segments:
        m = shard_length(segments.numel, world)
        key = (rank, m)
        if key not in shards:
            shards[key] = shard_segments(segments, rank, m)
        return shards[key]

    # ------------------------------------------------------------------ DDP's first iteration
    def first_iteration_buckets(self, bucket, bucket_cap_mb: float | None) -> list[VirtualBucket] | None:
        """When ``bucket`` is DDP's initial single bucket (index 0, the last, every parameter),
        the buckets of the layout DDP uses after its rebuild, over a copy of its buffer; None
        when the bucket is already one of the real buckets."""
        if bucket.index() != 0 or not bucket.is_last():
            return None
        params = list(bucket.parameters())
        if self._model_params is None:
            self._model_params = params  # the first bucket ever seen holds every parameter
        elif [id(p) for p in params] != [id(p) for p in self._model_params]:
            return None
        if self.bucket_layout is None or sum(len(b) for b in self.bucket_layout) != len(params):
            if self.bucket_layout is not None:
                logger.warning("bucketmoo_kernels: the saved bucket layout covers %d parameters, this DDP model "
                               "has %d; predicting the layout instead", sum(len(b) for b in self.bucket_layout),
                               len(params))
            self.bucket_layout = predict_rebuilt_layout(params, bucket_cap_mb)
            self.layout_source = "predicted"
        if self.bucket_layout == [list(range(len(params)))]:
            return None  # the single bucket is the real layout
        self._observing = []
        return split_bucket(bucket.buffer(), params, self.bucket_layout)

    def observe_bucket(self, bucket, order_matters: bool = True) -> None:
        """After DDP's rebuild: record the real layout once, and warn (on rank 0) when it differs
        from the one the first iteration used in a way that changed that iteration's result:
        other bucket members, or another order inside a bucket where ``order_matters`` (chunk
        segments cut across parameters; bucket and param segments do not depend on the order)."""
        if self._observing is None or self._layout_confirmed or isinstance(bucket, VirtualBucket):
            return
        index_of = {id(p): i for i, p in enumerate(self._model_params or [])}
        indices = [index_of.get(id(p)) for p in bucket.parameters()]
        if None in indices:
            self._observing = None
            return
        if bucket.index() == 0:
            self._observing = []
        self._observing.append(indices)
        if bucket.is_last():
            observed, self._observing = self._observing, None
            if observed == [list(range(len(index_of)))] and bucket.index() == 0:
                self._observing = []  # still the single bucket (static_graph's 2nd iteration)
                return
            self._layout_confirmed = True
            if observed != self.bucket_layout:
                members_differ = [sorted(b) for b in observed] != [sorted(b) for b in self.bucket_layout or []]
                log = logger.warning if (members_differ or order_matters) and _is_rank_zero() else logger.debug
                log("bucketmoo_kernels: DDP rebuilt its buckets as %s, not as the predicted %s (the gradients "
                    "did not become ready in reverse parameter order, or bucket_cap_mb differs from DDP's); the "
                    "first iteration used the predicted buckets. The observed layout is kept in state_dict() "
                    "for resumed runs.", observed, self.bucket_layout)
                self.bucket_layout = observed
                self.layout_source = "observed"

    def load_layout(self, layout) -> None:
        if layout is None:
            self.bucket_layout, self.layout_source = None, None
            return
        self.bucket_layout = check_layout(layout, sum(len(b) for b in layout))
        self.layout_source = "loaded"

    # ------------------------------------------------------------------ stash step machine
    @property
    def current_task(self) -> int | None:
        return self._current_task

    def final_task(self) -> bool:
        """The running task's backward is the last of the step (it combines)."""
        return len(self._tasks_done) == self.num_tasks - 1

    def stash_bucket(self, task: int, buf: torch.Tensor, params) -> None:
        """Keep a copy of task ``task``'s bucket (keyed by its parameters, so that a row can be
        re-assembled after DDP rebuilds its buckets)."""
        entry = self._stash.setdefault(task, {"flats": {}, "views": {}})
        flat = buf.clone()
        entry["flats"][tuple(id(p) for p in params)] = flat
        offset = 0
        for p in params:
            entry["views"][id(p)] = flat[offset:offset + p.numel()]
            offset += p.numel()
        stashed = sum(f.numel() * f.element_size() for e in self._stash.values() for f in e["flats"].values())
        self.note_extra_bytes(stashed)

    def stashed_row(self, task: int, buf: torch.Tensor, params) -> torch.Tensor:
        """Task ``task``'s stashed gradient of the bucket holding ``params``."""
        entry = self._stash.get(task)
        if entry is None:
            raise RuntimeError(f"stash mode: nothing was stashed for task {task} in this step")
        flat = entry["flats"].get(tuple(id(p) for p in params))
        if flat is not None:
            return flat
        # DDP rebuilt its buckets since this task was stashed (it does so once, after the first
        # backward): assemble the row from the per-parameter views of the stash.
        self.stash_reassembled += 1
        parts = [entry["views"].get(id(p)) for p in params]
        parts = [v if v is not None else buf.new_zeros(p.numel()) for v, p in zip(parts, params)]
        return torch.cat(parts) if parts else buf.new_zeros(0)

    @contextlib.contextmanager
    def task(self, task_id: int):
        """The stash step machine around one task's backward (see ``BucketMOOState.task``)."""
        if isinstance(task_id, bool) or not isinstance(task_id, int) or not 0 <= task_id < self.num_tasks:
            raise ValueError(f"task_id must be an int in [0, {self.num_tasks}); got {task_id!r}")
        if task_id in self._tasks_done:
            raise RuntimeError(
                f"task {task_id} was already back-propagated in this step (done: {self._tasks_done}); "
                f"each of the {self.num_tasks} tasks runs exactly once per optimizer step"
            )
        if self._current_task is not None:
            raise RuntimeError(f"state.task({task_id}) entered inside state.task({self._current_task})")
        self._current_task = task_id
        calls = self.hook_calls
        try:
            yield
        except BaseException:
            self._current_task = None
            self._stash.clear()
            self._tasks_done = []
            raise
        self._current_task = None
        if self.hook_calls == calls:
            self._stash.clear()
            self._tasks_done = []
            raise RuntimeError(
                f"bucket_moo_hook did not run during the backward of task {task_id}: DDP did not reduce "
                "this backward. Causes: a second backward(retain_graph=True) on the same forward (DDP "
                "reduces only the first backward after each forward: run one forward per task), or "
                "DDP.no_sync() (gradient accumulation is not supported in stash mode), or no backward "
                "inside the block. The step's stash was discarded."
            )
        self._tasks_done.append(task_id)
        if len(self._tasks_done) == self.num_tasks:
            self._tasks_done = []
            self._stash.clear()
            self.finish_step()

    def method_state_for(self, index: int) -> MethodState:
        """Bucket ``index``'s :class:`MethodState` (created on first use)."""
        state = self.method_states.get(index)
        if state is None:
            state = self.method_states[index] = MethodState(strict=False)
        return state

    def snapshot(self) -> dict[str, Any]:
        """The checkpointed part: counters, the bucket layout and the method states."""
        return {"step": self.step, "peak_extra_bytes": self.peak_extra_bytes,
                "method_states": {int(k): v.state_dict() for k, v in self.method_states.items()},
                "bucket_layout": None if self.bucket_layout is None else [list(b) for b in self.bucket_layout]}


def _is_rank_zero() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
