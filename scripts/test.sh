#!/usr/bin/env bash
# The CPU test suite (GPU tests carry the `gpu` marker and are skipped here).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
