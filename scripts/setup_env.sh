#!/usr/bin/env bash
# Create (or reuse) ./.venv with everything bucketmoo_kernels needs, then install the package
# (which builds the native extensions) in editable mode. Safe to run again.
#
#   BUCKETMOO_TORCH_SPEC   torch requirement to install when the venv has no torch
#                          (default torch==2.13.0, the CPU wheel on this project's machines;
#                          on a GPU machine install your CUDA build of torch first instead)
#   BUCKETMOO_VENV         where the virtualenv lives (default ./.venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BUCKETMOO_VENV:-.venv}"
TORCH_SPEC="${BUCKETMOO_TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip_quiet() { python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC"
  pip_quiet "$TORCH_SPEC"
fi
python -c "import torch" || { echo "[setup] torch failed to install" >&2; exit 1; }
TORCH_VERSION=$(python -c "import torch; print(torch.__version__.split('+')[0])")
# Pin torch to what is installed so no later requirement can pull another (CUDA) build.
CONSTRAINT=$(mktemp)
echo "torch==${TORCH_VERSION}" > "$CONSTRAINT"
if ! python -c "import triton" 2>/dev/null; then
  case "$TORCH_VERSION" in
    2.13.*) pip_quiet -c "$CONSTRAINT" "triton==3.9.0" ;;
    *) pip_quiet -c "$CONSTRAINT" "triton>=3.6" ;;
  esac
fi
pip_quiet -c "$CONSTRAINT" numpy scipy pytest hypothesis ninja pybind11 matplotlib tqdm babel torchjd
echo "[setup] building and installing bucketmoo_kernels (native extensions included)"
python -m pip install --quiet --disable-pip-version-check --no-build-isolation -c "$CONSTRAINT" -e . 2>&1 \
  | grep -v "^WARNING: Location" || true
python -c "import bucketmoo_kernels as bm; print('[setup] backends on cpu:', {k: ('ok' if v is None else 'unavailable') for k, v in bm.available_backends('cpu').items()})"
rm -f "$CONSTRAINT"
