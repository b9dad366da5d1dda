"""End-to-end FSDP2 step time and extra memory: stock FSDP2 vs Bucket-Level MOO, and vs
global MOO done by gathering the full task gradients.

gloo on localhost, P = 2 and 4 processes (one thread each), an MLP of ~10M parameters on
CPU, one ``fully_shard`` per layer plus the root (one FSDP parameter group = one bucket).
Configurations run in the same process group, round-robin, so the ratios come from the
same run. Each step is timed between two barriers (median and min, rank 0's clock).

* ``stock FSDP2``: the baseline; ``mean``: our reduce-scatter with plain averaging;
* ``mgda bucket`` / ``param`` / ``bucket bf16``: Bucket-Level MOO as the reduce-scatter;
* ``global MOO (gather full grads)``: the classic alternative at this scale: every rank
  computes its task's full (unsharded) gradient, all-gathers every task's full gradient
  ([P, n]) and solves one MGDA over the whole model. This is what Bucket-Level MOO avoids;
  the paper reports 72 GB (bucket) vs 123 GB (global) on 7-8B models.

``extra MB``: bucket MOO's own peak allocation per group in flight (``state.peak_extra_bytes``);
for the global baseline the bytes of the gathered task gradients and the combined gradient.

Usage: python benchmarks/bench_fsdp_step.py [--worlds 2 4] [--width 1152 --layers 8]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bucketmoo_kernels as bm  # noqa: E402
from benchmarks.harness import append_results, environment, finish_worker, run_gloo_workers, step_bench_parser  # noqa: E402
from bucketmoo_kernels.ddp import BucketMOOState  # noqa: E402
from bucketmoo_kernels.fsdp import apply_bucket_moo  # noqa: E402

CONFIGS = [
    ("stock FSDP2", "fsdp", None),
    ("mean (FSDP reduce-scatter)", "fsdp", dict(method="mean")),
    ("mgda bucket", "fsdp", dict(method="mgda")),
    ("mgda bucket bf16 wire", "fsdp", dict(method="mgda", compress="bf16")),
    ("mgda param", "fsdp", dict(method="mgda", granularity="param")),
    ("pcgrad bucket", "fsdp", dict(method="pcgrad")),
    ("global MOO (gather full grads)", "global", None),
]


def _model(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU())
                                 for _ in range(layers)])


def _build(kind, kwargs, args, mesh):
    from torch.distributed.fsdp import fully_shard

    model = _model(args.width, args.layers)
    state = None
    if kind == "fsdp":
        for block in model:
            fully_shard(block, mesh=mesh, reshard_after_forward=False)
        fully_shard(model, mesh=mesh, reshard_after_forward=False)
        if kwargs is not None:
            state = BucketMOOState(mode="ranks", **kwargs)
            apply_bucket_moo(model, state)
    return model, state


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


def _worker(rank: int, world: int, port: int, outdir: str, args) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    data = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(rank))
    samples = {name: [] for name, _, _ in CONFIGS}
    extra = {name: 0 for name, _, _ in CONFIGS}
    for _ in range(args.rounds):
        for name, kind, kwargs in CONFIGS:
            model, state = _build(kind, kwargs, args, mesh)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            for i in range(args.warmup + args.steps):
                dist.barrier()
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                model(data).square().mean().backward()
                if kind == "global":
                    extra[name] = max(extra[name], _global_moo_step(model, world))
                opt.step()
                dist.barrier()
                if i >= args.warmup:
                    samples[name].append((time.perf_counter() - t0) * 1e3)
            if state is not None:
                extra[name] = max(extra[name], state.peak_extra_bytes)
            del model, opt, state
    rows = []
    for name, kind, _ in CONFIGS:
        times = sorted(samples[name])
        rows.append({"name": name, "median_ms": times[len(times) // 2], "min_ms": times[0], "extra": extra[name]})
    finish_worker(rows, rank, outdir)


def main() -> None:
    parser = step_bench_parser(__doc__, "fsdp_step", warmup=1)
    args = parser.parse_args()
    params = args.layers * (args.width * args.width + args.width)
    group_mb = (args.width * args.width + args.width) * 4 / 2**20
    table = []
    for world in args.worlds:
        rows = run_gloo_workers(_worker, world, args)
        base = rows[0]
        for r in rows:
            table.append({"P": world, "configuration": r["name"], "step ms": r["median_ms"],
                          "x stock": r["median_ms"] / base["median_ms"], "min ms": r["min_ms"],
                          "x stock (min)": r["min_ms"] / base["min_ms"], "extra MB": r["extra"] / 2**20,
                          "extra / group": r["extra"] / 2**20 / group_mb})
            print(table[-1], flush=True)
    env = environment("cpu")
    env["model"] = (f"MLP {args.layers} x Linear({args.width}, {args.width}), {params / 1e6:.1f}M params "
                    f"({params * 4 / 2**20:.0f} MB fp32), one FSDP group per layer ({group_mb:.1f} MB), batch {args.batch}")
    env["setup"] = (f"gloo on localhost, 1 thread per process, reshard_after_forward=False (ZeRO-2-like); "
                    f"{args.rounds} rounds round-robin, {args.steps} timed steps after {args.warmup} warm-up")
    notes = ("Ratios are to stock FSDP2 in the same run. `extra MB` is Bucket-Level MOO's peak extra allocation "
             "per FSDP group in flight (all-to-all receive buffer and task rows), or, for the global baseline, "
             "the gathered full task gradients plus the local flat and combined gradients. `extra / group` "
             "divides by one group's fp32 gradient. The machine is shared (2 cores): read ratios, not "
             "absolute times.")
    path = append_results(args.name, table, env, title="FSDP2 step time: stock vs Bucket-Level MOO vs global MOO",
                         notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
