#!/usr/bin/env bash
# Create (or reuse) ./.venv with everything bucketmoo_kernels needs, then install the package
# (which builds the native extensions) in editable mode. Safe to run again.
#
#   BUCKETMOO_TORCH_SPEC   torch requirement to install when the venv has no torch
#                          (default torch==2.13.0, the CPU wheel on this project's machines;
#                          on a GPU machine install your CUDA build of torch first instead)
#   BUCKETMOO_VENV         where the virtualenv lives (default ./.venv)
#   BUCKETMOO_ENGINES      1 (default): also install the engines the integration tests drive
#                          (transformers, accelerate, peft, trl, datasets, lightning, deepspeed) and the
#                          solvers torchjd needs for its NashMTL, CAGrad and UPGrad (cvxpy, ecos,
#                          clarabel, qpsolvers, quadprog);
#                          0: skip them (their tests then skip with the reason)
#
# Any dependency that cannot be installed stops the script with a message naming it and
# pip's own output; only pip's known noise (the "WARNING: Location" lines) is filtered.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BUCKETMOO_VENV:-.venv}"
TORCH_SPEC="${BUCKETMOO_TORCH_SPEC:-torch==2.13.0}"

die() { echo "[setup] ERROR: $*" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV" || die "could not create the virtualenv $VENV (is python3-venv installed?)"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# pip_install WHAT ARGS...: pip install ARGS quietly; on failure print pip's output and stop.
pip_install() {
  local what="$1" log status
  shift
  log=$(mktemp)
  status=0
  python -m pip install --quiet --disable-pip-version-check "$@" >"$log" 2>&1 || status=$?
  # Show what pip said except its known noise; an empty remainder is fine (grep exits 1 then).
  grep -v "^WARNING: Location" "$log" || [ $? -eq 1 ]
  rm -f "$log"
  [ "$status" -eq 0 ] || die "could not install $what (pip install $*; exit status $status, output above)"
}

# numpy first: a torch imported without numpy prints "Failed to initialize NumPy" warnings.
if ! python -c "import numpy" 2>/dev/null; then
  echo "[setup] installing numpy"
  pip_install numpy numpy
fi
if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC"
  pip_install torch "$TORCH_SPEC"
fi
python -c "import torch" || die "torch is installed but does not import (see the error above)"
TORCH_VERSION=$(python -c "import torch; print(torch.__version__.split('+')[0])")
# Pin torch to what is installed so no later requirement can pull another (CUDA) build.
CONSTRAINT=$(mktemp)
trap 'rm -f "$CONSTRAINT"' EXIT
echo "torch==${TORCH_VERSION}" > "$CONSTRAINT"
if ! python -c "import triton" 2>/dev/null; then
  echo "[setup] installing triton"
  case "$TORCH_VERSION" in
    2.13.*) pip_install triton -c "$CONSTRAINT" "triton==3.9.0" ;;
    *) pip_install triton -c "$CONSTRAINT" "triton>=3.6" ;;
  esac
fi
echo "[setup] installing the test and benchmark dependencies"
pip_install "the test and benchmark dependencies" -c "$CONSTRAINT" \
  numpy scipy pytest pytest-xdist hypothesis ninja pybind11 matplotlib tqdm babel torchjd
if [ "${BUCKETMOO_ENGINES:-1}" = "1" ]; then
  echo "[setup] installing the engines of the integration tests and torchjd's optional solvers"
  pip_install "the integration engines" -c "$CONSTRAINT" \
    "transformers>=5.0" "accelerate>=1.0" peft "trl>=1.16" datasets "lightning>=2.2" cvxpy ecos clarabel qpsolvers quadprog
  if ! python -c "import deepspeed" 2>/dev/null; then
    # DeepSpeed builds no ops here (the tests use gloo on CPU); it needs the venv's torch at
    # build time, hence no build isolation.
    DS_BUILD_OPS=0 pip_install deepspeed --no-build-isolation -c "$CONSTRAINT" deepspeed
  fi
fi
echo "[setup] building and installing bucketmoo_kernels (native extensions included)"
pip_install "bucketmoo_kernels (pip install -e .)" --no-build-isolation -c "$CONSTRAINT" -e .
python -c "import bucketmoo_kernels as bm; print('[setup] backends on cpu:', {k: ('ok' if v is None else 'unavailable') for k, v in bm.available_backends('cpu').items()})" \
  || die "bucketmoo_kernels does not import after installation (see the error above)"
