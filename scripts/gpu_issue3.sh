#!/usr/bin/env bash
# Device calls for issue 3 (results under $OUT). Part 1: checkpoints + GPU pool tests. Part 2: benches.
#   bash scripts/gpu_issue3.sh tests     bash scripts/gpu_issue3.sh bench
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export CROSSPOOL_OLMOE_DIR=/tmp/olmoe CROSSPOOL_QWEN15_DIR=/tmp/qwen15
if [ "${1:-tests}" = tests ]; then
    [ -f /tmp/olmoe/config.json ] || python3 -m crosspool.cli make-model --preset olmoe-1b-7b --out /tmp/olmoe --quiet
    [ -f /tmp/qwen15/config.json ] || python3 -m crosspool.cli make-model --preset qwen1.5-moe-a2.7b --out /tmp/qwen15 --quiet
    python3 -m pytest -m gpu tests/test_gpu_pools.py tests/test_gpu.py -q -s -x 2>&1 | tee "$OUT/gpu_pool_tests.txt" | grep -v "Loading weights"
else
    CROSSPOOL_OLMOE_DIR= CROSSPOOL_QWEN15_DIR= python3 -m pytest -m gpu tests/test_gpu_pools.py -q -x 2>&1 | tail -3
    python3 -m crosspool.bench.kv_pool --pool-gb 8 --json "$OUT/kv_pool.json" | tee "$OUT/kv_pool.md"
    # OLMoE shapes, 4 layers: the decode step of a real layer stack without writing 13 GB first
    python3 -m crosspool.cli make-model --preset olmoe-1b-7b --layers 4 --out /tmp/olmoe4 --quiet
    timeout 300 python3 -m crosspool.bench.kv_growth --model /tmp/olmoe4 --batch 16 --steps 64 --grow-gb 1 \
        --json "$OUT/kv_growth.json" | tee "$OUT/kv_growth.md"
fi
