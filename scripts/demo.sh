#!/usr/bin/env bash
# The main job: build tiny MoE checkpoints if absent, serve a mixed workload over them (GPU when present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m crosspool.cli demo "$@"
