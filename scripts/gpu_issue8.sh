#!/usr/bin/env bash
# Issue 8, the whole multi-GPU run, repeatable whenever nvidia-h200-x4 (2 KV + 2 weights GPUs) or nvidia-h200-x2
# (1 + 1) is lent: parity with one GPU, hidden-state transfer cost per layer, 4 models under load on the split
# layout vs one GPU (pipeline on/off), and the longest single request each layout holds. Results under $OUT.
# Usage on the GPU machine (repo root): bash scripts/gpu_issue8.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/issue8
gpus=$(nvidia-smi -L | wc -l)
if [ "$gpus" -ge 4 ]; then KV=cuda:0,cuda:1; W=cuda:2,cuda:3; else KV=cuda:0; W=cuda:1; fi
echo "GPUs: $gpus; KV pool on $KV, weights pool on $W" | tee "$OUT/layout.txt"
timeout 300 python3 scripts/multi_gpu_parity.py --kv "$KV" --weights "$W" 2>&1 | tail -4
timeout 200 python3 -m crosspool.bench.transfer --kv-devices "$KV" --weights-devices "$W" \
    --json "$OUT/transfer.json" 2>&1 | tail -8
python3 -m crosspool.cli make-model --preset olmoe-1b-7b --out /tmp/olmoe --quiet --device cuda
for rate in 1 4; do
    timeout 400 python3 -m crosspool.bench.multi_model --model /tmp/olmoe --models 4 --modes off,on --rate $rate \
        --duration-s 15 --prompt-len 512 --output-len 96 --kv-cache-gb 24 --max-num-seqs 16 --out-dir "/tmp/issue8/one_gpu_rate$rate" \
        2>&1 | grep -v "^{" | tail -4
    timeout 400 python3 -m crosspool.bench.multi_model --model /tmp/olmoe --models 4 --modes off,on --rate $rate \
        --duration-s 15 --prompt-len 512 --output-len 96 --kv-cache-gb 24 --kv-devices "$KV" --weights-devices "$W" \
        --max-num-seqs 16 --out-dir "/tmp/issue8/split_rate$rate" 2>&1 | grep -v "^{" | tail -3
done
timeout 300 python3 -m crosspool.bench.capacity --model /tmp/olmoe --copies 4 --run --json "$OUT/capacity_one_gpu.json"
timeout 300 python3 -m crosspool.bench.capacity --model /tmp/olmoe --copies 4 --run --kv-devices "$KV" \
    --weights-devices "$W" --json "$OUT/capacity_split.json"
tar czf "$OUT/issue8.tgz" -C /tmp/issue8 .
