#!/usr/bin/env bash
# First GPU timings (scripts/gpu-check.sh): preftune's SFT and DPO steps (reference log-probs
# precomputed) and sampling against PyTorch + transformers on the same GPU, data and shapes, in f32
# and with bf16 mixed precision on both sides. Peak GPU memory is read with nvidia-smi for both.
# Usage: timing.sh MODEL_DIR LABEL (BIN, PY, WORK and DEVICE from gpu-check.sh; PRECISIONS="false
# true" are the bf16 settings to time). Issue 22's own table is scripts/gpu/table22.sh.
set -uo pipefail
model=$1 label=$2
BATCH=${BATCH:-8} MAXLEN=${MAXLEN:-512} STEPS=${STEPS:-5}
GRPO_STEPS=${GRPO_STEPS:-3}
source scripts/gpu/timing-lib.sh
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
with_mem "$BIN" --device "$DEVICE" bench --workload generate --model "$model" --prompts bench/prompts.jsonl \
    --gen-batch 16 --new-tokens 64 --dtype bf16 || rc=1
with_mem env BF16=1 $PY scripts/gpu/reference_steps.py generate "$model" bench/prompts.jsonl 16 64 || rc=1
with_mem "$BIN" --device "$DEVICE" bench --workload generate --model "$model" --prompts bench/prompts.jsonl \
    --gen-batch 16 --new-tokens 64 || rc=1
with_mem env BF16=0 $PY scripts/gpu/reference_steps.py generate "$model" bench/prompts.jsonl 16 64 || rc=1
# The bf16 sampling again with cudarc's per-buffer events (PREFTUNE_CUDA_EVENT_TRACKING=1, as
# before 2026-12-07): what skipping them saves an eager decoding step.
with_mem env PREFTUNE_CUDA_EVENT_TRACKING=1 "$BIN" --device "$DEVICE" bench --workload generate --model "$model" \
    --prompts bench/prompts.jsonl --gen-batch 16 --new-tokens 64 --dtype bf16 || rc=1
# The same sampling with its decoding steps replayed as CUDA graphs (their counts in the line).
with_mem env PREFTUNE_CUDA_GRAPHS=1 "$BIN" --device "$DEVICE" bench --workload generate --model "$model" \
    --prompts bench/prompts.jsonl --gen-batch 16 --new-tokens 64 --dtype bf16 || rc=1
with_mem env PREFTUNE_CUDA_GRAPHS=1 "$BIN" --device "$DEVICE" bench --workload generate --model "$model" \
    --prompts bench/prompts.jsonl --gen-batch 16 --new-tokens 64 || rc=1
# And with preftune's CUDA kernels too (the decoding attention kernel; `cuda_kernels` in the line).
with_mem env PREFTUNE_CUDA_KERNELS=1 PREFTUNE_CUDA_GRAPHS=1 "$BIN" --device "$DEVICE" bench --workload generate \
    --model "$model" --prompts bench/prompts.jsonl --gen-batch 16 --new-tokens 64 --dtype bf16 || rc=1
# GRPO iterations, bf16 on both sides.
with_mem ours_grpo --set bf16=true || rc=1
KERNELS=1 with_mem ours_grpo --set bf16=true || rc=1
KERNELS=1 GRAPHS=1 with_mem ours_grpo --set bf16=true || rc=1
with_mem env BF16=1 $PY scripts/gpu/reference_steps.py grpo "$model" bench/prompts.jsonl 8 8 256 $GRPO_STEPS || rc=1
exit $rc
