"""A few CUDA and Triton calls for one compute-sanitizer pass (the last step of scripts/gpu_session.sh).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python3 scripts/sanitizer_cases.py [--backends cuda triton]

Small enough to finish in well under a minute under memcheck; every path that indexes memory
differently is taken once per backend: gram, combine and the fused op with T in {2, 8}, fp32 and
bf16, N = 40003 (vector body, scalar tail), aligned and shifted rows (scalar path), one segment,
a chunked layout and a layout with empty and length-1 segments, ``out`` aliasing a row. Without
the caching allocator (``PYTORCH_NO_CUDA_MEMORY_CACHING=1``) every tensor is its own allocation,
so an access past its end is reported instead of landing in a neighbour inside a cached block.

Each output is also checked against the torch reference backend (float64), so a wrong result
fails here even when the sanitizer sees nothing. Prints ``sanitizer cases done`` at the end.
"""

from __future__ import annotations

import argparse
import sys

import torch

import bucketmoo_kernels as bm
from bucketmoo_kernels.inputs import Segments

#: relative error ||out - ref|| / ||ref|| allowed against the float64 reference
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _check(what: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    got64, ref64 = got.double(), ref.double()
    if not torch.isfinite(got64).all():
        raise AssertionError(f"{what}: non-finite output")
    rel = ((got64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()
    if rel > TOLERANCE[dtype]:
        raise AssertionError(f"{what}: relative error {rel:.3g} > {TOLERANCE[dtype]:g}")


def run(backend: str, device: str = "cuda", n: int = 40_003) -> int:
    """Check every case on ``backend``; return how many were checked (raises on a wrong one)."""
    cases = 0
    layouts = {"one": None, "chunks": Segments.chunks(n, 1000),
               "ragged": Segments.from_lengths([n // 4, 0, 1, n - n // 4 - 1])}
    for dtype in (torch.float32, torch.bfloat16):
        for num_tasks in (2, 8):
            grads = torch.randn(num_tasks, n, device=device).to(dtype)
            for name, segments in layouts.items():
                what = f"{backend} T={num_tasks} {dtype} {name}"
                gram = bm.gram(grads, segments, backend=backend)
                _check(f"gram {what}", gram, bm.gram(grads, segments, backend="torch"), torch.float32)
                weights = bm.solve(gram, backend="torch")
                out = torch.full((n,), float("nan"), device=device, dtype=dtype)
                bm.combine(grads, weights, segments, out=out, backend=backend)
                _check(f"combine {what}", out, bm.combine(grads, weights, segments, backend="torch"), dtype)
                got = bm.fused_bucket_moo(grads, segments=segments, backend=backend, check_finite=False)
                _check(f"fused {what}", got, bm.fused_bucket_moo(grads, segments=segments, backend="torch"), dtype)
                cases += 3
            # rows that are not 16-byte aligned (scalar path), out aliasing the first row
            shifted = [torch.randn(n + 1, device=device).to(dtype)[1:] for _ in range(num_tasks)]
            ref = bm.fused_bucket_moo([r.clone() for r in shifted], segments=1000, backend="torch")
            bm.fused_bucket_moo(shifted, segments=1000, out=shifted[0], backend=backend, check_finite=False)
            _check(f"fused {backend} T={num_tasks} {dtype} shifted, out aliasing a row", shifted[0], ref, dtype)
            cases += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["cuda", "triton"], choices=["cuda", "triton", "cpu"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a smoke run of this script (with --backends cpu), not a sanitizer case")
    parser.add_argument("--n", type=int, default=40_003, help="elements per task")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sanitizer_cases: needs a CUDA device", file=sys.stderr)
        return 1
    reasons = bm.available_backends(args.device)
    failed = False
    for backend in args.backends:
        if reasons[backend] is not None:
            print(f"{backend}: unavailable ({reasons[backend]})", flush=True)
            failed = True
            continue
        print(f"{backend}: {run(backend, args.device, args.n)} cases checked", flush=True)
    if failed:
        return 1
    print("sanitizer cases done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
