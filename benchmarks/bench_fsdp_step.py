"""End-to-end FSDP2 step time and extra memory: stock FSDP2 vs Bucket-Level MOO, and vs
global MOO done by gathering the full task gradients; and a breakdown of the reduce-scatter's
own cost.

gloo on localhost, P = 2 processes (``--worlds``, 4 optional) of one thread each, an MLP of
~10M parameters on CPU, one ``fully_shard`` per layer plus the root (one FSDP parameter group
= one bucket), ``reshard_after_forward=False``. Every configuration is built once and warmed
up, then the configurations are visited round-robin, one timed step each per round,
``--samples`` rounds in the same process group: a burst of load from other jobs hits all of
them alike. A step is timed between two barriers (rank 0's clock; the harness's
``round_robin_samples``).

* ``stock FSDP2``: the baseline; ``mean``: our reduce-scatter with plain averaging;
* ``mgda bucket`` / ``param`` / ``bucket bf16 wire`` / ``pcgrad bucket``: Bucket-Level MOO as
  the reduce-scatter;
* ``global MOO (gather full grads)``: the classic alternative at this scale: every rank
  computes its task's full (unsharded) gradient, all-gathers every task's full gradient
  ([P, n]) and solves one MGDA over the whole model. This is what Bucket-Level MOO avoids;
  the paper reports 72 GB (bucket) vs 123 GB (global) on 7-8B models.

Per configuration: median step time with its interquartile range, the ratio to stock FSDP2
taken per round with its quartiles, and ``in reduce-scatter ms``: rank 0's wall time inside
the group reduce-scatters per step (stock: FSDP's own ``reduce_scatter_tensor``; global MOO:
the gather, solve and copy-back).

The breakdown reads the overhead of ``mgda bucket`` without the noise: in the same rounds,
on the FSDP groups' gradient sizes (recorded from stock FSDP2's reduce-scatters) it times
* ``kernel``: Gram + solve + combine of the rank's [T, n/P] shard of every group;
* ``plain collectives``: one reduce-scatter per group (what stock FSDP2 sends);
* ``sharded collectives``: per group an all-to-all of n elements and an all-reduce of the
  [1, T, T] Gram (the protocol's traffic; FSDP keeps gradients sharded, so no all-gather);
and reports ``extra collectives`` = sharded - plain and ``waiting and the rest`` = overhead
- kernel - extra collectives.

``extra MB``: bucket MOO's own peak allocation per group in flight (``state.peak_extra_bytes``);
for the global baseline the bytes of the gathered task gradients and the combined gradient.

Usage: python -m benchmarks.bench_fsdp_step [--worlds 2 4] [--samples 20] [--width 1152 --layers 8]
       python -m benchmarks.bench_fsdp_step --quick --no-write   (a check that it runs)
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.distributed as dist

import bucketmoo_kernels as bm
from benchmarks.harness import (HookClock, append_results, environment, finish_worker, init_gloo_worker,
                                load_average, markdown_table, overhead_breakdown, parse_step_args, protocol_parts,
                                run_gloo_workers, step_bench_parser, step_rows, time_step_rounds)
from bucketmoo_kernels.ddp import BucketMOOState
from bucketmoo_kernels.fsdp import apply_bucket_moo

CONFIGS = [
    # name, kind ("fsdp" / "global"), state kwargs (None: stock FSDP2)
    ("stock FSDP2", "fsdp", None),
    ("mean (FSDP reduce-scatter)", "fsdp", dict(method="mean")),
    ("mgda bucket", "fsdp", dict(method="mgda")),
    ("mgda bucket bf16 wire", "fsdp", dict(method="mgda", compress="bf16")),
    ("mgda param", "fsdp", dict(method="mgda", granularity="param")),
    ("pcgrad bucket", "fsdp", dict(method="pcgrad")),
    ("global MOO (gather full grads)", "global", None),
]
BASELINE = {"fsdp": "stock FSDP2", "global": "stock FSDP2"}
BREAKDOWN_OF = "mgda bucket"

try:  # the custom-comm interface of FSDP2 (torch >= 2.8)
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter as _ReduceScatterBase
except ImportError:  # pragma: no cover - older torch: apply_bucket_moo raises anyway
    _ReduceScatterBase = object


class _TimedReduceScatter(_ReduceScatterBase):
    """A group's reduce-scatter (stock or Bucket-Level MOO) timed by a :class:`HookClock`;
    ``numel`` is the length of the last gradient it reduced (the group's padded gradient)."""

    def __init__(self, inner, clock: HookClock):
        self.inner, self.numel = inner, 0
        self.timed = clock.wrap(inner.__call__)

    def allocate(self, size, *, dtype, device):
        return self.inner.allocate(size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        self.numel = input_tensor.numel()
        return self.timed(output_tensor=output_tensor, input_tensor=input_tensor, group=group, op=op,
                          async_op=async_op)


def _model(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU())
                                 for _ in range(layers)])


def _build(kind, kwargs, args, mesh, clock: HookClock):
    """The model of one configuration, its state (None for the baselines) and its timed
    reduce-scatters (one per FSDP group; none for global MOO)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    model = _model(args.width, args.layers)
    state, comms = None, []
    if kind == "fsdp":
        for block in model:
            fully_shard(block, mesh=mesh, reshard_after_forward=False)
        fully_shard(model, mesh=mesh, reshard_after_forward=False)
        if kwargs is not None:
            state = BucketMOOState(mode="ranks", **kwargs)
            apply_bucket_moo(model, state)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                for group in module._get_fsdp_state()._fsdp_param_groups:
                    comm = _TimedReduceScatter(group._reduce_scatter_comm, clock)
                    module.set_custom_reduce_scatter(comm)
                    comms.append(comm)
    return model, state, comms


def _global_moo_step(model, world) -> int:
    """Classic global MGDA: gather every task's full gradient, one solve, local update."""
    grads = [p.grad.reshape(-1) for p in model.parameters()]
    flat = torch.cat(grads)
    gathered = torch.empty(world * flat.numel(), dtype=flat.dtype)
    dist.all_gather_into_tensor(gathered, flat)
    combined = bm.fused_bucket_moo(gathered.view(world, -1), method="mgda", check_finite=False)
    start = 0
    for p in model.parameters():
        p.grad.copy_(combined[start:start + p.numel()].view_as(p))
        start += p.numel()
    return gathered.numel() * gathered.element_size() + combined.numel() * combined.element_size() \
        + flat.numel() * flat.element_size()


def _step(model, kind, data, opt, global_step, peak: list[int]) -> None:
    opt.zero_grad(set_to_none=True)
    model(data).square().mean().backward()
    if kind == "global":
        peak[0] = max(peak[0], global_step(model))
    opt.step()


def _worker(rank: int, world: int, port: int, outdir: str, args) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    init_gloo_worker(rank, world, port)
    mesh = init_device_mesh("cpu", (world,))
    data = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(rank))
    clock = HookClock()
    global_step = clock.wrap(functools.partial(_global_moo_step, world=world))
    steps, states, peaks, sizes = {}, {}, {}, None
    for name, kind, kwargs in CONFIGS:
        model, state, comms = _build(kind, kwargs, args, mesh, clock)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        peaks[name] = [0]
        steps[name] = functools.partial(_step, model, kind, data, opt, global_step, peaks[name])
        for _ in range(args.warmup):
            steps[name]()
        if state is not None:
            state.reset_statistics()
            states[name] = state
        if kind == "fsdp" and kwargs is None:  # stock FSDP2: the groups' gradient lengths, in reduce order
            sizes = [c.numel for c in comms]
    parts = protocol_parts(sizes, world, plain="reduce_scatter", all_gather=False)
    out = time_step_rounds(steps, parts, clock, args.samples)
    group_bytes = max(sizes) * 4
    out["sizes"] = sizes
    out["extra"] = {name: (state.peak_extra_bytes, group_bytes) for name, state in states.items()}
    out["extra"].update({name: (peak[0], group_bytes) for name, peak in peaks.items() if peak[0]})
    steps.clear()
    states.clear()
    finish_worker(out, rank, outdir)


def tables(world: int, res: dict) -> tuple[list[dict], dict]:
    rows = step_rows(world, res, CONFIGS, BASELINE, vs="stock", hook="reduce-scatter", per="group")
    return rows, overhead_breakdown(world, res, BREAKDOWN_OF, "stock FSDP2", hook="reduce-scatter")


def main(argv: Sequence[str] | None = None) -> tuple[list[dict], list[dict]]:
    parser = step_bench_parser(__doc__, "fsdp_step", warmup=2)
    args = parse_step_args(parser, argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the breakdown reads the groups' sizes from a warm-up step")
    params = args.layers * (args.width * args.width + args.width)
    group_mb = (args.width * args.width + args.width) * 4 / 2**20
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
    env["model"] = (f"MLP {args.layers} x Linear({args.width}, {args.width}), {params / 1e6:.1f}M params "
                    f"({params * 4 / 2**20:.0f} MB fp32), one FSDP group per layer ({group_mb:.1f} MB), "
                    f"batch {args.batch}")
    env["setup"] = (f"gloo on localhost, 1 thread per process, reshard_after_forward=False (ZeRO-2-like); every "
                    f"configuration built once and warmed up for {args.warmup} steps, then {args.samples} rounds "
                    f"round-robin over the configurations and the breakdown parts, one timed step each per round")
    notes = (
        "`x stock` is the median over the rounds of (step / stock FSDP2 step of the same round) with its "
        "quartiles. `step ms` and `IQR ms`: median and interquartile range of the step time. `in "
        "reduce-scatter ms`: rank 0's wall time inside the groups' reduce-scatters per step (stock: FSDP's "
        "own; Bucket-Level MOO: all-to-all, Gram all-reduce, solve and combine; global MOO: gather, solve "
        "and copy-back). `extra MB`: Bucket-Level MOO's peak extra allocation per FSDP group in flight "
        "(`state.peak_extra_bytes`: all-to-all receive buffer and task rows) over the timed steps, or, for "
        "the global baseline, the gathered full task gradients plus the local flat and combined gradients; "
        "`extra / group` divides by the largest group's fp32 gradient.\n\n"
        f"Breakdown of `{BREAKDOWN_OF}` (second table): `overhead` = median over the rounds of its step "
        "minus the stock FSDP2 step of the same round; `kernel` = Gram + solve + combine of this rank's "
        "[T, n/P] shard of every group (`fused_bucket_moo`, cpu backend); `extra collectives` = (all-to-all "
        "of each group's gradient + all-reduce of its [1, T, T] Gram) - (one reduce-scatter of each group's "
        "gradient), both timed in isolation in the same rounds; `waiting and the rest` = overhead - kernel "
        "- extra collectives (ranks waiting on each other, the reduce-scatter's Python and copies). The "
        "machine is shared (2 cores, other jobs running; see the load averages): read the ratios and the "
        "breakdown, not absolute times."
    )
    if args.no_write:
        return all_rows, breakdowns
    path = append_results(args.name, all_rows, env, title="FSDP2 step time: stock vs Bucket-Level MOO vs global MOO",
                          notes=notes, extra_md="Breakdown of the reduce-scatter's own cost:\n\n"
                          + markdown_table(breakdowns))
    print(f"appended to {path}")
    return all_rows, breakdowns


if __name__ == "__main__":
    main()
