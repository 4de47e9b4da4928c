#!/usr/bin/env bash
# One device call for issue 2: GPU tests + torch-path decode benchmark on full-size OLMoE-1B-7B.
# Usage on the GPU machine (repo root): bash scripts/gpu_issue2.sh   (results under $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
t0=$(date +%s)
python3 -m crosspool.cli make-model --preset olmoe-1b-7b --out /tmp/olmoe --quiet
echo "make-model olmoe-1b-7b full: $(( $(date +%s) - t0 )) s, $(du -sh /tmp/olmoe | cut -f1)" | tee -a "$OUT/gpu.txt"
CROSSPOOL_OLMOE_DIR=/tmp/olmoe python3 -m pytest -m gpu tests/test_gpu.py -q -s 2>&1 | tee "$OUT/gpu_tests.txt" | tail -30
python3 -m crosspool.bench.decode --model /tmp/olmoe --batch-sizes 1,16 --prompt-len 128 --output-len 64 \
    --kv-cache-gb 16 --json "$OUT/decode_torch.json" 2>&1 | tee "$OUT/decode_torch.md"
