#!/usr/bin/env bash
# First GPU timings (scripts/gpu-check.sh): preftune's SFT and DPO steps (reference log-probs
# precomputed) and sampling against PyTorch + transformers on the same GPU, data and shapes, in f32
# and with bf16 mixed precision on both sides. Peak GPU memory is read with nvidia-smi for both.
# Usage: timing.sh MODEL_DIR LABEL (BIN, PY, WORK from gpu-check.sh; PRECISIONS="false true" are
# the bf16 settings to time)
set -uo pipefail
model=$1 label=$2
BATCH=${BATCH:-8} MAXLEN=${MAXLEN:-512} STEPS=${STEPS:-5}
data="$WORK/timing.jsonl"
[ -f "$data" ] || $PY scripts/gpu/make_timing_data.py "$data" 64
# Runs a command while sampling the GPU's used memory; prints the command's last JSON line with
# `gpu_mem_peak_mib` (peak minus the idle reading before it) added.
with_mem() {
    local base poll
    base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$WORK/mem.txt" &
    poll=$!
    "$@" > "$WORK/run.out" 2> "$WORK/run.err"
    local rc=$?
    kill $poll; wait $poll 2>/dev/null
    [ $rc -eq 0 ] || { tail -n 5 "$WORK/run.err" >&2; return $rc; }
    local peak
    peak=$(sort -n "$WORK/mem.txt" | tail -1)
    grep '^{' "$WORK/run.out" | tail -1 | $PY -c "import json,sys; d=json.load(sys.stdin); d['gpu_mem_peak_mib']=int(sys.argv[1]); d['model']=sys.argv[2]; print(json.dumps(d))" "$((peak - base))" "$label"
}
# preftune's step time: the median difference of elapsed time between logged steps.
ours() {
    local algo=$1; shift
    rm -rf "$WORK/t-out"
    PREFTUNE_CUDA_KERNELS=${KERNELS:-0} "$BIN" --device cuda "$algo" --set model_name_or_path="$model" --set train_file="$data" \
        --set output_dir="$WORK/t-out" --set per_device_train_batch_size=$BATCH --set max_length=$MAXLEN \
        --set max_steps=$((STEPS + 2)) --set logging_steps=1 --set save_steps=100000 --set learning_rate=1e-6 \
        --set max_grad_norm=1.0 "$@" > /dev/null || return 1
    rm -rf "$WORK/t-out/model.safetensors" "$WORK/t-out/optimizer.safetensors"
    $PY - "$WORK/t-out/metrics.jsonl" "$algo" "$*${KERNELS:+ PREFTUNE_CUDA_KERNELS=$KERNELS}" <<'PY'
import json, statistics, sys
m = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
el = [r["num_tokens"] / r["train_tokens_per_second"] for r in m]
steps = [b - a for a, b in zip(el, el[1:])][1:]
s = statistics.median(steps)
print(json.dumps({"impl": "preftune", "workload": sys.argv[2], "options": sys.argv[3], "steps": len(steps),
                  "median_step_s": s, "tokens_per_s": (m[-1]["num_tokens"] - m[-2]["num_tokens"]) / s}))
PY
}
# A GRPO iteration (issue 22's shape): 8 prompts x 8 samples up to 256 new tokens, digits as the
# reward, beta 0, then the update; the median of the steps after the first.
GRPO_STEPS=${GRPO_STEPS:-3}
ours_grpo() {
    rm -rf "$WORK/g-out"
    PREFTUNE_CUDA_KERNELS=${KERNELS:-0} PREFTUNE_CUDA_GRAPHS=${GRAPHS:-0} "$BIN" --device cuda grpo --set model_name_or_path="$model" \
        --set train_file=bench/prompts.jsonl --set output_dir="$WORK/g-out" --set per_device_train_batch_size=8 \
        --set num_generations=8 --set max_completion_length=256 --set temperature=1.0 --set beta=0.0 \
        --set max_steps=$((GRPO_STEPS + 1)) --set logging_steps=1 --set save_steps=100000 --set learning_rate=1e-6 \
        --set max_grad_norm=1.0 --set "reward=\"command:python3 examples/rewards/count_digits.py\"" "$@" \
        > /dev/null || return 1
    rm -rf "$WORK/g-out/model.safetensors" "$WORK/g-out/optimizer.safetensors"
    $PY - "$WORK/g-out/metrics.jsonl" "$*${KERNELS:+ PREFTUNE_CUDA_KERNELS=$KERNELS}${GRAPHS:+ PREFTUNE_CUDA_GRAPHS=$GRAPHS}" <<'PY'
import json, statistics, sys
m = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
el = [r["num_tokens"] / r["train_tokens_per_second"] for r in m]
steps = [b - a for a, b in zip(el, el[1:])]
print(json.dumps({"impl": "preftune", "workload": "grpo", "options": sys.argv[2], "prompts": 8, "num_generations": 8,
                  "max_completion_length": 256, "steps": len(steps), "median_step_s": statistics.median(steps)}))
PY
}
# Every row is attempted; the script fails if any did.
rc=0
for bf in ${PRECISIONS:-false true}; do
    b=$([ $bf = true ] && echo 1 || echo 0)
    with_mem ours sft --set bf16=$bf || rc=1
    with_mem env BF16=$b $PY scripts/gpu/reference_steps.py sft "$model" "$data" $BATCH $MAXLEN $STEPS || rc=1
    with_mem ours dpo --set bf16=$bf --set precompute_ref_log_probs=true || rc=1
    with_mem env BF16=$b $PY scripts/gpu/reference_steps.py dpo "$model" "$data" $BATCH $MAXLEN $STEPS || rc=1
done
# The bf16 steps again with preftune's own CUDA kernels (crates/kernels-cuda).
KERNELS=1 with_mem ours sft --set bf16=true || rc=1
KERNELS=1 with_mem ours dpo --set bf16=true --set precompute_ref_log_probs=true || rc=1
# Sampling: 16 prompts x 64 new tokens at T=1.
with_mem "$BIN" --device cuda bench --workload generate --model "$model" --prompts bench/prompts.jsonl \
    --gen-batch 16 --new-tokens 64 --dtype bf16 || rc=1
with_mem env BF16=1 $PY scripts/gpu/reference_steps.py generate "$model" bench/prompts.jsonl 16 64 || rc=1
with_mem "$BIN" --device cuda bench --workload generate --model "$model" --prompts bench/prompts.jsonl \
    --gen-batch 16 --new-tokens 64 || rc=1
with_mem env BF16=0 $PY scripts/gpu/reference_steps.py generate "$model" bench/prompts.jsonl 16 64 || rc=1
# The bf16 sampling again with cudarc's per-buffer events (PREFTUNE_CUDA_EVENT_TRACKING=1, as
# before 2026-12-07): what skipping them saves an eager decoding step.
with_mem env PREFTUNE_CUDA_EVENT_TRACKING=1 "$BIN" --device cuda bench --workload generate --model "$model" \
    --prompts bench/prompts.jsonl --gen-batch 16 --new-tokens 64 --dtype bf16 || rc=1
# The same sampling with its decoding steps replayed as CUDA graphs (their counts in the line).
with_mem env PREFTUNE_CUDA_GRAPHS=1 "$BIN" --device cuda bench --workload generate --model "$model" \
    --prompts bench/prompts.jsonl --gen-batch 16 --new-tokens 64 --dtype bf16 || rc=1
with_mem env PREFTUNE_CUDA_GRAPHS=1 "$BIN" --device cuda bench --workload generate --model "$model" \
    --prompts bench/prompts.jsonl --gen-batch 16 --new-tokens 64 || rc=1
# And with preftune's CUDA kernels too (the decoding attention kernel; `cuda_kernels` in the line).
with_mem env PREFTUNE_CUDA_KERNELS=1 PREFTUNE_CUDA_GRAPHS=1 "$BIN" --device cuda bench --workload generate \
    --model "$model" --prompts bench/prompts.jsonl --gen-batch 16 --new-tokens 64 --dtype bf16 || rc=1
# GRPO iterations, bf16 on both sides.
with_mem ours_grpo --set bf16=true || rc=1
KERNELS=1 with_mem ours_grpo --set bf16=true || rc=1
KERNELS=1 GRAPHS=1 with_mem ours_grpo --set bf16=true || rc=1
with_mem env BF16=1 $PY scripts/gpu/reference_steps.py grpo "$model" bench/prompts.jsonl 8 8 256 $GRPO_STEPS || rc=1
exit $rc
