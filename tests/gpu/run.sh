#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (torch, transformers, timm, triton installed): CUDA checks and benchmarks,
# JSON results under $OUT (default ./gpu_results). About 3-4 minutes on an H200.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
timeout 150 python tests/gpu/check_cuda.py --out "$OUT/checks.json" > "$OUT/checks.log" 2>&1
timeout 150 python -m mm.cli bench --cuda --sizes 125m,1b --dtypes bfloat16 --batches 1,8 --repeats 2 \
    --out "$OUT/bench.json" > "$OUT/bench.log" 2>&1
tail -n 30 "$OUT/checks.log" "$OUT/bench.log"
