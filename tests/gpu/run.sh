#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (torch, transformers, timm, triton installed): CUDA checks and benchmarks,
# JSON results under $OUT (default ./gpu_results). Exits non-zero when a check fails or a step times out.
# About 7 minutes on an H200 (the FlashMLA check, last, has not run on one yet).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
status=0
timeout 330 python tests/gpu/check_cuda.py --out "$OUT/checks.json" > "$OUT/checks.log" 2>&1 || status=1
timeout 160 python -m mm.apps.cli bench --cuda --sizes 1b --dtypes bfloat16,float32 --batches 1 --repeats 3 --no-vit \
    --out "$OUT/bench.json" > "$OUT/bench.log" 2>&1 || status=1
tail -n 40 "$OUT/checks.log"
tail -n 12 "$OUT/bench.log"
exit $status
