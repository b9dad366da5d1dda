#!/usr/bin/env bash
# The first GPU session in one device call: proves the kernels and measures the headline, then ends.
#
#   bash scripts/gpu_session.sh             the one call (ends by itself within 480 s)
#   bash scripts/gpu_session.sh --plan      print its steps, their time limits and the total; run nothing
#   bash scripts/gpu_session.sh rerun ID... build, then rerun these pytest ids (what summary.txt prints)
#   bash scripts/gpu_session.sh STAGE...    longer opt-in stages (one per device call, a 560 s deadline each):
#       gpu-suite  every test marked gpu (not distributed) in tests/, the compute-sanitizer tests included
#       sanitize   compute-sanitizer memcheck / racecheck / initcheck / synccheck over test_native_cuda.py
#       bench      bench_cuda with the Gram and combine passes, bench_kernel_paths, bench_kernels --device cuda
#   (--plan also takes stages: `--plan bench`)
#
# Run it on the GPU machine from anywhere (it changes to the repository root), with the machine's
# own python3 (PYTHON overrides): nothing is installed, the package runs in place through PYTHONPATH.
#
# The one call, in order (docs/cuda.md, "The first GPU session"):
#   versions      GPU, driver, nvcc, compute-sanitizer, torch, triton, cores
#   build_cpu     both extensions built out of place (setup.py build_ext --build-lib build/gpu_session/...,
#   build_cuda    BUCKETMOO_CUDA_ARCHS=90, MAX_JOBS = all cores) in the background, each copied into the
#                 package (atomically, by rename) only when its build has finished
#   triton        meanwhile: the Triton backend against the float64 references (tests/test_conformance.py
#                 restricted to triton, tests/test_triton_backend.py, tests/triton_kernels)
#   import        after both builds: which backends load
#   cuda          the CUDA backend against the same references (conformance restricted to cuda,
#                 tests/test_native_cuda.py without its compute-sanitizer tests)
#   graphs        every method's weight step captured in a CUDA graph (tests/methods/test_cuda_graph_methods.py)
#   local_memory  the device memory the weight kernels reserve (tests/test_cuda_resources.py)
#   bench         the headline benchmark (benchmarks/bench_cuda.py: fused vs a copy, round-robin)
#   sanitizer     only with time left: one compute-sanitizer memcheck pass over a few CUDA and Triton cases
#                 (scripts/sanitizer_cases.py) with PYTORCH_NO_CUDA_MEMORY_CACHING=1
# Every step has its own time limit, capped by what is left of the deadline (a step cut short is
# TIMED OUT, one with no time left SKIPPED); a failing step does not stop the others. pytest runs
# with xdist (-n), pytest-timeout per test and --maxfail; its ids are printed as they finish (-v),
# so a cut-off step still names what failed so far.
#
# What comes back: $OUT/summary.txt (one line a step, then the commands that rerun the failing ids)
# and $OUT/gpu_session.tgz (every log, junit xml, rerun list and the benchmark tables). Both are
# rewritten after every step, so a call killed from outside keeps what was done. Without $OUT they
# go to ./gpu_out. The summary is also the last thing printed.
#
# Knobs (environment): GPU_SESSION_BUDGET_S (the deadline: 480 s for the one call, 560 s for an
# opt-in stage), GPU_SESSION_STEP_CAP_S (caps every step's limit;
# the CPU test uses it), GPU_SESSION_JOBS (xdist workers, 8), MAX_JOBS (compile jobs, all cores),
# BUCKETMOO_CUDA_ARCHS (90), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY="${PYTHON:-python3}"
STEP_CAP_S="${GPU_SESSION_STEP_CAP_S:-100000}"
PACK_RESERVE_S=10       # kept back from every step for the last summary and archive
MIN_STEP_S=5            # a step with less than this left is SKIPPED
NPROC=$(nproc 2>/dev/null || echo 16)
JOBS="${GPU_SESSION_JOBS:-8}"
export MAX_JOBS="${MAX_JOBS:-$NPROC}"
export BUCKETMOO_CUDA_ARCHS="${BUCKETMOO_CUDA_ARCHS:-90}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PYTEST=("$PY" -m pytest -p no:cacheprovider -v -ra)

# ---- the steps and their limits (seconds) ---------------------------------------------------
# "name limit mode what": mode "|" runs beside the other "|" steps of its stage (they count as
# the longest of them), "+" after everything before it. The one call's wall-clock plan is
# versions + max(build_cpu, build_cuda, triton) + the rest.
FIRST_PLAN="versions 15 + GPU, driver, toolkits, torch/triton versions
build_cpu 120 | background: the CPU extension, out of place, copied in when complete
build_cuda 185 | background: the CUDA extension (sm_90), out of place, copied in when complete
triton 185 | beside the builds: tests/test_conformance.py (triton) + tests/test_triton_backend.py + tests/triton_kernels
import 20 + after both builds: available_backends('cuda'), native.load_errors()
cuda 90 + tests/test_conformance.py (cuda) + tests/test_native_cuda.py, no sanitizer tests
graphs 35 + tests/methods/test_cuda_graph_methods.py
local_memory 25 + tests/test_cuda_resources.py (one process: it reads the driver's free memory)
bench 75 + benchmarks/bench_cuda.py: fused vs copy, T 2/4/8, fp32/bf16, in and beyond L2, cuda + triton, eager + graph
sanitizer 25 + only with time left (then it gets all of it; SKIPPED with less than 25 s): compute-sanitizer memcheck of scripts/sanitizer_cases.py
pack 10 + kept back for summary.txt and gpu_session.tgz (also rewritten after every step)"

# The builds of the opt-in stages, as in the one call.
BUILDS="build_cpu 120 | the CPU extension (incremental on a warm machine: only what changed)
build_cuda 185 | the CUDA extension (incremental likewise)"

plan_of() { # plan_of STAGE: its plan lines
  case "$1" in
    first) echo "$FIRST_PLAN" ;;
    rerun) echo "versions 15 + versions and device
$BUILDS
rerun 240 + the given pytest ids (BUCKETMOO_REQUIRE_CUDA_EXT=1), -n ${JOBS}" ;;
    gpu-suite) echo "versions 15 + versions and device
$BUILDS
gpu_suite 340 + every gpu-marked, non-distributed test in tests/ (compute-sanitizer tests included), -n ${JOBS}" ;;
    sanitize) echo "versions 15 + versions and device
$BUILDS
memcheck 200 + compute-sanitizer memcheck over test_native_cuda.py (no graph/sanitizer/opcheck tests)
racecheck 60 + racecheck over the long-Gram and fused tests
initcheck 40 + initcheck over the Gram tests
synccheck 40 + synccheck over the fused tests" ;;
    bench) echo "versions 15 + versions and device
$BUILDS
bench_cuda_full 110 + bench_cuda with the Gram and combine passes alone, 20 samples
bench_kernel_paths 110 + serial vs parallel Gram reduction, vector vs scalar loads, graph replay vs eager
bench_kernels_cuda 110 + bench_kernels --device cuda (every op and backend), T 2/4/8, N 1M and 25M" ;;
  esac
}

limit_of() { # limit_of NAME [STAGE]: the planned limit of a step
  awk -v n="$1" '$1 == n {print $2; exit}' <<< "$(plan_of "${2:-first}")"
}

plan_total() { # plan_total STAGE: the wall-clock total of its plan
  awk '$3 == "|" { if ($2 > par) par = $2; next } { seq += $2 } END { print seq + par }' <<< "$(plan_of "$1")"
}

print_plan() { # print_plan STAGE...: the steps, their limits and the wall-clock total
  local stage total=0 name limit mode what
  for stage in "$@"; do
    echo "stage $stage (deadline $(budget_of "$stage") s):"
    printf '  %-18s %6s  %s\n' step limit what
    while read -r name limit mode what; do
      [ "$mode" = "|" ] && what="(in parallel) $what"
      printf '  %-18s %5ss  %s\n' "$name" "$limit" "$what"
    done <<< "$(plan_of "$stage")"
    total=$((total + $(plan_total "$stage")))
  done
  echo "total: $total s"
}

budget_of() { # the internal deadline of a stage: 480 s for the one call, 560 s for the opt-in ones
  if [ -n "${GPU_SESSION_BUDGET_S:-}" ]; then echo "$GPU_SESSION_BUDGET_S"
  elif [ "$1" = first ]; then echo 480
  else echo 560
  fi
}

# ---- arguments --------------------------------------------------------------------------------
PLAN_ONLY=0
STAGES=()
RERUN_IDS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --plan) PLAN_ONLY=1 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    first|gpu-suite|sanitize|bench) STAGES+=("$1") ;;
    rerun) STAGES+=(rerun); shift; RERUN_IDS=("$@"); break ;;
    *) echo "gpu_session.sh: unknown argument '$1' (--plan, rerun ID..., gpu-suite, sanitize, bench)" >&2; exit 2 ;;
  esac
  shift
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=(first)
BUDGET_S=0
for s in "${STAGES[@]}"; do b=$(budget_of "$s"); [ "$b" -gt "$BUDGET_S" ] && BUDGET_S=$b; done
if [ "$PLAN_ONLY" -eq 1 ]; then
  print_plan "${STAGES[@]}"
  exit 0
fi
if [ "${STAGES[0]}" = rerun ] && [ ${#RERUN_IDS[@]} -eq 0 ]; then
  echo "gpu_session.sh rerun: give the pytest ids to rerun (summary.txt prints the line)" >&2
  exit 2
fi

# ---- where things go --------------------------------------------------------------------------
OUT_DIR="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_session.XXXXXX")
mkdir -p "$WORK/logs" "$WORK/results"
SUMMARY="$WORK/summary.txt"
ARCHIVE="gpu_session.tgz"
DEADLINE=$((SECONDS + BUDGET_S))
BUILD_ROOT="$ROOT/build/gpu_session"
CUDA_OK=unknown
LAST_RC=
STEP_PID=
{
  echo "bucketmoo_kernels GPU session: ${STAGES[*]}; $(date -u '+%Y-%m-%d %H:%M UTC'); commit" \
    "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo ' (local changes)'); deadline ${BUDGET_S} s"
  printf '%-14s %-26s %5s  %s\n' step status time "last line of its log"
} > "$SUMMARY"

# pack: summary.txt and one archive in $OUT (at most 8 files come back from the device machine).
pack() {
  cp "$SUMMARY" "$OUT_DIR/summary.txt" 2>/dev/null
  cp "$ROOT"/benchmarks/results/cuda_goal.* "$ROOT"/benchmarks/results/kernel_paths.* \
    "$ROOT"/benchmarks/results/kernels_cuda*.* "$WORK/results/" 2>/dev/null
  tar czf "$OUT_DIR/$ARCHIVE.tmp" -C "$WORK" logs results summary.txt 2>/dev/null \
    && mv -f "$OUT_DIR/$ARCHIVE.tmp" "$OUT_DIR/$ARCHIVE"
}

# finish (on exit, whatever the cause): stop the background builds (each a process group of its
# own, started by timeout), write the last summary and the archive, print the summary.
finish() {
  local pidfile
  [ -n "$STEP_PID" ] && kill -TERM -- "-$STEP_PID" 2>/dev/null
  for pidfile in "$BUILD_ROOT"/*/timeout.pid; do
    [ -f "$pidfile" ] && [ ! -f "$(dirname "$pidfile")/rc" ] && kill -TERM -- "-$(cat "$pidfile")" 2>/dev/null
  done
  echo "elapsed ${SECONDS} s of ${BUDGET_S} s" >> "$SUMMARY"
  pack
  echo
  echo "[gpu] summary ($OUT_DIR/summary.txt; logs, junit xml and tables in $OUT_DIR/$ARCHIVE)"
  cat "$SUMMARY"
  rm -rf "$WORK"
}
trap finish EXIT
trap 'exit 130' INT TERM

left() { echo $((DEADLINE - PACK_RESERVE_S - SECONDS)); }

# cap LIMIT: the limit cut to the step cap and to what is left of the deadline; 0 when less than
# MIN_STEP_S is left (the step is then SKIPPED)
cap() {
  local limit=$1 l
  l=$(left)
  if [ "$l" -lt "$MIN_STEP_S" ]; then echo 0; return; fi
  [ "$limit" -gt "$STEP_CAP_S" ] && limit=$STEP_CAP_S
  [ "$limit" -gt "$l" ] && limit=$l
  echo "$limit"
}

# record NAME RC LIMIT START: one summary line (status from the exit code), then repack.
record() {
  local name=$1 rc=$2 limit=$3 start=$4 status
  case "$rc" in
    0) status=ok ;;
    124|137) status="TIMED OUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  local last
  last=$(grep -av '^\s*$' "$WORK/logs/$name.log" 2>/dev/null | tail -n 1 | cut -c1-110)
  printf '%-14s %-26s %4ds  %s\n' "$name" "$status" $((SECONDS - start)) "$last" >> "$SUMMARY"
  echo "[gpu] $name: $status ($((SECONDS - start)) s)"
  LAST_RC=$rc
  rerun_ids "$name"
  pack
}

skip() { # skip NAME REASON
  LAST_RC=skipped
  printf '%-14s %-26s %4ds  %s\n' "$1" "SKIPPED" 0 "$2" >> "$SUMMARY"
  echo "[gpu] $1: SKIPPED ($2)"
  pack
}

# rerun_ids NAME: the failing pytest ids of a step's log (its -v lines and the -ra summary), in
# the summary under the step's line as the command that reruns them (one device call: it builds
# first), and as a list in results/rerun_NAME.txt.
rerun_ids() {
  local log="$WORK/logs/$1.log" ids
  [ -f "$log" ] || return 0
  ids=$(grep -aoE '(FAILED|ERROR) tests/[^ ]+' "$log" | awk '{print $2}' | sort -u)
  [ -n "$ids" ] || return 0
  printf '%s\n' "$ids" > "$WORK/results/rerun_$1.txt"
  {
    echo "    $(printf '%s\n' "$ids" | wc -l) failing ids; rerun with:"
    echo "    bash scripts/gpu_session.sh rerun $(printf '%s\n' "$ids" | sed "s/.*/'&'/" | tr '\n' ' ')"
  } | tee -a "$SUMMARY"
}

# step NAME LIMIT COMMAND...: run it under its limit (capped), log to logs/NAME.log, record it.
step() {
  local name=$1 limit
  limit=$(cap "$2")
  shift 2
  if [ "$limit" -le 0 ]; then
    skip "$name" "no time left before the deadline"
    return 0
  fi
  local start=$SECONDS
  echo "[gpu] $name (limit ${limit}s): $*"
  # in the background and waited for, so that a signal to this script is handled at once
  timeout -k 5 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1 < /dev/null &
  STEP_PID=$!
  wait "$STEP_PID"
  local rc=$?
  STEP_PID=
  record "$name" "$rc" "$limit" "$start"
}

# ---- the build -----------------------------------------------------------------------------
so_suffix() { timeout 30 "$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))' 2>/dev/null < /dev/null; }

# build_one KIND LIMIT: build one extension out of place, then move it into the package.
# Runs in the background (its own status file); nothing half-written is ever in the package.
build_one() {
  local kind=$1 limit=$2 lib="$BUILD_ROOT/$kind/lib" tmp="$BUILD_ROOT/$kind/temp" rc=0 so
  mkdir -p "$lib" "$tmp"
  local skip_env=BUCKETMOO_SKIP_CUDA_BUILD
  [ "$kind" = cuda ] && skip_env=BUCKETMOO_SKIP_CPU_BUILD
  {
    echo "out of place: --build-lib $lib --build-temp $tmp, MAX_JOBS=$MAX_JOBS, archs $BUCKETMOO_CUDA_ARCHS"
    timeout -k 5 "$limit" env "$skip_env=1" BUCKETMOO_FORCE_CUDA_BUILD=1 \
      "$PY" setup.py build_ext --build-lib "$lib" --build-temp "$tmp" < /dev/null &
    echo $! > "$BUILD_ROOT/$kind/timeout.pid"
    wait $!
    rc=$?
    if [ $rc -eq 0 ]; then
      so=$(find "$lib" -name "_${kind}*.so" -newer "$BUILD_ROOT/$kind/started" 2>/dev/null | head -n 1)
      [ -z "$so" ] && so=$(find "$lib" -name "_${kind}*$(so_suffix)" 2>/dev/null | head -n 1)
      if [ -n "$so" ]; then
        cp "$so" "$ROOT/bucketmoo_kernels/.$(basename "$so").tmp" \
          && mv -f "$ROOT/bucketmoo_kernels/.$(basename "$so").tmp" "$ROOT/bucketmoo_kernels/$(basename "$so")" \
          && echo "copied into the package: bucketmoo_kernels/$(basename "$so")" || rc=1
      else
        echo "the build ended without an _${kind} extension in $lib"
        rc=1
      fi
    fi
  } > "$WORK/logs/build_$kind.log" 2>&1
  echo "$rc" > "$BUILD_ROOT/$kind/rc"
}

# start_build KIND LIMIT: build_one in the background; wait_build KIND records it.
declare -A BUILD_PID BUILD_START BUILD_LIMIT
start_build() {
  local kind=$1 limit
  limit=$(cap "$2")
  if [ "$limit" -le 0 ]; then
    skip "build_$kind" "no time left before the deadline"
    return 0
  fi
  mkdir -p "$BUILD_ROOT/$kind"
  rm -f "$BUILD_ROOT/$kind/rc" "$BUILD_ROOT/$kind/timeout.pid"
  touch "$BUILD_ROOT/$kind/started"
  BUILD_START[$kind]=$SECONDS
  BUILD_LIMIT[$kind]=$limit
  echo "[gpu] build_$kind (background, limit ${limit}s)"
  build_one "$kind" "$limit" &
  BUILD_PID[$kind]=$!
}

wait_build() {
  local kind=$1 pid="${BUILD_PID[$1]:-}"
  [ -n "$pid" ] || return 0
  wait "$pid"
  record "build_$kind" "$(cat "$BUILD_ROOT/$kind/rc" 2>/dev/null || echo 1)" "${BUILD_LIMIT[$kind]}" "${BUILD_START[$kind]}"
}

# ensure_build: for the opt-in stages. Always builds: the build directories stay on a warm
# machine, so ninja recompiles only what changed since the last call (a fix included).
ensure_build() {
  start_build cpu "$(limit_of build_cpu rerun)"
  start_build cuda "$(limit_of build_cuda rerun)"
  wait_build cpu
  wait_build cuda
}

# ---- the steps ---------------------------------------------------------------------------------
versions() {
  step versions "$(limit_of versions)" bash -c '
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 || echo "nvidia-smi: failed"
    (nvcc --version 2>&1 | tail -n 2) || echo "nvcc: not found"
    (compute-sanitizer --version 2>&1 | head -n 2) || echo "compute-sanitizer: not found"
    echo "cores: $(nproc)"
    "$1" -c "
import platform, torch, triton, numpy
print(\"python\", platform.python_version(), \"torch\", torch.__version__, \"cuda\", torch.version.cuda,
      \"triton\", triton.__version__, \"numpy\", numpy.__version__)
p = torch.cuda.get_device_properties(0)
print(p.name, \"sm_%d%d\" % (p.major, p.minor), p.multi_processor_count, \"SMs\",
      getattr(p, \"L2_cache_size\", 0) >> 20, \"MiB L2\", p.total_memory >> 30, \"GiB\")"' versions "$PY"
}

import_check() {
  step import "$(limit_of import)" "$PY" -c "
import sys, bucketmoo_kernels as bm, bucketmoo_kernels.native as n
reasons = bm.available_backends('cuda')
print('backends on cuda:', reasons, 'load errors:', n.load_errors())
sys.exit(0 if reasons.get('cuda') is None else 1)"
  [ "$LAST_RC" = 0 ] && CUDA_OK=yes || CUDA_OK=no
}

# pytest_step NAME LIMIT [ENV=VALUE...] -- PYTEST ARGS...
pytest_step() {
  local name=$1 limit=$2
  shift 2
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  step "$name" "$limit" env OMP_NUM_THREADS=2 "${envs[@]}" "${PYTEST[@]}" \
    --junitxml="$WORK/results/$name.xml" "$@"
}

stage_first() {
  versions
  start_build cpu "$(limit_of build_cpu)"
  start_build cuda "$(limit_of build_cuda)"
  pytest_step triton "$(limit_of triton)" -- -n "$JOBS" --timeout=120 --maxfail=30 \
    tests/test_conformance.py -k "triton" tests/test_triton_backend.py tests/triton_kernels
  wait_build cpu
  wait_build cuda
  import_check
  if [ "$CUDA_OK" = yes ]; then
    pytest_step cuda "$(limit_of cuda)" BUCKETMOO_REQUIRE_CUDA_EXT=1 -- -n "$JOBS" --timeout=60 --maxfail=30 \
      tests/test_conformance.py tests/test_native_cuda.py -k "cuda and not sanitizer"
  else
    skip cuda "the cuda backend is unavailable (see build_cuda and import)"
  fi
  pytest_step graphs "$(limit_of graphs)" -- -n 4 --timeout=60 --maxfail=20 tests/methods/test_cuda_graph_methods.py
  pytest_step local_memory "$(limit_of local_memory)" -- --timeout=60 tests/test_cuda_resources.py
  step bench "$(limit_of bench)" "$PY" -m benchmarks.bench_cuda
  # The sanitizer only with time left: it gets all of it (at least its planned limit, else SKIPPED).
  if [ "$(left)" -ge "$(limit_of sanitizer)" ]; then
    step sanitizer "$(left)" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
      --error-exitcode 1 --target-processes all "$PY" scripts/sanitizer_cases.py
  else
    skip sanitizer "less than $(limit_of sanitizer) s left"
  fi
}

stage_rerun() {
  versions
  ensure_build
  pytest_step rerun "$(limit_of rerun rerun)" BUCKETMOO_REQUIRE_CUDA_EXT=1 -- \
    -n "$JOBS" --timeout=120 "${RERUN_IDS[@]}"
}

stage_gpu_suite() {
  versions
  ensure_build
  pytest_step gpu_suite "$(limit_of gpu_suite gpu-suite)" BUCKETMOO_REQUIRE_CUDA_EXT=1 -- \
    -n "$JOBS" --timeout=600 -m "gpu and not distributed" tests
}

stage_sanitize() {
  versions
  ensure_build
  local t=tests/test_native_cuda.py tool k
  for tool in memcheck racecheck initcheck synccheck; do
    case "$tool" in
      memcheck) k="not graph and not sanitizer and not opcheck" ;;
      racecheck) k="gram_long or fused" ;;
      initcheck) k="gram_matches" ;;
      synccheck) k="fused" ;;
    esac
    step "$tool" "$(limit_of "$tool" sanitize)" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool "$tool" --error-exitcode 1 "${PYTEST[@]}" --timeout=300 "$t" -k "$k"
  done
}

stage_bench() {
  versions
  ensure_build
  step bench_cuda_full "$(limit_of bench_cuda_full bench)" "$PY" -m benchmarks.bench_cuda --parts --samples 20
  step bench_kernel_paths "$(limit_of bench_kernel_paths bench)" "$PY" -m benchmarks.bench_kernel_paths
  step bench_kernels_cuda "$(limit_of bench_kernels_cuda bench)" "$PY" -m benchmarks.bench_kernels \
    --device cuda --tasks 2 4 8 --sizes 1048576 25000000 --name kernels_cuda
}

for s in "${STAGES[@]}"; do
  case "$s" in
    first) stage_first ;;
    rerun) stage_rerun ;;
    gpu-suite) stage_gpu_suite ;;
    sanitize) stage_sanitize ;;
    bench) stage_bench ;;
  esac
done
# exit status: 1 when a step failed or timed out (a SKIPPED one alone does not count)
! grep -qE '^[a-z_]+ +(FAILED|TIMED OUT)' "$SUMMARY"
