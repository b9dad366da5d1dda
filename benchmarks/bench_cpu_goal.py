"""The CPU goal of issue 5: ``fused_bucket_moo`` on the native ``cpu`` backend vs ``torch``.

Setup: T = 4 fp32 gradients of N = 16M elements (MGDA), on this machine's cores; one
segment (the goal's setup) and, for the fused sweep, segments of 16K elements (a
chunk-granularity layout whose segments fit in a core's L2). Reports, in the same run:

* the median time of ``fused_bucket_moo(..., backend="cpu")`` and of ``backend="torch"``
  and their ratio (goal: >= 2x), for both cpu paths: two passes (a caller's ``out`` with
  ``check_finite=True``) and the fused sweep (``check_finite=False``, as the hooks call it);
* the effective bandwidth of the cpu backend, (T*N*4 bytes read + N*4 written) / time,
  as a share of what ``dst.copy_(src)`` reaches on the same number of bytes read + written
  (a copy of (T+1)*N/2 fp32 elements), measured in the same run (goal: >= 70%);
* the split into gram and combine, for diagnosis.

Run: ``python -m benchmarks.bench_cpu_goal [--n 16777216] [--tasks 4] [--segment 16384]``.
Appends a run to ``benchmarks/results/cpu_goal.md`` / ``.json``.
"""

from __future__ import annotations

import argparse

import torch

import bucketmoo_kernels as bm
from benchmarks.harness import (COPY_RATIO, append_results, copy_baseline, copy_ratio, environment, gbps,
                                load_average, time_ms, time_round_robin)


COLUMNS = ["what", "threads", "T", "N", "median_ms", "p25_ms", "p75_ms", "GB/s", COPY_RATIO, "speedup_vs_torch"]


def run(num_tasks: int, n: int, repeats: int, threads: int | None, segment: int) -> list[dict]:
    if threads:
        torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(num_tasks, n, generator=gen, dtype=torch.float32)
    out = torch.zeros(n, dtype=torch.float32)
    moved = (num_tasks * n + n) * 4  # bytes read + written by an ideal fused kernel
    copy_fn, copy_bytes = copy_baseline(num_tasks, n, torch.float32)
    weights = torch.full((1, num_tasks), 1.0 / num_tasks)
    rows = []

    def row(what: str, t: dict, bytes_moved: float | None = None, **extra) -> dict:
        r = {"what": what, "threads": torch.get_num_threads(), "T": num_tasks, "N": n,
             "median_ms": t["median_ms"], "p25_ms": t["p25_ms"], "p75_ms": t["p75_ms"]}
        if bytes_moved is not None:
            r["GB/s"] = gbps(bytes_moved, t["median_ms"])
        r.update(extra)
        rows.append(r)
        return r

    def fused(segments, check_finite):
        return lambda: bm.fused_bucket_moo(grads, segments=segments, out=out, backend="cpu",
                                           check_finite=check_finite)

    times = time_round_robin({
        "copy": copy_fn,
        "two passes": fused(None, True),
        "sweep": fused(None, False),
        "two passes, short segments": fused(segment, True),
        "sweep, short segments": fused(segment, False),
        "gram": lambda: bm.gram(grads, backend="cpu"),
        "combine": lambda: bm.combine(grads, weights, out=out, backend="cpu"),
    }, "cpu", samples=repeats)
    copy_row = row("torch copy_ of the same bytes", times["copy"], copy_bytes)
    # The float64 reference is ~50x slower: a few samples of it after the round-robin rows.
    torch_t = time_ms(lambda: bm.fused_bucket_moo(grads, out=out, backend="torch"), "cpu",
                      warmup=1, repeats=max(3, repeats // 5))
    for path in ("two passes", "sweep"):
        for layout, key in (("1 segment", path), (f"segments of {segment}", f"{path}, short segments")):
            r = row(f"fused_bucket_moo cpu, {path}, {layout}", times[key], moved)
            r["speedup_vs_torch"] = torch_t["median_ms"] / times[key]["median_ms"]
            r[COPY_RATIO] = copy_ratio(moved, times[key]["median_ms"], copy_bytes, times["copy"]["median_ms"])
    row("fused_bucket_moo torch, 1 segment", torch_t, moved)
    row("gram cpu, 1 segment", times["gram"], num_tasks * n * 4)
    row("combine cpu, 1 segment", times["combine"], moved)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20, help="round-robin samples per configuration")
    parser.add_argument("--segment", type=int, default=16384,
                        help="segment length of the short-segment layout (default 16384)")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1],
                        help="torch.set_num_threads values to run (default: 2 1)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    rows = []
    for threads in args.threads:
        rows += run(args.tasks, args.n, args.repeats, threads, args.segment)
    env = environment("cpu")
    from bucketmoo_kernels import native

    env["cpu loops"] = f"{native.cpu_isa()} variant (threads: see the table)"
    env["load average at end"] = load_average()
    results = [r for r in rows if COPY_RATIO in r]
    summary = "; ".join(f"{r['what'].removeprefix('fused_bucket_moo cpu, ')} ({r['threads']} thread(s)): "
                        f"**{r['speedup_vs_torch']:.1f}x** faster than torch, "
                        f"{COPY_RATIO} **{r[COPY_RATIO]:.2f}**" for r in results)
    notes = (
        f"Goal (issue 5): cpu >= 2x torch, and cpu bandwidth >= 70% of a torch copy of the same "
        f"bytes. This run: {summary}.\n\n"
        "speedup_vs_torch always compares with the torch backend on one segment. "
        "All rows but torch are timed round-robin (harness.time_round_robin: one sample of each "
        "per round, median and quartiles over the rounds), so that load from other processes "
        "affects them alike.\n\n"
        f"Bytes counted: T*N*4 read + N*4 written (an ideal single pass); the copy baseline "
        f"(harness.copy_baseline) copies (T+1)*N/2 fp32 elements, the same number of bytes read + "
        f"written; {COPY_RATIO} = effective bandwidth / copy bandwidth. A segment's "
        "weights depend on its whole Gram, so every segment is read twice (gram, then "
        "combine). With two passes both reads come from memory (about 2*T*N*4 + N*4 bytes "
        "moved); the fused sweep combines each short segment right after its Gram, so the "
        "second read comes from the core's cache; a segment larger than a core's share of the "
        "cache is still read twice from memory.\n\n"
        "Measured on a shared 2-core machine while other processes may also use the cores "
        "(see the load average above): numbers vary run to run."
    )
    if not args.no_write:
        path = append_results("cpu_goal", rows, env, title=f"CPU goal: fused_bucket_moo, T={args.tasks}, N={args.n} fp32",
                             notes=notes, columns=COLUMNS)
        print(f"wrote {path}")
    from benchmarks.harness import markdown_table

    print(notes)
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
