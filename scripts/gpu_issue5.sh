#!/usr/bin/env bash
# Issue 5 on the H200: `crosspool serve` of the 5-model set (4 OLMoE-1B-7B-shaped models + Qwen1.5-MoE-A2.7B)
# driven by the openai client (scripts/serve_smoke.py), then SIGTERM. Needs the server wheels in .whl
# (see docs/progress.md, issue 5). Results under $OUT. About 5 minutes.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t0=$(date +%s)
python3 -m crosspool.cli make-model --preset olmoe-1b-7b --out /tmp/olmoe --quiet --device cuda
python3 -m crosspool.cli make-model --preset qwen1.5-moe-a2.7b --out /tmp/qwen15 --quiet --device cuda
echo "checkpoints written in $(( $(date +%s) - t0 )) s"
python3 -m crosspool.cli serve --model olmoe-a=/tmp/olmoe --model olmoe-b=/tmp/olmoe --model olmoe-c=/tmp/olmoe \
    --model olmoe-d=/tmp/olmoe --model qwen15=/tmp/qwen15 --port 8000 > "$OUT/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do curl -sf localhost:8000/health > /dev/null && break; sleep 1; done
grep -v '"msg": "request' "$OUT/serve.log" | head -30
timeout 240 python3 scripts/serve_smoke.py --base-url http://127.0.0.1:8000/v1 --per-model 8 --max-tokens 64 \
    2>&1 | tee "$OUT/serve_smoke.txt"
kill -TERM $pid; wait $pid; echo "server exit status $?"
tail -3 "$OUT/serve.log"
