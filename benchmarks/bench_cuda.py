"""The headline GPU benchmark: ``fused_bucket_moo`` against a device-to-device copy of the same bytes.

For every backend (``cuda``, ``triton``), dtype (fp32, bf16), T in {2, 4, 8} and two sizes, in the
same run and round-robin (``harness.time_round_robin``, CUDA events):

* ``copy``: ``dst.copy_(src)`` of (T+1)*N/2 elements (``harness.copy_baseline``): the bytes an
  ideal one-pass fused op moves, T*N read + N written;
* ``fused eager``: ``fused_bucket_moo(..., backend=B, check_finite=False)`` (MGDA, one segment:
  the sync-free, graph-capturable path);
* ``fused graph``: the same call captured once in a CUDA graph and replayed (no host overhead);
* ``torch reference``: the float64 torch backend (``speedup_vs_torch``; ``--no-torch`` leaves it out);
* with ``--parts``: ``gram`` and ``combine`` alone.

The two sizes:

* ``shard``: T*N*itemsize = 25 MB (``--shard-bytes``), what one rank holds of a DDP 25 MB bucket
  in the sharded protocol; with the output it fits the GPU's L2 (50 MB on an H100). Such a call
  reads the gradients from memory once (Gram) and again from L2 (combine), so its bound is the
  copy itself (``bound`` 1). Each call gets fresh inputs: the buffers rotate over sets that
  together exceed 3x the L2, so no call starts with its inputs already in L2; the copy rotates
  the same way. The goal of the issue (>= 0.85 of the copy) applies here: ``goal`` says whether
  it is met.
* ``large``: N = 25M elements (``--n``; 100 MB to 800 MB of gradients), beyond L2: the design
  reads the gradients twice from memory (Gram, then combine: (2T+1)*N*itemsize bytes), so even at
  copy speed per pass it reaches (T+1)/(2T+1) of the copy (0.60, 0.56, 0.53 at T = 2, 4, 8).

Columns: ``copy_ratio`` = effective bandwidth on the ideal bytes ((T+1)*N*itemsize) / the copy's
bandwidth in the same run; ``bound`` as above; ``of_bound`` = copy_ratio / bound. Every timed
case's output is first checked against the torch reference at that size (output poisoned with
NaN before the call; relative error ||out - ref|| / ||ref|| <= 1e-4 for fp32, 2e-2 for bf16), and
the graph replay's output again after the timing: ``check`` says ``ok``, ``WRONG`` or ``ERROR``;
the exit status is 1 if any case is not ok. Results are saved after every case.

    python -m benchmarks.bench_cuda                       # the headline (scripts/gpu_session.sh's bench step)
    python -m benchmarks.bench_cuda --parts --samples 20  # with the Gram and combine passes alone
    python -m benchmarks.bench_cuda --quick --device cpu --no-write   # a smoke run of this script on CPU

Appends a run to ``benchmarks/results/cuda_goal.md`` / ``.json`` (``cuda_goal_cpu`` on CPU,
``_quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys

import torch

import bucketmoo_kernels as bm
from benchmarks.harness import (COPY_RATIO, RunRecorder, copy_baseline, copy_ratio, environment, gbps,
                                markdown_table, time_round_robin)
from bucketmoo_kernels.inputs import Segments

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHORT = {v: k for k, v in DTYPES.items()}
#: ||out - ref|| / ||ref|| allowed against the float64 torch reference
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
#: in-L2 goal: the fused op at >= this share of the copy bandwidth
GOAL = 0.85
COLUMNS = ["backend", "size", "T", "dtype", "N", "MB", "in L2", "call", "median_ms", "iqr_ms", "GB/s", COPY_RATIO,
           "bound", "of_bound", "goal", "speedup_vs_torch", "check"]
QUICK = {"tasks": [2], "dtypes": ["fp32"], "n": 1 << 19, "shard_bytes": 1 << 20, "samples": 3}


def shard_elements(shard_bytes: int, num_tasks: int, itemsize: int) -> int:
    """N such that the T gradients take ``shard_bytes`` (rounded down to a multiple of 4096)."""
    return max(4096, shard_bytes // (num_tasks * itemsize) // 4096 * 4096)


def bound(num_tasks: int, in_l2: bool) -> float:
    """The best copy_ratio the two-pass design can reach: 1 when the second pass reads from L2,
    (T+1)/(2T+1) when both read from memory."""
    return 1.0 if in_l2 else (num_tasks + 1) / (2 * num_tasks + 1)


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> str:
    """``ok (rel 3e-07)`` or ``WRONG (...)``: the output against the reference."""
    got, want = out.double(), ref.double()
    if not torch.isfinite(got).all():
        bad = int((~torch.isfinite(got)).sum())
        return f"WRONG ({bad} non-finite elements)"
    rel = ((got - want).norm() / want.norm().clamp_min(1e-300)).item()
    return f"ok (rel {rel:.1e})" if rel <= TOLERANCE[dtype] else f"WRONG (rel {rel:.2e} > {TOLERANCE[dtype]:g})"


def _rotating(fns):
    """One call that runs ``fns`` in turn (fresh inputs for every call)."""
    if len(fns) == 1:
        return fns[0]
    turn = itertools.cycle(fns)
    return lambda: next(turn)()


def _capture(fn) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def run_point(backend: str, size: str, num_tasks: int, dtype: torch.dtype, n: int, device: torch.device,
              l2_bytes: int | None, samples: int, with_torch: bool, with_graph: bool, parts: bool) -> list[dict]:
    """The rows of one case (copy first); raises on an error the caller records."""
    item = torch.empty(0, dtype=dtype).element_size()
    footprint = (num_tasks + 1) * n * item
    in_l2 = l2_bytes is not None and footprint <= l2_bytes
    sets = math.ceil(3 * l2_bytes / footprint) if in_l2 else 1
    segs = Segments.single(n)
    grads = [torch.randn(num_tasks, n, device=device).to(dtype) for _ in range(sets)]
    outs = [torch.zeros(n, dtype=dtype, device=device) for _ in range(sets)]

    def fused(i, on=backend):
        return lambda: bm.fused_bucket_moo(grads[i], segments=segs, out=outs[i], backend=on, check_finite=False)

    ref = bm.fused_bucket_moo(grads[0], segments=segs, backend="torch", check_finite=False)
    outs[0].fill_(float("nan"))
    fused(0)()
    eager_check = check(outs[0], ref, dtype)
    eager_bits = outs[0].clone()
    copies = [copy_baseline(num_tasks, n, dtype, device) for _ in range(sets)]
    copy_bytes = copies[0][1]
    ideal = (num_tasks + 1) * n * item
    calls = {"copy": (_rotating([fn for fn, _ in copies]), copy_bytes),
             "fused eager": (_rotating([fused(i) for i in range(sets)]), ideal)}
    graphs = []
    if with_graph and device.type == "cuda":
        graphs = [_capture(fused(i)) for i in range(sets)]
        calls["fused graph"] = (_rotating([g.replay for g in graphs]), ideal)
    if with_torch:
        calls["torch reference"] = (_rotating([fused(i, "torch") for i in range(sets)]), ideal)
    if parts:
        gram = bm.gram(grads[0], segs, backend=backend)
        weights = bm.solve(gram, backend="torch")
        calls["gram"] = (_rotating([lambda g=g: bm.gram(g, segs, backend=backend) for g in grads]),
                         num_tasks * n * item)
        calls["combine"] = (_rotating([lambda i=i: bm.combine(grads[i], weights, segs, out=outs[i], backend=backend)
                                       for i in range(sets)]), ideal)
    times = time_round_robin({what: fn for what, (fn, _) in calls.items()}, device, samples=samples)
    checks = {"fused eager": eager_check}
    if graphs:
        outs[0].fill_(float("nan"))
        graphs[0].replay()
        checks["fused graph"] = check(outs[0], ref, dtype)
        if checks["fused graph"].startswith("ok") and not torch.equal(outs[0], eager_bits):
            checks["fused graph"] += ", bits differ from eager"
    copy_ms = times["copy"]["median_ms"]
    torch_ms = times["torch reference"]["median_ms"] if with_torch else None
    rows = []
    for what, (_, nbytes) in calls.items():
        t = times[what]
        r = {"backend": backend, "size": size, "T": num_tasks, "dtype": SHORT[dtype], "N": n,
             "MB": footprint / 1e6, "in L2": ("yes" if in_l2 else "no") if l2_bytes is not None else "-",
             "call": what, "median_ms": t["median_ms"], "iqr_ms": t["iqr_ms"], "GB/s": gbps(nbytes, t["median_ms"]),
             COPY_RATIO: copy_ratio(nbytes, t["median_ms"], copy_bytes, copy_ms)}
        if what.startswith("fused"):
            if l2_bytes is not None:
                r["bound"] = bound(num_tasks, in_l2)
                r["of_bound"] = r[COPY_RATIO] / r["bound"]
                r["goal"] = ("met" if r[COPY_RATIO] >= GOAL else "missed") if in_l2 else "-"
            if torch_ms is not None:
                r["speedup_vs_torch"] = torch_ms / t["median_ms"]
            r["check"] = checks[what]
        rows.append(r)
    del graphs, grads, outs, copies, calls
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: the same code on the CPU backend (with --quick: a smoke run)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="default: cuda triton on a GPU, cpu on CPU (triton is not timed on CPU: the interpreter)")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--sizes", nargs="+", default=["shard", "large"], choices=["shard", "large"])
    parser.add_argument("--n", type=int, default=25_000_000, help="elements per task of the 'large' size")
    parser.add_argument("--shard-bytes", type=int, default=25_000_000, help="T*N*itemsize of the 'shard' size")
    parser.add_argument("--samples", type=int, default=10, help="round-robin samples per call")
    parser.add_argument("--no-torch", action="store_true", help="leave out the torch reference's timing")
    parser.add_argument("--no-graph", action="store_true", help="leave out the CUDA graph replay")
    parser.add_argument("--parts", action="store_true", help="also time gram and combine alone")
    parser.add_argument("--quick", action="store_true",
                        help=f"T={QUICK['tasks']}, fp32, N={QUICK['n']}, shard {QUICK['shard_bytes']} B, "
                             f"{QUICK['samples']} samples: a check that it runs (numbers mean nothing)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--results-dir", default=None, help="default benchmarks/results")
    parser.add_argument("--name", default=None, help="results file name (default cuda_goal[_cpu][_quick])")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.backends is None:
        args.backends = ["cuda", "triton"] if args.device == "cuda" else ["cpu"]
    if args.name is None:
        args.name = "cuda_goal" + ("_cpu" if args.device == "cpu" else "") + ("_quick" if args.quick else "")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_cuda: no CUDA device (use --device cpu for a smoke run)", file=sys.stderr)
        return 1
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None) if device.type == "cuda" \
        else None
    env = environment(device)
    if l2_bytes:
        env["L2"] = f"{l2_bytes / 2**20:.0f} MiB"
    notes = __doc__.split("\n\n", 1)[1].split("    python -m", 1)[0].strip()
    recorder = None if args.no_write else RunRecorder(
        args.name, env, title="Headline: fused_bucket_moo vs a device copy of the same bytes", notes=notes,
        columns=COLUMNS, results_dir=args.results_dir)
    reasons = bm.available_backends(device)
    rows, bad = [], []
    for backend in args.backends:
        for size in args.sizes:
            for dname in args.dtypes:
                dtype = DTYPES[dname]
                item = torch.empty(0, dtype=dtype).element_size()
                for num_tasks in args.tasks:
                    n = args.n if size == "large" else shard_elements(args.shard_bytes, num_tasks, item)
                    case = {"backend": backend, "size": size, "T": num_tasks, "dtype": dname, "N": n}
                    if reasons.get(backend, "unknown backend") is not None:
                        new = [{**case, "call": "fused eager", "check": f"ERROR: unavailable: {reasons.get(backend)}"}]
                    else:
                        try:
                            new = run_point(backend, size, num_tasks, dtype, n, device, l2_bytes, args.samples,
                                            not args.no_torch, not args.no_graph, args.parts)
                        except Exception as exc:  # noqa: BLE001  (record it, go on with the other cases)
                            new = [{**case, "call": "fused eager", "check": f"ERROR: {type(exc).__name__}: {exc}"[:200]}]
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                    rows += new
                    bad += [r for r in new if "check" in r and not r["check"].startswith("ok")]
                    print(markdown_table(new, COLUMNS), flush=True)
                    if recorder is not None:
                        recorder.save(rows)
    print(markdown_table(rows, COLUMNS))
    if recorder is not None:
        print(f"appended to {recorder.md_path}")
    fused = [r for r in rows if r.get("call", "").startswith("fused") and COPY_RATIO in r]
    in_l2 = [r[COPY_RATIO] for r in fused if r.get("in L2") == "yes"]
    summary = f"headline: {len(fused)} timed fused cases"
    if in_l2:
        summary += f"; in L2 copy_ratio {min(in_l2):.2f}..{max(in_l2):.2f} (goal {GOAL})"
    if bad:
        print(f"WRONG OR FAILED: {len(bad)} cases: " + "; ".join(
            f"{r['backend']} {r['size']} T={r['T']} {r['dtype']} {r['call']}: {r['check']}" for r in bad))
        print(summary + f"; {len(bad)} NOT OK")
        return 1
    print(summary + "; every output matches the torch reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
