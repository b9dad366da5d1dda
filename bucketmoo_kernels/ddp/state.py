"""``BucketMOOState``: the settings, buffers and statistics of :func:`bucket_moo_hook`.

Modelled on PyTorch's ``PowerSGDState``: grouped fields, a validating ``__init__`` whose
errors name the argument, ``state_dict()`` / ``load_state_dict()`` and pickling without the
process group.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..dispatch import BACKEND_NAMES
from ..inputs import Segments
from ..methods import NORMALIZATIONS, get_method, resolve_options
from . import collectives
from .diagnostics import BucketRecord, DiagnosticsLog
from .protocol import TaskLayout, shard_length, shard_segments

__all__ = ["BucketMOOState", "MODES", "PROTOCOLS", "COMPRESSIONS", "STASH_REDUCTIONS"]

logger = logging.getLogger("bucketmoo_kernels")

MODES = ("ranks", "stash")
PROTOCOLS = ("sharded", "allgather")
COMPRESSIONS = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
STASH_REDUCTIONS = ("tasks", "combined")
_STATE_DICT_VERSION = 1


def parse_granularity(granularity: str) -> tuple[str, int | None]:
    """``"bucket" | "param" | "global" | "chunk:<n>"`` -> (kind, chunk length or None)."""
    if granularity in ("bucket", "param", "global"):
        return granularity, None
    if isinstance(granularity, str) and granularity.startswith("chunk:"):
        try:
            n = int(granularity.split(":", 1)[1])
        except ValueError:
            n = 0
        if n > 0:
            return "chunk", n
    raise ValueError(
        "granularity must be 'bucket', 'param', 'global' or 'chunk:<n>' with a positive element count n; "
        f"got {granularity!r}"
    )


class BucketMOOState:
    r"""State of :func:`bucket_moo_hook`: resolve task-gradient conflicts per DDP bucket.

    Settings -- what is computed:

    * ``method`` (default ``"mgda"``): any registered method (``available_methods()``).
      ``"mean"`` is plain averaging and reproduces DDP exactly (with diagnostics off it runs
      DDP's own all-reduce).
    * ``granularity`` (``"bucket"``): one weight vector per DDP bucket (the paper's choice).
      ``"param"``: one per parameter in the bucket; ``"chunk:<n>"``: one per n elements;
      ``"global"``: one for the whole model (classic MGDA, the baseline): its Gram is the sum
      of the bucket Grams, so every bucket is held until the last one arrives -- T/P model
      copies extra per rank (sharded) or T model copies (stash / allgather), and no overlap.
      Finer granularities cost S*T*T floats of all-reduce and S small solves per bucket.
    * ``normalization`` (``"none"``), ``normalize_weights`` (True): see
      :func:`bucketmoo_kernels.solve`. Loss-based normalisations need :meth:`set_losses`.
    * ``**method_options``: the method's options (``mgda``: solver, max_iter, tol;
      ``pcgrad``: seed -- the base seed; the hook uses ``seed + step`` so that every rank
      draws the same task order and the order changes every step; ``cagrad``: c, rescale).

    Settings -- where the task gradients come from:

    * ``mode="ranks"`` (tasks on ranks, the scalable one): rank r's bucket holds the
      gradient of task ``task_of_rank[r]`` (default: task r). Every task needs the same number
      of ranks (P / T); their gradients are averaged into the task gradient.
    * ``mode="stash"``: every rank back-propagates each of ``num_tasks`` tasks in turn inside
      ``with state.task(t):``; the hook stashes the buckets and combines on the last task.
      Costs T-1 stashed gradient copies per rank.
    * ``protocol`` (ranks mode, ``"sharded"``): ``"sharded"`` moves the bytes of a ring
      all-reduce and holds O(bucket) extra; ``"allgather"`` gathers every rank's bucket
      (P x bucket memory, (P-1) x bucket received) -- a baseline for small P.
    * ``compress`` (ranks mode, None): ``"bf16"`` / ``"fp16"`` sends the shards in half
      precision (half the bytes; the Gram is still accumulated in fp32 from the received
      values, and every rank applies the same rounded values, so replicas stay identical).
      fp16 overflows above 65504: scale the loss (AMP) accordingly.
    * ``stash_reduce`` (stash mode, ``"tasks"``): ``"tasks"`` averages every task's bucket
      over the ranks as it arrives (T all-reduces; the weights are those of the averaged task
      gradients, identical on every rank); ``"combined"`` combines the local task gradients
      first and all-reduces the result once (1/T of the traffic, but each rank's weights come
      from its own micro-batch).
    * ``process_group``: the DDP process group (None: the default group).

    Settings -- execution:

    * ``overlap`` (True; ranks mode, sharded protocol, not ``global``): pipeline the buckets.
      The hook of bucket k launches k's all-to-all and returns; the hook of bucket k+1 (or
      the last bucket's own call) finishes k -- Gram, the tiny all-reduce, solve, combine --
      and launches k's all-gather, which completes in the background. The big transfers then
      overlap the backward like DDP's all-reduce does; every collective is still issued from
      the autograd thread in bucket order, so all ranks issue them in the same order. Costs
      up to two buckets in flight. False: each bucket is finished inside its own hook call.

    * ``backend`` (``"auto"``): kernel backend for Gram and combine.
    * ``record_diagnostics`` (False): record per step and bucket the weights, task cosines,
      combined vs average norm and min-norm residual in ``state.diagnostics``
      (a :class:`~bucketmoo_kernels.ddp.diagnostics.DiagnosticsLog`); ``max_diagnostic_steps``
      bounds it. Off: nothing is computed or stored.

    Statistics: ``step`` (completed optimizer steps), ``peak_extra_bytes`` (largest memory the
    hook allocated for one bucket in flight; for ``global`` and ``stash``, for the whole
    step) and ``largest_bucket_bytes`` (the largest bucket seen), both since construction;
    ``stash_reassembled`` counts stashed rows rebuilt from per-parameter views because DDP
    rebuilt its buckets between the tasks of a step (it does so once, in the first step).

    Non-finite gradients are not checked (no host sync): NaN/Inf propagate into the combined
    gradient, so ``torch.amp.GradScaler`` sees them and skips the step.
    """

    __slots__ = [
        "process_group",
        # what is computed
        "method",
        "method_options",
        "granularity",
        "normalization",
        "normalize_weights",
        # where the task gradients come from
        "mode",
        "task_of_rank",
        "num_tasks",
        "protocol",
        "compress",
        "stash_reduce",
        # execution
        "overlap",
        "backend",
        "record_diagnostics",
        "max_diagnostic_steps",
        # statistics
        "step",
        "peak_extra_bytes",
        "largest_bucket_bytes",
        "stash_reassembled",
        "diagnostics",
        # internal buffers (not checkpointed)
        "losses",
        "bucket_params",
        "_tasks",
        "_layouts",
        "_pending",
        "_stash",
        "_current_task",
        "_tasks_done",
        "_hook_calls",
        "_step_extra_bytes",
        "_checked",
        "_inflight",
    ]

    def __init__(self, method: str = "mgda", mode: str = "ranks", granularity: str = "bucket",
                 process_group: dist.ProcessGroup | None = None, task_of_rank: Sequence[int] | None = None,
                 *, num_tasks: int | None = None, protocol: str = "sharded", compress: str | None = None,
                 stash_reduce: str = "tasks", normalization: str = "none", normalize_weights: bool = True,
                 overlap: bool = True, backend: str = "auto", record_diagnostics: bool = False, max_diagnostic_steps: int = 1000,
                 **method_options: Any):
        spec = get_method(method)  # ValueError listing the known methods
        resolve_options(spec, method_options)  # TypeError naming unknown options
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        parse_granularity(granularity)
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}; got {protocol!r}")
        if compress not in COMPRESSIONS:
            raise ValueError(f"compress must be None, 'bf16' or 'fp16'; got {compress!r}")
        if compress is not None and mode != "ranks":
            raise ValueError(f"compress={compress!r} applies to mode='ranks' (the exchanged shards); "
                             f"got mode={mode!r}")
        if stash_reduce not in STASH_REDUCTIONS:
            raise ValueError(f"stash_reduce must be one of {STASH_REDUCTIONS}; got {stash_reduce!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}; got {normalization!r}")
        if backend != "auto" and backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}; got {backend!r}")
        if num_tasks is not None and (isinstance(num_tasks, bool) or not isinstance(num_tasks, int)
                                      or num_tasks < 1):
            raise ValueError(f"num_tasks must be a positive int or None; got {num_tasks!r}")
        if mode == "stash":
            if num_tasks is None:
                raise ValueError("mode='stash' needs num_tasks (how many backward passes, one per task, "
                                 "make one optimizer step)")
            if task_of_rank is not None:
                raise ValueError("task_of_rank applies to mode='ranks'; in mode='stash' every rank "
                                 "back-propagates every task")
        if not isinstance(max_diagnostic_steps, int) or max_diagnostic_steps < 1:
            raise ValueError(f"max_diagnostic_steps must be a positive int; got {max_diagnostic_steps!r}")

        self.process_group = process_group
        self.method = method
        self.method_options = dict(method_options)
        self.granularity = granularity
        self.normalization = normalization
        self.normalize_weights = bool(normalize_weights)
        self.mode = mode
        self.task_of_rank = None if task_of_rank is None else tuple(int(t) for t in task_of_rank)
        self.num_tasks = num_tasks
        self.protocol = protocol
        self.compress = compress
        self.stash_reduce = stash_reduce
        self.overlap = bool(overlap)
        self.backend = backend
        self.record_diagnostics = bool(record_diagnostics)
        self.max_diagnostic_steps = max_diagnostic_steps
        self.step = 0
        self.peak_extra_bytes = 0
        self.largest_bucket_bytes = 0
        self.stash_reassembled = 0
        self.diagnostics = DiagnosticsLog(max_diagnostic_steps)
        self._reset_buffers()
        if mode == "ranks" and dist.is_available() and dist.is_initialized():
            self._task_layout()  # validate task_of_rank against the group now

    # ------------------------------------------------------------------ internals
    def _reset_buffers(self) -> None:
        self.losses = None
        self.bucket_params = {}
        self._tasks = None
        self._layouts = {}
        self._pending = []
        self._stash = {}
        self._current_task = None
        self._tasks_done = []
        self._hook_calls = 0
        self._step_extra_bytes = 0
        self._checked = False
        self._inflight = None

    def task_layout(self) -> TaskLayout:
        """Ranks mode: the validated :class:`TaskLayout` of the process group (built on first use;
        ``ValueError`` naming ``task_of_rank`` when the ranks do not fit the tasks)."""
        return self._task_layout()

    def _task_layout(self) -> TaskLayout:
        if self._tasks is None:
            world = collectives.group_size(self.process_group)
            self._tasks = TaskLayout.build(self.task_of_rank, world, self.num_tasks)
        return self._tasks

    @property
    def total_tasks(self) -> int:
        """T: ``num_tasks`` in stash mode, the number of tasks of ``task_of_rank`` in ranks mode."""
        if self.mode == "stash":
            return self.num_tasks
        return self._task_layout().num_tasks

    @property
    def wire_dtype(self) -> torch.dtype | None:
        return COMPRESSIONS[self.compress]

    @property
    def plain_average(self) -> bool:
        """``mean`` with nothing that needs the MOO protocol (no normalisation, compression or
        diagnostics): the engine's own average (DDP's all-reduce, FSDP's reduce-scatter) runs
        instead, bit-identical to training without bucketmoo."""
        return (self.method == "mean" and self.normalization == "none" and self.compress is None
                and not self.record_diagnostics)

    def solve_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~bucketmoo_kernels.ddp.protocol.solve_weights` for this step."""
        return dict(options=self.method_call_options(), normalization=self.normalization,
                    losses=self.losses, normalize_weights=self.normalize_weights, backend=self.backend)

    def record(self, index: int, gram_matrix: torch.Tensor, weights: torch.Tensor) -> None:
        """Append bucket ``index``'s diagnostics for this step (nothing when recording is off)."""
        if self.record_diagnostics:
            self.diagnostics.append(BucketRecord.from_gram(self.step, index, gram_matrix, weights))

    def method_call_options(self) -> dict[str, Any]:
        """The method options for this step (PCGrad-style ``seed`` becomes ``seed + step``)."""
        options = dict(self.method_options)
        spec = get_method(self.method)
        if "seed" in spec.defaults:
            options["seed"] = int(options.get("seed", spec.defaults["seed"])) + self.step
        return options

    def segments_for(self, index: int, numel: int,
                     param_numels: Sequence[int] | None) -> tuple[Segments, dict]:
        """The (cached) segment layout of a bucket for this state's granularity, and the
        bucket's cache of shard layouts."""
        kind, chunk = parse_granularity(self.granularity)
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

    def shard_segments_for(self, segments: Segments, shards: dict, rank: int, world: int) -> Segments:
        m = shard_length(segments.numel, world)
        key = (rank, m)
        if key not in shards:
            shards[key] = shard_segments(segments, rank, m)
        return shards[key]

    def reset_statistics(self) -> None:
        """Zero ``peak_extra_bytes`` and ``largest_bucket_bytes`` (e.g. after DDP's first
        iteration, which runs with one bucket holding every parameter unless
        ``static_graph=True``)."""
        self.peak_extra_bytes = 0
        self.largest_bucket_bytes = 0

    def note_extra_bytes(self, nbytes: int) -> None:
        self.peak_extra_bytes = max(self.peak_extra_bytes, int(nbytes))

    # ------------------------------------------------------------------ public helpers
    def set_losses(self, losses) -> None:
        """Per-task losses ``[T]`` for ``normalization='loss'/'loss+'`` (same on every rank).

        In ranks mode every rank knows only its own loss: use :meth:`gather_losses`.
        """
        t = torch.as_tensor(losses, dtype=torch.float64).detach().cpu()
        if t.shape != (self.total_tasks,):
            raise ValueError(f"losses must have shape [T] = [{self.total_tasks}]; got {tuple(t.shape)}")
        self.losses = t

    def gather_losses(self, local_loss) -> torch.Tensor:
        """Ranks mode: all-gather every rank's loss, average per task, :meth:`set_losses`.

        A collective: every rank of the group must call it (before backward).
        Returns the ``[T]`` float64 task losses.
        """
        if self.mode != "ranks":
            raise RuntimeError("gather_losses is for mode='ranks'; in mode='stash' call set_losses")
        tasks = self._task_layout()
        # Gather on the loss's own device: NCCL cannot move CPU tensors.
        device = local_loss.device if isinstance(local_loss, torch.Tensor) else torch.device("cpu")
        mine = torch.as_tensor(local_loss, dtype=torch.float64).detach().reshape(1).to(device)
        allv = torch.empty(tasks.world_size, dtype=torch.float64, device=device)
        collectives.all_gather_flat(allv, mine, self.process_group)
        allv = allv.cpu()
        per_task = torch.stack([allv[list(rs)].mean() for rs in tasks.ranks_of_task])
        self.set_losses(per_task)
        return per_task

    @contextlib.contextmanager
    def task(self, task_id: int):
        """Stash mode: the backward passes inside this block belong to task ``task_id``.

        Example::

            for t, loss in enumerate(task_losses(ddp_model, batches)):  # one forward per task
                with state.task(t):
                    loss.backward()
            optimizer.step()

        Raises:
            RuntimeError: not in stash mode; a task repeated within one step; or the hook never
                ran inside the block. The last one happens with a second
                ``backward(retain_graph=True)`` on the same forward (DDP reduces only the first
                backward after a forward: run one forward per task) and inside ``no_sync()``
                (stash mode does not support gradient accumulation).
        """
        if self.mode != "stash":
            raise RuntimeError(f"state.task() is for mode='stash'; this state has mode={self.mode!r}")
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
        calls = self._hook_calls
        try:
            yield self
        except BaseException:
            self._current_task = None
            self._stash.clear()
            self._tasks_done = []
            raise
        self._current_task = None
        if self._hook_calls == calls:
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
            self.step += 1

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Settings and counters (not the process group, buffers or diagnostics)."""
        return {
            "version": _STATE_DICT_VERSION,
            "method": self.method,
            "method_options": dict(self.method_options),
            "granularity": self.granularity,
            "normalization": self.normalization,
            "normalize_weights": self.normalize_weights,
            "mode": self.mode,
            "task_of_rank": self.task_of_rank,
            "num_tasks": self.num_tasks,
            "protocol": self.protocol,
            "compress": self.compress,
            "stash_reduce": self.stash_reduce,
            "overlap": self.overlap,
            "backend": self.backend,
            "record_diagnostics": self.record_diagnostics,
            "max_diagnostic_steps": self.max_diagnostic_steps,
            "step": self.step,
            "peak_extra_bytes": self.peak_extra_bytes,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (validated like ``__init__``); keeps the process group."""
        sd = dict(state_dict)
        version = sd.pop("version", None)
        if version != _STATE_DICT_VERSION:
            raise ValueError(f"state_dict version must be {_STATE_DICT_VERSION}; got {version!r}")
        step = sd.pop("step", 0)
        peak = sd.pop("peak_extra_bytes", 0)
        options = sd.pop("method_options", {})
        fresh = BucketMOOState(process_group=self.process_group, **sd, **options)
        for slot in self.__slots__:
            setattr(self, slot, getattr(fresh, slot))
        self.step = int(step)
        self.peak_extra_bytes = int(peak)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the settings and counters; the process group is not serialisable and dropped."""
        logger.warning("NOTE: the process group is not serializable and is excluded from a saved "
                       "BucketMOOState.")
        return self.state_dict()

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a pickled state on the default process group (set ``process_group`` after)."""
        self.process_group = None
        self.diagnostics = DiagnosticsLog()
        self._reset_buffers()
        self.load_state_dict(state)

    def __repr__(self) -> str:
        return (f"BucketMOOState(method={self.method!r}, mode={self.mode!r}, granularity={self.granularity!r}, "
                f"protocol={self.protocol!r}, compress={self.compress!r}, step={self.step})")
