"""The CUDA goal of issue 5: ``fused_bucket_moo`` on the native ``cuda`` backend.

Sweep: T in {2, 4, 8}, N = 25M elements (the issue's size; DDP's default bucket is 25 MB), bf16
and fp32, one segment, MGDA. For every point, in the same run:

* ``copy`` (``harness.copy_baseline``): ``dst.copy_(src)`` of (T+1)*N/2 elements of the same dtype, i.e. the same
  number of bytes read + written as an ideal one-pass fused kernel, (T*N + N) * itemsize;
* ``fused cuda``: ``fused_bucket_moo(..., backend="cuda", check_finite=False)`` (the
  sync-free, graph-capturable path; ``check_finite=True`` adds one tiny device-to-host copy);
  its effective bandwidth counts the ideal bytes, so ``copy_ratio`` is the issue's ratio
  (goal >= 0.85) and ``speedup_vs_torch`` the other goal (>= 3x);
* ``fused torch``: the float64 reference backend;
* ``gram cuda`` and ``combine cuda`` alone, each with the bytes it must move, to show how
  close each pass is to the copy bandwidth.

Gram and combine are two passes over the T gradients (the weights of a segment depend on
all its elements, and 25M elements x T do not fit on chip or in L2), so the bytes actually
moved are (2T + 1) * N * itemsize; ``traffic_vs_copy`` reports the bandwidth on those bytes.

Run on a GPU: ``python -m benchmarks.bench_cuda [--n 25000000] [--tasks 2 4 8]``.
Appends a run to ``benchmarks/results/cuda_goal.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import sys

import torch

import bucketmoo_kernels as bm
from benchmarks.harness import (COPY_RATIO, append_results, copy_baseline, copy_ratio, environment, gbps,
                                time_round_robin)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def run_point(num_tasks: int, n: int, dtype: torch.dtype, with_torch: bool, samples: int) -> list[dict]:
    device = torch.device("cuda")
    item = torch.tensor([], dtype=dtype).element_size()
    grads = torch.randn(num_tasks, n, device=device).to(dtype)
    out = torch.zeros(n, dtype=dtype, device=device)
    weights = torch.full((1, num_tasks), 1.0 / num_tasks, device=device)
    ideal = (num_tasks + 1) * n * item
    traffic = (2 * num_tasks + 1) * n * item
    copy_fn, copy_bytes = copy_baseline(num_tasks, n, dtype, device)
    calls = {  # what -> (call, ideal bytes)
        "copy of the same bytes": (copy_fn, copy_bytes),
        "fused_bucket_moo cuda": (lambda: bm.fused_bucket_moo(grads, out=out, backend="cuda", check_finite=False),
                                  ideal),
        "gram cuda": (lambda: bm.gram(grads, backend="cuda"), num_tasks * n * item),
        "combine cuda": (lambda: bm.combine(grads, weights, out=out, backend="cuda"), ideal),
    }
    if with_torch:
        calls["fused_bucket_moo torch"] = (
            lambda: bm.fused_bucket_moo(grads, out=out, backend="torch", check_finite=False), ideal)
    times = time_round_robin({what: fn for what, (fn, _) in calls.items()}, device, samples=samples)
    copy_ms = times["copy of the same bytes"]["median_ms"]
    name = str(dtype).replace("torch.", "")
    rows = []
    for what, (_, nbytes) in calls.items():
        t = times[what]
        r = {"T": num_tasks, "dtype": name, "N": n, "what": what, "median_ms": t["median_ms"],
             "iqr_ms": t["iqr_ms"], "GB/s": gbps(nbytes, t["median_ms"]),
             COPY_RATIO: copy_ratio(nbytes, t["median_ms"], copy_bytes, copy_ms)}
        if what == "fused_bucket_moo cuda":
            r["traffic_vs_copy"] = copy_ratio(traffic, t["median_ms"], copy_bytes, copy_ms)
            if with_torch:
                r["speedup_vs_torch"] = times["fused_bucket_moo torch"]["median_ms"] / t["median_ms"]
        rows.append(r)
    del grads, out
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=25_000_000)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--no-torch", action="store_true", help="skip the (slow) torch reference")
    parser.add_argument("--samples", type=int, default=20, help="round-robin samples per configuration")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cuda: needs a CUDA device")
    reason = bm.available_backends("cuda")["cuda"]
    if reason is not None:
        sys.exit(f"bench_cuda: the cuda backend is unavailable: {reason}")
    rows = []
    for dtype in args.dtypes:
        for num_tasks in args.tasks:
            rows += run_point(num_tasks, args.n, DTYPES[dtype], not args.no_torch, args.samples)
    columns = ["T", "dtype", "N", "what", "median_ms", "iqr_ms", "GB/s", COPY_RATIO, "traffic_vs_copy",
               "speedup_vs_torch"]
    notes = (
        "All rows of a point timed round-robin in the same run (harness.time_round_robin, CUDA events). "
        "GB/s counts the bytes an ideal kernel moves: (T+1)*N*itemsize for the fused op and the "
        f"copy, T*N*itemsize for gram, (T+1)*N*itemsize for combine. {COPY_RATIO} = GB/s / copy GB/s "
        "(issue goal for fused: >= 0.85). traffic_vs_copy counts the (2T+1)*N*itemsize bytes the "
        "two passes really move. speedup_vs_torch: torch reference time / cuda time (goal >= 3). "
        "fused runs with check_finite=False (no host sync)."
    )
    if args.no_write:
        from benchmarks.harness import markdown_table

        print(markdown_table(rows, columns))
        return
    path = append_results("cuda_goal", rows, environment("cuda"),
                         title="CUDA backend: fused_bucket_moo vs copy bandwidth and the torch reference",
                         notes=notes, columns=columns)
    print(path.read_text())


if __name__ == "__main__":
    main()
