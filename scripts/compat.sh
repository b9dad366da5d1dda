#!/usr/bin/env bash
# Compatibility lane: build bucketmoo_kernels against another torch and run the core CPU suite.
#
#   bash scripts/compat.sh TORCH_VERSION [TRITON_VERSION] [--record]
#   bash scripts/compat.sh 2.11.0 3.6.0      # the GPU machine's pair
#   bash scripts/compat.sh 2.15.0            # triton: whatever that torch requires
#
# What it does, all under out/compat/<torch>/ (ignored by git; the checkout is not touched):
#   1. a virtualenv with torch==TORCH_VERSION (on PyPI the Linux wheels of recent releases are
#      CUDA builds; they and their nvidia-* dependencies install and import on a CPU-only
#      machine), triton, and the test dependencies, all pinned to that torch by a constraints
#      file (the machine-wide pip constraint, if any, is replaced by it for this script only);
#   2. a copy of the committed tree (git archive HEAD, so local edits and built .so files of
#      the main checkout are not mixed in), where the CPU extension is built against that torch;
#   3. the core suite on it: the fast lane (torch, cpu and Triton-interpreter backends, every
#      method; the integration tests skip without their engines) plus one DDP test file;
#   4. a one-line result appended to benchmarks/results/compat.md only with --record.
#
# Took 14-17 minutes on a 2-core machine under load (about 15), the download of the CUDA wheels
# (about 3 GB, 4.9 GB in the venv), the C++ build and the suite included; not part of the default CI.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RECORD=0
args=()
for a in "$@"; do
  case "$a" in
    --record) RECORD=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) args+=("$a") ;;
  esac
done
[ ${#args[@]} -ge 1 ] || { sed -n '2,20p' "$0"; exit 2; }
TORCH_VERSION="${args[0]}"
TRITON_VERSION="${args[1]:-}"
WORK="$ROOT/out/compat/$TORCH_VERSION"
VENV="$WORK/venv"
SRC="$WORK/src"
LOG="$WORK/log.txt"
mkdir -p "$WORK"
: > "$LOG"
say() { echo "[compat $TORCH_VERSION] $*" | tee -a "$LOG"; }
die() { say "ERROR: $*"; exit 1; }
start=$SECONDS

CONSTRAINT="$WORK/constraints.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINT"
[ -n "$TRITON_VERSION" ] && echo "triton==$TRITON_VERSION" >> "$CONSTRAINT"
# Triton's interpreter before 3.7 converts one-element arrays with int(), which numpy 2.4 refuses
# ("only 0-dimensional arrays can be converted to Python scalars"): pin numpy below it there.
# BUCKETMOO_COMPAT_NUMPY overrides the numpy requirement.
NUMPY_SPEC="${BUCKETMOO_COMPAT_NUMPY:-numpy}"
case "$TRITON_VERSION" in 3.[0-6]|3.[0-6].*) NUMPY_SPEC="${BUCKETMOO_COMPAT_NUMPY:-numpy<2.4}" ;; esac
# Our constraints replace any machine-wide one (which may cap torch below the version asked).
export PIP_CONSTRAINT="$CONSTRAINT"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
pipi() { "$PY" -m pip install --quiet "$@" >>"$LOG" 2>&1 || die "pip install $* failed (see $LOG)"; }
say "installing torch==$TORCH_VERSION ${TRITON_VERSION:+triton==$TRITON_VERSION} and the test dependencies"
pipi "$NUMPY_SPEC"
pipi "torch==$TORCH_VERSION" ${TRITON_VERSION:+"triton==$TRITON_VERSION"}
"$PY" -c "import triton" 2>/dev/null || pipi triton
pipi "$NUMPY_SPEC" scipy pytest pytest-xdist hypothesis ninja pybind11 setuptools wheel babel torchjd
versions=$("$PY" -c "import torch, triton, numpy, sys; print(f'torch {torch.__version__} triton {triton.__version__} numpy {numpy.__version__} python {sys.version.split()[0]}')")
say "$versions"

say "building the CPU extension in a copy of HEAD ($(git rev-parse --short HEAD))"
rm -rf "$SRC"
mkdir -p "$SRC"
git archive HEAD | tar -x -C "$SRC"
cp -r ../shared "$WORK/shared" 2>/dev/null || true
( cd "$SRC" && BUCKETMOO_SKIP_CUDA_BUILD=1 MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py build_ext --inplace ) >>"$LOG" 2>&1 \
  || die "the CPU extension does not build against torch $TORCH_VERSION (see $LOG)"
( cd "$SRC" && "$PY" -c "import bucketmoo_kernels as bm, bucketmoo_kernels.native as n; \
  a = bm.available_backends('cpu'); print('backends', a, 'load errors', n.load_errors()); assert a['cpu'] is None, a" ) \
  2>&1 | tee -a "$LOG"

say "core suite: fast lane + tests/ddp/test_ddp_state.py"
# The verdict is read from pytest's output below, not from the exit status of this pipe.
( cd "$SRC" && OMP_NUM_THREADS=1 "$PY" -m pytest -q -p no:cacheprovider -n 2 \
    -m "not slow and not distributed and not gpu" tests \
  && OMP_NUM_THREADS=1 "$PY" -m pytest -q -p no:cacheprovider tests/ddp/test_ddp_state.py ) 2>&1 \
  | tee "$WORK/pytest.txt" | tail -n 25 || true
summary=$(grep -E "passed|failed" "$WORK/pytest.txt" | tail -n 2 | tr '\n' ' ')
elapsed=$((SECONDS - start))
result="ok"
grep -qE "[0-9]+ failed|[0-9]+ error" "$WORK/pytest.txt" && result="FAILED"
say "result: $result ($summary) in ${elapsed}s"
if [ "$RECORD" = 1 ]; then
  out=benchmarks/results/compat.md
  [ -f "$out" ] || printf '# Compatibility lane\n\nProduced by `bash scripts/compat.sh TORCH [TRITON] --record` (CPU machine, 2 cores): the fast lane plus tests/ddp/test_ddp_state.py, run on a copy of the commit named, with the CPU extension built against that torch.\n\n| date | commit | versions | result | tests | seconds |\n|---|---|---|---|---|---|\n' > "$out"
  printf '| %s | %s | %s | %s | %s | %s |\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" "$(git rev-parse --short HEAD)" \
    "$versions" "$result" "$summary" "$elapsed" >> "$out"
  say "appended to $out"
fi
[ "$result" = ok ]
