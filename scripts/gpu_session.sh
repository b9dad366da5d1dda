#!/usr/bin/env bash
# Everything a GPU session needs to check, in as few device calls as possible.
#
#   bash scripts/gpu_session.sh [build] [test] [sanitize] [bench] [all]     (default: all)
#
# Run on the GPU machine from the repository root, with the machine's own python3 (CUDA torch,
# Triton, nvcc, compute-sanitizer; nothing is installed: the package runs in place through
# PYTHONPATH). Each stage keeps going when a step fails and records it; logs and results go
# to $OUT (the device tool's return folder) or ./gpu_out. The last lines printed are a short
# summary, one line a step. Every stage fits one 10-minute device call: its steps share a
# budget of STAGE_BUDGET_S seconds (default 560), and a step gets at most what is left of it
# (a step cut short is reported as TIMED OUT; a step with no time left as SKIPPED).
#   build     both extensions in place (BUCKETMOO_CUDA_ARCHS, default 90; MAX_JOBS, default 16)
#   test      the CUDA and Triton test files (tests/triton_kernels: the CUDA-graph replay in
#             both orders, tables used from a side stream; tests/test_cuda_resources.py: the
#             memory the first PGD weight step reserves), the API tests on the GPU build, and
#             every method's weight step captured in a CUDA graph (tests/methods/test_cuda_graph_methods.py)
#   sanitize  compute-sanitizer memcheck / racecheck / initcheck / synccheck (docs/cuda.md)
#   bench     benchmarks.bench_gpu_fixes first (issue 14: serial vs parallel Gram reduction,
#             vector vs scalar loads, CUDA-graph replay vs eager), then benchmarks.bench_cuda
#             (the issue's goal table) and bench_kernels --device cuda; the tables are also
#             copied to $OUT/results
# A later call on the same warm machine reuses the build (its outputs are ignored by git and
# stay there), so `build test` then `sanitize` then `bench` is three calls (build + test may
# need two on a cold machine: call `build` alone if the summary shows test steps SKIPPED).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-gpu_out}"
mkdir -p "$OUT_DIR/logs" "$OUT_DIR/results"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"

STAGE_BUDGET_S="${STAGE_BUDGET_S:-560}"
STAGE_DEADLINE=$((SECONDS + STAGE_BUDGET_S))
# new_stage: every stage gets its own budget (one device call each).
new_stage() { STAGE_DEADLINE=$((SECONDS + STAGE_BUDGET_S)); }

# step NAME TIMEOUT_S COMMAND...: run, log to $OUT/logs/NAME.log, record status and time.
# The timeout is capped by what is left of the stage's budget.
step() {
  local name="$1" limit="$2"
  shift 2
  local left=$((STAGE_DEADLINE - SECONDS))
  if [ "$left" -lt 10 ]; then
    printf '%-22s %-28s %4ds  %s\n' "$name" "SKIPPED (stage budget spent)" 0 "" | tee -a "$SUMMARY"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  echo "[gpu] $name: $*"
  timeout "$limit" "$@" > "$OUT_DIR/logs/$name.log" 2>&1
  local rc=$?
  local status="ok"
  [ $rc -eq 0 ] || status="FAILED (exit $rc)"
  [ $rc -eq 124 ] && status="TIMED OUT after ${limit}s"
  printf '%-22s %-28s %4ds  %s\n' "$name" "$status" $((SECONDS - start)) \
    "$(tail -n 1 "$OUT_DIR/logs/$name.log" | cut -c1-90)" | tee -a "$SUMMARY"
  return 0
}

stage_build() {
  new_stage
  step versions 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; \
    nvcc --version | tail -n 2; $PY -c 'import torch, triton, numpy; \
    print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"numpy\", numpy.__version__)'"
  step build 580 env BUCKETMOO_FORCE_CUDA_BUILD=1 BUCKETMOO_CUDA_ARCHS="${BUCKETMOO_CUDA_ARCHS:-90}" \
    MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace
  step import 60 "$PY" -c "import bucketmoo_kernels as bm, bucketmoo_kernels.native as n; \
    print(bm.available_backends('cuda'), n.load_errors(), n.cpu_isa())"
}

stage_test() {
  new_stage
  step test_triton_kernels 200 "$PY" -m pytest -q -p no:cacheprovider \
    --junitxml="$OUT_DIR/results/test_triton_kernels.xml" tests/triton_kernels tests/test_cuda_resources.py
  step test_native_cuda 580 env BUCKETMOO_REQUIRE_CUDA_EXT=1 "$PY" -m pytest -q -x -p no:cacheprovider \
    --junitxml="$OUT_DIR/results/test_native_cuda.xml" tests/test_native_cuda.py
  step test_triton 580 "$PY" -m pytest -q -p no:cacheprovider \
    --junitxml="$OUT_DIR/results/test_triton.xml" tests/test_triton_backend.py
  step test_api 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_api.py
  step test_method_graphs 240 "$PY" -m pytest -q -p no:cacheprovider \
    --junitxml="$OUT_DIR/results/test_method_graphs.xml" tests/methods/test_cuda_graph_methods.py
}

stage_sanitize() {
  new_stage
  local t=tests/test_native_cuda.py
  step memcheck 580 compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$PY" -m pytest -q -x -p no:cacheprovider "$t" -k "not graph and not sanitizer and not opcheck"
  step racecheck 400 compute-sanitizer --tool racecheck --error-exitcode 1 \
    "$PY" -m pytest -q -x -p no:cacheprovider "$t" -k "gram_long or fused"
  step initcheck 300 compute-sanitizer --tool initcheck --error-exitcode 1 \
    "$PY" -m pytest -q -x -p no:cacheprovider "$t" -k "gram_matches"
  step synccheck 300 compute-sanitizer --tool synccheck --error-exitcode 1 \
    "$PY" -m pytest -q -x -p no:cacheprovider "$t" -k "fused"
}

stage_bench() {
  new_stage
  step bench_gpu_fixes 240 "$PY" -m benchmarks.bench_gpu_fixes
  step bench_cuda 240 "$PY" -m benchmarks.bench_cuda
  step bench_kernels_cuda 240 "$PY" -m benchmarks.bench_kernels --device cuda --tasks 2 4 8 \
    --sizes 1048576 25000000 --name kernels_cuda
  cp benchmarks/results/gpu_fixes.* benchmarks/results/cuda_goal.* benchmarks/results/kernels_cuda.* \
    "$OUT_DIR/results/" 2>/dev/null || true
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(all)
for s in "${stages[@]}"; do
  case "$s" in
    build) stage_build ;;
    test) stage_test ;;
    sanitize) stage_sanitize ;;
    bench) stage_bench ;;
    all) stage_build; stage_test; stage_sanitize; stage_bench ;;
    *) echo "unknown stage '$s' (build, test, sanitize, bench, all)" >&2; exit 2 ;;
  esac
done
echo
echo "[gpu] summary (logs: $OUT_DIR/logs, results: $OUT_DIR/results)"
cat "$SUMMARY"
# The device tool returns at most 8 files from $OUT: bundle the logs and tables into one
# archive (next to summary.txt) and drop the loose copies.
if [ -n "${OUT:-}" ]; then
  bundle="gpu_session_$(IFS=_; echo "${stages[*]}").tgz"
  tar czf "$OUT_DIR/$bundle" -C "$OUT_DIR" logs results && rm -rf "$OUT_DIR/logs" "$OUT_DIR/results"
  echo "[gpu] logs and results bundled in \$OUT/$bundle"
fi
