"""``profile_conflicts``: measure where the tasks' gradients conflict in a model, segment by segment.

Algorithm, per step (``steps`` times, each task's callable drawing a fresh batch):

1. for every task t: call ``task_losses[t]()`` and take the gradient of that loss with
   ``torch.autograd.grad`` (``.grad`` is never read or written, no optimizer step; the model's
   buffers are put back after every call, so e.g. BatchNorm statistics do not move), copied
   into row t of one ``[T, N]`` buffer laid out by the granularity (:mod:`.layout`);
2. the per-segment Gram ``[S, T, T]`` with the library's :func:`~bucketmoo_kernels.gram`;
   inside a process group the rows live on their ranks and the Gram is formed as in the
   sharded protocol (:mod:`bucketmoo_kernels.distributed.protocol`: all-to-all of shards,
   partial Gram, all-reduce), so every rank holds the same Gram;
3. from the Gram: task cosines, conflict flags (some pair < 0), norms, mass (trace), the
   method's weights per segment and for the whole model (the sum of the segment Grams), and
   the distance between the two.

The statistics are averaged over the steps into a :class:`~.report.ConflictReport`.

Cost: T forward and backward passes per step (no more than training with T tasks), one
``[T, N]`` gradient buffer in the parameters' dtype (``[K, N]`` plus a ``[K, N]`` send copy
with K local tasks per rank), and per step one ``[S, T, T]`` Gram and ``[S, T]`` weights.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.distributed as dist

from ..api import gram, solve
from ..diagnostics import task_cosine
from ..distributed import collectives
from ..distributed.protocol import (TaskLayout, local_shard_length, reduce_gram, scatter_tasks, shard_length,
                                    shard_segments)
from ..methods.elementwise import is_elementwise
from ..methods.state import MethodState
from ..weight_step import WeightStep
from .layout import SegmentLayout, build_layout, check_bucket_cap, layer_of
from .report import ConflictReport, SegmentRecord

__all__ = ["profile_conflicts"]

_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_model(model) -> tuple[list[str], list[torch.Tensor]]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    wrapped = type(model).__name__
    if wrapped in ("DistributedDataParallel", "FullyShardedDataParallel", "DataParallel"):
        raise TypeError(f"model is wrapped in {wrapped}: pass the module inside it (model.module) and let "
                        "task_losses call that module (the profiler runs no DDP reduction)")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no parameter with requires_grad=True: nothing to profile")
    devices = {p.device for _, p in named}
    if len(devices) > 1:
        raise ValueError(f"model's trainable parameters must be on one device; found {sorted(map(str, devices))}")
    return [n for n, _ in named], [p for _, p in named]


def _check_tasks(task_losses) -> list[tuple[str, Callable]]:
    if not isinstance(task_losses, Mapping):
        raise TypeError("task_losses must be a mapping {task name: zero-argument callable returning the task's "
                        f"scalar loss}}; got {type(task_losses).__name__}")
    if not task_losses:
        raise ValueError("task_losses is empty: give at least one task (at least two in all to compare)")
    out = []
    for name, fn in task_losses.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"task_losses keys must be non-empty task names (str); got {name!r}")
        if not callable(fn):
            raise TypeError(f"task_losses[{name!r}] must be a zero-argument callable returning a scalar loss; "
                            f"got {type(fn).__name__}")
        out.append((name, fn))
    return out


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps!r}")
    return steps


def _weight_step(method, method_options) -> WeightStep:
    if isinstance(method, WeightStep):
        if method_options:
            raise TypeError("method_options: pass either a WeightStep as method or a method name with "
                            "method_options, not both")
        step = method
    else:
        if not isinstance(method, str):
            raise TypeError(f"method must be a method name or a WeightStep; got {type(method).__name__}")
        if is_elementwise(method):
            raise ValueError(f"method {method!r} is element-wise (no per-segment weights to report); choose a "
                             "method that weights the task gradients, e.g. 'mgda', 'pcgrad', 'cagrad', 'upgrad'")
        step = WeightStep(method, dict(method_options or {}))
    return step


def _loss_of(name: str, fn: Callable) -> torch.Tensor:
    loss = fn()
    where = f"task_losses[{name!r}]()"
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{where} must return a scalar torch.Tensor; got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{where} must return a scalar loss (one element); got shape {tuple(loss.shape)} "
                         "(reduce it, e.g. loss.mean())")
    if not loss.requires_grad:
        raise ValueError(f"{where} returned a loss that does not require grad (computed under torch.no_grad(), "
                         "or from frozen parameters only)")
    if not bool(torch.isfinite(loss.detach()).all()):
        raise ValueError(f"{where} returned a non-finite loss ({float(loss.detach().reshape(()))})")
    return loss.reshape(())


class _BufferGuard:
    """A copy of the model's buffers, put back after every task's forward pass."""

    def __init__(self, model: torch.nn.Module):
        self.buffers = [b for b in model.buffers()]
        self.saved = [b.detach().clone() for b in self.buffers]

    @torch.no_grad()
    def restore(self) -> None:
        for b, s in zip(self.buffers, self.saved):
            b.copy_(s)


def _grad_dtype(params: list[torch.Tensor]) -> torch.dtype:
    dtypes = {p.dtype for p in params}
    if len(dtypes) == 1 and next(iter(dtypes)) in _GRAD_DTYPES:
        return next(iter(dtypes))
    return torch.float32


def _fill_row(row: torch.Tensor, name: str, fn: Callable, names: list[str], params: list[torch.Tensor],
              layout: SegmentLayout) -> float:
    """Task ``name``'s gradient into ``row``; returns the loss value."""
    loss = _loss_of(name, fn)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for i, g in enumerate(grads):
        if g is None:
            raise ValueError(
                f"parameter {names[i]!r} gets no gradient from task_losses[{name!r}]: every trainable parameter "
                "must take part in every task's loss; freeze it (requires_grad_(False)) to leave it out")
        row.narrow(0, layout.offsets[i], params[i].numel()).copy_(g.reshape(-1))
    return float(loss.detach())


class _Accumulator:
    """Sums over steps of the per-segment statistics (float64, CPU)."""

    def __init__(self, num_segments: int, num_tasks: int):
        s, t = num_segments, num_tasks
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        self.cos, self.conflict, self.norms, self.weights = z(s, t, t), z(s), z(s, t), z(s, t)
        self.distance, self.mass, self.conflict_mass, self.pair_conflict = z(s), z(s), z(s), z(s)
        self.g_cos, self.g_conflict, self.g_norms, self.g_weights = z(1, t, t), z(1), z(1, t), z(1, t)
        self.g_pair_conflict = z(1)
        self.losses = z(t)
        self.steps = 0
        upper = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        self.upper = upper

    def _stats(self, g: torch.Tensor):
        diag = g.diagonal(dim1=-2, dim2=-1).clamp_min(0)
        norm = diag.sqrt()
        cos = task_cosine(g)
        negative = (cos[:, self.upper] < 0).to(torch.float64)
        return cos, negative.amax(-1), negative.mean(-1), norm, diag.sum(-1)

    def add(self, seg_gram: torch.Tensor, glob_gram: torch.Tensor, w: torch.Tensor, w_global: torch.Tensor,
            losses: torch.Tensor) -> None:
        cos, conflict, pair_conflict, norm, trace = self._stats(seg_gram)
        total = float(trace.sum())
        mass = trace / total if total > 0 else torch.zeros_like(trace)
        self.cos += cos
        self.conflict += conflict
        self.pair_conflict += pair_conflict
        self.norms += norm
        self.mass += mass
        self.conflict_mass += mass * conflict
        self.weights += w
        self.distance += 0.5 * (w - w_global).abs().sum(-1)
        g_cos, g_conflict, g_pair_conflict, g_norm, _ = self._stats(glob_gram)
        self.g_cos += g_cos
        self.g_conflict += g_conflict
        self.g_pair_conflict += g_pair_conflict
        self.g_norms += g_norm
        self.g_weights += w_global
        self.losses += losses
        self.steps += 1


def _sharded_gram_multi(rows: torch.Tensor, layout: SegmentLayout, row_task: list[int], num_tasks: int,
                        group, backend: str) -> torch.Tensor:
    """The sharded protocol's steps 1-2 with K > 1 task rows per rank (distinct tasks on every rank).

    Rank p receives shard p of every rank's K rows (one all-to-all), forms the partial Gram of
    its shard over all T = P*K tasks and the partial Grams are summed over ranks.
    """
    world, rank = collectives.group_size(group), collectives.group_rank(group)
    k, n = rows.shape
    m = shard_length(n, world)
    lengths = [local_shard_length(n, world, p) for p in range(world)]
    send = torch.cat([rows[:, p * m: p * m + lengths[p]].reshape(-1) for p in range(world)])
    received = torch.empty(world * k * lengths[rank], dtype=rows.dtype, device=rows.device)
    collectives.all_to_all_flat(received, send, group, output_split_sizes=[k * lengths[rank]] * world,
                                input_split_sizes=[k * length for length in lengths])
    position = {task: r for r, task in enumerate(row_task)}  # row r * K + j of `received` is task row_task[...]
    order = torch.tensor([position[t] for t in range(num_tasks)], dtype=torch.int64, device=rows.device)
    task_rows = received.view(world * k, lengths[rank]).index_select(0, order)
    partial = gram(task_rows, shard_segments(layout.segments, rank, m), backend=backend)
    return reduce_gram(partial, group)


class _Group:
    """The process-group side: which tasks live where, and how the Gram and losses combine."""

    def __init__(self, group, local_tasks: list[str], agreed: tuple, device: torch.device):
        self.group = group
        self.world = collectives.group_size(group)
        self.rank = collectives.group_rank(group)
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, (list(local_tasks), agreed), group=group)
        differ = [r for r, (_, a) in enumerate(gathered) if a != gathered[0][1]]
        if differ:
            raise ValueError(
                "profile_conflicts: the ranks of the process group were called with different settings or "
                f"models (rank 0: {gathered[0][1]!r}; rank {differ[0]}: {gathered[differ[0]][1]!r}); every rank "
                "must profile the same model with the same steps, granularity, bucket_cap_mb and method")
        per_rank = [names for names, _ in gathered]
        counts = {len(names) for names in per_rank}
        if len(counts) != 1:
            raise ValueError(f"task_losses must hold the same number of tasks on every rank; got "
                             f"{[len(x) for x in per_rank]} (rank order)")
        self.k = counts.pop()
        self.tasks: list[str] = list(dict.fromkeys(name for names in per_rank for name in names))
        index = {name: i for i, name in enumerate(self.tasks)}
        if self.k == 1:
            self.layout = TaskLayout.build([index[names[0]] for names in per_rank], self.world,
                                           num_tasks=len(self.tasks))
            self.row_task = None
        else:
            flat = [name for names in per_rank for name in names]
            if len(set(flat)) != len(flat):
                raise ValueError("with several tasks per rank, every task must live on exactly one rank; got "
                                 f"task_losses keys per rank {per_rank}")
            self.layout = None
            self.row_task = [index[name] for name in flat]
        self.task_ids = [index[name] for name in local_tasks]
        self.device = device
        collectives.check_backend(collectives.backend_name(group), device, "sharded")

    def gram(self, rows: torch.Tensor, layout: SegmentLayout, backend: str) -> torch.Tensor:
        if self.k == 1:
            sharded = scatter_tasks(rows[0], layout.segments, self.layout, group=self.group, backend=backend)
            return reduce_gram(sharded.partial_gram, self.group)
        return _sharded_gram_multi(rows, layout, self.row_task, len(self.tasks), self.group, backend)

    def losses(self, local: list[float]) -> torch.Tensor:
        """Per-task mean loss over the ranks that hold the task."""
        sums = torch.zeros(2, len(self.tasks), dtype=torch.float64, device=self.device)
        for t, v in zip(self.task_ids, local):
            sums[0, t] += v
            sums[1, t] += 1
        collectives.all_reduce_sum(sums, self.group)
        sums = sums.cpu()
        return sums[0] / sums[1]


def profile_conflicts(model: torch.nn.Module, task_losses: Mapping[str, Callable[[], torch.Tensor]], *,
                      steps: int = 4, granularity: str = "param", bucket_cap_mb: float | None = 25.0,
                      backend: str = "auto", method: str | WeightStep = "mgda", method_options: dict | None = None,
                      distributed: bool | None = None, group=None, progress: bool = False) -> ConflictReport:
    """Measure, segment by segment, where the tasks' gradients conflict in ``model``.

    For each of ``steps`` steps, back-propagates every task's loss separately (with
    ``torch.autograd.grad``: no optimizer step, ``.grad`` untouched, buffers restored after
    every call, so the model is left exactly as it was), forms the per-segment Gram matrix of
    the task gradients with :func:`~bucketmoo_kernels.gram` and derives cosines, conflicts,
    norms and the weights ``method`` would give, per segment and for the whole model.

    Args:
        model: the (unwrapped) module; its parameters with ``requires_grad`` are profiled,
            and each must receive a gradient from every task's loss.
        task_losses: ``{task name: callable}``; each call returns that task's scalar loss on
            a fresh batch (at least two tasks in all). In a process group: this rank's
            task(s) only.
        steps: number of steps (batches per task).
        granularity: ``"param"`` (one segment per parameter), ``"bucket"`` (DDP's buckets for
            ``bucket_cap_mb``, reverse parameter order), ``"chunk:<n>"`` (those buckets cut
            into n-element chunks) or ``"global"``.
        bucket_cap_mb: DDP's ``bucket_cap_mb`` (None: DDP's defaults, a 1 MiB first bucket).
        backend: kernel backend of the Gram and the weights (``auto``, ``torch``, ``cpu``,
            ``triton``, ``cuda``).
        method: the method whose weights are reported (a name or a prebuilt ``WeightStep``;
            not an element-wise one); ``method_options`` its options. Loss normalisations
            receive each step's losses.
        distributed: None (default): profile across the process group when one is
            initialised with more than one rank; True: require one; False: this process only.
        group: the process group (None: the default group). Every rank must call this with
            the same model layout and settings; each contributes its own tasks, and the
            Grams combine as in the sharded protocol. Every rank returns the same report.
        progress: show a tqdm progress bar (needs tqdm).
    Returns:
        :class:`~bucketmoo_kernels.ConflictReport`.
    Raises:
        TypeError / ValueError naming the argument: no tasks, one task, a loss that is not a
        scalar tensor or does not require grad, a parameter without gradient, a bad
        granularity, an element-wise method, ranks that disagree.
    """
    names, params = _check_model(model)
    tasks = _check_tasks(task_losses)
    steps = _check_steps(steps)
    cap = check_bucket_cap(bucket_cap_mb)
    step = _weight_step(method, method_options)
    layout = build_layout(names, params, granularity, cap)
    device = params[0].device
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    elif distributed and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs an initialised torch.distributed process group")
    pg = None
    if distributed:
        agreed = (steps, granularity, cap, step.name, sorted(step.options.items()), step.normalization,
                  [(n, tuple(p.shape)) for n, p in zip(names, params)])
        pg = _Group(group, [t for t, _ in tasks], agreed, device)
        all_tasks = pg.tasks
    else:
        all_tasks = [t for t, _ in tasks]
    if len(all_tasks) < 2:
        raise ValueError(f"task_losses must hold at least 2 tasks{' across the process group' if pg else ''} to "
                         f"compare their gradients; got {len(all_tasks)} ({', '.join(all_tasks)})")
    step.check_tasks(len(all_tasks))

    rows = torch.zeros(len(tasks), layout.numel, dtype=_grad_dtype(params), device=device)
    guard = _BufferGuard(model)
    acc = _Accumulator(layout.segments.num_segments, len(all_tasks))
    seg_state = MethodState() if step.needs_state else None
    glob_state = MethodState() if step.needs_state else None
    bar = _progress_bar(progress, steps * len(tasks))
    try:
        for _ in range(steps):
            local_losses = []
            for k, (name, fn) in enumerate(tasks):
                try:
                    local_losses.append(_fill_row(rows[k], name, fn, names, params, layout))
                finally:
                    guard.restore()
                if bar is not None:
                    bar.update(1)
            if pg is None:
                seg_gram = gram(rows, layout.segments, backend=backend)
                losses = torch.tensor(local_losses, dtype=torch.float64)
            else:
                seg_gram = pg.gram(rows, layout, backend)
                losses = pg.losses(local_losses)
            diag = seg_gram.diagonal(dim1=-2, dim2=-1)
            if not bool(torch.isfinite(seg_gram).all()):
                bad = [all_tasks[t] for t in range(len(all_tasks)) if not bool(torch.isfinite(diag[:, t]).all())]
                raise ValueError(f"the gradients of task(s) {bad or all_tasks} are not finite (NaN/Inf)")
            glob_gram = seg_gram.sum(0, keepdim=True)
            loss_arg = losses.to(device=seg_gram.device, dtype=torch.float32) if step.uses_losses else None
            w = solve(seg_gram, weight_step=step, backend=backend, losses=loss_arg, method_state=seg_state)
            w_global = solve(glob_gram, weight_step=step, backend=backend, losses=loss_arg, method_state=glob_state)
            acc.add(seg_gram.detach().to("cpu", torch.float64), glob_gram.detach().to("cpu", torch.float64),
                    w.detach().to("cpu", torch.float64), w_global.detach().to("cpu", torch.float64), losses)
    finally:
        if bar is not None:
            bar.close()
    return _report(acc, layout, names, params, all_tasks, step.name, granularity, cap,
                   pg.world if pg else 1, device, backend)


def _progress_bar(progress: bool, total: int):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError("progress=True needs tqdm: pip install tqdm") from exc
    return tqdm(total=total, desc="profile_conflicts (task backward passes)", unit="pass")


def _report(acc: _Accumulator, layout: SegmentLayout, names, params, tasks, method: str, granularity: str,
            cap, world: int, device, backend: str) -> ConflictReport:
    k = acc.steps

    def matrix(x: torch.Tensor) -> list[list[float]]:
        return [[float(v) for v in row] for row in x]

    records = []
    for s in range(layout.segments.num_segments):
        records.append(SegmentRecord(
            name=layout.names[s], params=layout.params[s], numel=layout.segments.length_list[s],
            layers=dict(layout.layer_numel[s]), cosine=matrix(acc.cos[s] / k),
            conflict_share=float(acc.conflict[s] / k), pair_conflict_share=float(acc.pair_conflict[s] / k),
            norms=[float(v) for v in acc.norms[s] / k],
            weights=[float(v) for v in acc.weights[s] / k], weight_distance=float(acc.distance[s] / k),
            mass_share=float(acc.mass[s] / k), conflict_mass_share=float(acc.conflict_mass[s] / k)))
    layers: dict[str, int] = {}
    for n, p in zip(names, params):
        layers[layer_of(n)] = layers.get(layer_of(n), 0) + p.numel()
    whole = SegmentRecord(
        name="global", params=tuple(names), numel=layout.numel, layers=dict(layers), cosine=matrix(acc.g_cos[0] / k),
        conflict_share=float(acc.g_conflict[0] / k), pair_conflict_share=float(acc.g_pair_conflict[0] / k),
        norms=[float(v) for v in acc.g_norms[0] / k],
        weights=[float(v) for v in acc.g_weights[0] / k], weight_distance=0.0, mass_share=1.0,
        conflict_mass_share=float(acc.g_conflict[0] / k))
    meta = {"device": str(device), "backend": backend, "parameters": len(params)}
    return ConflictReport(tasks=list(tasks), granularity=granularity, method=method, steps=k, segments=records,
                          global_segment=whole, losses=[float(v) for v in acc.losses / k], layers=layers,
                          bucket_cap_mb=cap, world_size=world, meta=meta)
