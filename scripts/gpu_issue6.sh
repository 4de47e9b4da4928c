#!/usr/bin/env bash
# Issue 6 on the H200: 2 and 4 OLMoE-1B-7B-shaped models decoding at once at equal offered load (the same Poisson
# trace): pipeline off / on / on with green contexts, plus a serial (one-lane) pipeline timeline for comparison.
# Results (JSON + timeline PNGs) come back as one archive, $OUT/issue6.tgz. About 7 minutes.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/issue6
timeout 150 python3 -m pytest -m gpu -q tests/test_gpu.py -k pipeline 2>&1 | tail -3
python3 -m crosspool.cli make-model --preset olmoe-1b-7b --out /tmp/olmoe --quiet --device cuda
B="python3 -m crosspool.bench.multi_model --model /tmp/olmoe --prompt-len 512 --output-len 96 --kv-cache-gb 24 \
    --max-num-seqs 16 --out-dir /tmp/issue6"
timeout 400 $B --models 2,4 --modes off,on,on-green --rate 2 --duration-s 15 2>&1 | grep -v "^{" | tail -9
timeout 100 $B --models 2 --modes serial --rate 2 --duration-s 5 2>&1 | grep -v "^{" | tail -3
tar czf "$OUT/issue6.tgz" -C /tmp/issue6 .
