"""Bucket-Level MOO on DeepSpeed ZeRO stages 0, 1 and 2 (tasks on ranks).

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    from bucketmoo_kernels.integrations.deepspeed import apply_bucket_moo
    apply_bucket_moo(engine, BucketMOOState(method="mgda", mode="ranks", granularity="bucket"))

DeepSpeed has no communication-hook API. Its gradient reduction is a handful of methods of
the engine (stage 0) or of the ZeRO optimizer (stages 1 and 2); :func:`apply_bucket_moo`
replaces, **on the given instance only** (the classes are untouched), the one method that
reduces one bucket of whole-parameter gradients:

* stage 0: ``engine.allreduce_and_copy(small_bucket, dp_group, ...)`` -- the gradients of
  one ``allreduce_bucket_size`` bucket, flattened, all-reduced and copied back;
* stages 1 and 2, ``contiguous_gradients=True``: ``optimizer.average_tensor(flat, dtype)`` --
  the flat independent-partition-gradient (IPG) bucket, whatever DeepSpeed would do with it
  next (all-reduce, or ``reduce_scatter=True``: per-slice reductions to the owners of the
  partitions, with ``use_multi_rank_bucket_allreduce`` on or off);
* stages 1 and 2, ``contiguous_gradients=False``: ``optimizer.buffered_reduce_fallback`` --
  the same IPG bucket as a list of gradients.

The bucket goes through the library's sharded tasks-on-ranks protocol
(:class:`bucketmoo_kernels.distributed.engine.BucketEngine`: all-to-all of the shards, partial
Gram, all-reduce of the tiny Gram, the same solve on every rank, combine of the own shard,
all-gather), which moves the bytes of a ring all-reduce: no more than DeepSpeed's own
all-reduce of the bucket. The combined gradient replaces the whole bucket on every rank;
DeepSpeed then keeps what it keeps after its own reduction (its partition, or everything),
so the result lands where DeepSpeed expects the averaged gradient. ``overlap_comm`` only
changes the CUDA stream DeepSpeed reduces on; the MOO reduction runs on the stream that
DeepSpeed selected.

``granularity="global"`` (one weight vector for the whole model, the classic-MGDA baseline)
holds every bucket: each bucket's all-to-all runs when DeepSpeed reduces it, the rows are
kept (T/P of the bucket per rank), and when the backward's last bucket is reduced
(``optimizer.reduce_ipg_grads()`` from the ZeRO epilogue, or the end of
``engine.buffered_allreduce_fallback`` at stage 0) the summed Gram is all-reduced once,
solved, and every bucket is combined, all-gathered and written into the parameters'
reduced gradients.

``method="mean"`` with nothing that needs the protocol (``state.plain_average``) leaves
DeepSpeed's own reduction in place: bit-identical to the engine without the integration.

``state.step`` counts optimizer steps (``engine.step()`` at a gradient-accumulation
boundary). ``engine.save_checkpoint`` / ``engine.load_checkpoint`` save and restore the
state (its ``state_dict``) in the checkpoint's client state under ``"bucket_moo"``.

Refused, with what to use instead: ZeRO-3 (use FSDP2 and ``bucketmoo_kernels.fsdp``, or
ZeRO-2), CPU/NVMe offload, pipeline parallelism, MoE layers, sequence parallelism, sparse
gradients, ZenFlow, DeepCompile, ``gradient_accumulation_dtype`` different from the model
dtype, sum (not mean) gradient reduction, ``mode="stash"`` and ``protocol="allgather"``.
Gradient accumulation: stages 0 and 1 reduce once per optimizer step (the MOO sees the
accumulated task gradients); stage 2 reduces, and therefore combines, every micro-batch.
"""

from __future__ import annotations

import functools
import logging
import torch
import torch.distributed as dist

from ..distributed.engine import BucketEngine
from ..distributed.settings import parse_granularity
from ..distributed.state import BucketMOOState
from ..methods.elementwise import is_elementwise

__all__ = ["apply_bucket_moo", "DeepSpeedBucketMOO", "CHECKPOINT_KEY", "MIN_DEEPSPEED_VERSION",
           "TESTED_DEEPSPEED_VERSIONS"]

logger = logging.getLogger("bucketmoo_kernels")

CHECKPOINT_KEY = "bucket_moo"
MIN_DEEPSPEED_VERSION = "0.16.0"
TESTED_DEEPSPEED_VERSIONS = ("0.19",)
_PATCH_ATTR = "_bucket_moo_integration"


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "bucketmoo_kernels.integrations.deepspeed needs DeepSpeed: pip install 'bucketmoo_kernels[deepspeed]' "
            "(on a machine without CUDA: DS_BUILD_OPS=0 and DS_ACCELERATOR=cpu)"
        ) from exc
    return deepspeed


def _check_version(version: str) -> None:
    from packaging.version import Version

    if Version(version) < Version(MIN_DEEPSPEED_VERSION):
        raise RuntimeError(
            f"apply_bucket_moo needs deepspeed >= {MIN_DEEPSPEED_VERSION} (its ZeRO-1/2 bucket reduction "
            f"methods); found {version}. Upgrade: pip install -U 'deepspeed>={MIN_DEEPSPEED_VERSION}'"
        )
    if not any(version.startswith(v + ".") or version == v for v in TESTED_DEEPSPEED_VERSIONS):
        logger.warning("apply_bucket_moo was tested with deepspeed %s; found %s", TESTED_DEEPSPEED_VERSIONS, version)


def _refuse(what: str, instead: str) -> None:
    raise NotImplementedError(f"apply_bucket_moo does not support {what}; {instead}")


def _check_engine(engine, state: BucketMOOState, stage: int) -> None:
    """Raise for every configuration whose gradient reduction does not go through the
    methods this integration replaces."""
    if stage == 3:
        _refuse("ZeRO stage 3 (it reduce-scatters per parameter inside its own partitioned-parameter "
                "machinery)", "use ZeRO stage 2 (gradients and optimizer states partitioned, the paper's setting), "
                "or PyTorch FSDP2 with bucketmoo_kernels.fsdp.apply_bucket_moo for sharded parameters")
    if stage not in (0, 1, 2):
        raise ValueError(f"unknown ZeRO stage {stage!r}")
    if engine.zero_offload_optimizer() is not None or engine.zero_offload_param() is not None:
        _refuse("ZeRO offload (offload_optimizer / offload_param: gradients are copied to host memory "
                "inside the reduction)", "remove the offload section (ZeRO-2 without offload), or use FSDP2 "
                "with bucketmoo_kernels.fsdp and CPU offload there")
    if getattr(engine, "pipeline_parallelism", False):
        _refuse("pipeline parallelism (PipelineModule)", "use a plain module with ZeRO stage 0-2")
    if getattr(engine, "has_moe_layers", False):
        _refuse("MoE layers (expert gradients reduce over expert-data-parallel groups)",
                "use a dense model, or the DDP hook with the expert parameters excluded")
    if getattr(engine, "sequence_parallel_size", 1) != 1:
        _refuse("sequence parallelism", "use sequence_parallel_size=1")
    if any(isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse for m in engine.module.modules()):
        _refuse("sparse gradients (an embedding with sparse=True: DeepSpeed reduces those apart)",
                "use sparse=False embeddings")
    if getattr(engine, "zenflow", False):
        _refuse("ZenFlow", "disable zenflow in the zero_optimization section")
    if engine.is_deepcompile_active():
        _refuse("DeepCompile (it reduces gradients inside the compiled graph)", "disable compile.deepcompile")
    if not engine.gradient_average:
        _refuse("sum gradient reduction (gradient_allreduce_op != mean)",
                "use the default mean reduction: the combined gradient has weights that sum to one")
    if state.mode != "ranks":
        _refuse(f"mode={state.mode!r}", "use mode='ranks' (one task per rank or group of ranks); stashed tasks "
                "need the DDP hook (bucketmoo_kernels.ddp)")
    if is_elementwise(state.method):
        raise ValueError(
            f"method={state.method!r} is element-wise (not a function of the Gram matrix) and the DeepSpeed "
            f"integration runs only protocol='sharded' (the state has protocol={state.protocol!r}), whose ranks "
            "combine their own shard with weights solved from the Gram; use the DDP hook "
            "(bucketmoo_kernels.ddp) with protocol='allgather' or mode='stash' for this method")
    if state.protocol != "sharded":
        _refuse(f"protocol={state.protocol!r}", "use protocol='sharded' (the bytes of DeepSpeed's all-reduce)")
    if stage in (1, 2):
        opt = engine.optimizer
        needed = ("average_tensor", "buffered_reduce_fallback", "reduce_ipg_grads", "ipg_buckets", "bit16_groups",
                  "dp_process_group")
        missing = [n for n in needed if not hasattr(opt, n)]
        if missing:
            raise RuntimeError(f"engine.optimizer ({type(opt).__name__}) is not DeepSpeed's ZeRO stage 1/2 optimizer "
                               f"as this integration knows it (missing {missing}); check the deepspeed version")
        if getattr(opt, "cpu_offload", False):
            _refuse("ZeRO offload", "remove offload_optimizer")
        if any(opt._use_compact_grad_partition_buffer(i) for i in range(len(opt.bit16_groups))):
            _refuse("a gradient accumulation dtype different from the model dtype (data_types.grad_accum_dtype)",
                    "leave data_types.grad_accum_dtype unset (it then equals the model dtype)")
    else:
        for name in ("allreduce_and_copy", "buffered_allreduce_fallback"):
            if not hasattr(engine, name):
                raise RuntimeError(f"the DeepSpeed engine has no {name}(); check the deepspeed version")


def _same_ranks(a, b) -> bool:
    return dist.get_process_group_ranks(a) == dist.get_process_group_ranks(b)


class DeepSpeedBucketMOO:
    """What :func:`apply_bucket_moo` installed on one engine; :meth:`remove` undoes it.

    Attributes:
        engine: the DeepSpeed engine.
        state: the :class:`~bucketmoo_kernels.ddp.BucketMOOState`.
        stage: the ZeRO stage (0, 1 or 2).
        group: DeepSpeed's data-parallel process group (the protocol's group).
        buckets_reduced: buckets combined in the current backward (reset at its end).
    """

    def __init__(self, engine, state: BucketMOOState, stage: int, group):
        self.engine = engine
        self.state = state
        self.stage = stage
        self.group = group
        self.buckets_reduced = 0
        #: the bucket engine over DeepSpeed's data-parallel group; its buffers are DeepSpeed's,
        #: reused by the next bucket, so every exchange finishes in its own call
        self.moo = BucketEngine(state, group, holds_buffers=False)
        self._pending: list = []  # global granularity: (future of the combined bucket, its targets)
        self._patched: list[tuple[object, str]] = []

    # ------------------------------------------------------------------ installation
    def install(self) -> None:
        """Replace, on this engine and its optimizer only, the methods that reduce a bucket, end a
        backward, step and checkpoint; each replacement gets the original bound method first."""
        engine = self.engine
        if self.stage == 0:
            patches = [(engine, "allreduce_and_copy", self._allreduce_and_copy),
                       (engine, "buffered_allreduce_fallback", self._buffered_allreduce_fallback)]
        else:
            opt = engine.optimizer
            patches = [(opt, "average_tensor", self._average_tensor),
                       (opt, "buffered_reduce_fallback", self._buffered_reduce_fallback),
                       (opt, "reduce_ipg_grads", self._reduce_ipg_grads)]
        patches += [(engine, "step", self._step), (engine, "save_checkpoint", self._save_checkpoint),
                    (engine, "load_checkpoint", self._load_checkpoint)]
        for obj, name, _ in patches:
            if name in vars(obj):
                raise RuntimeError(f"{type(obj).__name__}.{name} is already overridden on this instance; "
                                   "apply_bucket_moo patches a fresh engine")
        for obj, name, replacement in patches:
            setattr(obj, name, functools.partial(replacement, getattr(obj, name)))
            self._patched.append((obj, name))
        setattr(engine, _PATCH_ATTR, self)

    # stage 0: one allreduce_bucket_size bucket of gradients; the end of the backward
    def _allreduce_and_copy(self, original, small_bucket, dp_group, dp_world_size=None):
        if self.state.plain_average:
            return original(small_bucket, dp_group, dp_world_size)
        self._reduce_grads(list(small_bucket), list(small_bucket), self.engine.communication_data_type)

    def _buffered_allreduce_fallback(self, original, grads=None, elements_per_buffer=500000000):
        try:
            return original(grads=grads, elements_per_buffer=elements_per_buffer)
        finally:
            self._end_of_backward()

    # stages 1 and 2: the IPG bucket, flat or as gradients; the flush at the end of the backward
    def _average_tensor(self, original, tensor, communication_data_type):
        if self.state.plain_average:
            return original(tensor, communication_data_type)
        params = self._bucket_params(communication_data_type)
        self._reduce_flat(tensor, params, [p.numel() for p in params], communication_data_type)

    def _buffered_reduce_fallback(self, original, rank, grads, communication_data_type,
                                  elements_per_buffer=500000000, log=None):
        if self.state.plain_average:
            return original(rank, grads, communication_data_type, elements_per_buffer=elements_per_buffer, log=log)
        if rank is not None:
            raise RuntimeError("apply_bucket_moo: DeepSpeed asked for a reduce to one rank "
                               f"(rank={rank}); only all-reduce style bucket reductions are supported")
        params = self._bucket_params(communication_data_type)
        if [p.numel() for p in params] != [g.numel() for g in grads]:
            raise RuntimeError("apply_bucket_moo: the gradients DeepSpeed reduces do not match its IPG "
                               "bucket's parameters; this DeepSpeed version is not supported")
        self._reduce_grads(list(grads), params, communication_data_type)

    def _reduce_ipg_grads(self, original, comm_dtype=None):
        try:
            return original(comm_dtype=comm_dtype)
        finally:
            if comm_dtype is None:  # the flush at the end of the backward (ZeRO epilogue)
                self._end_of_backward()

    # every stage: the step counter and the state in the checkpoint's client state
    def _step(self, original, *args, **kwargs):
        boundary = self.engine.is_gradient_accumulation_boundary()
        out = original(*args, **kwargs)
        if boundary:
            self.moo.finish_step()
        return out

    def _save_checkpoint(self, original, save_dir, tag=None, client_state=None, *args, **kwargs):
        client_state = dict(client_state or {})
        client_state[CHECKPOINT_KEY] = self.state.state_dict()
        return original(save_dir, tag, client_state, *args, **kwargs)

    def _load_checkpoint(self, original, *args, **kwargs):
        path, client_state = original(*args, **kwargs)
        if client_state is not None and CHECKPOINT_KEY in client_state:
            self.state.load_state_dict(client_state.pop(CHECKPOINT_KEY))
            self.state.process_group = self.group
            self.moo = BucketEngine(self.state, self.group, holds_buffers=False)
        return path, client_state

    def remove(self) -> None:
        """Restore the engine's (and its optimizer's) own methods."""
        for obj, name in reversed(self._patched):
            delattr(obj, name)
        self._patched = []
        if getattr(self.engine, _PATCH_ATTR, None) is self:
            delattr(self.engine, _PATCH_ATTR)

    # ------------------------------------------------------------------ reduction
    def _bucket_params(self, comm_dtype) -> list:
        zo = self.engine.optimizer
        bucket = zo.ipg_buckets[comm_dtype]
        return [zo.bit16_groups[i][j] for i, j, _ in bucket.params]

    def _wire_dtype(self, flat: torch.Tensor, comm_dtype) -> torch.dtype | None:
        if self.state.wire_dtype is not None:
            return self.state.wire_dtype
        return comm_dtype if comm_dtype is not None and comm_dtype != flat.dtype else None

    def _reduce_grads(self, grads: list, targets: list, comm_dtype) -> None:
        """A bucket given as separate gradient tensors: flatten, reduce, copy back."""
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._reduce_flat(flat, targets, [g.numel() for g in grads], comm_dtype)
        if parse_granularity(self.state.granularity)[0] != "global":
            offset = 0
            for g in grads:
                g.view(-1).copy_(flat[offset:offset + g.numel()])
                offset += g.numel()

    def _reduce_flat(self, flat: torch.Tensor, targets: list, sizes: list[int], comm_dtype) -> None:
        """Combine one bucket in place through the engine (``global``: hold it until the end of
        the backward, in a buffer of its own, since DeepSpeed reuses its bucket buffer)."""
        state = self.state
        n = flat.numel()
        if n == 0:
            return
        if sum(sizes) != n:
            raise RuntimeError(f"apply_bucket_moo: bucket of {n} elements but its parameters hold {sum(sizes)}")
        if not flat.is_contiguous():
            raise RuntimeError("apply_bucket_moo: DeepSpeed handed over a non-contiguous bucket")
        state.check_once(flat.device, "sharded")  # settings agreed by every rank, backend able
        state.runtime.note_bucket(flat)
        index = self.buckets_reduced
        self.buckets_reduced += 1
        wire = self._wire_dtype(flat, comm_dtype)
        if parse_granularity(state.granularity)[0] != "global":
            self.moo.reduce(index, flat, sizes, wire_dtype=wire)
            return
        full = torch.empty_like(flat)
        state.runtime.add_step_extra_bytes(full.numel() * full.element_size())
        self._pending.append((self.moo.reduce(index, flat, sizes, out=full, wire_dtype=wire), targets))

    def _grad_of(self, target):
        """Where the reduced gradient of a held bucket's element lives now."""
        if isinstance(target, torch.Tensor) and not isinstance(target, torch.nn.Parameter):
            return target  # stage 0: the gradient tensor itself
        if self.stage == 0:
            return target.grad
        return self.engine.optimizer.get_param_gradient_attribute(target)

    def _end_of_backward(self) -> None:
        """The backward's last bucket was reduced: the engine finishes the held buckets
        (``global``), whose combined values are then written into the reduced gradients."""
        pending, self._pending = self._pending, []
        self.buckets_reduced = 0
        self.moo.finish_backward()
        for future, targets in pending:
            full = future.wait()
            offset = 0
            for target in targets:
                numel = target.numel()
                grad = self._grad_of(target)
                if grad is not None:
                    grad.view(-1).copy_(full[offset:offset + numel].view_as(grad.view(-1)))
                offset += numel


def apply_bucket_moo(engine, state: BucketMOOState) -> DeepSpeedBucketMOO:
    """Run Bucket-Level MOO in a DeepSpeed engine's gradient reduction (ZeRO stages 0, 1, 2).

    Call it once, after ``deepspeed.initialize`` and before the first backward; every rank
    of the data-parallel group must call it with equal settings.

    Args:
        engine: the ``deepspeed.DeepSpeedEngine`` returned by ``deepspeed.initialize``.
        state: a :class:`~bucketmoo_kernels.ddp.BucketMOOState` with ``mode="ranks"``
            (rank r trains task ``task_of_rank[r]``) and ``protocol="sharded"``; its
            ``process_group`` must be None (DeepSpeed's data-parallel group is used) or a
            group of the same ranks.

    Returns:
        The :class:`DeepSpeedBucketMOO` installed on the engine (``.remove()`` restores it).

    Raises:
        ImportError: DeepSpeed is not installed (names the pip extra).
        TypeError: ``engine`` is not a DeepSpeed engine or ``state`` not a ``BucketMOOState``.
        RuntimeError: torch.distributed is not initialised, the DeepSpeed version is too old,
            the state's process group differs from DeepSpeed's, or the engine already has it.
        NotImplementedError: a configuration whose reduction this integration does not
            replace (ZeRO-3, offload, ...); the message says what to use instead.
        ValueError: the ranks do not divide evenly into the tasks (from ``task_of_rank``).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("apply_bucket_moo needs an initialised torch.distributed process group (tasks live on "
                           "ranks); launch with the deepspeed launcher or torchrun, or call "
                           "deepspeed.init_distributed() before deepspeed.initialize")
    deepspeed = _import_deepspeed()
    if not isinstance(engine, deepspeed.DeepSpeedEngine):
        raise TypeError(f"engine must be the deepspeed.DeepSpeedEngine returned by deepspeed.initialize; "
                        f"got {type(engine).__name__}")
    if not isinstance(state, BucketMOOState):
        raise TypeError(f"state must be a bucketmoo_kernels.ddp.BucketMOOState; got {type(state).__name__}")
    if getattr(engine, _PATCH_ATTR, None) is not None:
        raise RuntimeError("apply_bucket_moo was already applied to this engine; call .remove() on the object it "
                           "returned first")
    _check_version(deepspeed.__version__)
    stage = int(engine.zero_optimization_stage())
    _check_engine(engine, state, stage)
    group = engine.optimizer.dp_process_group if stage in (1, 2) else engine.seq_data_parallel_group
    if group is None:
        group = dist.group.WORLD
    if state.process_group is None:
        state.process_group = group  # (the state rebuilds its task layout for the new group)
    elif not _same_ranks(state.process_group, group):
        raise RuntimeError(
            f"state.process_group has ranks {dist.get_process_group_ranks(state.process_group)} but DeepSpeed "
            f"reduces gradients over {dist.get_process_group_ranks(group)}; leave process_group=None"
        )
    state.task_layout()  # ValueError naming task_of_rank when the world does not fit the tasks
    controller = DeepSpeedBucketMOO(engine, state, stage, group)
    controller.install()
    return controller

