#!/usr/bin/env bash
# A quick end-of-session check on the GPU machine: pool + parity GPU tests and the server on CUDA.
# Carries the server's wheels in .whl (see ../.library/device/README.md). Results under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CROSSPOOL_OLMOE_DIR= CROSSPOOL_QWEN15_DIR= python3 -m pytest -m gpu -q -x \
    tests/test_gpu_pools.py tests/test_server.py 2>&1 \
    | tee "$OUT/gpu_check.txt" | grep -v "Loading weights" | tail -15
