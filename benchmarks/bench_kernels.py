"""Kernel microbenchmark: gram / solve / combine / fused on every backend available for the
device, against the torch reference and a copy of the same bytes, measured in the same run.

    python -m benchmarks.bench_kernels --quick            # the main job's summary in ~1 minute on CPU
    python -m benchmarks.bench_kernels                     # the full sweep for the device
    python -m benchmarks.bench_kernels --device cuda --tasks 2 4 8 --sizes 25000000

A run is printed and appended to ``out/benchmarks/<name>.{md,json}`` (ignored by git: running
it leaves the checkout clean); ``--record`` appends it to the committed
``benchmarks/results/<name>.{md,json}`` instead, for a run meant to be published.

Effective bandwidth counts the ideal traffic: gram reads T*N elements; combine and fused
read T*N and write N. The copy baseline (``harness.copy_baseline``) moves T*N + N elements
(a copy of (T+1)*N/2 elements, read and written); ``copy_ratio`` = effective bandwidth / copy
bandwidth. Every op, backend and the copy of one (T, N, dtype, layout) case are timed
round-robin in the same run (``harness.time_round_robin``). Two torch baselines run in the
same process: ``torch`` (the float64 reference backend) and
``eager`` (fp32 matmuls per segment, what one would write by hand). The Triton backend is
skipped on CPU tensors: the interpreter is a test vehicle, not a backend.
"""

from __future__ import annotations

import argparse
import sys

import torch

import bucketmoo_kernels as bm
from bucketmoo_kernels.inputs import Segments
from benchmarks.harness import (COPY_RATIO, OUT_DIR, RESULTS_DIR, RunRecorder, copy_baseline, copy_ratio, environment, gbps,
                                markdown_table, time_round_robin)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _block_params(d: int) -> list[int]:
    """Parameter sizes of one GPT-2-style block of width d: qkv, proj, norms, MLP in/out."""
    return [d * 3 * d, 3 * d, d * d, d, d, d, d * 4 * d, 4 * d, 4 * d * d, d, d, d]


def param_layout(n: int) -> Segments:
    """Per-parameter segments of a transformer (GPT-2 small's width 768, narrower for small
    ``n`` so that several blocks fit), repeated and truncated to ``n`` elements."""
    d = next((w for w in (768, 512, 256, 128, 64, 32) if 2 * sum(_block_params(w)) <= n), 16)
    lengths, total = [], 0
    while total < n:
        for size in _block_params(d):
            size = min(size, n - total)
            lengths.append(size)
            total += size
            if total >= n:
                break
    return Segments.from_lengths(lengths)


def _short(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def backends_for(device: torch.device) -> list[str]:
    names = [n for n, reason in bm.available_backends(device).items() if reason is None]
    if device.type == "cpu":
        names = [n for n in names if n != "triton"]
    return names


def eager_gram(grads: torch.Tensor, segments: Segments) -> torch.Tensor:
    """What one would write by hand in torch: an fp32 matmul per segment."""
    bounds = segments.offsets.tolist()
    return torch.stack([grads[:, a:b].float() @ grads[:, a:b].float().T for a, b in zip(bounds, bounds[1:])])


def eager_combine(grads: torch.Tensor, weights: torch.Tensor, segments: Segments, out: torch.Tensor) -> None:
    bounds = segments.offsets.tolist()
    for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
        out[a:b] = (weights[s] @ grads[:, a:b].float()).to(out.dtype)


def _eager_ops(grads, segments, out, gram, weights, backend="torch"):
    def fused():
        g = eager_gram(grads, segments)
        w = bm.solve(g, backend=backend)
        eager_combine(grads, w, segments, out)

    return {"gram": lambda: eager_gram(grads, segments), "solve": lambda: bm.solve(gram, backend=backend),
            "combine": lambda: eager_combine(grads, weights, segments, out), "fused": fused}


def backend_ops(device, backend, num_tasks, n, dtype, segments):
    """op -> (call, ideal bytes) of one backend (or ``eager``) on one case."""
    elt = torch.empty(0, dtype=dtype).element_size()
    grads = torch.randn(num_tasks, n, device=device).to(dtype)
    out = torch.zeros(n, device=device, dtype=dtype)
    ref_backend = "torch" if backend == "eager" else backend
    gram = bm.gram(grads, segments, backend=ref_backend)
    weights = bm.solve(gram, backend=ref_backend)
    traffic = {"gram": num_tasks * n * elt, "solve": 0, "combine": (num_tasks + 1) * n * elt,
               "fused": (num_tasks + 1) * n * elt}
    if backend == "eager":
        calls = _eager_ops(grads, segments, out, gram, weights)
    else:
        calls = {
            "gram": lambda: bm.gram(grads, segments, backend=backend),
            "solve": lambda: bm.solve(gram, backend=backend),
            "combine": lambda: bm.combine(grads, weights, segments, out=out, backend=backend),
            "fused": lambda: bm.fused_bucket_moo(grads, segments=segments, out=out, backend=backend,
                                                 check_finite=False),
        }
    return {op: (fn, traffic[op]) for op, fn in calls.items()}


def torchjd_ops(device, num_tasks, n, dtype, segments):
    """torchjd's MGDA aggregator (Frank-Wolfe) on the same matrix, per segment: the 'fused' op only."""
    try:
        from torchjd.aggregation import MGDA
    except ImportError:
        return {}
    grads = torch.randn(num_tasks, n, device=device).to(dtype)
    bounds = segments.offsets.tolist()
    aggregator = MGDA()

    def fused():
        return torch.cat([aggregator(grads[:, a:b].float()) for a, b in zip(bounds, bounds[1:])])

    return {"fused": (fused, (num_tasks + 1) * n * torch.empty(0, dtype=dtype).element_size())}


def run(device: torch.device, tasks, sizes, dtypes, layouts, samples, on_case=None):
    """Every case's rows; ``on_case(rows so far)`` after each case (the results are saved there,
    so a run cut off keeps the cases it measured)."""
    rows = []
    names = backends_for(device)
    for n in sizes:
        for dname in dtypes:
            dtype = DTYPES[dname]
            for num_tasks in tasks:
                for layout in layouts:
                    segments = Segments.single(n) if layout == "one" else param_layout(n)
                    copy_fn, copy_bytes = copy_baseline(num_tasks, n, dtype, device)
                    calls = {("copy", "torch"): (copy_fn, copy_bytes)}
                    for backend in names + ["eager"]:
                        for op, call in backend_ops(device, backend, num_tasks, n, dtype, segments).items():
                            calls[(op, backend)] = call
                    for op, call in torchjd_ops(device, num_tasks, n, dtype, segments).items():
                        calls[(op, "torchjd")] = call
                    times = time_round_robin({key: fn for key, (fn, _) in calls.items()}, device, samples=samples)
                    copy_ms = times[("copy", "torch")]["median_ms"]
                    case = []
                    for (op, backend), (_, nbytes) in calls.items():
                        t = times[(op, backend)]
                        case.append({"op": op, "backend": backend, "T": num_tasks, "N": n, "dtype": dname,
                                     "segments": segments.num_segments, "median_ms": t["median_ms"],
                                     "iqr_ms": t["iqr_ms"],
                                     "GB/s": gbps(nbytes, t["median_ms"]) if nbytes else float("nan"),
                                     COPY_RATIO: (copy_ratio(nbytes, t["median_ms"], copy_bytes, copy_ms)
                                                  if nbytes else float("nan"))})
                    ref = {r["op"]: r["median_ms"] for r in case if r["backend"] == "torch"}
                    eager = {r["op"]: r["median_ms"] for r in case if r["backend"] == "eager"}
                    for r in case:
                        if r["op"] != "copy":
                            r["speedup_vs_torch"] = ref[r["op"]] / r["median_ms"]
                            r["speedup_vs_eager"] = eager[r["op"]] / r["median_ms"]
                    rows += case
                    if on_case is not None:
                        on_case(rows)
    return rows


def plot_results(rows, path, device_name: str):
    """One panel per dtype: the fused op's share of copy bandwidth against N, per backend and T
    (single-segment layout), so the scaling with size is visible at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fused = [r for r in rows if r["op"] == "fused" and r["segments"] == 1]
    dtypes = sorted({r["dtype"] for r in fused})
    fig, axes = plt.subplots(1, max(1, len(dtypes)), figsize=(5 * max(1, len(dtypes)) + 1.5, 4), squeeze=False)
    for ax, dname in zip(axes[0], dtypes):
        backends = sorted({r["backend"] for r in fused})
        tasks = sorted({r["T"] for r in fused})
        markers, styles = "os^Dv*", ["-", "--", ":", "-."]
        for (backend, num_tasks) in sorted({(r["backend"], r["T"]) for r in fused if r["dtype"] == dname}):
            pts = sorted((r["N"], r[COPY_RATIO]) for r in fused
                         if r["dtype"] == dname and r["backend"] == backend and r["T"] == num_tasks)
            b, t = backends.index(backend), tasks.index(num_tasks)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{b}", linestyle=styles[t % 4],
                    marker=markers[t % 6], label=f"{backend} T={num_tasks}")
        ax.set_xscale("log")
        ax.set_xlabel("N (elements per task)")
        ax.set_ylabel("effective bandwidth / copy bandwidth")
        ax.set_title(f"fused_bucket_moo, {dname}, one segment")
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(device_name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def replot(json_path: str) -> None:
    """Redraw the PNG of a results file without re-measuring."""
    import json
    from pathlib import Path

    data = json.loads(Path(json_path).read_text())
    run = data["runs"][-1] if "runs" in data else data
    plot_results(run["rows"], Path(json_path).with_suffix(".png"), run["env"]["device"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", type=int, nargs="+", default=None, help="T values (default 2 3 4 8)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="N values")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES))
    parser.add_argument("--layouts", nargs="+", default=["one", "params"], choices=["one", "params"])
    parser.add_argument("--samples", type=int, default=None,
                        help="round-robin samples per configuration (default 10, 5 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="the copy and the fused op, one segment, T=4, N=1M, fp32, 5 samples (about a minute "
                             "on CPU); --tasks/--sizes/--samples still apply")
    parser.add_argument("--name", default=None, help="results file name (default kernels_<device>[_quick])")
    parser.add_argument("--record", action="store_true",
                        help="append the run to the committed benchmarks/results/ instead of out/benchmarks/ "
                             "(ignored by git): for a run meant to be published")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out_dir = RESULTS_DIR if args.record else OUT_DIR
    if args.quick:
        tasks, sizes, dtypes, samples = args.tasks or [4], args.sizes or [1 << 20], ["fp32"], args.samples or 5
    else:
        tasks = args.tasks or [2, 3, 4, 8]
        sizes = args.sizes or ([1 << 16, 1 << 20, 1 << 24] if device.type == "cpu" else [1 << 16, 1 << 20, 25_000_000, 100_000_000])
        dtypes, samples = args.dtypes or list(DTYPES), args.samples or 10
    layouts = ["one"] if args.quick else args.layouts
    env = environment(device)
    columns = ["op", "backend", "T", "N", "dtype", "segments", "median_ms", "iqr_ms", "GB/s", COPY_RATIO,
               "speedup_vs_torch", "speedup_vs_eager"]
    notes = (f"Every op, backend and the copy of one case timed round-robin in the same run "
             f"(`benchmarks/harness.py` time_round_robin, {samples} samples each): median and IQR per call. "
             f"{COPY_RATIO} = effective bandwidth (ideal bytes: T*N read for gram, T*N read + N written for "
             "combine and fused) / bandwidth of the copy baseline (a copy of (T+1)*N/2 elements, i.e. T*N + N "
             "elements read + written) in the same run. speedup_vs_torch is against the float64 torch "
             "reference backend (the test oracle, written for clarity); speedup_vs_eager against `eager`, a "
             "hand-written fp32 torch version (a matmul per segment).")
    # The table is saved after every case, before any plotting: a run cut off, or a plot that
    # fails, keeps every case measured so far.
    if args.quick:  # the main job's summary: the copy and the fused op, one segment
        recorder = RunRecorder(args.name or f"kernels_{device.type}_quick", env,
                               title="Kernel microbenchmark, quick summary (the main job's)", notes=notes,
                               columns=columns, results_dir=out_dir)
        rows = run(device, tasks, sizes, dtypes, layouts, samples,
                   on_case=lambda rows: recorder.save([r for r in rows if r["op"] in ("copy", "fused")]))
        summary = [r for r in rows if r["op"] in ("copy", "fused")]
        print(markdown_table(summary, columns))
        print(f"appended to {_shown(recorder.md_path)}")
        return 0
    name = args.name or f"kernels_{device.type}"
    recorder = RunRecorder(name, env, title="Kernel microbenchmark", notes=notes, columns=columns,
                           results_dir=out_dir)
    rows = run(device, tasks, sizes, dtypes, layouts, samples, on_case=recorder.save)
    print(markdown_table(rows, columns))
    stamp = env["date"][:10] + "-" + env["commit"].split()[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_path = plot_results(rows, out_dir / f"{name}-{stamp}.png", env["device"])
    recorder.save(rows, extra_md=f"![fused copy ratio]({plot_path.name})")
    print(f"appended to {_shown(recorder.md_path)} (plot {_shown(plot_path)})")
    return 0


def _shown(path) -> str:
    """``path`` relative to the repository root when it is inside it."""
    root = RESULTS_DIR.parents[1]
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
