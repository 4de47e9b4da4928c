#!/usr/bin/env bash
# Issue 7 on the H200: predicted vs measured P99 aggregate KV demand, the three traces replayed through the
# engine on the GPU (tiny models of three families; wall-clock step times). Results under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 540 python3 -m crosspool.bench.plan_vs_measured --part replay --device cuda --horizon-s 60 --calib-s 20 \
    --trials 200 --models-dir /tmp/plan_models --out "$OUT/plan_vs_measured_cuda.json" 2>&1 | tail -20
