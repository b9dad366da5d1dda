"""Helpers of the DDP hook tests: gloo process groups on localhost, a tiny model, per-rank
data, and the single-process reference: every task's full gradient by plain autograd, combined
per bucket by the float64 oracles of :mod:`tests.references` (no code of the library)."""

from __future__ import annotations

import copy
import datetime
import faulthandler
import gc
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bucketmoo_kernels as bmk
from tests import references
from bucketmoo_kernels.ddp import BucketMOOState, bucket_moo_hook
from bucketmoo_kernels.distributed.localhost import free_port


# --------------------------------------------------------------------------- process groups
def _entry(rank: int, fn, world: int, port: int, outdir: str, args: tuple, init_group: bool,
           timeout_s: float) -> None:
    # An abort in a worker (a C++ std::terminate) prints every thread's Python stack.
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    # torchrun's variables, for engines that set up the group themselves (HF, Lightning, DeepSpeed).
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        if init_group:
            # A short timeout: a collective mismatch fails the test in minutes, not gloo's default 30.
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        result = {"ok": fn(rank, world, *args)}
    except BaseException:  # noqa: BLE001  (reported to the parent)
        result = {"error": traceback.format_exc()}
    try:
        torch.save(result, Path(outdir) / f"{rank}.pt")
        # Every rank's last sends must land before any rank tears gloo down: destroying a
        # group while a peer still streams into it aborts the process. A failed rank skips
        # the barrier (its peers then fail fast).
        if "ok" in result and dist.is_initialized():
            try:
                dist.barrier()
            except RuntimeError:
                pass  # a peer failed and left: its own result file holds the reason

        # Free the worker's objects (a DDP reducer holding the hook state, pending futures)
        # now, in the main thread with the interpreter fully alive, not during finalization.
        gc.collect()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # The result is on disk and the group is gone: leave without interpreter finalization,
    # where C++ threads or destructors that still reach for Python can std::terminate
    # ("terminate called without an active exception", seen rarely under load). The parent
    # reads results from the files, so nothing is lost.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, world: int, *args, init_group: bool = True, timeout_s: float = 180) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned processes; return the per-rank results.

    ``fn`` must be importable (a module-level function). Every process has torchrun's
    environment variables (RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...) and, with ``init_group``,
    a gloo process group (collective timeout ``timeout_s``); without it the engine under test
    sets the group up from the environment. A worker's exception is re-raised here with its
    traceback.
    """
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(_entry, args=(fn, world, free_port(), outdir, args, init_group, timeout_s), nprocs=world,
                           start_method="spawn")
        results = [torch.load(Path(outdir) / f"{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        if "error" in res:
            raise AssertionError(f"rank {r} failed:\n{res['error']}")
    return [res["ok"] for res in results]


def case_results(results: list, name: str) -> list:
    """Case ``name``'s result on every rank, from workers that return ``{name: result}`` and
    record a failing case as ``{"error": traceback}``: the test fails with that traceback."""
    import pytest

    per_rank = [res[name] for res in results]
    for rank, res in enumerate(per_rank):
        if isinstance(res, dict) and "error" in res:
            pytest.fail(f"case {name!r} failed on rank {rank}:\n{res['error']}")
    return per_rank


def run_scenarios(world: int, scenarios: dict) -> list:
    """One process group, many scenarios (``{name: cfg}``): per rank ``{name: result}``, where a
    failing scenario's result is ``{"error": traceback}``."""
    return run_distributed(_scenario_worker, world, scenarios)


def _scenario_worker(rank: int, world: int, scenarios: dict) -> dict:
    out = {}
    for name, cfg in scenarios.items():
        try:
            out[name] = train(rank, world, cfg)
        except BaseException:  # noqa: BLE001
            out[name] = {"error": traceback.format_exc()}
        dist.barrier()
    return out


# --------------------------------------------------------------------------- model and data
IN, HIDDEN, OUT = 6, 10, 3


class TwoHeads(torch.nn.Module):
    """A shared trunk and one head per task: each task leaves the other head unused."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh())
        self.heads = torch.nn.ModuleList([torch.nn.Linear(HIDDEN, OUT) for _ in range(2)])

    def forward(self, x, task: int = 0):
        return self.heads[task](self.trunk(x))


def make_model(dtype=torch.float32, seed: int = 0, two_heads: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    if two_heads:
        return TwoHeads().to(dtype)
    model = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, HIDDEN),
                                torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT))
    return model.to(dtype)


def batch(step: int, rank: int, micro: int, dtype=torch.float32):
    """The data of ``rank`` (its task) at ``step`` and micro-batch ``micro``; tasks get targets
    of different signs so their gradients conflict."""
    gen = torch.Generator().manual_seed(10_000 * step + 100 * rank + micro)
    x = torch.randn(4, IN, generator=gen)
    y = torch.randn(4, OUT, generator=gen) + (2.0 if rank % 2 == 0 else -2.0)
    return x.to(dtype), y.to(dtype)


def loss_of(model, data, task: int | None = None) -> torch.Tensor:
    x, y = data
    pred = model(x) if task is None else model(x, task)
    return torch.nn.functional.mse_loss(pred, y)


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])


# --------------------------------------------------------------------------- reference
def task_gradients(model: torch.nn.Module, datas: list[list], two_heads: bool = False) -> list[list[torch.Tensor]]:
    """For each task: the average over its ranks of the sum over micro-batches of the
    gradient, in float64 (one list of per-parameter tensors per task). ``datas[t]`` = list
    over the task's ranks of lists of micro-batches. Plain autograd on an unwrapped copy of
    the model: no DDP, no hook."""
    out = []
    params = list(model.parameters())
    for task, per_rank in enumerate(datas):
        acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        for micros in per_rank:
            for data in micros:
                g = torch.autograd.grad(loss_of(model, data, task if two_heads else None), params,
                                        allow_unused=True)
                acc = [a + (b.double() if b is not None else 0) for a, b in zip(acc, g)]
        out.append([a / len(per_rank) for a in acc])
    return out


def bucket_layout(ddp_module, state: BucketMOOState) -> list[list[int]]:
    """The parameter indices of every bucket, in bucket order, as the hook saw them."""
    index_of = {id(p): i for i, p in enumerate(ddp_module.parameters())}
    return [[index_of[id(p)] for p in state.bucket_params[b]] for b in sorted(state.bucket_params)]


def reference_combined(model, ddp_module, state: BucketMOOState, task_grads, method: str, granularity: str,
                       options: dict, step: int) -> list[tuple[list[int], torch.Tensor]]:
    """Per bucket: the parameter indices and the expected combined gradient (float64).

    Computed by :mod:`tests.references` (float64, on the explicit task gradients, no code of
    the library) per segment of the granularity: the bucket, each parameter, chunks of the
    bucket, or one segment over all buckets (``global``). ``options`` may hold the method's
    options and ``normalization`` / ``losses`` / ``normalize_weights``; PCGrad's seed advances
    by one per step, as the state does.
    """
    buckets = bucket_layout(ddp_module, state)
    opts = dict(options)
    if "seed" in bmk.methods.get_method(method).defaults:  # the state varies seeds per step
        opts["seed"] = opts.get("seed", 0) + step
    sizes = [p.numel() for p in ddp_module.parameters()]
    rows_of = lambda idx: torch.stack([torch.cat([g[i].reshape(-1) for i in idx]) for g in task_grads])  # noqa: E731
    if granularity == "global":
        idx = [i for b in buckets for i in b]
        combined = references.combined_per_segment(rows_of(idx), None, method, **opts)
        out, start = [], 0
        for b in buckets:
            n = sum(sizes[i] for i in b)
            out.append((b, combined[start:start + n]))
            start += n
        return out
    out = []
    for b in buckets:
        n = sum(sizes[i] for i in b)
        if granularity == "param":
            lengths = [sizes[i] for i in b]
        elif granularity.startswith("chunk:"):
            chunk = int(granularity.split(":")[1])
            lengths = [min(chunk, n - s) for s in range(0, n, chunk)]
        else:
            lengths = None
        out.append((b, references.combined_per_segment(rows_of(b), lengths, method, **opts)))
    return out


def gradient_scale(task_grads, idx: list[int]) -> float:
    """The largest task-gradient entry over the parameters ``idx``: the scale errors of a
    combined gradient are measured against (the combination itself may be ~0, e.g. the
    min-norm point of a task gradient and a zero one)."""
    return max(max(float(g[i].abs().max()) for i in idx) for g in task_grads) or 1.0


#: Largest relative error (max |got - expected| / :func:`gradient_scale` per bucket and step) of a
#: combined gradient against the float64 reference, by world size and by the lowest
#: precision on the gradient's path (the model dtype or the wire dtype of ``compress``).
#: float32: accumulation order and the float32 Gram the weights are solved from (the solve
#: amplifies its rounding by the conditioning of the min-norm problem); bf16/fp16: every task
#: row is rounded once on the wire (once per rank of the task before the group average) and
#: the combined shard once more on the way back, about 2-3 unit roundoffs of the dtype, plus
#: the weights solved from the Gram of the rounded rows.
#: Worst errors measured (2026-12-01): float32 1.2e-6; fp16 wire 1.4e-3 (P=2), 1.2e-3 (P=4);
#: bf16 model 3.2e-3, bf16 wire 6.2e-3 (P=2), 8.8e-3 (P=4, two ranks per task).
RELATIVE_TOLERANCE = {
    2: {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2},
    4: {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2},
}
WIRE_DTYPES = {None: torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def relative_tolerance(world: int, cfg: dict) -> float:
    """The tolerance of a scenario ``cfg`` of :func:`train` on ``world`` processes."""
    dtypes = [cfg.get("dtype", torch.float32), WIRE_DTYPES[cfg.get("compress")]]
    lowest = max(dtypes, key=lambda d: references.UNIT_ROUNDOFF[d])
    return RELATIVE_TOLERANCE[world][lowest]


# --------------------------------------------------------------------------- training loop
def train(rank: int, world: int, cfg: dict) -> dict:
    """K steps of DDP on the tiny model with ``cfg``; checks against the reference when asked.

    cfg keys: mode ("plain" | "ranks" | "stash"), steps, method, granularity, protocol,
    compress, dtype, bucket_cap_mb, grad_view, micro (micro-batches, no_sync before the last),
    task_of_rank, num_tasks, stash_reduce, record, options, check (compare to the reference).
    """
    mode = cfg.get("mode", "ranks")
    dtype = cfg.get("dtype", torch.float32)
    steps = cfg.get("steps", 3)
    micro = cfg.get("micro", 1)
    method = cfg.get("method", "mgda")
    granularity = cfg.get("granularity", "bucket")
    options = dict(cfg.get("options", {}))
    two_heads = cfg.get("two_heads", False)
    model = make_model(dtype, two_heads=two_heads)
    ref_model = copy.deepcopy(model)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, bucket_cap_mb=cfg.get("bucket_cap_mb", 0.0004), gradient_as_bucket_view=cfg.get("grad_view", False),
        find_unused_parameters=two_heads)
    state = None
    if mode != "plain":
        state = BucketMOOState(method=method, mode=mode, granularity=granularity, task_of_rank=cfg.get("task_of_rank"),
                               num_tasks=cfg.get("num_tasks"), protocol=cfg.get("protocol", "sharded"),
                               compress=cfg.get("compress"), stash_reduce=cfg.get("stash_reduce", "tasks"),
                               record_diagnostics=cfg.get("record", False), overlap=cfg.get("overlap", True),
                               **options)
        ddp.register_comm_hook(state, bucket_moo_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=cfg.get("lr", 0.05))
    errs, grads_seen = [], []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        if mode == "stash":
            num_tasks = cfg["num_tasks"]
            for t in range(num_tasks):
                with state.task(t):
                    loss_of(ddp, batch(step, rank, t, dtype)).backward()
            datas = [[[batch(step, r, t, dtype)] for r in range(world)] for t in range(num_tasks)]
        else:
            task_of_rank = cfg.get("task_of_rank") or list(range(world))
            head = task_of_rank[rank] if two_heads else None
            for m in range(micro):
                if m < micro - 1:
                    with ddp.no_sync():
                        loss_of(ddp, batch(step, rank, m, dtype), head).backward()
                else:
                    loss_of(ddp, batch(step, rank, m, dtype), head).backward()
            num_tasks = max(task_of_rank) + 1
            datas = [[[batch(step, r, m, dtype) for m in range(micro)] for r in range(world) if task_of_rank[r] == t]
                     for t in range(num_tasks)]
        if cfg.get("check") and state is not None:
            ref_model.load_state_dict(ddp.module.state_dict())
            tg = task_gradients(ref_model, datas, two_heads)
            expected = reference_combined(ref_model, ddp.module, state, tg, method, granularity, options, step)
            params = list(ddp.module.parameters())
            worst = 0.0
            for idx, exp in expected:
                got = torch.cat([(params[i].grad if params[i].grad is not None else torch.zeros_like(params[i]))
                                 .reshape(-1) for i in idx])
                worst = max(worst, float((got.double() - exp).abs().max() / gradient_scale(tg, idx)))
            errs.append(worst)
        grads_seen.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                                     for p in ddp.module.parameters()]))
        opt.step()
    result = {"params": flat_params(ddp.module), "errs": errs, "grads": grads_seen}
    if state is not None:
        result["peak_extra_bytes"] = state.peak_extra_bytes
        result["step"] = state.step
        result["largest_bucket_bytes"] = state.largest_bucket_bytes
        result["stash_reassembled"] = state.stash_reassembled
        result["bucket_numels"] = {b: sum(p.numel() for p in ps) for b, ps in state.bucket_params.items()}
        result["element_size"] = torch.empty(0, dtype=dtype).element_size()
        if state.record_diagnostics:
            result["diag_len"] = len(state.diagnostics)
            result["diag"] = state.diagnostics.summary()
            result["diag_b0"] = state.diagnostics.to_tensors(state.diagnostics.buckets()[-1])
    return result


def nonfinite_worker(rank: int, world: int) -> dict:
    """One backward where rank 1's data holds an Inf: the hook must not raise, and the
    combined gradient must be non-finite on every rank (so GradScaler skips the step)."""
    ddp = torch.nn.parallel.DistributedDataParallel(make_model(), bucket_cap_mb=0.0004)
    ddp.register_comm_hook(BucketMOOState(method="mgda"), bucket_moo_hook)
    x, y = batch(0, rank, 0)
    if rank == 1:
        x[0, 0] = float("inf")
    loss_of(ddp, (x, y)).backward()
    return {"finite": all(bool(torch.isfinite(p.grad).all()) for p in ddp.module.parameters())}


def protocol_worker(rank: int, world: int) -> dict:
    """The flat-tensor protocol (what FSDP reuses) on awkward bucket lengths -- including
    lengths where the last shards are short or empty -- against the float64 oracle on the
    stacked task gradients. Returns the worst relative error per case."""
    from bucketmoo_kernels.distributed.protocol import TaskLayout, allgather_tasks, sharded_moo

    out = {}
    for layout in (None, [0, 1] * (world // 2)):
        tasks = TaskLayout.build(layout, world)
        for n in (1, 5, 7, 64, 130):
            flats = [torch.randn(n, generator=torch.Generator().manual_seed(100 * r + n)) for r in range(world)]
            rows = [torch.stack([flats[r] for r in rs]).mean(0) for rs in tasks.ranks_of_task]
            for segs in (None, bmk.Segments.from_lengths([n // 2, 0, n - n // 2]), 3):
                seg_obj = bmk.inputs.as_segments(segs, n)
                lengths = seg_obj.lengths.tolist()
                expected = references.combined_per_segment(rows, lengths, "mgda")
                for wire in (None, torch.bfloat16):
                    flat = flats[rank].clone()
                    gram_matrix, weights, _ = sharded_moo(flat, seg_obj, tasks, "mgda", wire_dtype=wire)
                    tol_scale = torch.stack(rows).abs().max()  # the inputs' scale (the result may be ~0)
                    key = (str(layout), n, str(segs), str(wire))
                    out[key] = float((flat - expected).abs().max() / tol_scale)
                    if wire is None:
                        ref_gram = torch.stack([b.T @ b for b in torch.split(
                            torch.stack(rows).double().T, lengths)])
                        out[key + ("gram",)] = float((gram_matrix - ref_gram).abs().max()
                                                     / ref_gram.abs().max().clamp_min(1e-6))
                got_rows, _ = allgather_tasks(flats[rank], tasks)
                out[(str(layout), n, str(segs), "allgather")] = float(
                    (torch.stack(list(got_rows)) - torch.stack(rows)).abs().max())
    return out
