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

Usage: python -m benchmarks.bench_ddp_step [--worlds 2 4] [--samples 20] [--width 1152 --layers 8]
       python -m benchmarks.bench_ddp_step --quick --no-write   (a check that it runs)
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from benchmarks.harness import (HookClock, append_results, environment, finish_worker, init_gloo_worker,
                                load_average, markdown_table, overhead_breakdown, parse_step_args, protocol_parts,
                                run_gloo_workers, step_bench_parser, step_rows, time_step_rounds)
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


def _worker(rank: int, world: int, port: int, outdir: str, args) -> None:
    init_gloo_worker(rank, world, port)
    gen = torch.Generator().manual_seed(rank)
    data = [torch.randn(args.batch, args.width, generator=gen) for _ in range(2)]
    sizes = _bucket_sizes(args, data)
    clock = HookClock()
    runs = {}
    for name, kind, kwargs in CONFIGS:
        ddp = torch.nn.parallel.DistributedDataParallel(_model(args.width, args.layers))
        state = None
        if kwargs is not None:
            state = BucketMOOState(**kwargs)
            ddp.register_comm_hook(state, clock.wrap(bucket_moo_hook))
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
        for _ in range(args.warmup):  # DDP's first iteration uses one bucket, then rebuilds
            _step(ddp, state, kind, data, opt)
        if state is not None:
            state.reset_statistics()
        runs[name] = (kind, ddp, state, opt)
    steps = {name: functools.partial(_step, ddp, state, kind, data, opt)
             for name, (kind, ddp, state, opt) in runs.items()}
    parts = protocol_parts(sizes, world, plain="all_reduce", all_gather=True)
    out = time_step_rounds(steps, parts, clock, args.samples)
    out["sizes"] = sizes
    out["extra"] = {name: (state.peak_extra_bytes, state.largest_bucket_bytes)
                    for name, (_, _, state, _) in runs.items() if state is not None}
    runs.clear()
    steps.clear()
    finish_worker(out, rank, outdir)


def tables(world: int, res: dict) -> tuple[list[dict], dict]:
    rows = step_rows(world, res, CONFIGS, BASELINE, vs="plain", hook="hook", per="bucket")
    return rows, overhead_breakdown(world, res, BREAKDOWN_OF, "plain DDP", hook="hook")


def main(argv: Sequence[str] | None = None) -> tuple[list[dict], list[dict]]:
    args = parse_step_args(step_bench_parser(__doc__, "ddp_step", warmup=3), argv)
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
    if args.no_write:
        return all_rows, breakdowns
    path = append_results(args.name, all_rows, env, title="DDP step time: plain DDP vs bucket_moo_hook", notes=notes,
                          extra_md="Breakdown of the hook's own cost:\n\n" + markdown_table(breakdowns))
    print(f"appended to {path}")
    return all_rows, breakdowns


if __name__ == "__main__":
    main()
