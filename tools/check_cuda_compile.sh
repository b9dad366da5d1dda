#!/usr/bin/env bash
# Compile every .cu file of csrc/cuda with nvcc for sm_80 and sm_90 (no GPU needed), check
# every kernel's local memory (ptxas -v) against its budget (tools/check_cuda_local_memory.sh,
# budgets in tools/cuda_local_memory_budget.txt), then link and run tools/cuda_host_check.cu (launcher signatures, the kernels' index math and
# argument checks, all on the host). Exits non-zero on any compile, link or check failure.
#
# The flags mirror what torch's CUDAExtension passes to nvcc (the half/bfloat16 operator
# guards, relaxed constexpr), so code that compiles here also compiles inside the extension
# build. The .cu files include only the CUDA runtime, cuda_bf16.h/cuda_fp16.h and csrc/.
#
# Environment:
#   NVCC                      nvcc to use (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc,
#                             else /usr/local/cuda/bin/nvcc)
#   BUCKETMOO_CUDA_ARCHS      architectures, default "80;90"
#   BUCKETMOO_CUDA_STD        C++ standard, default c++17 (torch 2.13 builds with c++20:
#                             both are checked when this is unset)
#   BUCKETMOO_SKIP_HOST_CHECK=1   compile only, do not build/run the host check
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${NVCC:-}" ]; then
  nvcc_bin="$NVCC"
elif command -v nvcc >/dev/null 2>&1; then
  nvcc_bin="$(command -v nvcc)"
elif [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  nvcc_bin="$CUDA_HOME/bin/nvcc"
elif [ -x /usr/local/cuda/bin/nvcc ]; then
  nvcc_bin=/usr/local/cuda/bin/nvcc
else
  echo "check_cuda_compile: nvcc not found (set NVCC or CUDA_HOME)" >&2
  exit 2
fi

archs="${BUCKETMOO_CUDA_ARCHS:-80;90}"
gencode=()
IFS=';' read -ra arch_list <<< "$archs"
for arch in "${arch_list[@]}"; do
  gencode+=("-gencode" "arch=compute_${arch},code=sm_${arch}")
done
stds=("${BUCKETMOO_CUDA_STD:-c++17}")
if [ -z "${BUCKETMOO_CUDA_STD:-}" ]; then stds+=("c++20"); fi

torch_flags=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
             -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)

build_dir="$(mktemp -d "${TMPDIR:-/tmp}/bucketmoo_cuda_check.XXXXXX")"
trap 'rm -rf "$build_dir"' EXIT

shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "check_cuda_compile: no .cu files under csrc/cuda" >&2
  exit 1
fi

echo "check_cuda_compile: $("$nvcc_bin" --version | tail -n 1)"
failed=0
objects=()
ptxas_logs=()
for std in "${stds[@]}"; do
  for src in "${sources[@]}"; do
    obj="$build_dir/$(basename "${src%.cu}")_${std//+/x}.o"
    # First standard: plain flags, every arch (these objects are linked into the host check).
    # Further standards: torch's extension flags, last arch only (a syntax/type check).
    if [ "$std" = "${stds[0]}" ]; then
      extra=("${gencode[@]}" -Xptxas -v)
    else
      extra=("${torch_flags[@]}" "${gencode[@]: -2}")
    fi
    echo "  nvcc -std=$std ${extra[*]} -c $src"
    log="${obj%.o}.ptxas"
    if ! "$nvcc_bin" -std="$std" "${extra[@]}" -Icsrc -Xcompiler -Wall -c "$src" -o "$obj" 2> "$log"; then
      cat "$log" >&2
      echo "check_cuda_compile: FAILED to compile $src (-std=$std)" >&2
      failed=1
    elif [ "$std" = "${stds[0]}" ]; then
      grep -iE "warning|error" "$log" >&2 || true  # the -v report itself is checked below
      objects+=("$obj")
      ptxas_logs+=("$log")
    fi
  done
done
if [ "$failed" -ne 0 ]; then
  exit 1
fi

# Local memory (stack frame) of every kernel against tools/cuda_local_memory_budget.txt.
echo "  local memory per kernel (ptxas -v) vs tools/cuda_local_memory_budget.txt"
if ! bash tools/check_cuda_local_memory.sh "${ptxas_logs[@]}" > "$build_dir/lmem.txt"; then
  grep -v " ok$" "$build_dir/lmem.txt" >&2
  exit 1
fi
grep -E "weights_kernel|solve_.*sm_90|OK" "$build_dir/lmem.txt"  # the solvers' figures, sm_90

if [ "${BUCKETMOO_SKIP_HOST_CHECK:-0}" != "1" ]; then
  echo "  nvcc tools/cuda_host_check.cu + objects -> host check"
  "$nvcc_bin" -std="${stds[0]}" "${gencode[@]}" -Icsrc tools/cuda_host_check.cu "${objects[@]}" \
    -o "$build_dir/cuda_host_check"
  "$build_dir/cuda_host_check"
fi
echo "check_cuda_compile: OK (${#sources[@]} files, archs $archs, ${stds[*]})"
