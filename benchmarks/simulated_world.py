"""One rank of a P-rank world in one process: what the hook sends, holds and launches.

The process joins torch's ``fake`` process group (``dist.Backend.FAKE``; ``FakeProcessGroup``)
as rank r of P: every collective returns at once without moving data. A
:class:`~torch.utils._python_dispatch.TorchDispatchMode` (:class:`StepRecorder`) sits under the
hook and sees every operator it runs, the ``c10d`` collectives included (the process group
dispatches them as ``c10d.alltoall_base_``, ``c10d._allgather_base_``, ``c10d.allreduce_``, ...):

* collectives in order with their sizes; bytes sent / received per rank follow from them
  (all-to-all: the exact split sizes; all-reduce, all-gather, reduce-scatter: the
  bandwidth-optimal ring, whose per-rank bytes NCCL's ring and gloo's ring both move);
* peak extra memory: the storages created by the hook's operators that are alive at once
  (tracked with weak references, so frees count as soon as the hook drops a buffer);
  the bucket buffers themselves are DDP's and are not counted;
* kernel launches: operators that compute (not views, not ``empty``, not collectives); on a GPU
  each is one launch (the native and Triton backends register one op per kernel).

A fake collective leaves its output as allocated: the recorder fills all-to-all and
all-gather outputs with a fixed random pattern so that the Grams and solves downstream see
finite data. The values are synthetic; sizes, order, memory and operator counts are what
the hook really does on rank r. Collectives complete synchronously, so buffers that a real
backend would keep alive while an asynchronous collective is in flight are freed earlier
here: the measured peak is the synchronous one (docs/scale.md gives the asynchronous bound).

The DDP hook is driven directly with :class:`SimBucket` objects (DDP's ``GradBucket``
interface: ``buffer``, ``index``, ``is_last``, ``parameters``) whose sizes come from
:func:`benchmarks.llm_layout.ddp_buckets`: running ``DistributedDataParallel`` itself would
need the model's real parameters and a backward pass, which a 8B layout cannot afford on
this machine, and DDP's reducer adds nothing to what the hook issues. The FSDP2 path is
driven the same way: :class:`~bucketmoo_kernels.fsdp.reduce_scatter.BucketMOOReduceScatter`
is called with each group's reduce-scatter input and output, as ``fully_shard`` would.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from .llm_layout import CONFIGS, LlamaConfig, ddp_buckets, fsdp_groups

__all__ = ["Collective", "StepRecord", "StepRecorder", "SimBucket", "fake_world", "simulate_ddp_step",
           "simulate_fsdp_step", "task_of_rank", "summary"]

_ALLOC_ONLY = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
               "aten.new_empty.default", "aten.new_empty_strided.default"}
_PATTERN: dict[torch.dtype, torch.Tensor] = {}


def _fill(t: torch.Tensor) -> None:
    """Fill ``t`` with a fixed pseudo-random pattern (a tiled 64 Ki-element block)."""
    if t.numel() == 0 or not t.is_floating_point():
        return
    pat = _PATTERN.get(t.dtype)
    if pat is None:
        g = torch.Generator().manual_seed(1234)
        pat = _PATTERN[t.dtype] = torch.randn(1 << 16, generator=g).to(t.dtype)
    flat = t.view(-1)
    for start in range(0, flat.numel(), pat.numel()):
        end = min(start + pat.numel(), flat.numel())
        flat[start:end].copy_(pat[:end - start])


@dataclass(frozen=True)
class Collective:
    """One collective as rank ``rank`` issued it.

    ``kind``: ``all_to_all``, ``all_gather``, ``all_reduce``, ``reduce_scatter``, ``broadcast``...;
    ``numel_in`` / ``numel_out`` and ``element_size`` as passed by the rank; ``splits_in`` /
    ``splits_out``: all-to-all split sizes (None when equal chunks); ``sent`` / ``received``:
    bytes this rank puts on / takes off the wire.
    """

    kind: str
    dtype: str
    numel_in: int
    numel_out: int
    element_size: int
    splits_in: tuple[int, ...] | None
    splits_out: tuple[int, ...] | None
    sent: int
    received: int

    def signature(self) -> tuple:
        """What every rank of the world must agree on: the kind, the dtype and the size of the
        operation (the input of an all-to-all / all-reduce / reduce-scatter, the output of an
        all-gather; all-to-all input splits included)."""
        size = self.numel_out if self.kind == "all_gather" else self.numel_in
        return (self.kind, self.dtype, size, self.splits_in)


@dataclass
class StepRecord:
    """What one rank did in one simulated step."""

    world_size: int
    rank: int
    collectives: list[Collective] = field(default_factory=list)
    peak_extra_bytes: int = 0
    launches: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    state_peak_extra_bytes: int = 0  # what the hook's state reports (its own accounting)
    bucket_numels: list[int] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(c.sent for c in self.collectives)

    @property
    def received(self) -> int:
        return sum(c.received for c in self.collectives)

    def signature(self) -> list[tuple]:
        return [c.signature() for c in self.collectives]

    def by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.collectives:
            out[c.kind] = out.get(c.kind, 0) + 1
        return out


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _ring_bytes(kind: str, nbytes_full: int, world: int) -> int:
    """Bytes one rank sends (= receives) in the bandwidth-optimal ring of a collective whose
    full (unsharded) tensor has ``nbytes_full`` bytes."""
    if world <= 1:
        return 0
    if kind == "all_reduce":
        return 2 * (world - 1) * nbytes_full // world
    return (world - 1) * nbytes_full // world  # all_gather, reduce_scatter


class StepRecorder(TorchDispatchMode):
    """Records collectives, live extra memory and compute operators below it (see the module doc)."""

    def __init__(self, world_size: int, rank: int):
        super().__init__()
        self.record = StepRecord(world_size, rank)
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}

    # ---------------------------------------------------------------- memory
    def _live_bytes(self) -> int:
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            del self._live[k]
        return sum(n for _, n in self._live.values())

    def _track(self, outputs, inputs) -> None:
        seen = {t.untyped_storage()._cdata for t in _tensors(inputs)}
        for t in _tensors(outputs):
            if t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in seen:
                continue
            old = self._live.get(key)
            if old is not None and not old[0].expired():
                continue
            self._live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.record.peak_extra_bytes = max(self.record.peak_extra_bytes, self._live_bytes())

    # ---------------------------------------------------------------- collectives
    def _collective(self, name: str, args, kwargs) -> None:
        world = self.record.world_size
        rec = None
        if name.startswith("c10d.alltoall_base_"):
            output, input_, out_splits, in_splits = args[0], args[1], list(args[3]), list(args[4])
            es = input_.element_size()
            n_in, n_out = input_.numel(), output.numel()
            if not in_splits:
                in_splits = [n_in // world] * world
            if not out_splits:
                out_splits = [n_out // world] * world
            r = self.record.rank
            sent = (n_in - in_splits[r]) * es
            received = (n_out - out_splits[r]) * es
            rec = Collective("all_to_all", str(input_.dtype), n_in, n_out, es, tuple(in_splits), tuple(out_splits),
                             sent, received)
            _fill(output)
        elif name.startswith("c10d._allgather_base_") or name.startswith("c10d.allgather_into_tensor_coalesced"):
            output, input_ = args[0], args[1]
            es = input_.element_size()
            b = _ring_bytes("all_gather", output.numel() * es, world)
            rec = Collective("all_gather", str(input_.dtype), input_.numel(), output.numel(), es, None, None, b, b)
            _fill(output)
        elif name.startswith("c10d.allreduce_"):
            tensors = list(_tensors(args[0]))
            for t in tensors:
                es = t.element_size()
                b = _ring_bytes("all_reduce", t.numel() * es, world)
                self.record.collectives.append(
                    Collective("all_reduce", str(t.dtype), t.numel(), t.numel(), es, None, None, b, b))
            return
        elif name.startswith("c10d._reduce_scatter_base_"):
            output, input_ = args[0], args[1]
            es = input_.element_size()
            b = _ring_bytes("reduce_scatter", input_.numel() * es, world)
            rec = Collective("reduce_scatter", str(input_.dtype), input_.numel(), output.numel(), es, None, None, b, b)
        else:
            tensors = list(_tensors(args))
            numel = sum(t.numel() for t in tensors)
            es = tensors[0].element_size() if tensors else 0
            rec = Collective(name, str(tensors[0].dtype) if tensors else "", numel, numel, es, None, None, 0, 0)
        self.record.collectives.append(rec)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        out = func(*args, **kwargs)
        if name.startswith("c10d."):
            self._collective(name, args, kwargs)
            return out
        self.record.ops[name] = self.record.ops.get(name, 0) + 1
        if not getattr(func, "is_view", False) and name not in _ALLOC_ONLY:
            self.record.launches += 1
        self._track(out, (args, kwargs))
        return out


def _register_fake_backend() -> None:
    if "FAKE" in dist.Backend._plugins:
        return
    from torch._C._distributed_c10d import FakeProcessGroup

    def create(common_opts, backend_opts):
        return FakeProcessGroup._create_internal(common_opts.group_rank, common_opts.group_size, backend_opts)

    dist.Backend.register_backend("fake", create, extended_api=True, devices=["cpu", "cuda"])


@contextlib.contextmanager
def fake_world(world_size: int, rank: int):
    """Join torch's fake process group as ``rank`` of ``world_size`` (leaves any previous group).

    The ``fake`` backend is torch's C++ ``FakeProcessGroup``; it is registered here the way
    ``torch.testing._internal.distributed.fake_pg`` registers it (importing that module pulls
    in torch's test utilities, ~4 s of CPU).
    """
    if dist.is_initialized():
        dist.destroy_process_group()
    _register_fake_backend()
    dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world_size)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


_ONE = torch.zeros(1)


class SimBucket:
    """DDP's ``GradBucket`` interface over a buffer of the simulated bucket's size."""

    def __init__(self, index: int, buffer: torch.Tensor, shapes, is_last: bool):
        self._index, self._buffer, self._last = index, buffer, is_last
        # stand-ins with the parameters' shapes and no storage of their own (a stride-0 view of one
        # element: meta tensors would do too, but the first one imports torch._dynamo, ~15 s here)
        self._params = [_ONE.expand(*s) for s in shapes]

    def index(self) -> int:
        return self._index

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def is_last(self) -> bool:
        return self._last

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def gradients(self) -> list[torch.Tensor]:
        out, offset = [], 0
        for p in self._params:
            out.append(self._buffer[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        return out


def task_of_rank(world_size: int, num_tasks: int) -> list[int]:
    """Contiguous blocks: ranks ``[k P/T, (k+1) P/T)`` train task k."""
    if world_size % num_tasks:
        raise ValueError(f"world_size {world_size} must be a multiple of num_tasks {num_tasks}")
    per = world_size // num_tasks
    return [r // per for r in range(world_size)]


def _config(model) -> LlamaConfig:
    return CONFIGS[model] if isinstance(model, str) else model


def simulate_ddp_step(model: str | LlamaConfig, world_size: int, rank: int, *, num_tasks: int = 8,
                      protocol: str = "sharded", granularity: str = "bucket", overlap: bool = True,
                      bucket_cap_mb: float = 25.0, dtype: torch.dtype = torch.float32, method: str = "mgda",
                      compress: str | None = None, max_buckets: int | None = None,
                      steps: int = 1) -> StepRecord:
    """Run the DDP hook (ranks mode) for one step of ``model`` as rank ``rank`` of ``world_size``.

    Returns the :class:`StepRecord` of the last of ``steps`` steps (the first step builds the
    hook's caches: index tensors, shard layouts). ``max_buckets`` limits the step to the first
    buckets (for quick checks of very large layouts).
    """
    from bucketmoo_kernels.ddp import BucketMOOState, bucket_moo_hook

    cfg = _config(model)
    buckets = ddp_buckets(cfg, bucket_cap_mb=bucket_cap_mb, element_size=torch.empty(0, dtype=dtype).element_size())
    if max_buckets is not None:
        buckets = buckets[:max_buckets]
    with fake_world(world_size, rank) as group:
        state = BucketMOOState(method=method, mode="ranks", granularity=granularity, process_group=group,
                               task_of_rank=task_of_rank(world_size, num_tasks), protocol=protocol,
                               compress=compress, overlap=overlap, backend="auto")
        # The first hook call agrees on the settings (one all-gather of a few int64 per rank,
        # once per run): done here, outside the recorded steps, which are the steady state.
        state.check_once(torch.device("cpu"), protocol)
        record = None
        for _ in range(steps):
            bufs = []
            for b in buckets:
                buf = torch.empty(b.numel, dtype=dtype)
                _fill(buf)
                bufs.append(buf)
            recorder = StepRecorder(world_size, rank)
            futures = []
            with recorder:
                for b, buf in zip(buckets, bufs):
                    futures.append(bucket_moo_hook(state, SimBucket(b.index, buf, b.shapes, b.index == len(buckets) - 1)))
                for f in futures:
                    f.wait()
            record = recorder.record
            del futures, bufs
        record.state_peak_extra_bytes = state.peak_extra_bytes
        record.bucket_numels = [b.numel for b in buckets]
    return record


def simulate_fsdp_step(model: str | LlamaConfig, world_size: int, rank: int, *, num_tasks: int = 8,
                       granularity: str = "bucket", dtype: torch.dtype = torch.float32, method: str = "mgda",
                       compress: str | None = None, max_groups: int | None = None, steps: int = 1) -> StepRecord:
    """Run the FSDP2 custom reduce-scatter for every parameter group of ``model`` (one layer per
    group, then the root), as rank ``rank`` of ``world_size``; see :func:`simulate_ddp_step`."""
    from bucketmoo_kernels.ddp import BucketMOOState
    from bucketmoo_kernels.distributed.engine import BucketEngine
    from bucketmoo_kernels.fsdp.reduce_scatter import BucketMOOReduceScatter

    cfg = _config(model)
    groups = fsdp_groups(cfg, world_size)
    if max_groups is not None:
        groups = groups[:max_groups]
    with fake_world(world_size, rank) as group:
        state = BucketMOOState(method=method, mode="ranks", granularity=granularity, process_group=group,
                               task_of_rank=task_of_rank(world_size, num_tasks), compress=compress, backend="auto")
        state.check_once(torch.device("cpu"), "sharded")  # once per run, not per step (see above)
        engine = BucketEngine(state, group, holds_buffers=False, reductions_per_step=len(groups))
        comms = [BucketMOOReduceScatter(state, g["param_sizes"], lambda: None, i, g["name"], engine)
                 for i, g in enumerate(groups)]
        record = None
        for _ in range(steps):
            recorder = StepRecorder(world_size, rank)
            for g, comm in zip(groups, comms):
                inp = torch.empty(world_size * g["shard"], dtype=dtype)
                _fill(inp)
                out = torch.empty(g["shard"], dtype=dtype)
                with recorder:
                    comm(out, inp, group, dist.ReduceOp.AVG)
                del inp, out
            record = recorder.record
        record.state_peak_extra_bytes = state.peak_extra_bytes
        record.bucket_numels = [world_size * g["shard"] for g in groups]
    return record


def summary(record: StepRecord) -> dict:
    """A JSON-friendly summary of a :class:`StepRecord`."""
    return {
        "P": record.world_size, "rank": record.rank, "collectives": len(record.collectives),
        "by_kind": record.by_kind(), "sent_bytes": record.sent, "received_bytes": record.received,
        "peak_extra_bytes": record.peak_extra_bytes, "state_peak_extra_bytes": record.state_peak_extra_bytes,
        "launches": record.launches, "buckets": len(record.bucket_numels),
        "bucket_numel_max": max(record.bucket_numels, default=0),
        "model_numel": int(math.fsum(record.bucket_numels)),
    }
