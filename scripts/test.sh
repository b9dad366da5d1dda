#!/usr/bin/env bash
# The test command: set up the environment, compile-check the CUDA sources with nvcc (when
# nvcc is present), then run the whole pytest suite (Triton kernels under TRITON_INTERPRET=1
# when there is no GPU). Extra arguments go to pytest.
#
# Most of the suite runs one single-threaded process at a time, so it uses two pytest
# workers (pytest-xdist; every test file stays on one worker, so a file's spawned process
# group runs once) and the nvcc checks run beside them. BUCKETMOO_TEST_WORKERS sets the
# number of workers (0: no xdist, one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${BUCKETMOO_VENV:-.venv}/bin/activate"

nvcc_log=$(mktemp)
nvcc_pid=""
if [ -f tools/check_cuda_compile.sh ]; then
  if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
    echo "[test] nvcc compile check of csrc/cuda and the CUDA glue, beside pytest (output below)"
    ( bash tools/check_cuda_compile.sh \
        && { [ ! -f tools/check_cuda_glue.sh ] || bash tools/check_cuda_glue.sh; } ) >"$nvcc_log" 2>&1 &
    nvcc_pid=$!
  else
    echo "[test] nvcc not found: CUDA compile check skipped"
  fi
fi

workers="${BUCKETMOO_TEST_WORKERS:-2}"
xdist=()
if [ "$workers" != "0" ] && python -c "import xdist" 2>/dev/null; then
  xdist=(-n "$workers" --dist loadfile)
fi
echo "[test] pytest ${xdist[*]}"
status=0
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" python -m pytest -q --durations=15 "${xdist[@]}" tests "$@" || status=$?

if [ -n "$nvcc_pid" ]; then
  nvcc_status=0
  wait "$nvcc_pid" || nvcc_status=$?
  echo "[test] nvcc compile check and CUDA glue:"
  cat "$nvcc_log"
  if [ "$nvcc_status" -ne 0 ]; then
    echo "[test] FAILED: the nvcc compile check or the CUDA glue check (exit status $nvcc_status)" >&2
    status=1
  fi
fi
rm -f "$nvcc_log"
exit "$status"
