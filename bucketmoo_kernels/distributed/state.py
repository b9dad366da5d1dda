"""``BucketMOOState``: the settings and the runtime of the Bucket-Level MOO front ends.

Modelled on PyTorch's ``PowerSGDState``: a validating ``__init__`` whose errors name the
argument, ``state_dict()`` / ``load_state_dict()`` and pickling without the process group.
It is two parts: :class:`~.settings.MOOSettings` (``state.settings``, frozen: what is
computed) and :class:`~.runtime.MOORuntime` (``state.runtime``: buffers, caches, the stash
step machine, counters, diagnostics, method states). The front ends run their buckets through
a :class:`~.engine.BucketEngine` over the state (``state.engine`` for the DDP hook).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import torch
import torch.distributed as dist

from . import collectives
from .agreement import agree_settings
from .engine import BucketEngine
from .protocol import TaskLayout
from .runtime import MOORuntime
from .settings import (COMPRESSIONS, MODES, PROTOCOLS, SETTING_FIELDS, STASH_REDUCTIONS, MOOSettings, check_bool,
                       parse_granularity, settings_dict, settings_differences, settings_from_dict)

__all__ = ["BucketMOOState", "MODES", "PROTOCOLS", "COMPRESSIONS", "STASH_REDUCTIONS", "parse_granularity"]

logger = logging.getLogger("bucketmoo_kernels")

#: 2: adds ``bucket_cap_mb`` and ``bucket_layout`` (DDP's bucket layout after its rebuild).
_STATE_DICT_VERSION = 2

#: The runtime's attributes that ``BucketMOOState`` exposes (read and write) as its own.
RUNTIME_ATTRIBUTES = ("step", "peak_extra_bytes", "largest_bucket_bytes", "stash_reassembled", "diagnostics",
                      "losses", "bucket_params")
#: Settings that may change between steps (on every rank): not compared by ``load_state_dict``.
SWITCHABLE_SETTINGS = ("record_diagnostics",)


class BucketMOOState:
    r"""State of :func:`~bucketmoo_kernels.ddp.bucket_moo_hook` (and of the FSDP2 path):
    resolve task-gradient conflicts per bucket.

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
    * ``**method_options``: the method's options (``mgda``: solver, max_iter >= 1, tol >= 0;
      ``pcgrad``: seed -- the base seed; the hook uses ``seed + step`` so that every rank
      draws the same task order and the order changes every step; ``cagrad``: c >= 0,
      rescale in 0/1/2). Types and ranges are checked here.

    Settings -- where the task gradients come from:

    * ``mode="ranks"`` (tasks on ranks, the scalable one): rank r's bucket holds the
      gradient of task ``task_of_rank[r]`` (default: task r). Every task needs the same number
      of ranks (P / T); their gradients are averaged into the task gradient.
    * ``mode="stash"``: every rank back-propagates each of ``num_tasks`` tasks in turn inside
      ``with state.task(t):``; the hook stashes the buckets and combines on the last task.
      Costs T-1 stashed gradient copies per rank.
    * ``protocol`` (ranks mode, ``"sharded"``): ``"sharded"`` moves the bytes of a ring
      all-reduce and holds O(bucket) extra; ``"allgather"`` gathers every rank's bucket
      (P x bucket memory, (P-1) x bucket received) -- a baseline for small P. The
      element-wise methods (``graddrop``, ``trimmed_mean``: not functions of the Gram) need
      ``protocol="allgather"`` or ``mode="stash"``, and not ``granularity="global"`` nor
      ``ema``; other combinations raise ``ValueError`` here, before a hook is registered.
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
      and launches k's all-gather, which completes in the background. Costs up to two
      buckets in flight. False: each bucket is finished inside its own hook call.
    * ``backend`` (``"auto"``): kernel backend for Gram and combine.
    * ``record_diagnostics`` (False): record per step and bucket the weights, task cosines,
      combined vs average norm, min-norm residual and whether the Gram was finite in
      ``state.diagnostics`` (a :class:`~bucketmoo_kernels.distributed.diagnostics.DiagnosticsLog`);
      ``max_diagnostic_steps`` bounds it. Off: nothing is computed or stored.
    * ``bucket_cap_mb`` (None): the ``bucket_cap_mb`` given to ``DistributedDataParallel``
      (None: DDP's default). DDP's first iteration (two with ``static_graph=True``) runs with
      one bucket holding every parameter; the hook runs it as the buckets DDP builds after
      that iteration, predicted from this cap and the parameter order, so that the first step
      is bucket-level too and a resumed run equals an uninterrupted one (docs/ddp.md).

    Every rank must use the same settings: the first hook call compares them across ranks
    (one all-gather of a few int64) and raises ``ValueError`` on every rank naming the ones
    that differ.

    Statistics: ``step`` (completed optimizer steps), ``peak_extra_bytes`` (largest memory the
    hook allocated for one bucket in flight; for ``global`` and ``stash``, for the whole
    step) and ``largest_bucket_bytes`` (the largest bucket seen), both since construction;
    ``stash_reassembled`` counts stashed rows rebuilt from per-parameter views because DDP
    rebuilt its buckets between the tasks of a step.

    Non-finite gradients are not checked (no host sync): a segment whose Gram is not finite
    gets NaN weights on every backend, so its combined gradient is NaN and
    ``torch.amp.GradScaler`` sees it and skips the step.
    """

    __slots__ = ("_process_group", "settings", "runtime", "_tasks", "_engine")

    def __init__(self, method: str = "mgda", mode: str = "ranks", granularity: str = "bucket",
                 process_group: dist.ProcessGroup | None = None, task_of_rank: Sequence[int] | None = None,
                 *, num_tasks: int | None = None, protocol: str = "sharded", compress: str | None = None,
                 stash_reduce: str = "tasks", normalization: str = "none", normalize_weights: bool = True,
                 overlap: bool = True, backend: str = "auto", record_diagnostics: bool = False,
                 max_diagnostic_steps: int = 1000, bucket_cap_mb: float | None = None, **method_options: Any):
        given = locals()  # every setting is an argument of the same name (SETTING_FIELDS)
        settings = MOOSettings.build(**{f.name: given[f.name] for f in SETTING_FIELDS if f.name != "method_options"},
                                     **method_options)
        object.__setattr__(self, "_process_group", process_group)
        object.__setattr__(self, "settings", settings)
        object.__setattr__(self, "runtime", MOORuntime(settings.num_tasks, settings.max_diagnostic_steps))
        object.__setattr__(self, "_tasks", None)
        object.__setattr__(self, "_engine", None)
        if settings.mode == "ranks" and dist.is_available() and dist.is_initialized():
            self.task_layout()  # validate task_of_rank against the group now

    # ------------------------------------------------------------------ attribute access
    # Every setting is a read-only property and every runtime counter a read-write one, made
    # below the class from ``dataclasses.fields(MOOSettings)`` and :data:`RUNTIME_ATTRIBUTES`
    # (no name is listed twice); ``__slots__`` refuses any other attribute.
    @property
    def process_group(self) -> dist.ProcessGroup | None:
        return self._process_group

    @process_group.setter
    def process_group(self, group: dist.ProcessGroup | None) -> None:
        object.__setattr__(self, "_process_group", group)
        object.__setattr__(self, "_tasks", None)  # rebuilt for the new group on first use
        object.__setattr__(self, "_engine", None)

    @property
    def engine(self) -> BucketEngine:
        """The :class:`~.engine.BucketEngine` of the DDP hook, over :attr:`process_group` (built on
        first use; FSDP2 and DeepSpeed build their own over their group)."""
        if self._engine is None:
            object.__setattr__(self, "_engine", BucketEngine(self, self.process_group))
        return self._engine

    @property
    def method_options(self) -> dict[str, Any]:
        return self.settings.options

    # ------------------------------------------------------------------ derived settings
    def task_layout(self) -> TaskLayout:
        """Ranks mode: the validated :class:`TaskLayout` of the process group (built on first use;
        ``ValueError`` naming ``task_of_rank`` when the ranks do not fit the tasks)."""
        if self._tasks is None:
            world = collectives.group_size(self.process_group)
            object.__setattr__(self, "_tasks", TaskLayout.build(self.settings.task_of_rank, world,
                                                                self.settings.num_tasks))
        return self._tasks

    @property
    def total_tasks(self) -> int:
        """T: ``num_tasks`` in stash mode, the number of tasks of ``task_of_rank`` in ranks mode."""
        if self.settings.mode == "stash":
            return self.settings.num_tasks
        return self.task_layout().num_tasks

    @property
    def wire_dtype(self) -> torch.dtype | None:
        return self.settings.wire_dtype

    @property
    def plain_average(self) -> bool:
        """See :attr:`MOOSettings.plain_average`."""
        return self.settings.plain_average

    def method_call_options(self) -> dict[str, Any]:
        """The method options for this step (PCGrad-style ``seed`` becomes ``seed + step``)."""
        return self.settings.method_call_options(self.runtime.step)

    def weight_step(self):
        """The :class:`~bucketmoo_kernels.weight_step.WeightStep` of the current optimizer step
        (built once by the settings; PCGrad-style seeds advance with the step)."""
        return self.runtime.weight_step_at(self.settings, self.runtime.step)

    def solve_kwargs(self, index: int | None = None) -> dict[str, Any]:
        """Keyword arguments of :func:`~bucketmoo_kernels.distributed.protocol.solve_weights` for
        this step, after the weight step: ``losses``, ``backend`` and, for a weight step that
        keeps state (gradvac, pcd, ``ema``), bucket ``index``'s ``method_state`` (-1: global)."""
        kwargs = dict(losses=self.runtime.losses, backend=self.settings.backend)
        if index is not None and self.weight_step().needs_state:
            kwargs["method_state"] = self.runtime.method_state_for(index)
        return kwargs

    def record(self, index: int, gram_matrix: torch.Tensor, weights: torch.Tensor) -> None:
        """Append bucket ``index``'s diagnostics for this step (nothing when recording is off)."""
        self.runtime.record(self.settings.record_diagnostics, index, gram_matrix, weights)

    def note_extra_bytes(self, nbytes: int) -> None:
        self.runtime.note_extra_bytes(nbytes)

    def reset_statistics(self) -> None:
        """Zero ``peak_extra_bytes`` and ``largest_bucket_bytes``."""
        self.runtime.reset_statistics()

    def check_once(self, device: torch.device, protocol: str) -> None:
        """First reduction: every rank agrees on the settings (``ValueError`` naming the ones that
        differ), then the process group's backend must be able to run ``protocol`` on ``device``."""
        if self.runtime.checked:
            return
        agree_settings(self.settings, self.process_group, device)
        collectives.check_backend(collectives.backend_name(self.process_group), device, protocol)
        self.runtime.checked = True

    @property
    def bucket_layout(self) -> list[list[int]] | None:
        """DDP's bucket layout after its rebuild (parameter indices per bucket), predicted or
        observed; what the first iteration of a fresh DDP runs as. None until the hook ran."""
        return self.runtime.bucket_layout

    # ------------------------------------------------------------------ public helpers
    def set_losses(self, losses) -> None:
        """Per-task losses ``[T]`` for ``normalization='loss'/'loss+'`` (same on every rank).

        In ranks mode every rank knows only its own loss: use :meth:`gather_losses`.
        """
        t = torch.as_tensor(losses, dtype=torch.float64).detach().cpu()
        if t.shape != (self.total_tasks,):
            raise ValueError(f"losses must have shape [T] = [{self.total_tasks}]; got {tuple(t.shape)}")
        self.runtime.losses = t

    def gather_losses(self, local_loss) -> torch.Tensor:
        """Ranks mode: all-gather every rank's loss, average per task, :meth:`set_losses`.

        A collective: every rank of the group must call it (before backward).
        Returns the ``[T]`` float64 task losses.
        """
        if self.settings.mode != "ranks":
            raise RuntimeError("gather_losses is for mode='ranks'; in mode='stash' call set_losses")
        tasks = self.task_layout()
        # Gather on the loss's own device: NCCL cannot move CPU tensors.
        device = local_loss.device if isinstance(local_loss, torch.Tensor) else torch.device("cpu")
        mine = torch.as_tensor(local_loss, dtype=torch.float64).detach().reshape(1).to(device)
        allv = torch.empty(tasks.world_size, dtype=torch.float64, device=device)
        collectives.all_gather_flat(allv, mine, self.process_group)
        allv = allv.cpu()
        per_task = torch.stack([allv[list(rs)].mean() for rs in tasks.ranks_of_task])
        self.set_losses(per_task)
        return per_task

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
        if self.settings.mode != "stash":
            raise RuntimeError(f"state.task() is for mode='stash'; this state has mode={self.settings.mode!r}")
        return self.runtime.task(task_id)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Settings, counters, DDP's bucket layout and the method states (not the process group,
        buffers or diagnostics); plain data and tensors, loadable with ``weights_only=True``.

        Stash mode with ``stash_reduce="combined"`` on several ranks: each rank solves its own
        weights, so the method states differ between ranks; ``"rank_method_states"`` then holds
        every rank's (gathered at the end of each step), so that rank 0's dict alone resumes
        every rank exactly.
        """
        snap = self.runtime.snapshot()
        out = {"version": _STATE_DICT_VERSION, **settings_dict(self.settings)}
        out.update(step=snap["step"], peak_extra_bytes=snap["peak_extra_bytes"], bucket_layout=snap["bucket_layout"],
                   method_states=snap["method_states"])
        if self.runtime.rank_method_states is not None:
            out["rank_method_states"] = self.runtime.rank_method_states
        return out

    def load_state_dict(self, state_dict: dict[str, Any], *, replace_settings: bool = False) -> None:
        """Restore :meth:`state_dict` output (validated like ``__init__``); keeps the process group.

        The checkpoint's settings must equal this state's (``record_diagnostics`` aside, which may
        be switched between steps): a difference raises ``ValueError`` naming each differing
        setting with its saved and built value, since resuming with other settings (another
        method, ``task_of_rank``, ``bucket_cap_mb``, ...) would not continue the saved run.
        ``replace_settings=True`` adopts the checkpoint's settings instead of the built ones.

        Version 1 dicts (before ``bucket_cap_mb`` and ``bucket_layout``) load with DDP's default
        cap and a predicted layout.
        """
        sd = dict(state_dict)
        version = sd.pop("version", None)
        if version not in (1, _STATE_DICT_VERSION):
            raise ValueError(f"state_dict version must be 1 or {_STATE_DICT_VERSION}; got {version!r}")
        replace_settings = check_bool("replace_settings", replace_settings)
        step = sd.pop("step", 0)
        peak = sd.pop("peak_extra_bytes", 0)
        layout = sd.pop("bucket_layout", None)
        method_states = sd.pop("method_states", {})
        rank_states = sd.pop("rank_method_states", None)
        saved = settings_from_dict(sd)
        if not replace_settings:
            differ = settings_differences(saved, self.settings, ignore=SWITCHABLE_SETTINGS)
            if differ:
                lines = "\n".join(f"  {name}: saved {a!r}, built {b!r}" for name, a, b in differ)
                raise ValueError(
                    "load_state_dict: the checkpoint's settings differ from the ones this BucketMOOState was "
                    f"built with:\n{lines}\nBuild the state with the saved settings to resume that run, or "
                    "pass replace_settings=True to adopt the checkpoint's settings")
            saved = self.settings  # equal where it matters: keep what the user built
        runtime = MOORuntime(saved.num_tasks, saved.max_diagnostic_steps)
        runtime.load_layout(layout)
        runtime.step = int(step)
        runtime.peak_extra_bytes = int(peak)
        if rank_states is not None:
            runtime.rank_method_states = {int(r): dict(v) for r, v in rank_states.items()}
            mine = rank_states.get(self._group_rank())
            if mine is not None:
                method_states = mine
        for key, value in method_states.items():
            runtime.method_state_for(int(key)).load_state_dict(value)
        object.__setattr__(self, "settings", saved)
        object.__setattr__(self, "runtime", runtime)
        object.__setattr__(self, "_tasks", None)
        object.__setattr__(self, "_engine", None)
        if saved.mode == "ranks" and dist.is_available() and dist.is_initialized():
            self.task_layout()  # validate task_of_rank against the group now

    def gather_rank_method_states(self, device: torch.device) -> None:
        """Stash mode with ``stash_reduce="combined"``: all-gather every rank's method states into
        ``runtime.rank_method_states`` (a collective; two small all-gathers on ``device``), so that
        any rank's :meth:`state_dict` can resume every rank."""
        snap = {int(k): v.state_dict() for k, v in sorted(self.runtime.method_states.items())}
        parts = []
        for index, entry in snap.items():
            parts.append(torch.tensor([float(entry["calls"])], dtype=torch.float64))
            parts.extend(entry["tensors"][name].reshape(-1) for name in sorted(entry["tensors"]))
        mine = torch.cat(parts).to(device) if parts else torch.zeros(0, dtype=torch.float64, device=device)
        group = self.process_group
        world = collectives.group_size(group)
        lengths = torch.empty(world, dtype=torch.int64, device=device)
        collectives.all_gather_flat(lengths, torch.tensor([mine.numel()], dtype=torch.int64, device=device), group)
        if bool((lengths != mine.numel()).any()):
            raise RuntimeError(f"the ranks' method states have different sizes {lengths.tolist()}: the ranks ran "
                               "different bucket layouts")
        gathered = torch.empty(world * mine.numel(), dtype=torch.float64, device=device)
        collectives.all_gather_flat(gathered, mine, group)
        gathered = gathered.view(world, -1).cpu()
        per_rank = {}
        for rank in range(world):
            row, offset, states = gathered[rank], 0, {}
            for index, entry in snap.items():
                calls = int(row[offset])
                offset += 1
                tensors = {}
                for name in sorted(entry["tensors"]):
                    like = entry["tensors"][name]
                    tensors[name] = row[offset:offset + like.numel()].reshape(like.shape).clone()
                    offset += like.numel()
                states[index] = {"calls": calls, "tensors": tensors}
            per_rank[rank] = states
        self.runtime.rank_method_states = per_rank

    def _group_rank(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return collectives.group_rank(self.process_group)
        return 0

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the settings and counters; the process group is not serialisable and dropped."""
        logger.warning("NOTE: the process group is not serializable and is excluded from a saved "
                       "BucketMOOState.")
        return self.state_dict()

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a pickled state on the default process group (set ``process_group`` after)."""
        object.__setattr__(self, "_process_group", None)
        object.__setattr__(self, "_tasks", None)
        object.__setattr__(self, "_engine", None)
        object.__setattr__(self, "settings", MOOSettings())
        self.load_state_dict(state, replace_settings=True)

    def __repr__(self) -> str:
        s = self.settings
        return (f"BucketMOOState(method={s.method!r}, mode={s.mode!r}, granularity={s.granularity!r}, "
                f"protocol={s.protocol!r}, compress={s.compress!r}, step={self.runtime.step})")


def _setting_property(name: str) -> property:
    def get(self):
        return getattr(self.settings, name)

    def set_(self, value):
        if name in SWITCHABLE_SETTINGS:  # may be switched on and off between steps (on every rank)
            object.__setattr__(self, "settings", dataclasses.replace(self.settings, **{name: check_bool(name, value)}))
            return
        raise AttributeError(f"BucketMOOState.{name} is a setting and settings are fixed once built; build a new "
                             "BucketMOOState (or load_state_dict(..., replace_settings=True)) to change it")

    return property(get, set_, doc=f"The ``{name}`` setting (``state.settings.{name}``).")


def _runtime_property(name: str) -> property:
    return property(lambda self: getattr(self.runtime, name), lambda self, value: setattr(self.runtime, name, value),
                    doc=f"``state.runtime.{name}``.")


for _field in dataclasses.fields(MOOSettings):
    if not _field.name.startswith("_") and _field.name != "method_options":
        setattr(BucketMOOState, _field.name, _setting_property(_field.name))
for _name in RUNTIME_ATTRIBUTES:
    setattr(BucketMOOState, _name, _runtime_property(_name))
del _field, _name
