#!/usr/bin/env bash
# Issue 22's table, both sides in bf16 on the same GPU, data and shapes, in one run:
#   - SFT and DPO steps (DPO's reference log-probs precomputed), batch 8, at each of $LENGTHS;
#     gradient checkpointing on both sides at the lengths in $GC_AT (where TRL's users need it for
#     memory), off at the others;
#   - sampling, 16 prompts x 256 new tokens (preftune eagerly, and with CUDA graphs);
#   - a GRPO iteration, 8 prompts x 8 samples x 256 new tokens, then the update;
# against PyTorch + transformers running TRL's step maths (scripts/gpu/reference_steps.py); sampling
# and GRPO also against transformers' continuous batching (GRPOTrainer's
# use_transformers_continuous_batching), the faster reference counting. Then
# scripts/gpu/table22.py turns the lines into the table: ratios, MFU, the sampling's share of the
# memory-bandwidth roofline, and each target met or not.
# Usage: table22.sh MODEL_DIR LABEL (BIN, PY, WORK and DEVICE from gpu-check.sh; TABLE_MD: where the
# Markdown table goes, besides stdout). Knobs for a rehearsal on the CPU: LENGTHS, GC_AT, BATCH,
# STEPS, GEN_BATCH, NEW, GRPO_STEPS; KERNELS=0 leaves preftune's CUDA kernels off.
set -uo pipefail
model=$1 label=$2
LENGTHS=${LENGTHS:-512 2048} GC_AT=${GC_AT:-2048} BATCH=${BATCH:-8} STEPS=${STEPS:-5}
GEN_BATCH=${GEN_BATCH:-16} NEW=${NEW:-256} GRPO_STEPS=${GRPO_STEPS:-3} KERNELS=${KERNELS:-1}
export TABLE=issue22
source scripts/gpu/timing-lib.sh
lines="$WORK/table22.jsonl"
: > "$lines"
# A row: its line to stdout and to the table's input.
row() { with_mem "$@" | tee -a "$lines"; [ "${PIPESTATUS[0]}" -eq 0 ]; }
rc=0
for len in $LENGTHS; do
    gc=false
    [[ " $GC_AT " == *" $len "* ]] && gc=true
    g=$([ $gc = true ] && echo 1 || echo 0)
    for algo in sft dpo; do
        extra=()
        [ $algo = dpo ] && extra=(--set precompute_ref_log_probs=true)
        MAXLEN=$len row ours $algo --set bf16=true --set gradient_checkpointing=$gc "${extra[@]}" || rc=1
        row env BF16=1 GC=$g $PY scripts/gpu/reference_steps.py $algo "$model" "$data" $BATCH $len $STEPS || rc=1
    done
done
gen=(bench --workload generate --model "$model" --prompts bench/prompts.jsonl --gen-batch $GEN_BATCH
    --new-tokens $NEW --dtype bf16)
row env PREFTUNE_CUDA_KERNELS=$KERNELS "$BIN" --device "$DEVICE" "${gen[@]}" || rc=1
row env PREFTUNE_CUDA_KERNELS=$KERNELS PREFTUNE_CUDA_GRAPHS=1 "$BIN" --device "$DEVICE" "${gen[@]}" || rc=1
row env BF16=1 $PY scripts/gpu/reference_steps.py generate "$model" bench/prompts.jsonl $GEN_BATCH $NEW || rc=1
# transformers' continuous batching (GRPOTrainer's use_transformers_continuous_batching), when the
# installed transformers has it (5.8 and later; a failure here is reported, not fatal): the faster
# of the two references counts.
cb_failed() { echo "the continuous-batching reference failed (transformers < 5.8?)" >&2; }
row env BF16=1 CB=1 $PY scripts/gpu/reference_steps.py generate "$model" bench/prompts.jsonl $GEN_BATCH $NEW || cb_failed
row ours_grpo --set bf16=true || rc=1
GRAPHS=1 row ours_grpo --set bf16=true || rc=1
row env BF16=1 $PY scripts/gpu/reference_steps.py grpo "$model" bench/prompts.jsonl 8 8 $NEW $GRPO_STEPS || rc=1
row env BF16=1 CB=1 $PY scripts/gpu/reference_steps.py grpo "$model" bench/prompts.jsonl 8 8 $NEW $GRPO_STEPS || cb_failed
# The table, from whatever rows ran.
$PY scripts/gpu/table22.py "$lines" "$model" ${TABLE_MD:+--markdown "$TABLE_MD"} || rc=1
exit $rc
