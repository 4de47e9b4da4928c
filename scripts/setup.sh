#!/usr/bin/env bash
# Installs what CrossPool needs into the current Python, once. torch's CPU wheel goes first where no
# torch is present: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch (CPU wheel)"
    "$PY" -m pip install -q torch==2.13.0 || "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
if ! "$PY" -c "import crosspool, transformers, safetensors, tokenizers, tqdm, pytest, hypothesis, fastapi, uvicorn, openai, prometheus_client, triton, matplotlib, scipy" 2>/dev/null; then
    echo "[setup] installing crosspool and its dependencies"
    "$PY" -m pip install -q -e ".[test]"
fi
