#!/usr/bin/env bash
# Issue 7 on the H200: predicted vs measured P99 aggregate KV demand, the three traces replayed through the
# engine on the GPU (tiny models of three families; wall-clock step times). Results under $OUT.
# The engine is warmed first (fused-MoE tuning + every CUDA graph, then one unrecorded calibration sweep) and the
# rates are x16 the CPU run's (the bench's GPU default, written here too): at x1 a request lasts ~60 ms on the
# H200, ~0.06 are in flight and one request sets the P99 (first run: scale 0.17, gamma-0.25 +26%).
# Expected ~4 min of device time (traces ~25-35 s each of wall time at x16, warm-up <= 1 min).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 420 python3 -m crosspool.bench.plan_vs_measured --part replay --device cuda --rate-scale 16 --horizon-s 45 \
    --calib-s 15 --trials 200 --models-dir /tmp/plan_models --out "$OUT/plan_vs_measured_cuda.json" 2>&1 | tail -25
