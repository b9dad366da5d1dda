#!/usr/bin/env bash
# The test command: set up the environment, compile-check the CUDA sources with nvcc (when
# nvcc is present), then run the whole pytest suite (Triton kernels under TRITON_INTERPRET=1
# when there is no GPU). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${BUCKETMOO_VENV:-.venv}/bin/activate"
if [ -x tools/check_cuda_compile.sh ] || [ -f tools/check_cuda_compile.sh ]; then
  if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
    echo "[test] nvcc compile check of csrc/cuda"
    bash tools/check_cuda_compile.sh
    if [ -f tools/check_cuda_glue.sh ]; then
      echo "[test] CUDA glue (python/cuda_ops.cpp) against the CPU torch, with stubs"
      bash tools/check_cuda_glue.sh
    fi
  else
    echo "[test] nvcc not found: CUDA compile check skipped"
  fi
fi
echo "[test] pytest"
python -m pytest -q --durations=15 tests "$@"
