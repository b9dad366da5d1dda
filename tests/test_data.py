"""Tasks-on-ranks data (``bucketmoo_kernels.data``): plans, the sampler, per-task metrics."""

import datetime
import math
import os
import socket
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from bucketmoo_kernels.data import (TaskPlan, TaskSampler, evaluate_tasks, gather_task_metrics,
                                    task_dataloader)

SIZES = {"de": 10, "fr": 7, "sw": 4}


# ----------------------------------------------------------------------------- TaskPlan
def test_plan_default_blocks_and_identity():
    plan = TaskPlan.build(["a", "b"], world_size=4)
    assert plan.task_of_rank == (0, 0, 1, 1)
    assert plan.ranks_of("b") == (2, 3) and plan.ranks_per_task == 2
    assert [plan.shard_of(r) for r in range(4)] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    assert TaskPlan.build(SIZES, world_size=3).task_ids == (0, 1, 2)  # rank r -> task r, like the hook


def test_plan_names_and_ids():
    plan = TaskPlan.build(["a", "b"], world_size=4, task_of_rank=["b", "a", "b", "a"])
    assert plan.task_ids == (1, 0, 1, 0)
    assert plan.task_name(0) == "b" and plan.shard_of(2) == (1, 2) and plan.shard_of(3) == (1, 2)
    assert TaskPlan.build(["a", "b"], 2, [1, 0]).task_ids == (1, 0)


@pytest.mark.parametrize("tasks, world, tor, match", [
    (["a", "b"], 3, None, "cannot be split into 2 tasks"),
    (["a", "b"], 4, [0, 0, 0, 1], "same number of ranks"),
    (["a", "b"], 2, [0, 0], "no rank to task"),
    (["a", "b"], 2, [0, 2], r"task_of_rank\[1\]"),
    (["a", "b"], 2, ["a", "x"], "not one of the tasks"),
    (["a", "b"], 2, [0, 1, 1], "one task per rank"),
    (["a", "a"], 2, None, "distinct"),
    ([], 2, None, "at least one task"),
    (["a"], 0, None, "world_size"),
])
def test_plan_errors(tasks, world, tor, match):
    with pytest.raises(ValueError, match=match):
        TaskPlan.build(tasks, world, tor)


def test_plan_needs_world_without_group():
    with pytest.raises(RuntimeError, match="world_size was not given"):
        TaskPlan.build(["a"])


# ----------------------------------------------------------------------------- TaskSampler
def _epoch(plan, rank, epoch, **kw):
    s = TaskSampler(SIZES, plan, rank, **kw)
    s.set_epoch(epoch)
    out = list(s)
    assert len(out) == len(s)
    return s, out


def test_sampler_shards_disjoint_cover_and_equal_lengths():
    plan = TaskPlan.build(SIZES, world_size=6)  # 2 ranks per task
    for epoch in range(3):
        lengths = set()
        for t, name in enumerate(plan.tasks):
            shards = [_epoch(plan, r, epoch, seed=5)[1] for r in plan.ranks_of(name)]
            lengths |= {len(s) for s in shards}
            n = SIZES[name]
            # max task: 10 over 2 ranks -> 5 each; everyone yields 5
            everything = [i for pair in zip(*shards) for i in pair]
            assert all(0 <= i < n for i in everything)
            first_pass = everything[:n]
            assert sorted(first_pass) == list(range(n)), (name, epoch)  # one full pass, no repeat
            if n >= 10:
                assert not set(shards[0]) & set(shards[1])
        assert lengths == {5}


def test_sampler_deterministic_per_epoch_and_seed():
    plan = TaskPlan.build(SIZES, world_size=3)
    a = _epoch(plan, 0, 0, seed=1)[1]
    assert a == _epoch(plan, 0, 0, seed=1)[1]
    assert a != _epoch(plan, 0, 1, seed=1)[1]
    assert a != _epoch(plan, 0, 0, seed=2)[1]
    assert sorted(a) == list(range(10))
    assert _epoch(plan, 0, 3, shuffle=False)[1] == list(range(10))


def test_sampler_wraps_small_task_with_fresh_permutation():
    plan = TaskPlan.build(SIZES, world_size=3)
    _, sw = _epoch(plan, 2, 0, seed=0)
    assert len(sw) == 10
    assert sorted(sw[:4]) == list(range(4)) and sorted(sw[4:8]) == list(range(4))


def test_sampler_epoch_lengths():
    plan = TaskPlan.build(SIZES, world_size=3)
    assert len(TaskSampler(SIZES, plan, 0, epoch_length="min")) == 4
    assert len(TaskSampler(SIZES, plan, 1, epoch_length=3)) == 3
    s = TaskSampler(SIZES, plan, 1, epoch_length="shard", shuffle=False)
    assert list(s) == list(range(7))
    plan2 = TaskPlan.build(SIZES, world_size=6)
    assert list(TaskSampler(SIZES, plan2, 3, epoch_length="shard", shuffle=False)) == [1, 3, 5]


@pytest.mark.parametrize("kw, err, match", [
    (dict(lengths={"de": 1}), ValueError, "one entry per task"),
    (dict(lengths={"de": 0, "fr": 1, "sw": 1}), ValueError, "empty"),
    (dict(epoch_length="all"), ValueError, "epoch_length"),
    (dict(rank=3), ValueError, "rank must be"),
    (dict(plan="x"), TypeError, "TaskPlan"),
])
def test_sampler_errors(kw, err, match):
    args = dict(lengths=SIZES, plan=TaskPlan.build(SIZES, 3), rank=0)
    args.update(kw)
    with pytest.raises(err, match=match):
        TaskSampler(args.pop("lengths"), args.pop("plan"), args.pop("rank"), **args)


def test_task_dataloader_reads_only_its_task():
    data = {name: TensorDataset(torch.full((n,), float(t)), torch.arange(n)) for t, (name, n) in
            enumerate(SIZES.items())}
    plan = TaskPlan.build(data, world_size=3)
    for rank in range(3):
        loader = task_dataloader(data, rank, plan, batch_size=4, seed=0)
        batches = list(loader)
        assert len(loader) == len(batches) == 3  # 10 samples per rank, batch 4
        for tag, _ in batches:
            assert torch.all(tag == rank)
    with pytest.raises(TypeError, match="sampler="):
        task_dataloader(data, 0, plan, sampler=None)


# ----------------------------------------------------------------------------- 2 gloo processes
def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        plan = TaskPlan.build(["a", "b"])             # world and rank from the group
        data = {"a": TensorDataset(torch.arange(6.0)), "b": TensorDataset(torch.arange(3.0) + 100)}
        loader = task_dataloader(data, None, plan, batch_size=2, seed=3)
        seen = [torch.cat([b[0] for b in loader]).tolist()]
        loader.sampler.set_epoch(1)
        seen.append(torch.cat([b[0] for b in loader]).tolist())
        res = evaluate_tasks(lambda b: {"mean": b[0].mean(), "one": 1.0}, data, plan, batch_size=4)
        metrics = gather_task_metrics({"x": float(rank)}, rank + 1, plan, dst=1)
        result = {"ok": (seen, res, metrics)}
    except BaseException:  # noqa: BLE001
        result = {"error": traceback.format_exc()}
    torch.save(result, Path(outdir) / f"{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_gloo():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(2, port, out), nprocs=2, start_method="spawn")
        results = [torch.load(Path(out) / f"{r}.pt") for r in range(2)]
    for r, res in enumerate(results):
        assert "ok" in res, f"rank {r}:\n{res.get('error')}"
    (seen0, res0, m0), (seen1, res1, m1) = (r["ok"] for r in results)
    assert all(sorted(e) == [0.0, 1, 2, 3, 4, 5] for e in seen0) and seen0[0] != seen0[1]
    assert [sorted(e[:3]) for e in seen1] == [[100.0, 101, 102]] * 2 and len(seen1[0]) == 6
    assert res1 is None and m0 is None
    assert res0 == {"a": {"mean": 2.5, "one": 1.0}, "b": {"mean": 101.0, "one": 1.0}}
    assert m1 == {"a": {"x": 0.0}, "b": {"x": 1.0}}
    assert not math.isnan(m1["a"]["x"])
