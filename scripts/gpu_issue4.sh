#!/usr/bin/env bash
# Device calls for issue 4 (fast decode). Usage on the GPU machine (repo root), results under $OUT:
#   bash scripts/gpu_issue4.sh check    # compiled-kernel tests + engine on the kernels, decode torch vs triton
#   bash scripts/gpu_issue4.sh fast     # fast path on OLMoE: parity vs torch path, decode bench (graphs/eager/torch/HF)
#   bash scripts/gpu_issue4.sh profile  # OLMoE decode with per-kernel device time and host profile; kernels alone
#   bash scripts/gpu_issue4.sh bench    # OLMoE decode (+HF), Qwen3 table, kernels alone, greedy parity
#   bash scripts/gpu_issue4.sh qwen3    # the Qwen3-30B-A3B table alone, then OLMoE decode
#   bash scripts/gpu_issue4.sh megakernel [VARIANT ...]
#                                       # the megakernel's GPU tests (verbose, into $OUT/tests.log), then its step
#                                       # bench's VARIANTs alternated twice (`megakernel_variants.py`; default "");
#                                       # TESTS_K=EXPR runs the tests pytest -k EXPR selects
#   bash scripts/gpu_issue4.sh engine   # bench decode of OLMoE at batch 1, megakernel on and off, same call
#   bash scripts/gpu_issue4.sh ncu      # the megakernel's warp stall reasons under Nsight Compute (real clocks),
#                                       # into $OUT/ncu.txt; its largest reasons printed, then the SASS blocks
#                                       # with the most stall samples (`megakernel_ncu_blocks.py $OUT/sass.csv`)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
# the commit results record (`bench/provenance.py`): this copy's .git may be stale, `.run-commit` is not
[ -s .run-commit ] && export CROSSPOOL_COMMIT=$(cat .run-commit)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
stage=${1:-check}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "$stage" = check ]; then
    timeout 240 python3 -m pytest -m "gpu or not gpu" -q tests/test_kernels.py tests/test_kernel_path.py -s \
        -k "not timings" 2>&1 | tee "$OUT/kernel_tests.txt" | grep -E "passed|failed|Error|error|bf16 max" | tail -60
    timeout 120 python3 -m pytest -m gpu -q -s tests/test_kernels.py -k timings 2>&1 | tee "$OUT/timings.txt" \
        | grep -E "us,|passed|failed|Error"
    python3 -m crosspool.cli make-model --preset olmoe-1b-7b --out /tmp/olmoe --quiet
    for k in torch triton; do
        timeout 150 python3 -m crosspool.bench.decode --model /tmp/olmoe --batch-sizes 1,16 --prompt-len 128 \
            --output-len 64 --kv-cache-gb 16 --kernels $k --json "$OUT/decode_$k.json" 2>&1 | tail -8
    done
fi
if [ "$stage" = bench ]; then
    python3 -m crosspool.cli make-model --preset olmoe-1b-7b --out /tmp/olmoe --quiet --device cuda
    timeout 170 python3 -m crosspool.cli bench decode --model /tmp/olmoe --kv-cache-gb 16 --context 1024 \
        --batch 1,8,32 --hf --json "$OUT/olmoe.json" 2>&1 | grep -v "^{" | tail -9
    python3 -m crosspool.cli make-model --preset qwen3-30b-a3b --layers 24 --out /tmp/qwen3 --quiet --device cuda
    timeout 200 python3 -m crosspool.cli bench decode --model /tmp/qwen3 --kv-cache-gb 90 --context 1024,8192,32768 \
        --batch 1,8,32 --max-cell-tokens 300000 --json "$OUT/qwen3_24l.json" 2>&1 | grep -v "^{" | tail -14
    timeout 200 python3 -m crosspool.bench.kernels --json "$OUT/kernels.json" 2>&1 | tail -42
    timeout 70 python3 -m crosspool.bench.fast_path_parity --model /tmp/olmoe --prompts 8 --max-tokens 64 \
        --json "$OUT/parity_olmoe.json" 2>&1 | grep -v Loading | tail -8
fi
if [ "$stage" = qwen3 ]; then    # the Qwen3-30B-A3B table (24 of 48 layers: the machine's disk is 64 GB)
    timeout 150 python3 -m pytest -m gpu -q tests/test_kernels.py -k "qk_norm or graph or decode_bf16" 2>&1 | tail -3
    # engine-level: real CUDA graphs + async decode against the synchronous engine and the torch path (fp32)
    timeout 200 python3 -m pytest -q tests/test_async_decode.py tests/test_kernel_path.py 2>&1 | tail -3
    python3 -m crosspool.cli make-model --preset qwen3-30b-a3b --layers 24 --out /tmp/qwen3 --quiet --device cuda
    timeout 420 python3 -m crosspool.cli bench decode --model /tmp/qwen3 --kv-cache-gb 90 --context 1024,8192,32768 \
        --batch 1,8,32 --max-cell-tokens 300000 --json "$OUT/qwen3_24l.json" 2>&1 | tail -14
    rm -rf /tmp/qwen3
    python3 -m crosspool.cli make-model --preset olmoe-1b-7b --out /tmp/olmoe --quiet --device cuda
    timeout 150 python3 -m crosspool.cli bench decode --model /tmp/olmoe --kv-cache-gb 16 --context 1024 \
        --batch 1,8,32 --profile --json "$OUT/olmoe.json" 2>&1 | grep -v "^{" | cut -c1-150 | tail -40
fi
if [ "$stage" = profile ]; then
    python3 -m crosspool.cli make-model --preset olmoe-1b-7b --out /tmp/olmoe --quiet --device cuda
    timeout 100 python3 -m pytest -q tests/test_kernels.py -k "route" 2>&1 | tail -2
    timeout 200 python3 -m crosspool.cli bench decode --model /tmp/olmoe --kv-cache-gb 16 --context 1024 \
        --batch 1,8,32 --profile --host-profile --json "$OUT/olmoe_graphs.json" 2>&1 | grep -v "^{" \
        | cut -c1-160 | tail -75
    timeout 200 python3 -m crosspool.bench.kernels --json "$OUT/kernels.json" 2>&1 | tail -45
fi
if [ "$stage" = fast ]; then
    t0=$(date +%s)
    python3 -m crosspool.cli make-model --preset olmoe-1b-7b --out /tmp/olmoe --quiet --device cuda
    echo "make-model olmoe (values drawn on cuda): $(( $(date +%s) - t0 )) s"
    timeout 150 python3 -m pytest -q tests/test_kernel_path.py 2>&1 | tail -3
    timeout 150 python3 -m crosspool.bench.fast_path_parity --model /tmp/olmoe --prompts 8 --max-tokens 64 \
        --json "$OUT/parity_olmoe.json" 2>&1 | grep -v Loading | tail -10
    B="python3 -m crosspool.cli bench decode --model /tmp/olmoe --kv-cache-gb 16 --context 1024"
    timeout 200 $B --batch 1,8,32 --hf --json "$OUT/olmoe_graphs.json" 2>&1 | grep -v "^{" | tail -12
    timeout 100 $B --batch 1,8 --no-cuda-graphs --json "$OUT/olmoe_eager.json" 2>&1 | grep -v "^{" | tail -6
    timeout 100 $B --batch 1 --kernels torch --json "$OUT/olmoe_torch.json" 2>&1 | grep -v "^{" | tail -5
fi
if [ "$stage" = megakernel ]; then
    shift
    # TESTS_K: only the tests pytest's -k selects (all of them by default)
    timeout 400 python3 -u -m pytest -v -x -m gpu tests/test_megakernel.py tests/test_megakernel_attention.py \
        tests/test_megakernel_step.py ${TESTS_K:+-k "$TESTS_K"} > "$OUT/tests.log" 2>&1
    grep -E "PASS|FAIL|ERROR|passed|failed" "$OUT/tests.log" | sed 's/^tests\///' | cut -c1-150 | tail -40
    python3 scripts/megakernel_variants.py --rounds "${ROUNDS:-2}" -- "${@:-}"
fi
if [ "$stage" = engine ]; then
    python3 -m crosspool.cli make-model --preset olmoe-1b-7b --out /tmp/olmoe --quiet --device cuda
    # the megakernel (its carveout at what it uses, then the most shared memory), then the graph of kernels
    for m in "1 1" "1 0" "0 1"; do
        set -- $m
        CROSSPOOL_MEGAKERNEL=$1 CROSSPOOL_MEGAKERNEL_L1=$2 timeout 170 python3 -m crosspool.cli bench decode \
            --model /tmp/olmoe --kv-cache-gb 16 --context 1024 --batch 1 --json "$OUT/olmoe_mk$1_l1$2.json" 2>&1 \
            | grep -v "^{" | tail -4
    done
fi
if [ "$stage" = ncu ]; then     # why warps wait: instruction fetch (no_instruction), barriers, loads (long_scoreboard)
    NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
    # one launch sampled (the step bench's third), then each SASS instruction's stall samples by reason
    timeout 300 "$NCU" --kernel-name _chain_kernel --launch-skip 2 --launch-count 1 --clock-control none \
        --section WarpStateStats --section SourceCounters -f -o "$OUT/mk" \
        python3 scripts/megakernel_step_bench.py > "$OUT/ncu_run.txt" 2>&1
    tail -3 "$OUT/ncu_run.txt"
    "$NCU" --import "$OUT/mk.ncu-rep" --page details > "$OUT/ncu.txt" 2>&1
    grep -iE "stall|Warp Cycles|Issued Ipc" "$OUT/ncu.txt" | head -30
    "$NCU" --import "$OUT/mk.ncu-rep" --page source --csv --print-source sass > "$OUT/sass.csv" 2>&1 \
        || "$NCU" --help | grep -iE -A2 "print-source|--page"
    wc -c "$OUT/sass.csv"
    python3 scripts/megakernel_ncu_blocks.py "$OUT/sass.csv" --blocks 8 --top 4    # the blocks with most samples
fi
