"""End-to-end DDP step time, plain DDP vs bucket_moo_hook, and a breakdown of the hook's own cost.

gloo on localhost, P = 2 processes (``--worlds``) of one thread each, an MLP of ~10M
parameters on CPU, DDP's default 25 MB buckets. Every configuration is built once (its own
DDP model, warmed up past DDP's bucket rebuild) and the configurations are then visited
round-robin, one timed step each per round, ``--samples`` rounds: a burst of load from other
jobs hits all of them alike. A step is timed between two barriers (rank 0's clock).

* tasks on ranks: one forward/backward per rank per step (rank r = task r); baseline: plain DDP.
* stash: T = 2 forward/backward per step on every rank; baseline: plain DDP accumulating the
  same 2 micro-batches (``no_sync`` on all but the last).

Per configuration: median step time with its interquartile range, and the ratio to the
baseline taken per round (the two steps of a round are seconds apart, so load mostly cancels)
with the IQR of those ratios. ``in hook ms``: wall time rank 0 spends inside the hook per step.

The breakdown reads the overhead of bucket MGDA (sharded protocol) without the noise: in the
same rounds, on the bucket sizes DDP really used (recorded by a probe hook), it times
* ``kernel``: what the hook computes per step on a rank, Gram + solve + combine of the rank's
  [T, n/P] shard of every bucket (``fused_bucket_moo``);
* ``plain collectives``: one all-reduce per bucket (what plain DDP sends);
* ``sharded collectives``: per bucket an all-to-all of n elements, an all-reduce of the
  [1, T, T] Gram and an all-gather of n/P (the protocol's traffic, without any compute);
and reports ``extra collectives`` = sharded - plain, and ``waiting and the rest`` = the
measured per-round overhead (hook step - plain step) - kernel - extra collectives: time lost
to ranks waiting on each other, to communication that no longer overlaps the backward, and
to the hook's Python and copies.

``extra MB`` is the hook's peak allocation (``state.peak_extra_bytes``) over the timed steps
and ``extra / bucket`` divides it by the largest bucket.

Usage: python -m benchmarks.bench_ddp_step [--worlds 2] [--samples 20] [--width 1152 --layers 8]
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
import torch.distributed as dist

import bucketmoo_kernels as bm
from benchmarks.harness import (append_results, environment, finish_worker, load_average, run_gloo_workers,
                                step_bench_parser, summarize)
from bucketmoo_kernels.ddp import BucketMOOState, bucket_moo_hook

CONFIGS = [
    # name, kind ("ranks" / "stash"), state kwargs (None: plain DDP)
    ("plain DDP", "ranks", None),
    ("ranks mean (DDP all-reduce)", "ranks", dict(method="mean")),
    ("ranks mgda bucket sharded", "ranks", dict(method="mgda")),
    ("ranks mgda bucket sharded, no overlap", "ranks", dict(method="mgda", overlap=False)),
    ("ranks mgda bucket sharded bf16", "ranks", dict(method="mgda", compress="bf16")),
    ("ranks mgda bucket allgather", "ranks", dict(method="mgda", protocol="allgather")),
    ("ranks mgda param sharded", "ranks", dict(method="mgda", granularity="param")),
    ("ranks mgda chunk:65536 sharded", "ranks", dict(method="mgda", granularity="chunk:65536")),
    ("ranks mgda global sharded", "ranks", dict(method="mgda", granularity="global")),
    ("ranks pcgrad bucket sharded", "ranks", dict(method="pcgrad")),
    ("ranks cagrad bucket sharded", "ranks", dict(method="cagrad")),
    ("plain DDP, 2 micro-batches", "stash", None),
    ("stash mgda bucket (T=2)", "stash", dict(method="mgda", mode="stash", num_tasks=2)),
    ("stash mgda global (T=2)", "stash", dict(method="mgda", mode="stash", num_tasks=2, granularity="global")),
]
BASELINE = {"ranks": "plain DDP", "stash": "plain DDP, 2 micro-batches"}
BREAKDOWN_OF = "ranks mgda bucket sharded"


def _model(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*mods)


def _step(ddp, state, kind, data, opt) -> None:
    opt.zero_grad(set_to_none=True)
    if kind == "ranks":
        ddp(data[0]).square().mean().backward()
    elif state is None:
        with ddp.no_sync():
            ddp(data[0]).square().mean().backward()
        ddp(data[1]).square().mean().backward()
    else:
        for t in range(2):
            with state.task(t):
                (ddp(data[t]).square().mean() * (1 if t == 0 else -0.5)).backward()
    opt.step()


def _timed_hook(clock: list[float]):
    """``bucket_moo_hook`` that adds the wall time of each of its calls to ``clock[0]``."""

    @functools.wraps(bucket_moo_hook)
    def hook(state, bucket):
        t0 = time.perf_counter()
        try:
            return bucket_moo_hook(state, bucket)
        finally:
            clock[0] += time.perf_counter() - t0

    return hook


def _bucket_sizes(args, data) -> list[int]:
    """The bucket lengths plain DDP uses after its first-iteration rebuild (a probe hook)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    seen: dict[int, int] = {}

    def probe(state, bucket):
        seen[bucket.index()] = bucket.buffer().numel()
        return allreduce_hook(state, bucket)

    ddp = torch.nn.parallel.DistributedDataParallel(_model(args.width, args.layers))
    ddp.register_comm_hook(None, probe)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    for _ in range(3):
        seen.clear()
        _step(ddp, None, "ranks", data, opt)
    return [seen[i] for i in sorted(seen)]


def _breakdown_calls(sizes: list[int], world: int, rank: int) -> dict:
    """The isolated parts of the sharded protocol on buckets of ``sizes``."""
    shards = [-(-n // world) for n in sizes]
    rows = [torch.randn(world, m) for m in shards]  # [T, n/P]: this rank's shard of every task
    outs = [torch.zeros(m) for m in shards]
    buckets = [torch.randn(n) for n in sizes]
    padded = [torch.zeros(world * m) for m in shards]
    received = [torch.zeros(world * m) for m in shards]
    gathered = [torch.zeros(world * m) for m in shards]
    grams = [torch.zeros(1, world, world) for _ in sizes]

    def kernel():
        for r, o in zip(rows, outs):
            bm.fused_bucket_moo(r, method="mgda", out=o, check_finite=False)

    def plain_collectives():
        for b in buckets:
            dist.all_reduce(b)

    def sharded_collectives():
        for p, r, g, o, gm in zip(padded, received, gathered, outs, grams):
            dist.all_to_all_single(r, p)
            dist.all_reduce(gm)
            dist.all_gather_into_tensor(g, o)

    return {"kernel": kernel, "plain collectives": plain_collectives, "sharded collectives": sharded_collectives}


def _worker(rank: int, world: int, port: int, outdir: str, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(rank)
    data = [torch.randn(args.batch, args.width, generator=gen) for _ in range(2)]
    sizes = _bucket_sizes(args, data)
    clock = [0.0]
    runs = []
    for name, kind, kwargs in CONFIGS:
        ddp = torch.nn.parallel.DistributedDataParallel(_model(args.width, args.layers))
        state = None
        if kwargs is not None:
            state = BucketMOOState(**kwargs)
            ddp.register_comm_hook(state, _timed_hook(clock))
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
        for _ in range(args.warmup):  # DDP's first iteration uses one bucket, then rebuilds
            _step(ddp, state, kind, data, opt)
        if state is not None:
            state.reset_statistics()
        runs.append((name, kind, ddp, state, opt))
    parts = _breakdown_calls(sizes, world, rank)
    for fn in parts.values():
        fn()
    steps = {name: [] for name, *_ in runs}
    in_hook = {name: [] for name, *_ in runs}
    part_ms = {name: [] for name in parts}
    for _ in range(args.samples):
        for name, kind, ddp, state, opt in runs:
            clock[0] = 0.0
            dist.barrier()
            t0 = time.perf_counter()
            _step(ddp, state, kind, data, opt)
            dist.barrier()
            steps[name].append((time.perf_counter() - t0) * 1e3)
            in_hook[name].append(clock[0] * 1e3)
        for name, fn in parts.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            part_ms[name].append((time.perf_counter() - t0) * 1e3)
    out = {"sizes": sizes, "steps": steps, "in_hook": in_hook, "parts": part_ms, "extra": {}}
    for name, _, _, state, _ in runs:
        if state is not None:
            out["extra"][name] = (state.peak_extra_bytes, state.largest_bucket_bytes)
    runs.clear()
    finish_worker(out, rank, outdir)


def _paired(config: list[float], base: list[float], op) -> dict[str, float]:
    """Median and quartiles of ``op(config_r, base_r)`` over the rounds r."""
    return summarize([op(a, b) for a, b in zip(config, base)])


def tables(world: int, res: dict) -> tuple[list[dict], dict]:
    rows = []
    for name, kind, _ in CONFIGS:
        t = summarize(res["steps"][name])
        base = res["steps"][BASELINE[kind]]
        ratio = _paired(res["steps"][name], base, lambda a, b: a / b)
        extra, bucket = res["extra"].get(name, (0, 0))
        rows.append({"P": world, "configuration": name, "step ms": t["median_ms"], "IQR ms": t["iqr_ms"],
                     "x plain": ratio["median_ms"], "x plain p25": ratio["p25_ms"], "x plain p75": ratio["p75_ms"],
                     "in hook ms": statistics.median(res["in_hook"][name]),
                     "extra MB": extra / 2**20, "extra / bucket": extra / bucket if bucket else 0.0})
    parts = {name: summarize(xs) for name, xs in res["parts"].items()}
    overhead = _paired(res["steps"][BREAKDOWN_OF], res["steps"]["plain DDP"], lambda a, b: a - b)
    kernel = parts["kernel"]["median_ms"]
    extra_coll = _paired(res["parts"]["sharded collectives"], res["parts"]["plain collectives"], lambda a, b: a - b)
    breakdown = {
        "P": world, "buckets": len(res["sizes"]), "bucket elements": "+".join(str(n) for n in res["sizes"]),
        "overhead ms": overhead["median_ms"], "overhead IQR ms": overhead["iqr_ms"],
        "kernel ms": kernel, "kernel IQR ms": parts["kernel"]["iqr_ms"],
        "plain collectives ms": parts["plain collectives"]["median_ms"],
        "sharded collectives ms": parts["sharded collectives"]["median_ms"],
        "extra collectives ms": extra_coll["median_ms"], "extra collectives IQR ms": extra_coll["iqr_ms"],
        "waiting and the rest ms": overhead["median_ms"] - kernel - extra_coll["median_ms"],
        "in hook ms": statistics.median(res["in_hook"][BREAKDOWN_OF]),
    }
    return rows, breakdown


def main() -> None:
    parser = step_bench_parser(__doc__, "ddp_step", warmup=3)
    parser.set_defaults(worlds=[2])
    parser.add_argument("--samples", type=int, default=20, help="round-robin rounds (samples per configuration)")
    args = parser.parse_args()
    params = args.layers * (args.width * args.width + args.width)
    env = environment("cpu")
    all_rows, breakdowns = [], []
    for world in args.worlds:
        rows, breakdown = tables(world, run_gloo_workers(_worker, world, args))
        all_rows += rows
        breakdowns.append(breakdown)
        for r in rows:
            print(r, flush=True)
        print(breakdown, flush=True)
    env["load average at end"] = load_average()
    env["model"] = f"MLP {args.layers} x Linear({args.width}, {args.width}), {params / 1e6:.1f}M params, batch {args.batch}"
    env["setup"] = (f"gloo on localhost, 1 thread per process, DDP default buckets (25 MB); every configuration "
                    f"built once and warmed up for {args.warmup} steps, then {args.samples} rounds round-robin over "
                    f"the configurations and the breakdown parts, one timed step each per round")
    notes = (
        "`x plain` is the median over the rounds of (step / baseline step of the same round) with its "
        "quartiles: `ranks` rows against `plain DDP` (one forward/backward per step), `stash` rows against "
        "`plain DDP, 2 micro-batches`. `step ms` and `IQR ms`: median and interquartile range of the step "
        "time. `in hook ms`: rank 0's wall time inside the hook per step (kernels, launching and waiting "
        "on collectives). `extra MB`: the hook's peak allocation over the timed steps "
        "(`state.peak_extra_bytes`), per bucket in flight for tasks on ranks, per step for `global` and "
        "`stash`; `extra / bucket` divides it by the largest bucket.\n\n"
        f"Breakdown of `{BREAKDOWN_OF}` (second table): `overhead` = median over the rounds of its step "
        "minus the plain DDP step of the same round; `kernel` = Gram + solve + combine of this rank's "
        "[T, n/P] shard of every bucket (`fused_bucket_moo`, cpu backend); `extra collectives` = "
        "(all-to-all of each bucket + all-reduce of its [1, T, T] Gram + all-gather of its shard) - "
        "(one all-reduce of each bucket), both timed in isolation in the same rounds; `waiting and the "
        "rest` = overhead - kernel - extra collectives (ranks waiting on each other, communication no "
        "longer overlapping the backward, the hook's Python and copies). The machine is shared (2 "
        "cores, other jobs running; see the load averages): read the ratios and the breakdown, not "
        "absolute times."
    )
    from benchmarks.harness import markdown_table

    path = append_results(args.name, all_rows, env, title="DDP step time: plain DDP vs bucket_moo_hook", notes=notes,
                          extra_md="Breakdown of the hook's own cost:\n\n" + markdown_table(breakdowns))
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
