#!/usr/bin/env bash
# The test command: set up the environment, compile-check the CUDA sources with nvcc (when
# nvcc is present), then run the whole pytest suite (Triton kernels under TRITON_INTERPRET=1
# when there is no GPU). Extra arguments go to pytest.
#
# Most of the suite runs one single-threaded process at a time, so it uses two pytest
# workers (pytest-xdist; every test file stays on one worker, so a file's spawned process
# group runs once) and the nvcc checks run beside them. BUCKETMOO_TEST_WORKERS sets the
# number of workers (0: no xdist, one process).
# tests/conftest.py hands the heaviest files out first and keeps the files that share the
# HF scenarios on one worker.
set -euo pipefail
cd "$(dirname "$0")/.."
# The nvcc compile check needs no Python environment: it runs beside the setup (which is
# mostly single-threaded pip), and the glue check (which needs torch) beside pytest.
nvcc_log=$(mktemp)
nvcc_pid=""
have_nvcc=0
if [ -f tools/check_cuda_compile.sh ]; then
  if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
    have_nvcc=1
    echo "[test] nvcc compile check of csrc/cuda, beside the setup (output below)"
    bash tools/check_cuda_compile.sh >"$nvcc_log" 2>&1 &
    nvcc_pid=$!
  else
    echo "[test] nvcc not found: CUDA compile check skipped"
  fi
fi
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${BUCKETMOO_VENV:-.venv}/bin/activate"
if [ "$have_nvcc" = 1 ] && [ -f tools/check_cuda_glue.sh ]; then
  echo "[test] CUDA glue (python/cuda_ops.cpp) against the CPU torch, beside pytest (output below)"
  prev_pid=$nvcc_pid
  ( while kill -0 "$prev_pid" 2>/dev/null; do sleep 2; done
    bash tools/check_cuda_glue.sh ) >>"$nvcc_log.glue" 2>&1 &
  glue_pid=$!
fi

workers="${BUCKETMOO_TEST_WORKERS:-2}"
xdist=()
if [ "$workers" != "0" ] && python -c "import xdist" 2>/dev/null; then
  xdist=(-n "$workers" --dist loadfile)
fi
echo "[test] pytest ${xdist[*]}"
status=0
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" python -m pytest -q --durations=15 "${xdist[@]}" tests "$@" || status=$?

# report_job NAME PID LOG: wait for a background check, print its log, and fail the run
# (status=1) when it failed.
report_job() {
  local job_status=0
  wait "$2" || job_status=$?
  echo "[test] $1:"
  cat "$3"
  if [ "$job_status" -ne 0 ]; then
    echo "[test] FAILED: the $1 (exit status $job_status)" >&2
    status=1
  fi
}
if [ -n "$nvcc_pid" ]; then
  report_job "nvcc compile check" "$nvcc_pid" "$nvcc_log"
fi
if [ -n "${glue_pid:-}" ]; then
  report_job "CUDA glue check" "$glue_pid" "$nvcc_log.glue"
fi
rm -f "$nvcc_log" "$nvcc_log.glue"
exit "$status"
