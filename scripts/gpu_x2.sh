#!/usr/bin/env bash
# A device session's work in three calls of under 10 minutes. On nvidia-h200-x2 the two jobs of a call run at
# once, one per GPU (CUDA_VISIBLE_DEVICES 0 and 1, logs apart); on one GPU they run one after the other and the
# call's deadline cuts what does not fit (each step's timeout is cut to what is left), or `STAGE a` and
# `STAGE b` run them as two calls.
#   bash scripts/gpu_x2.sh split      # issue 8 (x2 only): 1 KV + 1 weights GPU: parity, 4 models at rate 2
#   bash scripts/gpu_x2.sh split2     # issue 8 (x2 only): 4 models at rate 4, the capacity row, transfer
#   bash scripts/gpu_x2.sh qwen3      # A: issue 4 (the Qwen3 cells not reached) | B: issue 4 (fused RoPE + KV write
#                                     #    in the decode attention: kernel tests on the GPU, decode off / on)
#   bash scripts/gpu_x2.sh plan       # issue 8 (x2 only): split decode step with per-call headers vs announced
#                                     #    passes, then 4 models at rates 2 and 4 on the split
#   bash scripts/gpu_x2.sh pass       # issue 8 (x2): whole-pass graphs: split parity, split decode step with/without
#   bash scripts/gpu_x2.sh pass2      # issue 8 (x2): split parity with lanes (+ the one-GPU pipeline GPU test), then 4
#                                     #    models at rates 2 and 4 on the split, pipeline off / on (two lanes)
#   bash scripts/gpu_x2.sh pass3      # issue 8 (x2): control round cost, rate 2 off/on, transfer per layer with
#                                     #    passes, four lanes
#   bash scripts/gpu_x2.sh lanes      # issue 8 (x2): 2 four-layer models on the split, pipeline off / on (lanes)
#   bash scripts/gpu_x2.sh s7         # A: issue 4 (fused RoPE off/on, kernel tests, attention re-timed) | B: issue 8's
#                                     #    one-GPU 4-model rows at rates 2 and 4 (the split's reference)
#   bash scripts/gpu_x2.sh s7b        # A: issue 4's Qwen3 cells | B: fused RoPE off/on at batch 1, 2, 4, 8 (twice)
#   bash scripts/gpu_x2.sh s7c        # A: the L2 prefetch probe, OLMoE decode with the experts' evict_first off / on
#                                     #    | B: their GPU tests, the Qwen3 1k row again
#   bash scripts/gpu_x2.sh check      # A: the kernels' GPU tests | B: switches' bit tests, OLMoE decode (defaults)
#   bash scripts/gpu_x2.sh probe      # A: a pure-read kernel's time by size | B: ncu on the one-token GEMVs
#   bash scripts/gpu_x2.sh attn       # A: OLMoE's batch-1 decode attention alone | B: ncu on it
#   bash scripts/gpu_x2.sh shape      # A: OLMoE's batch-1 attention alone per launch shape | B: decode with two shapes
#   bash scripts/gpu_x2.sh confirm    # A: GPU tests with the fused RoPE kernel's 128-key blocks | B: OLMoE decode with
#                                     #    them and without, twice
#   bash scripts/gpu_x2.sh tma        # A: GPU tests of the autotuned TMA expert GEMVs, the MoE FFN alone at 1-8 tokens
#                                     #    | B: decode at batch 1-8 with them and without, twice
#   bash scripts/gpu_x2.sh s10        # A: the kernels' GPU tests | B: engine GPU bit tests, decode with TMA experts
#                                     #    on (default) / off at batch 1-32
#   bash scripts/gpu_x2.sh s10q       # Qwen3-30B-A3B (24 layers) at 1k: A: defaults, batch 1-32 | B: TMA experts off
#   bash scripts/gpu_x2.sh s13        # A: routing inside the router GEMV (GPU tests, OLMoE batch 1 off / on, host
#                                     #    busy time) | B: Qwen3 8k x 8 / 32, split plans for many tiles against the
#                                     #    session-11 rule
#   bash scripts/gpu_x2.sh classes    # A | B: Qwen3 1k in a serving bucket, graphs per context class | one class
#   bash scripts/gpu_x2.sh early      # A: GPU tests and the kernel alone, the fused attention's loads first (off / on)
#                                     #    | B: OLMoE decode at batch 1, off / on
#   bash scripts/gpu_x2.sh s12        # A: GPU tests of session 11's builds, the router norm by token count | B: the
#                                     #    Qwen3 table's 8k/32k rows, Qwen3 1k in a serving bucket
#   bash scripts/gpu_x2.sh combine    # A: GPU tests of the tiled combine, split sweep per chunk | B: Qwen3 1k in a
#                                     #    serving bucket and OLMoE 1k, CROSSPOOL_COMBINE_CHUNK 0 / 16 / 64
#   bash scripts/gpu_x2.sh splitplan  # A: GPU tests of split plans, the split sweep | B: OLMoE and Qwen3 decode,
#                                     # plans against the old rule (CROSSPOOL_LONG_SPLIT_WAVES=2)
#   bash scripts/gpu_x2.sh s11        # (run; the merge is gone) A: one-warp routing and o_proj merge tests, the batch-1
#                                     #    critical path, attention on 2 warps | B: decode: defaults, routing on 4
#                                     #    warps, o_proj merging the attention splits, our GEMV on the projections
#   bash scripts/gpu_x2.sh splits     # A: decode attention alone per split count, batch 1 and 8, 1k-128k | B: Qwen3
#                                     #    1k with serving's max_model_len (40,960) against the bench's default
#   bash scripts/gpu_x2.sh profile    # A | B: the device time per kernel of OLMoE's decode step, batch 1 | 8, and
#                                     #    each kernel's share of the step's critical path
#   bash scripts/gpu_x2.sh replay     # issue 7's GPU replay (closed issue; when device time is left)
#   bash scripts/gpu_x2.sh pipeline   # A: issue 6 (2 models off/on/green, serial) | B: 4 models off/on at rates 2
#                                     #    and 4 (issue 6's 4-model rows = issue 8's one-GPU reference)
#   bash scripts/gpu_x2.sh serve      # issue 5's 5-model serve (needs carry .whl)
#   bash scripts/gpu_x2.sh rerun      # x2: split parity (stacks dumped if it stalls) + 4 models at rate 2 on the
#                                     # split; then the Qwen3 table (GPU 0) and OLMoE batch 8/32 (GPU 1)
# Results: $OUT/<stage>.tgz and the jobs' logs. The server wheels for `serve` travel in .whl
# (docs/progress.md, issue 5).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} NCCL_NVLS_ENABLE=0
# autotuning results cached on disk: a fresh process (a spawned rank, the next bench) reuses them instead of
# timing every config again (the split parity spent minutes on it in session 4)
export TRITON_CACHE_AUTOTUNING=1
# the commit benchmarks record (this copy's .git may be stale): `git rev-parse --short HEAD > .run-commit`
# here before the call, and carry .run-commit
[ -f .run-commit ] && export CROSSPOOL_COMMIT=$(cat .run-commit)
OUT=${OUT:-/tmp/out}; RES=/tmp/res; mkdir -p "$OUT" "$RES"
# Triton's cache (compiled kernels, autotuning results) from the previous call of the session: each call may get
# a fresh machine, which otherwise compiles and tunes everything again (a model's first decode row took 150-330 s
# in session 12). The call leaves the cache in $OUT as triton-cache.tgz.part-* (16 MiB each);
# `bash scripts/triton_cache.sh FILES_AT` joins them into .triton-cache/ (ignored) for `carry`.
export TRITON_CACHE_DIR=/tmp/triton-cache
mkdir -p "$TRITON_CACHE_DIR"
if [ -f .triton-cache/cache.tgz ]; then
    tar xzf .triton-cache/cache.tgz -C "$TRITON_CACHE_DIR" && echo "triton cache: $(du -sh "$TRITON_CACHE_DIR" | cut -f1) carried"
fi
stage=${1:?usage: gpu_x2.sh split|qwen3|pipeline|serve [a|b]}
only=${2:-}
deadline=$(( $(date +%s) + ${BUDGET_S:-545} ))
OLMOE=/tmp/olmoe
GPUS=$(nvidia-smi -L | wc -l)

# run for at most $1 seconds, and never past the call's deadline
t() { local cap=$1; shift; local left=$(( deadline - $(date +%s) - 5 ));
      [ "$left" -lt "$cap" ] && cap=$left; [ "$cap" -le 5 ] && { echo "skipped (no time left): $*"; return 124; }
      timeout "$cap" "$@"; }
# a checkpoint written once per warm machine (marker after a complete write)
ckpt() { [ -f "$2/.complete" ] || { python3 -m crosspool.cli make-model --preset "$1" --out "$2" --quiet \
             --device cuda ${3:+--layers $3} && touch "$2/.complete"; }; }
# job_a and job_b: at once on two GPUs, else one after the other on GPU 0; `gpu_x2.sh STAGE a|b` runs one of them
# (on one GPU, a call each)
both() {
    if [ "$only" = a ]; then job_a; return; fi
    if [ "$only" = b ]; then job_b; return; fi
    if [ "$GPUS" -ge 2 ]; then
        ( export CUDA_VISIBLE_DEVICES=1; job_b ) > "$RES/job_b.log" 2>&1 &
        ( export CUDA_VISIBLE_DEVICES=0; job_a ); wait
    else
        job_a; job_b > "$RES/job_b.log" 2>&1
    fi
    echo "=== job B"; cat "$RES/job_b.log"
}
# the split parity's fp32 verdict in $1 (its log); else its last lines, the results so far, and the call ends (the
# runs after it would only burn device time on an engine that is broken or too slow across ranks)
parity_gate() {
    grep "^\[\|identical\|Error" "$1" | head -20
    grep -q "float32: .* 12/12 requests identical" "$1" && return 0
    echo "split parity did not pass: last lines"; tail -80 "$1" | cut -c1-200
    tar czf "$OUT/$stage.tgz" -C "$RES" .; exit 1
}
# a lone batch's decode step on the split layout (OLMoE, 1k context, batch 1 and 8) with env $1=$2
split_decode() {
    ( export "$1=$2"; t "$3" python3 -m crosspool.cli bench decode --model $OLMOE --kv-cache-gb 16 --context 1024 \
        --batch 1,8 --kv-devices cuda:0 --weights-devices cuda:1 --label "$1=$2" \
        --json "$RES/decode_split_$1_$2.json" > "$RES/decode_split_$1_$2.out" 2>&1 )
    grep "^| 1024\|Error" "$RES/decode_split_$1_$2.out" | sed "s/^/$1=$2: /"
}
# the Qwen3 cells session 4 did not reach (1k x 1/8/32 and 8k x 1/8 are in benchmarks.md)
qwen3_cells() {
    ckpt qwen3-30b-a3b /tmp/qwen3 24      # 24 of 48 layers (what the 64 GB single-GPU machine's disk holds)
    # --profile: kernel times of the first cell (8k x 32: why batch 32 reads at 0.24 of copy bandwidth)
    t 480 python3 -m crosspool.cli bench decode --model /tmp/qwen3 --kv-cache-gb 90 --context 8192,32768 \
        --batch 32,8,1 --max-cell-tokens 300000 --profile --json "$RES/qwen3_24l.json" 2>&1 \
        | tee "$RES/qwen3_24l.out" | grep -v "^{" | cut -c1-150 | tail -45
}
# OLMoE decode (ctx 1k) at batches $1 once per CROSSPOOL_FUSED_ROPE_ROWS value in $2...: the fused RoPE + KV write
# in the decode attention for steps of at most that many rows (0: never, 64: always)
fused_rope_decode() {
    local batches=$1; shift
    for rows in "$@"; do
        CROSSPOOL_FUSED_ROPE_ROWS=$rows t 90 python3 -m crosspool.cli bench decode --model $OLMOE --kv-cache-gb 16 \
            --context 1024 --batch "$batches" --label "fused-rope-rows=$rows" --json "$RES/olmoe_fused$rows.json" \
            2>&1 | grep "^| 1024" | sed "s/^/fused-rope-rows=$rows: /"
    done
}
# issue 4, session 6: the fused kernel's GPU tests, decode without / with it, the attention kernels alone (their
# key walk became a shared helper: session 3's numbers are the reference)
fused_rope_check() {
    t 150 python3 -m pytest -q tests/test_kernels.py -k "rope or decode_attention or fused_rope" 2>&1 | tail -3
    fused_rope_decode 1,8 0 64
    t 90 python3 -m crosspool.bench.kernels --only attention splits --json "$RES/kernels_attention.json" 2>&1 \
        | grep -v "^{" | tail -20
}
# `bench decode` of MODEL with ARGS once per variant (a list of VAR=VALUE settings, "" = the defaults), each run cut
# at $VT seconds (default 80), the first $FIRST s later (default 60: on a fresh machine it compiles and autotunes);
# rows printed after the variant's name, JSON in $RES/PREFIX_<name>.json
decode_variants() {
    local model=$1 prefix=$2 args=$3 v name first=${FIRST:-60}; shift 3
    for v in "$@"; do
        name=${v:-defaults}
        ( [ -n "$v" ] && export $v; t $(( ${VT:-80} + first )) python3 -m crosspool.cli bench decode --model "$model" \
            $args --label "$name" --json "$RES/${prefix}_${name//[ =]/_}.json" 2>&1 \
            | grep "^| [0-9]" | sed "s/^/$name: /" )
        first=0
    done
}
# OLMoE decode at 1k (batch 1, 8, 32 or $BATCHES) once per variant
variants() { decode_variants $OLMOE olmoe "--kv-cache-gb 16 --context 1024 --batch ${BATCHES:-1,8,32}" "$@"; }
QWEN3_SERVING_1K="--kv-cache-gb 60 --context 1024 --max-model-len 40960"
MM="python3 -m crosspool.bench.multi_model --model $OLMOE --prompt-len 512 --output-len 96 --kv-cache-gb 24 \
    --max-num-seqs 16 --duration-s 15"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee "$RES/gpus.txt"

if [ "$stage" = split ]; then
    [ "$GPUS" -ge 2 ] || { echo "split needs 2 GPUs"; exit 2; }
    # compile- and autotune-bound (three tiny model families, fp32 then bf16): ~2 min per layout in session 4
    ( export CROSSPOOL_DUMP_STACKS_S=120; t 330 python3 scripts/multi_gpu_parity.py --kv cuda:0 --weights cuda:1 \
        > "$RES/parity.log" 2>&1 ) &
    # meanwhile (the parity is compile-bound): session 4's new GPU tests (router tuning, skinny-GEMM switch,
    # tuning cache, KV guard bundle on real VMM)
    ( export CUDA_VISIBLE_DEVICES=1; t 200 python3 -m pytest -q -m gpu tests/test_gpu_pools.py tests/test_kernels.py \
        -k "pools or tune or tuning or gemv_linear" > "$RES/gpu_tests.log" 2>&1 ) &
    ckpt olmoe-1b-7b $OLMOE; wait
    tail -3 "$RES/gpu_tests.log"
    parity_gate "$RES/parity.log"
    t 190 $MM --models 4 --modes off,on --rate 2 --kv-devices cuda:0 --weights-devices cuda:1 \
        --out-dir "$RES/split_rate2" 2>&1 | tee "$RES/split_rate2.out" | grep -v "^{" | tail -4
fi

if [ "$stage" = split2 ]; then   # the rest of issue 8 once `split` passed: a lone batch's step, rate 4, capacity
    [ "$GPUS" -ge 2 ] || { echo "split2 needs 2 GPUs"; exit 2; }
    ckpt olmoe-1b-7b $OLMOE
    # a lone batch on the split layout (transfer not overlapped): against the one-GPU 1.33 / 3.50 / 5.91 ms
    t 100 python3 -m crosspool.cli bench decode --model $OLMOE --kv-cache-gb 16 --context 1024 --batch 1,8,32 \
        --kv-devices cuda:0 --weights-devices cuda:1 --json "$RES/decode_split.json" 2>&1 | grep "^| 1024"
    t 190 $MM --models 4 --modes off,on --rate 4 --kv-devices cuda:0 --weights-devices cuda:1 \
        --out-dir "$RES/split_rate4" 2>&1 | tee "$RES/split_rate4.out" | grep -v "^{" | tail -4
    # the one-GPU row (606,672 tokens) was measured in session 3: `--kv-devices` left out runs it again
    t 150 python3 -m crosspool.bench.capacity --model $OLMOE --copies 4 --run --max-position 2097152 \
        --run-tokens 131072 --kv-devices cuda:0 --weights-devices cuda:1 --json "$RES/capacity_split.json" \
        2>&1 | tail -12
    t 90 python3 -m crosspool.bench.transfer --kv-devices cuda:0 --weights-devices cuda:1 \
        --json "$RES/transfer.json" 2>&1 | tail -9
fi

if [ "$stage" = plan ]; then   # issue 8, session 5: the announced-pass protocol (one plan message a pass)
    [ "$GPUS" -ge 2 ] || { echo "plan needs 2 GPUs"; exit 2; }
    ckpt olmoe-1b-7b $OLMOE
    # a lone batch's step on the split layout, per-call headers (before) and announced passes (after)
    for plan in 0 1; do split_decode CROSSPOOL_FFN_PLAN $plan 150; done
    t 170 $MM --models 4 --modes off,on --rate 2 --kv-devices cuda:0 --weights-devices cuda:1 \
        --out-dir "$RES/split_rate2" 2>&1 | tee "$RES/split_rate2.out" | grep -v "^{" | tail -3
    t 170 $MM --models 4 --modes off,on --rate 4 --kv-devices cuda:0 --weights-devices cuda:1 \
        --out-dir "$RES/split_rate4" 2>&1 | tee "$RES/split_rate4.out" | grep -v "^{" | tail -3
fi

if [ "$stage" = pass ]; then   # issue 8, session 6: whole passes as one CUDA graph per side (NCCL inside)
    [ "$GPUS" -ge 2 ] || { echo "pass needs 2 GPUs"; exit 2; }
    ( export CROSSPOOL_DUMP_STACKS_S=150; t 230 python3 scripts/multi_gpu_parity.py --kv cuda:0 --weights cuda:1 \
        > "$RES/parity.log" 2>&1 ) &
    ckpt olmoe-1b-7b $OLMOE; wait
    parity_gate "$RES/parity.log"
    # a lone batch's step on the split layout: whole-pass graphs (after) vs sub-step graphs + plans (before)
    for passes in 1 0; do split_decode CROSSPOOL_PASS_GRAPHS $passes 140; done
fi

if [ "$stage" = pass2 ]; then  # issue 8, session 6: lanes checked, then 4 models on the split (whole-pass graphs)
    [ "$GPUS" -ge 2 ] || { echo "pass2 needs 2 GPUs"; exit 2; }
    # lanes on the devices must give one GPU's tokens (three families, fp32); meanwhile on GPU 1 the one-GPU
    # pipeline's test (its two sides now capture on their own streams: each its own cuBLAS workspace)
    ( export CROSSPOOL_DUMP_STACKS_S=150; t 200 python3 scripts/multi_gpu_parity.py --kv cuda:0 --weights cuda:1 \
        --pipeline --dtypes float32 > "$RES/parity_lanes.log" 2>&1 ) &
    ( export CUDA_VISIBLE_DEVICES=1; t 200 python3 -m pytest -q -m gpu tests/test_gpu.py -k pipeline \
        > "$RES/gpu_pipeline.log" 2>&1 ) &
    ckpt olmoe-1b-7b $OLMOE; wait
    tail -2 "$RES/gpu_pipeline.log"; parity_gate "$RES/parity_lanes.log"
    # pipeline off = every pass in one lane; on = the models' passes in two lanes
    for rate in 2 4; do
        t 220 $MM --models 4 --modes off,on --rate $rate --kv-devices cuda:0 --weights-devices cuda:1 \
            --out-dir "$RES/split_rate$rate" 2>&1 | tee "$RES/split_rate$rate.out" | grep -v "^{" | tail -3
    done
fi

if [ "$stage" = pass3 ]; then  # issue 8, session 6: control round, transfer per layer with passes, four lanes
    [ "$GPUS" -ge 2 ] || { echo "pass3 needs 2 GPUs"; exit 2; }
    ( python3 scripts/control_round_bench.py --ranks 2 > "$RES/control.out" 2>&1 ) &
    ckpt olmoe-1b-7b $OLMOE; wait; tail -1 "$RES/control.out"
    # session 7: pass2's rate-2 "on" row was cut by its timeout (the "off" row paid the first compile)
    t 220 $MM --models 4 --modes off,on --rate 2 --kv-devices cuda:0 --weights-devices cuda:1 \
        --out-dir "$RES/split_rate2" 2>&1 | tee "$RES/split_rate2.out" | grep "^|" | tail -2
    t 90 python3 -m crosspool.bench.transfer --kv-devices cuda:0 --weights-devices cuda:1 \
        --json "$RES/transfer.json" 2>&1 | grep "^|" | tail -7
    CROSSPOOL_LANES=4 t 170 $MM --models 4 --modes on --rate 4 --kv-devices cuda:0 --weights-devices cuda:1 \
        --out-dir "$RES/split_rate4_lanes4" 2>&1 | tee "$RES/split_rate4_lanes4.out" | grep -v "^{" | tail -2
fi

if [ "$stage" = lanes ]; then  # issue 8, session 6: the pipeline across ranks as two lanes (a quick check)
    [ "$GPUS" -ge 2 ] || { echo "lanes needs 2 GPUs"; exit 2; }
    ckpt olmoe-1b-7b /tmp/olmoe4 4           # 4 of 16 layers: loads and captures fast
    t 200 python3 -m crosspool.bench.multi_model --model /tmp/olmoe4 --prompt-len 256 --output-len 64 \
        --kv-cache-gb 8 --max-num-seqs 4 --duration-s 8 --models 2 --modes off,on --rate 4 \
        --kv-devices cuda:0 --weights-devices cuda:1 --out-dir "$RES/lanes" 2>&1 | tee "$RES/lanes.out" \
        | grep -v "^{\|unbatched" | tail -6
fi

if [ "$stage" = rerun ]; then   # session 4: what the first three calls left
    [ "$GPUS" -ge 2 ] || { echo "rerun needs 2 GPUs"; exit 2; }
    ( export CROSSPOOL_DUMP_STACKS_S=75; t 190 python3 scripts/multi_gpu_parity.py --kv cuda:0 --weights cuda:1 \
        > "$RES/parity.log" 2>&1 ) &
    ckpt olmoe-1b-7b $OLMOE; ckpt qwen3-30b-a3b /tmp/qwen3 24; wait     # checkpoints written meanwhile
    grep "^\[\|identical\|Error\|error" "$RES/parity.log" | head -20
    if grep -q "float32: .* 12/12 requests identical" "$RES/parity.log"; then
        t 170 $MM --models 4 --modes off,on --rate 2 --kv-devices cuda:0 --weights-devices cuda:1 \
            --out-dir "$RES/split_rate2" 2>&1 | tee "$RES/split_rate2.out" | grep -v "^{" | tail -4
    else
        echo "split parity did not pass: last stacks"; tail -60 "$RES/parity.log" | cut -c1-160
    fi
    ( export CUDA_VISIBLE_DEVICES=1; t 150 python3 -m crosspool.cli bench decode --model $OLMOE --kv-cache-gb 16 \
        --context 1024 --batch 8,32 --json "$RES/olmoe_b32.json" > "$RES/olmoe_b32.out" 2>&1 ) &
    t 400 python3 -m crosspool.cli bench decode --model /tmp/qwen3 --kv-cache-gb 90 --context 1024,8192,32768 \
        --batch 1,8,32 --max-cell-tokens 300000 --json "$RES/qwen3_24l.json" 2>&1 | tee "$RES/qwen3_24l.out" \
        | grep -v "^{" | tail -14
    wait; echo "=== OLMoE"; grep -v "^{" "$RES/olmoe_b32.out" | tail -5
fi

if [ "$stage" = qwen3 ]; then
    ckpt olmoe-1b-7b $OLMOE          # before the jobs: both read it
    job_a() { qwen3_cells; }
    job_b() { fused_rope_check; }
    both
fi

if [ "$stage" = s7 ]; then   # session 7: issue 4's fused RoPE timing (GPU 0) beside issue 8's one-GPU reference (GPU 1)
    ckpt olmoe-1b-7b $OLMOE
    job_a() { fused_rope_check; }
    job_b() {   # the same 4-model runs as pass2/pass3 on one GPU, in the same device session
        for rate in 2 4; do
            t 240 $MM --models 4 --modes off,on --rate $rate --out-dir "$RES/one_gpu_rate$rate" 2>&1 \
                | tee "$RES/one_gpu_rate$rate.out" | grep "^|" | tail -2
        done
    }
    both
fi

if [ "$stage" = s7b ]; then  # session 7: the Qwen3 cells (GPU 0) beside fused RoPE off/on at batch 1..8 (GPU 1)
    ckpt olmoe-1b-7b $OLMOE
    job_a() { qwen3_cells; }
    job_b() { fused_rope_decode 1,2,4,8 0 64 0 64; }
    both
fi

if [ "$stage" = s7c ]; then  # session 7: L2 (GPU 0: the prefetch probe, decode with the experts' evict_first off/on)
    ckpt olmoe-1b-7b $OLMOE   #             | their GPU tests, the Qwen3 1k row (GPU 1)
    job_a() {
        t 60 python3 scripts/l2_prefetch_probe.py 2>&1 | grep -v Warn | tail -9
        for ef in 0 1 0 1; do
            CROSSPOOL_EXPERTS_EVICT_FIRST=$ef t 70 python3 -m crosspool.cli bench decode --model $OLMOE \
                --kv-cache-gb 16 --context 1024 --batch 1,8 --label "evict-first=$ef" \
                --json "$RES/olmoe_evictfirst$ef.json" 2>&1 | grep "^| 1024" | sed "s/^/evict-first=$ef: /"
        done
    }
    job_b() {
        t 120 python3 -m pytest -q -m gpu tests/test_gpu.py -k "prefetch or evict_first or programmatic" 2>&1 | tail -2
        ckpt qwen3-30b-a3b /tmp/qwen3 24
        t 200 python3 -m crosspool.cli bench decode --model /tmp/qwen3 --kv-cache-gb 90 --context 1024 \
            --batch 1,8,32 --json "$RES/qwen3_1k.json" 2>&1 | grep "^| 1024"
    }
    both
fi

if [ "$stage" = check ]; then  # issue 4, after session 8's removals: the kernels' GPU tests, the bit tests of the
                               # switches left, the default decode step (session 8: 1.12 / 3.33 / 5.98 ms)
    ckpt olmoe-1b-7b $OLMOE
    job_a() { t 400 python3 -m pytest -q -m gpu tests/test_kernels.py 2>&1 | tail -4; }
    job_b() {
        t 200 python3 -m pytest -q -m gpu tests/test_gpu.py -k "evict_first or programmatic" 2>&1 | tail -3
        variants ""
    }
    both
fi

if [ "$stage" = probe ]; then  # issue 4, session 9: a pure-read kernel's time by size (fixed cost per kernel?) | ncu
                               # on the one-token QKV GEMV (ours, cuBLAS), the expert gate/up GEMV, a 25 MB read
    job_a() { t 300 python3 scripts/stream_probe.py 2>&1 | tee "$RES/stream_probe.txt" | grep "^|\|fit\|copy"; }
    job_b() {
        t 400 ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
            --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
            python3 scripts/stream_probe.py --ncu > "$RES/ncu.txt" 2>&1
        grep -i "^  [a-z_]*kernel\|^  [a-z].*(\|Duration\|DRAM Throughput\|Memory Throughput\|Achieved Occupancy\|Theoretical Occ\|Registers Per\|Waves Per SM\|Grid Size\|Block Size\|Warp Cycles Per Issued\|Stall\|ERR\|==PROF==\|rror" \
            "$RES/ncu.txt" | cut -c1-150 | head -120
    }
    both
fi

if [ "$stage" = attn ]; then  # issue 4, session 9: OLMoE's batch-1 decode attention alone (graph times) | ncu on it
    job_a() { t 200 python3 scripts/stream_probe.py --attention 2>&1 | tee "$RES/attention_probe.txt" | grep "^|"; }
    job_b() {
        t 300 ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
            --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats \
            python3 scripts/stream_probe.py --attention --ncu > "$RES/ncu_attention.txt" 2>&1
        grep -i "^  [a-z_]*kernel\|^  [a-z].*(\|Duration\|DRAM Throughput\|Achieved Occupancy\|Theoretical Occ\|Registers Per\|Waves Per SM\|Grid Size\|Block Size\|Warp Cycles Per Issued\|Issue Slots Busy\|No Eligible\|stalled\|Shared Memory Per\|==PROF==\|rror" \
            "$RES/ncu_attention.txt" | cut -c1-150 | head -150
    }
    both
fi

if [ "$stage" = shape ]; then  # issue 4, session 9: the decode attention's launch shape (warps, keys per block, keys per
                               # split): OLMoE's batch-1 attention alone per setting | decode with two of them
    ckpt olmoe-1b-7b $OLMOE
    job_a() {
        for v in "4 64 128" "8 64 128" "4 128 128" "8 128 128" "4 32 128" "4 64 64" "8 64 64" "4 128 256" "8 128 256"; do
            set -- $v
            CROSSPOOL_DECODE_WARPS=$1 CROSSPOOL_DECODE_BLOCK_N=$2 CROSSPOOL_MIN_KEYS_PER_SPLIT=$3 t 40 \
                python3 scripts/stream_probe.py --attention 2>&1 | grep "^| [fp]" | sed "s/^/warps $1, block $2, min keys $3: /"
        done
    }
    job_b() { VT=100 BATCHES=1,8 variants "" CROSSPOOL_DECODE_WARPS=8 CROSSPOOL_DECODE_BLOCK_N=128; }
    both
fi

if [ "$stage" = confirm ]; then  # issue 4, session 10: the fused RoPE kernel's 128-key blocks (CROSSPOOL_FUSED_BLOCK_N)
    ckpt olmoe-1b-7b $OLMOE      # against the defaults: GPU tests (the kernel's, the engine's bits), decode twice each
    job_a() {
        CROSSPOOL_FUSED_BLOCK_N=128 t 250 python3 -m pytest -q -m "gpu or not gpu" tests/test_kernels.py \
            tests/test_gpu.py -k "rope or decode_bf16 or evict_first" 2>&1 | tail -2
    }
    job_b() { VT=120 BATCHES=1,8 variants "" CROSSPOOL_FUSED_BLOCK_N=128 "" CROSSPOOL_FUSED_BLOCK_N=128; }
    both
fi

if [ "$stage" = tma ]; then  # issue 4, session 10: the expert GEMVs with TMA-fetched weight tiles, autotuned
                             # (CROSSPOOL_EXPERTS_TMA=auto). A: their GPU tests, the MoE FFN alone at 1-8 tokens off /
                             # auto | B: decode at batch 1-8 off / auto (the first tma stage, fixed tiles and the dense
                             # GEMV's TMA path, is in git at 80a2462)
    ckpt olmoe-1b-7b $OLMOE
    job_a() {
        t 200 python3 -m pytest -q -m "gpu or not gpu" tests/test_kernels.py -k "fused_moe or tma or tune" 2>&1 | tail -2
        for v in "" CROSSPOOL_EXPERTS_TMA=auto; do
            ( [ -n "$v" ] && export $v; t 120 python3 -m crosspool.bench.kernels --only moe_ffn --shape olmoe-1b-7b \
                --json "$RES/kernels_moe_${v:-defaults}.json" 2>&1 | grep "^| olmoe-1b-7b | [1248] |" \
                | sed "s/^/${v:-defaults}: /" )
        done
    }
    job_b() { VT=150 BATCHES=1,2,4,8 variants "" CROSSPOOL_EXPERTS_TMA=auto "" CROSSPOOL_EXPERTS_TMA=auto; }
    both
fi

if [ "$stage" = s10 ]; then  # issue 4, session 10's defaults (128-key fused attention blocks, TMA experts at 2-8
                            # tokens): A: the kernels' GPU tests | B: the engine's GPU bit tests, decode with TMA
                            # experts on (default) and off at batch 1-32
    ckpt olmoe-1b-7b $OLMOE
    job_a() { t 450 python3 -m pytest -q -m gpu tests/test_kernels.py 2>&1 | tail -4; }
    job_b() {
        t 150 python3 -m pytest -q -m gpu tests/test_gpu.py -k "evict_first or programmatic" 2>&1 | tail -3
        VT=150 BATCHES=1,2,4,8,32 variants "" CROSSPOOL_EXPERTS_TMA=off
    }
    both
fi

if [ "$stage" = s10q ]; then  # issue 4, session 10: Qwen3-30B-A3B (24 of 48 layers) at 1k with TMA experts on
                             # (default; A, batch 1-32) and off (B, batch 1-8); the checkpoint is written first
    ckpt qwen3-30b-a3b /tmp/qwen3 24
    q1k() { t $1 python3 -m crosspool.cli bench decode --model /tmp/qwen3 --kv-cache-gb 60 --context 1024 \
                --batch $2 --label "${3:-defaults}" --json "$RES/qwen3_1k_${3:-defaults}.json" 2>&1 \
                | grep "^| 1024" | sed "s/^/${3:-defaults}: /"; }
    job_a() { q1k 300 1,2,8,32; }
    job_b() { export CROSSPOOL_EXPERTS_TMA=off; q1k 300 1,2,8 tma-off; }
    both
fi

if [ "$stage" = s11 ]; then  # issue 4, session 11: session 10's two builds, not yet on a GPU: the routing kernel on
                            # one warp with one max per top-k round (default) and o_proj folding the split combine
                            # in (CROSSPOOL_OPROJ_MERGE_ROWS=1). A: their tests on the GPU (interpreter-style tests
                            # too), the batch-1 step's critical path, the attention kernels on 2 warps | B: decode
    ckpt olmoe-1b-7b $OLMOE
    job_a() {
        t 260 python3 -m pytest -q -m "gpu or not gpu" tests/test_kernels.py -k "route or routing or merg or decode" 2>&1 \
            | tail -2
        t 150 python3 -m crosspool.cli bench decode --model $OLMOE --kv-cache-gb 16 --context 1024 --batch 1 \
            --profile --json "$RES/olmoe_profile_b1.json" > "$RES/olmoe_profile_b1.out" 2>&1
        grep "kernels busy" "$RES/olmoe_profile_b1.out"
        sed -n '/critical path, per step/,$p' "$RES/olmoe_profile_b1.out" | grep -v "^{" | cut -c1-160 | head -30
        # fewer cross-warp reductions? (the fused kernel's sm_90 PTX: 27-31 bar.sync on 4 warps, 55 on 2)
        VT=120 BATCHES=1,8 variants CROSSPOOL_DECODE_WARPS=2
    }
    job_b() {
        # GEMV_ROWS=1: our GEMV on the projections with the combine kernel (what the merge changes besides the
        # combine: o_proj leaves cuBLAS)
        VT=120 BATCHES=1,8 variants "" CROSSPOOL_ROUTE_WARPS=4 CROSSPOOL_OPROJ_MERGE_ROWS=1 CROSSPOOL_GEMV_ROWS=1 \
            "" CROSSPOOL_OPROJ_MERGE_ROWS=1
    }
    both
fi

if [ "$stage" = s13 ]; then   # issue 4, session 13: A: the routing inside the router GEMV (CROSSPOOL_ROUTE_IN_GEMV=1:
                             # its GPU tests, 200 racing launches each; OLMoE batch 1 with and without, with the
                             # host's own time per step) | B: split plans for many tiles in decode (Qwen3 8k x 8 / 32,
                             # against the session-11 rule, CROSSPOOL_LONG_SMS_PER_TILE=1000)
    job_a() {
        t 200 python3 -m pytest -q -m "gpu or not gpu" tests/test_kernels.py \
            -k "routing_inside or norm_route or router_norm" 2>&1 | tail -2
        ckpt olmoe-1b-7b $OLMOE
        VT=50 BATCHES=1 variants "" CROSSPOOL_ROUTE_IN_GEMV=1 "" CROSSPOOL_ROUTE_IN_GEMV=1
        python3 - "$RES" <<'PY'
import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/olmoe_*.json")):
    for r in json.load(open(f))["rows"]:
        print(f.split("/")[-1], "batch", r["batch"], "step ms %.3f host busy ms %.3f host wait ms %.3f"
              % (r["step_ms"], r.get("host_busy_ms", -1), r.get("host_wait_ms", -1)))
PY
        # split counts for 64-tile grids (Qwen3 at batch 16), between the 32 that gain from the long rule and the
        # 128 that lose
        t 100 python3 -m crosspool.bench.kernels --only splits --batches 16 --contexts 8192,32768 \
            --json "$RES/kernels_splits_b16.json" 2>&1 | grep "qwen3"
    }
    job_b() {
        ckpt qwen3-30b-a3b /tmp/qwen3 24
        VT=330 FIRST=0 decode_variants /tmp/qwen3 qwen3_8k "--kv-cache-gb 90 --context 8192 --batch 8,32" \
            "" CROSSPOOL_LONG_SMS_PER_TILE=1000
    }
    both
fi

if [ "$stage" = classes ]; then   # issue 4, session 12: Qwen3 1k in a serving bucket (graphs sized for 40,960
                                 # keys) with graphs per context class (defaults) | one class
                                 # (CROSSPOOL_GRAPH_SHORT_CONTEXT=0); each row is its GPU's first run (compiles)
    qwen3_serving() { VT=330 FIRST=0 decode_variants /tmp/qwen3 qwen3_1k_serving "$QWEN3_SERVING_1K --batch 1,8" "$1"; }
    job_a() { ckpt qwen3-30b-a3b /tmp/qwen3 24; qwen3_serving ""; }
    job_b() { while [ ! -f /tmp/qwen3/.complete ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 2; done
              qwen3_serving CROSSPOOL_GRAPH_SHORT_CONTEXT=0; }
    both
fi

if [ "$stage" = early ]; then   # issue 4, session 12: the fused attention kernel with its loads issued first and
                               # the new key's norm after the walk (CROSSPOOL_FUSED_EARLY_LOADS=1) | A: its GPU
                               # tests, the kernel alone (graph-replayed, cold caches) | B: OLMoE decode at batch 1
    job_a() {
        t 200 python3 -m pytest -q -m "gpu or not gpu" tests/test_kernels.py -k "early_loads or rope_decode_attention" \
            2>&1 | tail -2
        for v in 0 1 0 1; do
            CROSSPOOL_FUSED_EARLY_LOADS=$v t 60 python3 scripts/stream_probe.py --attention 2>&1 \
                | tee -a "$RES/attention_probe_early.txt" | grep "^| [fp]" | sed "s/^/early $v: /"
        done
    }
    job_b() {
        ckpt olmoe-1b-7b $OLMOE
        VT=45 BATCHES=1 variants "" CROSSPOOL_FUSED_EARLY_LOADS=1 "" CROSSPOOL_FUSED_EARLY_LOADS=1
    }
    both
fi

if [ "$stage" = s12 ]; then   # issue 4, session 12: A: the GPU tests the combine call cut short (150 s), the
                             # post-attention norm inside the router GEMV by token count (CROSSPOOL_ROUTER_NORM:
                             # up to N tokens, default 1) | B: the Qwen3 table's long rows with split plans, and
                             # the 1k serving-bucket row the combine call's time limit cut
    job_a() {
        t 300 python3 -m pytest -q -m "gpu or not gpu" tests/test_kernels.py \
            -k "split_plan or combine_skips or rope_decode_attention_in or long_context_split or embed_rope or \
                argmax_into or forward_logits or norm_route_linear or router_norm or context_class" 2>&1 | tail -3
        ckpt olmoe-1b-7b $OLMOE
        VT=50 BATCHES=1,2,4 variants "" CROSSPOOL_ROUTER_NORM=0 CROSSPOOL_ROUTER_NORM=4 "" CROSSPOOL_ROUTER_NORM=0 \
            CROSSPOOL_ROUTER_NORM=4
    }
    job_b() {
        ckpt qwen3-30b-a3b /tmp/qwen3 24
        t 150 python3 -m crosspool.cli bench decode --model /tmp/qwen3 --kv-cache-gb 60 --context 1024 --batch 1,8 \
            --max-model-len 40960 --json "$RES/qwen3_1k_serving_defaults.json" 2>&1 | grep "^| 1024" \
            | sed "s/^/defaults, mml 40960: /"
        t 400 python3 -m crosspool.cli bench decode --model /tmp/qwen3 --kv-cache-gb 90 --context 8192,32768 \
            --batch 1,8,32 --max-cell-tokens 300000 --json "$RES/qwen3_24l_long.json" 2>&1 \
            | tee "$RES/qwen3_24l_long.out" | grep "^| [0-9]"
    }
    both
fi

if [ "$stage" = combine ]; then   # issue 4, session 12: serving buckets at short contexts. Session 11: Qwen3 at
                                 # batch 1 in a serving bucket (64 splits, 9 used) paid 4.8 us a layer in the
                                 # combine, 1.67 against 1.54 ms a step. Since then: graphs per context class
                                 # (CROSSPOOL_GRAPH_SHORT_CONTEXT, 0 = one class), the combine loading its parts
                                 # as tiles (CROSSPOOL_COMBINE_CHUNK, 0 = one split at a time, the default), and
                                 # the graphs' fused ends (CROSSPOOL_GRAPH_FUSED_ENDS=0: torch's ops, as before),
                                 # the post-attention norm inside the router GEMV (CROSSPOOL_ROUTER_NORM=1, off).
                                 # A: GPU tests, the kernels | B: decode
    job_a() {
        CROSSPOOL_COMBINE_CHUNK=16 t 150 python3 -m pytest -q -m "gpu or not gpu" tests/test_kernels.py \
            -k "split_plan or combine_skips or rope_decode_attention_in or long_context_split or embed_rope or \
                argmax_into or forward_logits or norm_route_linear or router_norm" 2>&1 | tail -2
        ckpt olmoe-1b-7b $OLMOE      # the batch-1 critical path with the graph's fused ends (new in session 11)
        t 120 python3 -m crosspool.cli bench decode --model $OLMOE --kv-cache-gb 16 --context 1024 --batch 1 \
            --profile --json "$RES/olmoe_profile_b1.json" > "$RES/olmoe_profile_b1.out" 2>&1
        sed -n '/critical path, per step/,$p' "$RES/olmoe_profile_b1.out" | grep -v "^{" | cut -c1-120 | head -24
        for c in 0 16 64; do
            CROSSPOOL_COMBINE_CHUNK=$c t 120 python3 -m crosspool.bench.kernels --only splits --batches 1,8 \
                --contexts 1024,32768 --json "$RES/kernels_combine$c.json" 2>&1 \
                | grep "engine\|serving" | sed "s/^/chunk $c: /"
        done
    }
    job_b() {
        ckpt qwen3-30b-a3b /tmp/qwen3 24
        VT=90 FIRST=0 decode_variants /tmp/qwen3 qwen3_1k_serving "$QWEN3_SERVING_1K --batch 1,8" \
            "" CROSSPOOL_COMBINE_CHUNK=16 CROSSPOOL_GRAPH_SHORT_CONTEXT=0
        t 90 python3 -m crosspool.cli bench decode --model /tmp/qwen3 --kv-cache-gb 60 --context 1024 --batch 1,8 \
            --json "$RES/qwen3_1k_bench_default.json" 2>&1 | grep "^| 1024" | sed "s/^/bench default mml: /"
        ckpt olmoe-1b-7b $OLMOE
        VT=60 BATCHES=1,8 variants "" CROSSPOOL_GRAPH_FUSED_ENDS=0 CROSSPOOL_ROUTER_NORM=1 "" CROSSPOOL_ROUTER_NORM=1
    }
    both
fi

if [ "$stage" = splitplan ]; then   # issue 4, session 11: split-KV plans that follow the context (a bucket's grid
                                   # sized for long contexts, short ones on the two-wave count, empty splits exit at
                                   # once). CROSSPOOL_LONG_SPLIT_WAVES=2 is the old rule. A: GPU tests, the sweep |
                                   # B: Qwen3 decode (OLMoE's 1k: 1.09 / 3.22 ms either way, first call)
    job_a() {
        t 150 python3 -m pytest -q -m "gpu or not gpu" tests/test_kernels.py \
            -k "split_plan or combine_skips or rope_decode_attention_in" 2>&1 | tail -2
        t 200 python3 -m crosspool.bench.kernels --only splits --batches 1,8 --contexts 1024,32768 \
            --json "$RES/kernels_plan.json" 2>&1 | grep "^|"
    }
    job_b() {
        ckpt qwen3-30b-a3b /tmp/qwen3 24
        VT=90 FIRST=0 decode_variants /tmp/qwen3 qwen3_1k_serving "$QWEN3_SERVING_1K --batch 1" \
            "" CROSSPOOL_LONG_SPLIT_WAVES=2
        t 150 python3 -m crosspool.cli bench decode --model /tmp/qwen3 --kv-cache-gb 60 --context 32768 \
            --batch 8 --json "$RES/qwen3_32k_defaults.json" 2>&1 | grep "^| 32768" | sed "s/^/defaults: /"
    }
    both
fi

if [ "$stage" = splits ]; then  # issue 4: decode attention alone against its split count at batch 1 and 8, 1k-128k
                               # (session 7 found OLMoE 32k batch 1 at 93.8 us with the engine's 17 splits, 81.4 with
                               # 64): is a keys-per-split target (~512) a better rule than "two waves"?
    job_a() { t 400 python3 -m crosspool.bench.kernels --only splits --batches 1,8 --contexts 1024,4096,32768,131072 \
                  --json "$RES/kernels_splits.json" 2>&1 | grep "^|"; }
    job_b() {   # what serving's split count (sized by the model's longest context, 40,960) costs a 1k step
        ckpt qwen3-30b-a3b /tmp/qwen3 24
        for mml in "" 40960 "" 40960; do
            t 120 python3 -m crosspool.cli bench decode --model /tmp/qwen3 --kv-cache-gb 60 --context 1024 \
                --batch 1,8 ${mml:+--max-model-len $mml} --json "$RES/qwen3_1k_mml${mml:-default}.json" 2>&1 \
                | grep "^| 1024" | sed "s/^/max-model-len ${mml:-default}: /"
        done
    }
    both
fi

if [ "$stage" = profile ]; then  # issue 4: the device time per kernel of OLMoE's decode step (ctx 1k), batch 1 and 8
    # (`profile nopdl`: without PDL, so no kernel's time includes its wait for the one before)
    ckpt olmoe-1b-7b $OLMOE
    [ "$only" = nopdl ] && { export CROSSPOOL_PDL=0; only=; }
    # the full output (the per-kernel table too) lands in $RES; printed: the critical path under PDL
    prof() { t 150 python3 -m crosspool.cli bench decode --model $OLMOE --kv-cache-gb 16 --context 1024 --batch $1 \
                 --profile --json "$RES/olmoe_profile_b$1.json" > "$RES/olmoe_profile_b$1.out" 2>&1
             grep "kernels busy" "$RES/olmoe_profile_b$1.out"; sed -n '/critical path, per step/,$p' \
                 "$RES/olmoe_profile_b$1.out" | grep -v "^{" | cut -c1-160 | head -30; }
    job_a() { prof 1; }
    job_b() { prof 8; }
    both
fi

if [ "$stage" = replay ]; then   # issue 7's fixed GPU replay (closed issue; crashed in session 4 on the KV race)
    t 330 python3 -m crosspool.bench.plan_vs_measured --part replay --device cuda --rate-scale 16 \
        --horizon-s 45 --calib-s 15 --trials 200 --models-dir /tmp/plan_models \
        --out "$RES/plan_vs_measured_cuda.json" 2>&1 | tail -25
fi

if [ "$stage" = pipeline ]; then
    ckpt olmoe-1b-7b $OLMOE
    job_a() {   # issue 6: 2 models, every mode, and the one-lane timeline
        t 100 python3 -m pytest -m gpu -q tests/test_gpu.py -k pipeline 2>&1 | tail -3
        t 200 $MM --models 2 --modes off,on,on-green --rate 2 --out-dir "$RES/issue6" 2>&1 \
            | tee "$RES/issue6_2.out" | grep -v "^{" | tail -5
        t 60 $MM --models 2 --modes serial --rate 2 --duration-s 5 --out-dir "$RES/issue6" 2>&1 \
            | tee "$RES/issue6_serial.out" | grep -v "^{" | tail -3
    }
    job_b() {   # issue 6's 4-model rows, which are also issue 8's one-GPU reference, at two loads
        for rate in 2 4; do
            t 250 $MM --models 4 --modes off,on --rate $rate --out-dir "$RES/one_gpu_rate$rate" 2>&1 \
                | tee "$RES/one_gpu_rate$rate.out" | grep -v "^{" | tail -4
        done
    }
    both
fi

if [ "$stage" = serve ]; then   # issue 5's H200 check (closed in session 3; kept to repeat it), needs .whl
    ckpt olmoe-1b-7b $OLMOE
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
    ckpt qwen1.5-moe-a2.7b /tmp/qwen15
    python3 -m crosspool.cli serve --model olmoe-a=$OLMOE --model olmoe-b=$OLMOE --model olmoe-c=$OLMOE \
        --model olmoe-d=$OLMOE --model qwen15=/tmp/qwen15 --port 8000 > "$RES/serve.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 240); do curl -sf localhost:8000/health > /dev/null && break; sleep 1; done
    grep -v '"msg": "request' "$RES/serve.log" | head -30
    t 200 python3 scripts/serve_smoke.py --base-url http://127.0.0.1:8000/v1 --per-model 8 --max-tokens 64 2>&1
    kill -TERM $pid; wait $pid; echo "server exit status $?"; tail -3 "$RES/serve.log"
fi
tar czf "$OUT/$stage.tgz" -C "$RES" . && rm -rf "$RES"
# the cache for the next call (at most 3 parts: $OUT returns 8 files, 64 MiB in all)
tar czf /tmp/triton-cache.tgz -C "$TRITON_CACHE_DIR" . \
    && split -b 15m /tmp/triton-cache.tgz "$OUT/triton-cache.tgz.part-"
if [ "$(ls "$OUT"/triton-cache.tgz.part-* | wc -l)" -gt 3 ]; then
    echo "triton cache over 3 parts: not returned"; rm -f "$OUT"/triton-cache.tgz.part-*
fi
echo "triton cache: $(du -h /tmp/triton-cache.tgz | cut -f1) compressed"
