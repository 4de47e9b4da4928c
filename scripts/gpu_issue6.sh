#!/usr/bin/env bash
# Issue 6 on the H200: 2 and 4 OLMoE-1B-7B-shaped models decoding at once, pipeline off / on / serial, at equal
# offered load (same Poisson trace), with timelines. Results (JSON + PNGs) under $OUT. About 6 minutes.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m crosspool.cli make-model --preset olmoe-1b-7b --out /tmp/olmoe --quiet --device cuda
timeout 420 python3 -m crosspool.bench.multi_model --model /tmp/olmoe --models 2,4 --modes off,on,serial \
    --rate 2 --duration-s 15 --prompt-len 512 --output-len 96 --kv-cache-gb 24 --out-dir "$OUT" 2>&1 \
    | grep -v "^{" | tail -12
