#!/usr/bin/env bash
# The GPU checks, as one script for a lent CUDA machine whose image already holds torch:
#   bash benchmarks/gpu_check.sh [OUTDIR]
# 1. the CUDA tests (pytest -m cuda), 2. the benchmark's CUDA rows. Logs go to OUTDIR.
set -uo pipefail
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi -L
$py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
$py -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
timeout "${TEST_TIMEOUT:-240}" $py -m pytest -q -m cuda -p no:cacheprovider -W ignore tests/ 2>&1 | tee "$out/cuda_tests.log" | tail -25
timeout "${BENCH_TIMEOUT:-240}" $py benchmarks/run.py --devices cuda --width 256 --sections "${BENCH_SECTIONS:-compile,step,alternatives}" \
    --compile-depths 4 --repeats 2 --step-depth 6 --rounds 100 --alt-rounds 20 --compile-threads 8 \
    --json "$out/bench_cuda.json" 2>"$out/bench_cuda.err" | tee "$out/bench_cuda.txt"
tail -5 "$out/bench_cuda.err"
