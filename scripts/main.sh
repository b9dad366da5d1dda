#!/usr/bin/env bash
# The main job: set up the environment, run the multilingual demo (Bucket-Level MOO in a DDP
# training run on real text), then print the kernel microbenchmark summary.
# Extra arguments go to the demo (see: python -m bucketmoo_kernels.demo --help).
#
# It leaves the checkout as it found it: the demo writes to demo_out/ and the benchmark to
# out/benchmarks/ (both ignored by git). To publish a summary in benchmarks/results/, run
#   python -m benchmarks.bench_kernels --quick --record
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${BUCKETMOO_VENV:-.venv}/bin/activate"
echo "[main] demo"
python -m bucketmoo_kernels.demo "$@"
echo "[main] kernel microbenchmark summary   (T=4, N=1M fp32: the copy baseline and the fused op, one segment)"
python -m benchmarks.bench_kernels --quick
echo "[main] outputs, ignored by git: demo_out/ (or the --out given; report.md, results.json, plots) and out/benchmarks/kernels_cpu_quick.{md,json}"
