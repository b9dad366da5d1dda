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
from .scale_model import _own_len, _shard, plain_allreduce_bytes, predict_ddp, predict_fsdp
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
def _gloo_worker(rank, world, port, outdir, args):
    import os

    import torch.distributed as dist

    from .harness import finish_worker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = args["numel"]
    x = torch.randn(n)
    out = torch.empty(n)
    m = -(-n // world)
    own = torch.randn(m)
    gathered = torch.empty(world * m)
    small = torch.randn(64)
    ops = {
        "all_reduce": lambda: dist.all_reduce(x),
        "all_to_all": lambda: dist.all_to_all_single(out, x),
        "all_gather": lambda: dist.all_gather_into_tensor(gathered, own),
        "all_reduce_small": lambda: dist.all_reduce(small),
    }
    res = {}
    for name, fn in ops.items():
        samples = []
        for _ in range(args["repeats"]):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        res[name] = {"median_s": statistics.median(samples), "min_s": min(samples)}
    finish_worker([res], rank, outdir)


def measure_gloo(worlds=(2, 4), numel: int = 25 * 2**20 // 4, repeats: int = 7) -> dict:
    from .harness import run_gloo_workers

    out = {}
    for P in worlds:
        res = run_gloo_workers(_gloo_worker, P, {"numel": numel, "repeats": repeats})[0]
        nbytes = numel * 4
        out[P] = {k: dict(v) for k, v in res.items()}
        # effective per-rank bandwidth from the bytes each rank moves (ring / exact a2a)
        out[P]["all_reduce"]["GBps"] = 2 * (P - 1) / P * nbytes / res["all_reduce"]["median_s"] / 1e9
        out[P]["all_to_all"]["GBps"] = (P - 1) / P * nbytes / res["all_to_all"]["median_s"] / 1e9
        out[P]["all_gather"]["GBps"] = (P - 1) / P * nbytes / res["all_gather"]["median_s"] / 1e9
    return {"numel": numel, "repeats": repeats, "worlds": out}


def gloo_vs_model(cpu: dict, gloo: dict) -> list[dict]:
    """Predicted added ms per step vs the measured ones of results/ddp_step.json."""
    from .harness import RESULTS_DIR

    data = json.loads((RESULTS_DIR / "ddp_step.json").read_text())
    meas = {(r["P"], r["configuration"]): r for r in data["rows"]}
    buckets = ddp_buckets(mlp_shapes(1152, 8))
    numels = [b.numel for b in buckets]
    T = None
    rows = []
    for P in (2, 4):
        g = gloo["worlds"][P]
        T = P
        bw = {k: g[k]["GBps"] * 1e9 for k in ("all_reduce", "all_to_all", "all_gather")}
        lat_small = g["all_reduce_small"]["median_s"]
        comb = cpu["combine_GBps"].get(T) or min(cpu["combine_GBps"].values())
        gram_bw = cpu["gram_GBps"].get(T) or min(cpu["gram_GBps"].values())
        solve_s = (cpu["solve_us"].get(T) or max(cpu["solve_us"].values())) * 1e-6
        t_ar = sum(2 * (P - 1) / P * n * 4 / bw["all_reduce"] for n in numels)
        for label, proto, gran in (("ranks mgda bucket sharded, no overlap", "sharded", "bucket"),
                                   ("ranks mgda bucket sharded", "sharded", "bucket"),
                                   ("ranks mgda global sharded", "sharded", "global"),
                                   ("ranks mgda bucket allgather", "allgather", "bucket")):
            if proto == "sharded":
                comm = sum((n - _own_len(n, P, 0)) * 4 / bw["all_to_all"] + (P - 1) * _shard(n, P) * 4 / bw["all_gather"]
                           for n in numels) + (1 if gran == "global" else len(numels)) * lat_small
                compute = sum(T * _shard(n, P) * 4 / (gram_bw * 1e9) + (T + 1) * _shard(n, P) * 4 / (comb * 1e9)
                              for n in numels) + (1 if gran == "global" else len(numels)) * solve_s
            else:
                comm = sum((P - 1) * n * 4 / bw["all_gather"] for n in numels)
                compute = sum(T * n * 4 / (gram_bw * 1e9) + (T + 1) * n * 4 / (comb * 1e9) for n in numels) \
                    + len(numels) * solve_s
            pred = (comm - t_ar + compute) * 1e3
            m, base = meas.get((P, label)), meas.get((P, "plain DDP"))
            if m is None or base is None:
                continue
            rows.append({"P": P, "configuration": label, "predicted added ms": pred,
                         "measured added ms (median)": m["step ms"] - base["step ms"],
                         "measured added ms (min)": m["min ms"] - base["min ms"],
                         "residual (median) ms": m["step ms"] - base["step ms"] - pred,
                         "residual (min) ms": m["min ms"] - base["min ms"] - pred,
                         "plain DDP noise ms (median - min)": base["step ms"] - base["min ms"]})
    return rows


def run(cpu: dict) -> dict:
    out = {"simulated_vs_model": simulated_vs_model()}
    try:
        gloo = measure_gloo()
        out["gloo"] = gloo
        out["gloo_vs_model"] = gloo_vs_model(cpu, gloo)
    except Exception as exc:  # noqa: BLE001 - reported in the results, not hidden
        out["gloo_error"] = repr(exc)
    return out


def to_markdown(v: dict) -> str:
    from .harness import markdown_table

    parts = ["### Simulated worlds vs the model (bytes exact, memory to the small tensors)\n",
             markdown_table(v["simulated_vs_model"])]
    if "gloo_vs_model" in v:
        parts += ["\n### Step overhead at P = 2, 4 (gloo, this CPU) vs benchmarks/results/ddp_step.json\n",
                  "gloo collectives measured here (25 MiB fp32, median of 7):\n", "```",
                  json.dumps(v["gloo"], indent=1), "```\n", markdown_table(v["gloo_vs_model"])]
    if "gloo_error" in v:
        parts.append(f"\ngloo measurement failed: {v['gloo_error']}\n")
    return "\n".join(parts)
