"""Tasks on ranks: which rank reads which task's data, and per-task evaluation.

Bucket-Level MOO with ``mode="ranks"`` needs rank r to back-propagate only the loss of task
``task_of_rank[r]``. This module is the data side of that contract, shared by every
integration (plain DDP, HF Transformers, Accelerate, Lightning, DeepSpeed):

* :class:`TaskPlan` validates the split of a world of P ranks into T named tasks (every task
  gets P / T ranks) and says, for a rank, its task and its shard among the ranks of that task.
  ``plan.task_ids`` is the ``task_of_rank`` to hand to ``BucketMOOState``.
* :class:`TaskSampler` is a ``torch.utils.data.Sampler`` over the rank's own task dataset:
  the task's indices are shuffled per epoch from ``(seed, epoch, task)`` -- the same
  permutation on every rank of the task -- and split among those ranks. Every rank of the
  world yields the same number of indices per epoch (tasks of different sizes wrap around or
  are cut, see ``epoch_length``), so DDP ranks never disagree on the number of steps.
* :func:`task_dataloader` is a plain ``DataLoader`` over that sampler.
* :func:`gather_task_metrics` merges per-rank metrics into one value per task on rank 0, and
  :func:`evaluate_tasks` runs a model over every rank's task shard and gathers the results.

Example (plain DDP, two tasks on four ranks)::

    plan = TaskPlan.build(["de", "fr"], world_size=4)       # ranks 0,1 -> de; 2,3 -> fr
    loader = task_dataloader({"de": ds_de, "fr": ds_fr}, rank, plan, batch_size=8, seed=0)
    state = BucketMOOState(method="mgda", task_of_rank=plan.task_ids)
    ddp_model.register_comm_hook(state, bucket_moo_hook)
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for batch in loader: ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

__all__ = ["TaskPlan", "TaskSampler", "task_dataloader", "gather_task_metrics", "evaluate_tasks",
           "EPOCH_LENGTHS"]

EPOCH_LENGTHS = ("max", "min", "shard")


def _dist_world(world_size: int | None, group=None) -> int:
    if world_size is not None:
        return world_size
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("world_size was not given and no torch.distributed process group is initialized: "
                           "pass world_size, or call torch.distributed.init_process_group first")
    return dist.get_world_size(group)


def _dist_rank(rank: int | None, group=None) -> int:
    if rank is not None:
        return rank
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("rank was not given and no torch.distributed process group is initialized: "
                           "pass rank, or call torch.distributed.init_process_group first")
    return dist.get_rank(group)


@dataclass(frozen=True)
class TaskPlan:
    """Which named task every rank of a world trains.

    Attributes:
        tasks: task names, in task-id order (task id t is ``tasks[t]``).
        task_of_rank: task id of every rank (length P); every task has P / T ranks.
    """

    tasks: tuple[str, ...]
    task_of_rank: tuple[int, ...]

    @classmethod
    def build(cls, tasks: Sequence[str] | Mapping[str, Any], world_size: int | None = None,
              task_of_rank: Sequence[int | str] | None = None) -> "TaskPlan":
        """Split a world of ``world_size`` ranks into ``tasks``.

        Args:
            tasks: task names (or a ``{name: dataset}`` mapping; its key order is the task order).
            world_size: P (default: the initialized default process group's size).
            task_of_rank: task of every rank, as ids into ``tasks`` or as names. None: P must be
                a multiple of T and ranks are assigned in contiguous blocks (ranks
                ``0 .. P/T-1`` train ``tasks[0]``, the next P/T ``tasks[1]``, ...); with P == T
                that is rank r -> task r, ``BucketMOOState``'s own default.
        Raises:
            ValueError: naming the argument -- no tasks, duplicate or non-string names, a world
                that cannot be split into the tasks, an unknown task, a task without ranks, or
                tasks with different rank counts.
        """
        names = tuple(tasks.keys() if isinstance(tasks, Mapping) else tasks)
        if not names:
            raise ValueError("tasks must name at least one task; got none")
        if not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"tasks must be non-empty strings; got {list(names)!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"tasks must be distinct; got {list(names)!r}")
        world = _dist_world(world_size)
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise ValueError(f"world_size must be a positive int; got {world!r}")
        num = len(names)
        if task_of_rank is None:
            if world % num:
                raise ValueError(
                    f"a world of {world} ranks cannot be split into {num} tasks {list(names)}: every task "
                    f"needs the same number of ranks, so launch a multiple of {num} processes "
                    f"(e.g. torchrun --nproc-per-node {num})")
            per = world // num
            return cls(names, tuple(r // per for r in range(world)))
        ids = []
        for r, t in enumerate(task_of_rank):
            if isinstance(t, str):
                if t not in names:
                    raise ValueError(f"task_of_rank[{r}] = {t!r} is not one of the tasks {list(names)}")
                ids.append(names.index(t))
            elif isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < num:
                raise ValueError(f"task_of_rank[{r}] must be a task name or an id in [0, {num}); got {t!r}")
            else:
                ids.append(int(t))
        if len(ids) != world:
            raise ValueError(f"task_of_rank must give one task per rank ({world} ranks); got {len(ids)} "
                             f"entries: {list(task_of_rank)!r}")
        counts = [ids.count(t) for t in range(num)]
        if 0 in counts:
            missing = [names[t] for t, c in enumerate(counts) if c == 0]
            raise ValueError(f"task_of_rank assigns no rank to task(s) {missing}: every task needs a rank")
        if len(set(counts)) != 1:
            raise ValueError(
                "task_of_rank must give every task the same number of ranks (so that method='mean' is "
                "plain DDP averaging); got " + ", ".join(f"{n}: {c}" for n, c in zip(names, counts)))
        return cls(names, tuple(ids))

    @property
    def world_size(self) -> int:
        return len(self.task_of_rank)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def ranks_per_task(self) -> int:
        return self.world_size // self.num_tasks

    @property
    def task_ids(self) -> tuple[int, ...]:
        """``task_of_rank`` as ids: pass it to ``BucketMOOState(task_of_rank=...)``."""
        return self.task_of_rank

    def ranks_of(self, task: int | str) -> tuple[int, ...]:
        """The ranks that train ``task`` (an id or a name), in rank order."""
        t = self.tasks.index(task) if isinstance(task, str) else task
        return tuple(r for r, i in enumerate(self.task_of_rank) if i == t)

    def _check_rank(self, rank: int) -> int:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be an int in [0, {self.world_size}); got {rank!r}")
        return rank

    def task_id(self, rank: int) -> int:
        return self.task_of_rank[self._check_rank(rank)]

    def task_name(self, rank: int) -> str:
        return self.tasks[self.task_id(rank)]

    def shard_of(self, rank: int) -> tuple[int, int]:
        """``(index, count)``: rank's position among the ranks of its task, and their number."""
        ranks = self.ranks_of(self.task_id(rank))
        return ranks.index(rank), len(ranks)


def _seed_for(seed: int, epoch: int, task: int) -> int:
    # One stable 63-bit seed per (seed, epoch, task); identical on every rank and run.
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(task) * 104_729 + 17) % (2**63 - 1)


class TaskSampler(Sampler[int]):
    """Indices of one rank's share of its own task's dataset.

    Per epoch, the task's indices ``0 .. n_task-1`` are permuted with a generator seeded from
    ``(seed, epoch, task id)`` (or kept in order with ``shuffle=False``), laid end to end as
    often as needed, cut to ``epoch_length * ranks_per_task`` and dealt round-robin to the
    ranks of the task (``order[shard::ranks_per_task]``). The ranks of a task therefore see
    disjoint samples within a pass, and every rank of the world yields the same count.

    Args:
        lengths: the size of every task's dataset, ``{name: len}`` (or ``{name: dataset}``),
            in the plan's task order or any order with the same names.
        plan: the :class:`TaskPlan`.
        rank: this rank (default: the default process group's rank).
        seed: base seed (the same on every rank).
        shuffle: permute per epoch (False: dataset order).
        epoch_length: indices per rank and epoch. ``"max"`` (default): enough for every rank to
            see its whole shard of the largest task; smaller tasks wrap around (each pass with a
            fresh permutation). ``"min"``: cut every task to the smallest one's shard.
            ``"shard"``: exactly this rank's shard of its task, no repeats (counts differ across
            tasks: for evaluation loops without collectives, not for DDP training). An int:
            that many.
    """

    def __init__(self, lengths: Mapping[str, Any], plan: TaskPlan, rank: int | None = None, *,
                 seed: int = 0, shuffle: bool = True, epoch_length: str | int = "max"):
        if not isinstance(plan, TaskPlan):
            raise TypeError(f"plan must be a TaskPlan; got {type(plan).__name__}")
        sizes = {}
        for name, value in lengths.items():
            n = value if isinstance(value, int) and not isinstance(value, bool) else len(value)
            sizes[name] = int(n)
        if set(sizes) != set(plan.tasks):
            raise ValueError(f"lengths must have one entry per task of the plan {list(plan.tasks)}; "
                             f"got {sorted(sizes)}")
        empty = [n for n in plan.tasks if sizes[n] < 1]
        if empty:
            raise ValueError(f"the dataset of task(s) {empty} is empty; every task needs data")
        if not (epoch_length in EPOCH_LENGTHS or (isinstance(epoch_length, int)
                                                  and not isinstance(epoch_length, bool) and epoch_length > 0)):
            raise ValueError(f"epoch_length must be one of {EPOCH_LENGTHS} or a positive int; got {epoch_length!r}")
        self.plan = plan
        self.rank = plan._check_rank(_dist_rank(rank))
        self.task = plan.task_id(self.rank)
        self.task_name = plan.tasks[self.task]
        self.shard, self.num_shards = plan.shard_of(self.rank)
        self.task_size = sizes[self.task_name]
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch_length = epoch_length
        self.epoch = 0
        k = plan.ranks_per_task
        if epoch_length == "max":
            self.num_samples = max(math.ceil(n / k) for n in sizes.values())
        elif epoch_length == "min":
            self.num_samples = min(n // k for n in sizes.values())
            if self.num_samples < 1:
                raise ValueError(f"epoch_length='min': the smallest task has fewer samples than its {k} ranks; "
                                 f"sizes {sizes}")
        elif epoch_length == "shard":
            self.num_samples = len(range(self.shard, self.task_size, self.num_shards))
        else:
            self.num_samples = int(epoch_length)

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation of ``epoch`` on the next iteration (call it on every rank)."""
        self.epoch = int(epoch)

    def _order(self, passes: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.task_size).repeat(passes)
        gen = torch.Generator().manual_seed(_seed_for(self.seed, self.epoch, self.task))
        return torch.cat([torch.randperm(self.task_size, generator=gen) for _ in range(passes)])

    def __iter__(self) -> Iterator[int]:
        if self.epoch_length == "shard":
            order = self._order(1)
            return iter(order[self.shard::self.num_shards].tolist())
        needed = self.num_samples * self.num_shards
        order = self._order(math.ceil(needed / self.task_size))[:needed]
        return iter(order[self.shard::self.num_shards].tolist())

    def __len__(self) -> int:
        return self.num_samples


def task_dataloader(datasets: Mapping[str, Any], rank: int | None, plan: TaskPlan, batch_size: int = 1, *,
                    seed: int = 0, shuffle: bool = True, epoch_length: str | int = "max",
                    **loader_kwargs: Any) -> DataLoader:
    """A plain ``DataLoader`` over ``datasets[plan.task_name(rank)]`` with a :class:`TaskSampler`.

    Only the rank's own task dataset is indexed. Call ``loader.sampler.set_epoch(epoch)`` at
    the start of every epoch. ``loader_kwargs`` go to ``DataLoader`` (``collate_fn``,
    ``num_workers``, ``drop_last``, ...; not ``sampler`` or ``shuffle``).
    """
    for bad in ("sampler", "batch_sampler", "shuffle"):
        if bad in loader_kwargs:
            raise TypeError(f"task_dataloader sets the sampler itself; do not pass {bad}=")
    sampler = TaskSampler(datasets, plan, rank, seed=seed, shuffle=shuffle, epoch_length=epoch_length)
    return DataLoader(datasets[sampler.task_name], batch_size=batch_size, sampler=sampler, **loader_kwargs)


def gather_task_metrics(metrics: Mapping[str, float], count: float, plan: TaskPlan, *, group=None,
                        dst: int = 0) -> dict[str, dict[str, float]] | None:
    """Merge every rank's metrics of its own task into one value per task, on rank ``dst``.

    A collective: every rank of ``group`` calls it with its task's metrics (e.g.
    ``{"loss": mean_loss}``) and the number of examples they average over; the ranks of a
    task are combined as a ``count``-weighted mean.

    Returns:
        on ``dst``: ``{task name: {metric: value}}`` in the plan's task order (tasks whose ranks
        saw no example get NaN); elsewhere None.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gather_task_metrics is a collective: initialize a torch.distributed process group")
    world = dist.get_world_size(group)
    if world != plan.world_size:
        raise ValueError(f"plan is for {plan.world_size} ranks but the process group has {world}")
    rank = dist.get_rank(group)
    mine = (rank, {k: float(v) for k, v in metrics.items()}, float(count))
    gathered = [None] * world if rank == dst else None
    dst_global = dist.get_global_rank(group, dst) if group is not None else dst
    dist.gather_object(mine, gathered, dst=dst_global, group=group)
    if rank != dst:
        return None
    out = {}
    for t, name in enumerate(plan.tasks):
        parts = [g for g in gathered if plan.task_of_rank[g[0]] == t]
        total = sum(p[2] for p in parts)
        keys = sorted({k for p in parts for k in p[1]})
        out[name] = {k: (sum(p[1][k] * p[2] for p in parts if k in p[1]) / total if total > 0 else math.nan)
                     for k in keys}
    return out


def evaluate_tasks(metric_fn: Callable[[Any], Mapping[str, float]], datasets: Mapping[str, Any], plan: TaskPlan,
                   batch_size: int = 1, *, rank: int | None = None, group=None, dst: int = 0,
                   **loader_kwargs: Any) -> dict[str, dict[str, float]] | None:
    """Evaluate every task on the ranks that train it; ``{task: {metric: value}}`` on ``dst``.

    Each rank runs ``metric_fn(batch) -> {name: batch mean}`` over its shard of its own task's
    dataset (in order, no repeats; ``len(batch)`` or the first tensor's length is the batch
    size) without any collective, then :func:`gather_task_metrics` merges the example-weighted
    means. Run it on the unwrapped model (``ddp_model.module``) under ``torch.no_grad()``.
    """
    rank = _dist_rank(rank, group)
    loader = task_dataloader(datasets, rank, plan, batch_size, shuffle=False, epoch_length="shard",
                             **loader_kwargs)
    sums: dict[str, float] = {}
    seen = 0
    for batch in loader:
        values = metric_fn(batch)
        first = batch[0] if isinstance(batch, (list, tuple)) else (
            next(iter(batch.values())) if isinstance(batch, Mapping) else batch)
        n = len(first)
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
        seen += n
    means = {k: v / seen for k, v in sums.items()} if seen else {}
    return gather_task_metrics(means, seen, plan, group=group, dst=dst)
