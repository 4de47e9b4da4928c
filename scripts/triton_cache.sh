#!/usr/bin/env bash
# Join the Triton cache a device call returned (triton-cache.tgz.part-* under its files_at folder) into
# .triton-cache/cache.tgz (ignored), which the next call of gpu_x2.sh unpacks when `carry` names .triton-cache.
#   bash scripts/triton_cache.sh /work/.device/N/
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:?usage: triton_cache.sh FILES_AT}
parts=("$src"/triton-cache.tgz.part-*)
[ -e "${parts[0]}" ] || { echo "no triton-cache.tgz.part-* under $src"; exit 1; }
mkdir -p .triton-cache
cat "${parts[@]}" > .triton-cache/cache.tgz
tar tzf .triton-cache/cache.tgz > /dev/null        # a whole archive, not a cut one
echo "$(du -h .triton-cache/cache.tgz | cut -f1) in .triton-cache/cache.tgz: carry [\".run-commit\", \".triton-cache\"]"
