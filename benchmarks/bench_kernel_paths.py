"""The kernels' alternative code paths measured against each other on a GPU (one device call, < 10 min).

Three tables in one results file, each with the same-run copy bandwidth as the yardstick (the
choices issue 14 made: a parallel Gram reduction, vector loads, graph replay):

* ``reduction``: the Triton Gram of one long segment (N = 25M and 300M elements, bf16, T = 4),
  with the multi-tile reduction adding ``R = 32`` partial slots at a time (the default) and
  ``R = 1`` (a serial chain of dependent loads, what the single-launch version did in its
  last-arriving program); the CUDA Gram beside it when the extension is built.
* ``loads``: Triton Gram and combine on rows that are 16-byte aligned (vector loads) and on
  the same rows shifted by one element (the launcher then specialises for unaligned
  pointers: scalar loads), N = 25M (and 25M + 3 for combine: the full blocks stay unmasked);
* ``graphs``: ``fused_bucket_moo`` (triton, and cuda when built) eager vs the replay of a CUDA
  graph of the same call, one segment and 4096-element chunks, N = 4M; a replayed output that
  differs from eager in any bit is reported in the ``bits_equal`` column.

``python -m benchmarks.bench_kernel_paths [--quick]`` writes ``benchmarks/results/kernel_paths.md``
and ``.json`` (device, versions, commit and date in the header). This file was called
``bench_gpu_fixes.py`` (results ``gpu_fixes``) before it had run anywhere.
"""

from __future__ import annotations

import argparse
import sys

import torch

import bucketmoo_kernels as bm
from benchmarks.harness import RunRecorder, copy_baseline_ms, environment, gbps, time_ms
from bucketmoo_kernels.inputs import Segments, as_task_grads
from bucketmoo_kernels.triton import combine_triton, gram_triton


def _cuda_built() -> bool:
    return bm.available_backends("cuda").get("cuda") is None


def reduction_rows(sizes, num_tasks=4, dtype=torch.bfloat16) -> list[dict]:
    dev = torch.device("cuda")
    rows = []
    for n in sizes:
        grads = torch.randn(num_tasks, n, device=dev).to(dtype)
        tg = as_task_grads(grads)
        segs = Segments.single(n)
        nbytes = num_tasks * n * grads.element_size()
        copy = copy_baseline_ms(nbytes // 2 // grads.element_size(), dtype, dev)
        rows.append({"table": "reduction", "what": "copy of the same bytes", "N": n, "median_ms": copy["median_ms"],
                     "GB/s": gbps(nbytes, copy["median_ms"])})
        ref = None
        for r in (32, 1):
            t = time_ms(lambda: gram_triton(tg, segs, reduce_slots=r), dev)
            got = gram_triton(tg, segs, reduce_slots=r)
            ref = got if ref is None else ref
            rows.append({"table": "reduction", "what": f"triton gram R={r}", "N": n, "median_ms": t["median_ms"],
                         "GB/s": gbps(nbytes, t["median_ms"]),
                         "max_rel_diff_vs_R32": float(((got - ref).abs().max() / ref.abs().max()).item())})
        if _cuda_built():
            t = time_ms(lambda: bm.gram(grads, backend="cuda"), dev)
            rows.append({"table": "reduction", "what": "cuda gram", "N": n, "median_ms": t["median_ms"],
                         "GB/s": gbps(nbytes, t["median_ms"])})
        del grads, tg
        torch.cuda.empty_cache()
    return rows


def load_rows(n, num_tasks=4) -> list[dict]:
    dev = torch.device("cuda")
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).replace("torch.", "")
        for length in (n, n + 3):
            buf = torch.randn(num_tasks, length + 16, device=dev).to(dtype)
            weights = torch.full((1, num_tasks), 1.0 / num_tasks, device=dev)
            segs = Segments.single(length)
            for shift in (0, 1):
                rows_view = buf[:, shift:shift + length]  # shift 1: not 16-byte aligned
                tg = as_task_grads(rows_view)
                out = torch.empty(length + 16, dtype=dtype, device=dev)[shift:shift + length]
                g_bytes = num_tasks * length * buf.element_size()
                c_bytes = (num_tasks + 1) * length * buf.element_size()
                aligned = "aligned" if shift == 0 else "shifted by 1 (scalar)"
                if length == n:
                    t = time_ms(lambda: gram_triton(tg, segs), dev)
                    rows.append({"table": "loads", "what": f"triton gram {name} {aligned}", "N": length,
                                 "median_ms": t["median_ms"], "GB/s": gbps(g_bytes, t["median_ms"])})
                t = time_ms(lambda: combine_triton(tg, weights, segs, out), dev)
                rows.append({"table": "loads", "what": f"triton combine {name} {aligned}", "N": length,
                             "median_ms": t["median_ms"], "GB/s": gbps(c_bytes, t["median_ms"])})
            del buf
            torch.cuda.empty_cache()
    copy = copy_baseline_ms(n, torch.float32, dev)
    rows.append({"table": "loads", "what": "copy fp32 (read+write N)", "N": n, "median_ms": copy["median_ms"],
                 "GB/s": gbps(2 * n * 4, copy["median_ms"])})
    return rows


def graph_rows(n, num_tasks=4, dtype=torch.bfloat16) -> list[dict]:
    dev = torch.device("cuda")
    rows = []
    backends = ["triton"] + (["cuda"] if _cuda_built() else [])
    for backend in backends:
        for seg_name, segs in (("one segment", Segments.single(n)), ("chunks of 4096", Segments.chunks(n, 4096))):
            grads = torch.randn(num_tasks, n, device=dev).to(dtype)
            out = torch.empty(n, dtype=dtype, device=dev)

            def call():
                return bm.fused_bucket_moo(grads, segments=segs, out=out, backend=backend, check_finite=False)

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    call()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                call()
            eager_t = time_ms(call, dev)
            replay_t = time_ms(graph.replay, dev)
            grads.copy_(torch.randn_like(grads))
            graph.replay()
            replayed = out.clone()
            call()
            equal = bool(torch.equal(replayed, out))
            rows.append({"table": "graphs", "what": f"fused {backend} {seg_name}", "N": n,
                         "eager_ms": eager_t["median_ms"], "replay_ms": replay_t["median_ms"],
                         "bits_equal": equal})
            del graph, grads, out
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernel_paths needs a CUDA device")
    big = [1_000_000, 25_000_000] if args.quick else [25_000_000, 300_000_000]
    n = 1_000_000 if args.quick else 25_000_000
    cols = ["table", "what", "N", "median_ms", "GB/s", "max_rel_diff_vs_R32", "eager_ms", "replay_ms", "bits_equal"]
    recorder = None if args.no_write else RunRecorder(
        "kernel_paths", environment("cuda"),
        title="Kernel code paths on a GPU: Gram reduction width, load width, graph replay",
        notes=__doc__.split("\n\n", 1)[1].rsplit("``python -m", 1)[0], columns=cols)
    rows = []
    for part in (lambda: reduction_rows(big), lambda: load_rows(n), lambda: graph_rows(4_000_000)):
        try:
            new = part()
        except Exception as exc:  # keep the other tables: record the failure as a row
            new = [{"table": "error", "what": repr(exc)[:200]}]
        rows += new
        for r in new:
            print(r, flush=True)
        if recorder is not None:  # saved after every table: a run cut off keeps the tables it finished
            recorder.save(rows)
    if recorder is not None:
        print("wrote", recorder.md_path)

if __name__ == "__main__":
    main()
