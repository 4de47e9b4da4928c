#!/usr/bin/env bash
# Issue 4: the measurements that decide whether a batch-1 megakernel can reach 0.85 of copy bandwidth (one
# nvidia-h200, ~4 min; docs/progress.md, "Next session's device time"). Each run prints its table; all of them also
# go to $OUT/megakernel-probes.txt when $OUT is set (the device's returned folder).
#   bash scripts/megakernel_probes.sh        # session 13's three runs
#   bash scripts/megakernel_probes.sh l2     # session 14: L2 prefetches past the ring, D tiles ahead
#   bash scripts/megakernel_probes.sh fence  # session 14: barriers from warp 1, and without fences
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
log=${OUT:-/tmp}/megakernel-probes.txt
run() {   # run ARGS...: one tma_ring_probe configuration, at most 120 s
    echo "## python3 scripts/tma_ring_probe.py $* ($(cat .run-commit 2>/dev/null || git rev-parse --short HEAD))" | tee -a "$log"
    timeout 120 python3 scripts/tma_ring_probe.py "$@" 2>&1 | grep -v -i warn | tee -a "$log"
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader | tee -a "$log"
if [ "${1:-}" = fence ]; then   # session 14: barriers from warp 1, without fences, and none (tagged words)
    run --rows 128 --stages 12
    exit
fi
if [ "${1:-}" = l2 ]; then
    for d in 4 8 16 32; do run --rows 128 --stages 12 --l2-ahead "$d"; done
    exit
fi
run --rows 128 --stages 12                  # session 13's row again, with the flag barrier and the barriers alone
run --rows 128 --stages 12 --balanced       # whole tiles per program: the stragglers' share of a boundary
run --rows 128 --stages 12 --warps 8        # more warps to read the ring after a barrier
