"""Checks of the scale model (benchmarks/scale_model.py) against what runs on this machine.

1. Bytes, collectives and memory: :func:`predict_ddp` / :func:`predict_fsdp` against the
   simulated worlds (the hook itself on a fake process group), P = 8 .. 1024.
2. Step overhead at P = 2 and 4: the model's prediction for the MLP of
   ``benchmarks/bench_ddp_step.py`` (gloo on this CPU: bandwidth measured here with a few
   collectives, Gram/combine/solve throughput from :func:`measure_cpu`) against the measured
   step times in ``benchmarks/results/ddp_step.json``.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from .llm_layout import CONFIGS, ddp_buckets, fsdp_groups, mlp_shapes
from .scale_bytes import plain_allreduce_bytes, predict_ddp, predict_fsdp
from .simulated_world import simulate_ddp_step, simulate_fsdp_step

SIM_CASES = [
    # (label, model, P, T, kwargs)
    ("DDP sharded bucket", "small", 8, 8, {}),
    ("DDP sharded bucket", "small", 64, 8, {}),
    ("DDP sharded bucket", "small", 256, 8, {}),
    ("DDP sharded bucket", "small", 1024, 8, {}),
    ("DDP sharded bucket, no overlap", "small", 64, 8, {"overlap": False}),
    ("DDP sharded param", "small", 64, 8, {"granularity": "param"}),
    ("DDP sharded bucket bf16 wire", "small", 64, 8, {"compress": "bf16"}),
    ("DDP sharded global", "small", 64, 8, {"granularity": "global"}),
    ("DDP sharded global", "small", 1024, 8, {"granularity": "global"}),
    ("DDP allgather bucket", "tiny", 8, 8, {"protocol": "allgather"}),
    ("DDP allgather bucket", "tiny", 64, 8, {"protocol": "allgather"}),
    ("FSDP2 reduce-scatter", "small", 64, 8, {"fsdp": True}),
    ("FSDP2 reduce-scatter", "small", 1024, 8, {"fsdp": True}),
]


def simulated_vs_model() -> list[dict]:
    rows = []
    for label, model, P, T, kw in SIM_CASES:
        kw = dict(kw)
        fsdp = kw.pop("fsdp", False)
        t0 = time.perf_counter()
        if fsdp:
            rec = simulate_fsdp_step(model, P, P - 1, num_tasks=T)
            pred = predict_fsdp(fsdp_groups(CONFIGS[model], P), P, T, rank=P - 1)
        else:
            rec = simulate_ddp_step(model, P, P - 1, num_tasks=T, **kw)
            pred = predict_ddp(ddp_buckets(CONFIGS[model]), P, T, protocol=kw.get("protocol", "sharded"),
                               granularity=kw.get("granularity", "bucket"), overlap=kw.get("overlap", True),
                               wire_size=2 if kw.get("compress") else None, rank=P - 1)
        numels = rec.bucket_numels
        rows.append({
            "case": label, "layout": model, "P": P, "T": T, "rank": P - 1, "buckets": len(numels),
            "largest bucket MB": max(numels) * 4 / 2**20,
            "sim sent MB": rec.sent / 2**20, "model sent MB": pred["sent"] / 2**20,
            "sent residual B": rec.sent - pred["sent"], "received residual B": rec.received - pred["received"],
            "collectives sim/model": f"{len(rec.collectives)}/{pred['collectives']}",
            "sent / ring AR": rec.sent / max(plain_allreduce_bytes(numels, P, 4), 1),
            "sim extra MB": rec.peak_extra_bytes / 2**20, "model extra MB": pred["peak_extra"] / 2**20,
            "extra residual B": rec.peak_extra_bytes - pred["peak_extra"],
            "extra / largest bucket": rec.peak_extra_bytes / (max(numels) * 4),
            "hook's own count MB": rec.state_peak_extra_bytes / 2**20,
            "launches / bucket": rec.launches / len(numels), "sim s": time.perf_counter() - t0,
        })
    return rows


# ------------------------------------------------------------------ gloo at P = 2, 4
def _timed(fn) -> float:
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def _gloo_worker(rank, world, port, outdir, args):
    """Per round, interleaved: DDP's all-reduce of the MLP's buckets; the sharded protocol on
    the same buckets (``sharded_moo``, blocking); and the model's components measured apart:
    the all-to-all, the all-gather, the T x T all-reduce and the local Gram + solve + combine."""
    import os

    import torch.distributed as dist

    from bucketmoo_kernels import combine, gram, solve
    from bucketmoo_kernels.distributed.protocol import TaskLayout, sharded_moo
    from bucketmoo_kernels.inputs import Segments

    from .harness import finish_worker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tasks = TaskLayout.build(None, world)
    numels = args["numels"]
    bufs = [torch.randn(n) for n in numels]
    m = [-(-n // world) for n in numels]
    splits = [[max(0, min(mk, n - p * mk)) for p in range(world)] for n, mk in zip(numels, m)]
    recv = [torch.empty(world * s[rank]) for s in splits]
    own = [torch.randn(mk) for mk in m]
    gath = [torch.empty(world * mk) for mk in m]
    small = torch.randn(1, world, world)
    rows = [torch.randn(world, s[rank]) for s in splits]
    K = len(numels)
    parts = {
        "plain all-reduce": lambda: [dist.all_reduce(b) for b in bufs],
        "sharded protocol": lambda: [sharded_moo(b, Segments.single(b.numel()), tasks, "mgda") for b in bufs],
        "all_to_all": lambda: [dist.all_to_all_single(recv[k], bufs[k], splits[k][rank:rank + 1] * world, splits[k])
                               for k in range(K)],
        "all_gather": lambda: [dist.all_gather_into_tensor(gath[k], own[k]) for k in range(K)],
        "gram all_reduce": lambda: [dist.all_reduce(small) for _ in range(K)],
        "gram+solve+combine": lambda: [combine(r, solve(gram(r), "mgda")) for r in rows],
    }
    for fn in parts.values():  # warm-up
        fn()
    samples = {k: [] for k in parts}
    for _ in range(args["rounds"]):
        for name, fn in parts.items():
            samples[name].append(_timed(fn))
    finish_worker([samples], rank, outdir)


def measure_gloo(worlds=(2, 4), rounds: int = 5) -> dict:
    """The MLP of ``bench_ddp_step.py`` (DDP's 25 MB buckets): component and protocol times."""
    from .harness import run_gloo_workers

    numels = [b.numel for b in ddp_buckets(mlp_shapes(1152, 8))]
    out = {"bucket_numels": numels, "rounds": rounds, "worlds": {}}
    for P in worlds:
        out["worlds"][P] = run_gloo_workers(_gloo_worker, P, {"numels": numels, "rounds": rounds})[0]
    return out


def gloo_vs_model(gloo: dict) -> list[dict]:
    """Additive model (protocol = all-to-all + all-gather + Gram all-reduce + local compute, each
    timed apart in the same round) against the protocol timed as a whole, round by round;
    and the added time over DDP's all-reduce, predicted vs measured."""
    rows = []
    for P, s in gloo["worlds"].items():
        R = len(s["plain all-reduce"])
        pred = [sum(s[k][i] for k in ("all_to_all", "all_gather", "gram all_reduce", "gram+solve+combine"))
                for i in range(R)]
        meas = s["sharded protocol"]
        plain = s["plain all-reduce"]
        res = [(m - p) / m for m, p in zip(meas, pred)]
        added_p = [p - a for p, a in zip(pred, plain)]
        added_m = [m - a for m, a in zip(meas, plain)]
        q = lambda v: (statistics.median(v), min(v), max(v))  # noqa: E731
        rows.append({
            "P": P, "rounds": R,
            "protocol ms (median)": q(meas)[0] * 1e3, "model ms (median)": q(pred)[0] * 1e3,
            "relative residual median": q(res)[0], "relative residual min": q(res)[1], "relative residual max": q(res)[2],
            "added ms measured (median)": q(added_m)[0] * 1e3, "added ms model (median)": q(added_p)[0] * 1e3,
            "plain all-reduce ms median": q(plain)[0] * 1e3, "plain all-reduce ms min..max":
                f"{q(plain)[1] * 1e3:.0f}..{q(plain)[2] * 1e3:.0f}",
            "protocol ms min..max": f"{q(meas)[1] * 1e3:.0f}..{q(meas)[2] * 1e3:.0f}",
        })
    return rows


def ddp_step_comparison() -> list[dict]:
    """The measured added step time of results/ddp_step.json (for reference next to the model)."""
    from .harness import RESULTS_DIR

    data = json.loads((RESULTS_DIR / "ddp_step.json").read_text())
    meas = {(r["P"], r["configuration"]): r for r in data["rows"]}
    rows = []
    for P in (2, 4):
        base = meas[(P, "plain DDP")]
        for label in ("ranks mgda bucket sharded, no overlap", "ranks mgda bucket sharded"):
            m = meas[(P, label)]
            rows.append({"P": P, "configuration": label, "added ms (median)": m["step ms"] - base["step ms"],
                         "added ms (min)": m["min ms"] - base["min ms"],
                         "plain DDP median - min ms": base["step ms"] - base["min ms"]})
    return rows


def run(cpu: dict) -> dict:
    out = {"simulated_vs_model": simulated_vs_model()}
    try:
        gloo = measure_gloo()
        out["gloo"] = gloo
        out["gloo_vs_model"] = gloo_vs_model(gloo)
        out["ddp_step"] = ddp_step_comparison()
    except Exception as exc:  # noqa: BLE001 - reported in the results, not hidden
        out["gloo_error"] = repr(exc)
    return out


def to_markdown(v: dict) -> str:
    from .harness import markdown_table

    parts = ["### Simulated worlds vs the model (bytes exact, memory to the small tensors)\n",
             markdown_table(v["simulated_vs_model"])]
    if "gloo_vs_model" in v:
        parts += ["\n### Time model at P = 2, 4 (gloo, this CPU, the MLP of bench_ddp_step.py)\n",
                  markdown_table(v["gloo_vs_model"]),
                  "\nFor reference, the added step time measured end to end in benchmarks/results/ddp_step.json:\n",
                  markdown_table(v["ddp_step"])]
    if "gloo_error" in v:
        parts.append(f"\ngloo measurement failed: {v['gloo_error']}\n")
    return "\n".join(parts)
