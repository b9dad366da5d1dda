#!/usr/bin/env bash
# The main job: set up the environment, run the multilingual demo (Bucket-Level MOO in a DDP
# training run on real text), then print the kernel microbenchmark summary.
# Extra arguments go to the demo (see: python -m bucketmoo_kernels.demo --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${BUCKETMOO_VENV:-.venv}/bin/activate"
echo "[main] demo"
python -m bucketmoo_kernels.demo "$@"
echo "[main] kernel microbenchmark summary   (T=4, N=1M fp32: the copy baseline and the fused op, one segment)"
python -m benchmarks.bench_kernels --quick
