#!/usr/bin/env bash
# GRPO benchmark for BENCHMARKS.md: preftune grpo and (with PYTHON pointing at a venv with
# scripts/requirements-reference.txt) TRL's GRPOTrainer, same prompts and settings: SmolLM2-135M,
# f32, 4 prompts x 8 generations per step, 64 new tokens, reward = digits in the completion, beta 0.
# Usage: [PYTHON=/path/to/venv/bin/python] [THREADS=2] [STEPS=4] scripts/bench_grpo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-4}
. scripts/bench_prelude.sh
rm -rf runs/bench/grpo-out
/usr/bin/time -f '{"peak_rss_mib": %M}' -o runs/bench/grpo-rss.json "$BIN" --threads "$THREADS" grpo \
  --set model_name_or_path="$MODEL" --set train_file=bench/prompts.jsonl --set output_dir=runs/bench/grpo-out \
  --set per_device_train_batch_size=4 --set num_generations=8 --set max_completion_length=64 \
  --set max_steps="$STEPS" --set learning_rate=1e-6 --set temperature=1.0 --set beta=0.0 \
  --set "reward=\"command:python3 examples/rewards/count_digits.py\"" \
  --set logging_steps=1 --set save_steps=100000 --set seed=42 > runs/bench/grpo-summary.json
python3 - <<'PY'
import json, statistics
m = [json.loads(l) for l in open("runs/bench/grpo-out/metrics.jsonl") if '"loss"' in l]
rss = json.load(open("runs/bench/grpo-rss.json"))["peak_rss_mib"] / 1024
elapsed = [r["num_tokens"] / r["train_tokens_per_second"] for r in m]
steps = [b - a for a, b in zip(elapsed, elapsed[1:])]
print(json.dumps({"workload": "grpo", "impl": "preftune", "threads": 2, "steps": len(m), "prompts_per_step": 4,
                  "num_generations": 8, "max_completion_length": 64, "median_step_s": statistics.median(steps),
                  "peak_rss_mib": rss, "rewards": [round(r["reward"], 3) for r in m]}))
PY
if [ -n "${PYTHON:-}" ]; then
  "$PYTHON" scripts/reference_grpo_bench.py "$MODEL" bench/prompts.jsonl "$STEPS" 4 8 64 2>/dev/null | tail -1
fi
