"""Shared benchmark harness: timing, same-run baselines, environment stamp, result files.

Every benchmark script defines its sweep and calls:

* :func:`time_ms` -- ``triton.testing.do_bench`` (median, p20, p80) on CUDA; on CPU the
  median of repeated runs after warm-up.
* :func:`copy_baseline_ms` -- a device copy of the same bytes, measured in the same run;
  effective bandwidth of a kernel is reported as a share of it.
* :func:`environment` -- device, library versions, commit, date.
* :func:`write_results` -- a markdown table (+ JSON rows) under ``benchmarks/results/``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device | str = "cpu", *, warmup: int = 2,
            repeats: int = 7, min_time_s: float = 0.0) -> dict[str, float]:
    """Median / p20 / p80 wall time of ``fn()`` in milliseconds."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    q = lambda f: samples[min(len(samples) - 1, int(f * len(samples)))]  # noqa: E731
    return {"median_ms": statistics.median(samples), "p20_ms": q(0.2), "p80_ms": q(0.8)}


def copy_baseline_ms(numel: int, dtype: torch.dtype, device: torch.device | str, **kw) -> dict[str, float]:
    """Time ``dst.copy_(src)`` of ``numel`` elements: reads and writes ``numel * itemsize`` bytes."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src), device, **kw)


def gbps(bytes_moved: float, ms: float) -> float:
    return bytes_moved / (ms * 1e-3) / 1e9


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device | str = "cpu") -> dict[str, str]:
    """Device, versions, commit and date, stamped on every result file."""
    device = torch.device(device)
    if device.type == "cuda":
        dev = torch.cuda.get_device_name(device)
    else:
        dev = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    info = {"device": dev, "torch": torch.__version__, "python": platform.python_version(),
            "commit": _git_commit(), "date": _dt.date.today().isoformat()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    return info


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(name: str, rows: Sequence[dict], env: dict[str, str], *, title: str,
                  notes: str = "", columns: Sequence[str] | None = None) -> Path:
    """Write ``results/<name>.md`` (table with an environment header) and ``<name>.json``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    text = f"# {title}\n\n{header}\n\n{notes.strip()}\n\n{markdown_table(rows, columns)}"
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(text)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps({"env": env, "rows": list(rows)}, indent=1))
    return path


# ---- multi-process (gloo) step benchmarks -------------------------------------------------

def step_bench_parser(doc: str, name: str, warmup: int):
    """Command-line options shared by the end-to-end step benchmarks (DDP, FSDP2)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="process counts")
    parser.add_argument("--width", type=int, default=1152, help="MLP width")
    parser.add_argument("--layers", type=int, default=8, help="MLP depth")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round and configuration")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin passes over the configurations")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--name", default=name, help="results file name")
    return parser


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo_workers(worker, world: int, args) -> list[dict]:
    """Spawn ``worker(rank, world, port, outdir, args)`` on ``world`` processes; return the
    rows that rank 0 saved with :func:`finish_worker`."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(worker, args=(world, _free_port(), outdir, args), nprocs=world)
        return torch.load(Path(outdir) / "rows.pt")


def finish_worker(rows: list[dict], rank: int, outdir: str) -> None:
    """Rank 0 saves ``rows`` for :func:`run_gloo_workers`; every rank leaves the group and
    ends its process (``os._exit``: nothing may follow this call)."""
    import torch.distributed as dist

    if rank == 0:
        torch.save(rows, Path(outdir) / "rows.pt")
    dist.barrier()
    gc.collect()  # DDP/FSDP objects (hook state, futures) go now, not at interpreter exit
    dist.destroy_process_group()
    # The rows are on disk: leave without interpreter finalization, where C++ threads or
    # destructors that still reach for Python can std::terminate ("terminate called without
    # an active exception", seen rarely with gloo under load).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
