"""End-to-end DDP step time: plain DDP vs bucket_moo_hook in each mode and granularity.

gloo on localhost, P = 2 and 4 processes (one thread each), an MLP of ~10M parameters on
CPU, DDP's default 25 MB buckets. Every configuration runs in the same process group, one
after the other, so the ratios to plain DDP come from the same run; the configurations are visited
round-robin (``--rounds``) so that load from other jobs spreads evenly. Each step is timed
between two barriers (median and min over the samples, rank 0's clock).

* tasks on ranks: one forward/backward per rank per step (rank r = task r); baseline: plain DDP.
* stash: T = 2 forward/backward per step on every rank; baseline: plain DDP accumulating the
  same T micro-batches (``no_sync`` on all but the last).

``extra MB`` is the hook's own peak allocation (``state.peak_extra_bytes``) over the timed
steps and ``extra / bucket`` divides it by the largest bucket (DDP's first iteration runs
with a single bucket holding every parameter, so the statistics are reset after warm-up).

Usage: python benchmarks/bench_ddp_step.py [--worlds 2 4] [--steps 5] [--width 1152 --layers 8]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import environment, finish_worker, run_gloo_workers, step_bench_parser, write_results  # noqa: E402
from bucketmoo_kernels.ddp import BucketMOOState, bucket_moo_hook  # noqa: E402

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


def _model(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*mods)


def _run_config(ddp, state, kind, data, opt):
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


def _worker(rank: int, world: int, port: int, outdir: str, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(rank)
    data = [torch.randn(args.batch, args.width, generator=gen) for _ in range(2)]
    samples = {name: [] for name, _, _ in CONFIGS}
    extra = {name: (0, 0) for name, _, _ in CONFIGS}
    # Round-robin over the configurations, so that load from other jobs on the machine
    # spreads evenly over them; every round builds a fresh DDP (first iteration: one bucket,
    # then rebuilt) and times `steps` steps after `warmup`.
    for _ in range(args.rounds):
        for name, kind, kwargs in CONFIGS:
            model = _model(args.width, args.layers)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            state = None
            if kwargs is not None:
                state = BucketMOOState(**kwargs)
                ddp.register_comm_hook(state, bucket_moo_hook)
            opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
            for i in range(args.warmup + args.steps):
                if i == args.warmup and state is not None:
                    state.reset_statistics()  # DDP's first iteration uses one bucket for everything
                dist.barrier()
                t0 = time.perf_counter()
                _run_config(ddp, state, kind, data, opt)
                dist.barrier()
                if i >= args.warmup:
                    samples[name].append((time.perf_counter() - t0) * 1e3)
            if state is not None:
                extra[name] = (max(extra[name][0], state.peak_extra_bytes),
                               max(extra[name][1], state.largest_bucket_bytes))
            del ddp, model, opt, state
    rows = []
    for name, kind, _ in CONFIGS:
        times = sorted(samples[name])
        rows.append({"name": name, "kind": kind, "median_ms": times[len(times) // 2], "min_ms": times[0],
                     "extra": extra[name][0], "bucket": extra[name][1]})
    finish_worker(rows, rank, outdir)


def main() -> None:
    parser = step_bench_parser(__doc__, "ddp_step", warmup=2)
    args = parser.parse_args()
    params = args.layers * (args.width * args.width + args.width)
    table = []
    for world in args.worlds:
        rows = run_gloo_workers(_worker, world, args)
        base = {r["kind"]: r for r in rows if r["name"].startswith("plain DDP")}
        for r in rows:
            table.append({
                "P": world,
                "configuration": r["name"],
                "step ms": r["median_ms"],
                "x plain": r["median_ms"] / base[r["kind"]]["median_ms"],
                "min ms": r["min_ms"],
                "x plain (min)": r["min_ms"] / base[r["kind"]]["min_ms"],
                "extra MB": r["extra"] / 2**20,
                "extra / bucket": (r["extra"] / r["bucket"]) if r["bucket"] else 0.0,
            })
            print(table[-1], flush=True)
    env = environment("cpu")
    env["model"] = f"MLP {args.layers} x Linear({args.width}, {args.width}), {params / 1e6:.1f}M params, batch {args.batch}"
    env["setup"] = (f"gloo on localhost, 1 thread per process, DDP default buckets (25 MB); {args.rounds} rounds "
                    f"round-robin over the configurations, each a fresh DDP timed for {args.steps} steps after "
                    f"{args.warmup} warm-up; median and min over the {args.rounds * args.steps} samples")
    notes = (
        "Ratios are to plain DDP in the same run: `ranks` rows to `plain DDP` (one forward/backward per "
        "step), `stash` rows to `plain DDP, 2 micro-batches` (two forward/backward per step). `extra MB`: "
        "the hook's peak allocation over the timed steps (`state.peak_extra_bytes`), per bucket in flight for tasks on ranks, per "
        "step for `global` and `stash`; `extra / bucket` divides it by the largest bucket. The machine is "
        "shared (2 cores, other jobs running): read ratios, not absolute times."
    )
    path = write_results(args.name, table, env, title="DDP step time: plain DDP vs bucket_moo_hook", notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
