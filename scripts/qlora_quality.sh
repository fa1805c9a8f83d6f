#!/usr/bin/env bash
# The quality gap of LoRA on a quantised base (docs/qlora.md): LoRA DPO trained on a 4-bit base
# (load_in_4bit) and on the f32 base, each adapter then evaluated on the f32 base, on held-out
# pairs, over seeds; and each adapter on the base it trained on (the run's own evaluation).
#   scripts/qlora_quality.sh BASE PAIRS [OUT] [SEEDS]
# BASE: an f32 HF folder (the IMDb pipeline's SFT model, RESULTS.md); PAIRS: its DPO pairs
# (prompt/chosen/rejected). The first 128 pairs train (2 epochs, batch 8, 32 steps), the last 32
# are held out. Prints one JSON line per run and evaluation to OUT/quality.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:?BASE model folder}; PAIRS=${2:?PAIRS jsonl}; OUT=${3:-runs/qlora-quality}; SEEDS=${4:-1,2,3}
BIN=target/release/preftune
mkdir -p "$OUT"
head -n 128 "$PAIRS" > "$OUT/train.jsonl"
tail -n 32 "$PAIRS" > "$OUT/heldout.jsonl"
common=(--set model_name_or_path="$BASE" --set train_file="$OUT/train.jsonl"
  --set use_peft=true --set lora_r=16 --set lora_alpha=32 --set lora_dropout=0.0
  --set 'lora_target_modules=["all-linear"]' --set per_device_train_batch_size=8 --set max_steps=32
  --set learning_rate=5e-4 --set beta=0.1 --set precompute_ref_log_probs=true --set bf16=true
  --set logging_steps=8 --set save_steps=1000 --set max_length=128)
evaluate() { # model-or-adapter label seed extra...
  local m=$1 label=$2 seed=$3; shift 3
  "$BIN" dpo --eval-only --set model_name_or_path="$m" --set eval_file="$OUT/heldout.jsonl" \
    --set output_dir="$OUT/eval-$label-$seed" --set overwrite_output_dir=true \
    --set per_device_eval_batch_size=8 --set max_length=128 --set bf16=true "$@" \
    | python3 -c "import json,sys; v=json.loads(sys.stdin.read()); e=v.get('eval',v); print(json.dumps({'eval': '$label', 'seed': $seed, **{k: e[k] for k in e if k.startswith('eval_')}}))" \
    | tee -a "$OUT/quality.jsonl"
}
for seed in ${SEEDS//,/ }; do
  for v in q4 f32; do
    run=$OUT/$v-$seed
    rm -rf "$run"
    quant=(); [ $v = q4 ] && quant=(--set load_in_4bit=true)
    start=$(date +%s.%N)
    # The run's own evaluation: the adapter on the base it trained on.
    "$BIN" dpo "${common[@]}" --set output_dir="$run" --set seed=$seed "${quant[@]}" \
      --set eval_file="$OUT/heldout.jsonl" --set per_device_eval_batch_size=8 > "$OUT/run.json"
    secs=$(echo "$(date +%s.%N) - $start" | bc)
    python3 -c "import json,sys; e=json.load(open('$OUT/run.json'))['eval']; print(json.dumps({'eval': '$v-adapter-on-own-base', 'seed': $seed, 'train_seconds': round($secs, 1), **{k: e[k] for k in e if k.startswith('eval_')}}))" \
      | tee -a "$OUT/quality.jsonl"
    # The adapter folder loads as its f32 base + the adapter.
    evaluate "$run" "$v-adapter-on-f32" $seed --set ref_model="$BASE"
  done
done
