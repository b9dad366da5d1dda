#!/usr/bin/env bash
# Check the CUDA torch glue (python/cuda_ops.cpp) on a machine WITHOUT a CUDA build of torch:
#
#  1. compile it with g++ against the installed (CPU) torch's headers (plus an empty stand-in
#     for the generated c10/cuda/impl/cuda_cmake_macros.h, which CPU wheels lack);
#  2. link it with the real csrc/cuda launchers (nvcc objects) and host stand-ins for the few
#     libc10_cuda symbols it references (tools/cuda_glue_stubs.cpp; never called);
#  3. load it into Python after bucketmoo_kernels.native (which defines the op schemas) and
#     check that all six CUDA ops (every op but the CPU-only fused_) get a CUDA kernel whose signature matches the schema (a mismatch
#     fails at load), and that redispatching to the CUDA key with CPU tensors reaches the
#     glue's own argument check.
#
# Needs: the package installed with its CPU extension, g++, nvcc, the CUDA runtime library.
# Exits non-zero on any failure. Not a substitute for running tests/test_native_cuda.py on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
nvcc_bin="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
if [ -n "${CUDA_HOME:-}" ]; then
  cuda_home="$CUDA_HOME"
elif [ -f /usr/local/cuda/include/cuda_runtime.h ]; then
  cuda_home=/usr/local/cuda
else
  cuda_home="$(dirname "$(dirname "$(readlink -f "$nvcc_bin")")")"
fi
torch_dir="$("$PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
py_inc="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
work="$(mktemp -d "${TMPDIR:-/tmp}/bucketmoo_glue_check.XXXXXX")"
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/stub/c10/cuda/impl"
if [ ! -f "$torch_dir/include/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$work/stub/c10/cuda/impl/cuda_cmake_macros.h"
fi
incs=(-isystem "$work/stub" -isystem "$torch_dir/include" -isystem "$torch_dir/include/torch/csrc/api/include"
      -isystem "$cuda_home/include" -isystem "$py_inc")
echo "check_cuda_glue: compiling python/cuda_ops.cpp and the stand-ins (g++ -std=c++20)"
g++ -c -fPIC -std=c++20 -Wall "${incs[@]}" python/cuda_ops.cpp -o "$work/cuda_ops.o"
g++ -c -fPIC -std=c++20 "${incs[@]}" tools/cuda_glue_stubs.cpp -o "$work/stubs.o"
objs=()
for src in csrc/cuda/*.cu; do
  obj="$work/$(basename "${src%.cu}").o"
  "$nvcc_bin" -std=c++17 -arch=sm_90 -Xcompiler -fPIC -c "$src" -o "$obj"
  objs+=("$obj")
done
g++ -shared -o "$work/glue_check.so" "$work/cuda_ops.o" "$work/stubs.o" "${objs[@]}" \
  -L"$torch_dir/lib" -lc10 -ltorch -ltorch_cpu -L"$cuda_home/lib64" -lcudart \
  -Wl,-rpath,"$torch_dir/lib" -Wl,-rpath,"$cuda_home/lib64"
"$PYTHON" - "$work/glue_check.so" <<'PY'
import sys
import torch
import bucketmoo_kernels.native  # noqa: F401  (defines the bucketmoo schemas)

torch.ops.load_library(sys.argv[1])
ops = ["gram", "solve_mgda", "solve_pcgrad", "solve_cagrad", "solve_dual_cone", "combine_", "weights"]
for op in ops:
    keys = [line.split(":")[0] for line in torch._C._dispatch_dump(f"bucketmoo::{op}").splitlines()]
    assert "CUDA" in keys, f"bucketmoo::{op} has no CUDA kernel: {keys}"
ks = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
g, off, m = [torch.randn(10), torch.randn(10)], torch.tensor([0, 10]), torch.eye(2, dtype=torch.float64)[None]
calls = {
    "gram": (g, off), "solve_mgda": (m, 0, 10, 0.0), "solve_pcgrad": (m, torch.tensor([[1], [0]])),
    "solve_cagrad": (m, 0.4, 1), "solve_dual_cone": (m, 4, 0.0, 1e-4, 10), "combine_": (torch.empty(10), g, torch.ones(1, 2), off),
    "weights": (m.float(), None, None, 1, 0, 10, 0.0, 0.0, 0, 0, True),
}
for op, args in calls.items():
    try:
        getattr(torch.ops.bucketmoo, op).default.redispatch(ks, *args)
    except RuntimeError as exc:
        assert "must be a CUDA tensor" in str(exc), f"{op}: unexpected error {exc}"
    else:
        raise AssertionError(f"{op}: the CUDA kernel accepted CPU tensors")
print(f"check_cuda_glue: the {len(ops)} CUDA ops have kernels matching their schemas")
PY
