#!/usr/bin/env bash
# PPO iteration benchmark for BENCHMARKS.md: preftune ppo on SmolLM2-135M, f32, 8 prompts per
# rollout, 64 new tokens, 4 PPO epochs, value model on its own backbone, reward = digits in the
# completion (a command source). TRL 1.16 ships no PPO trainer, so there is no reference side.
# Usage: [THREADS=2] [STEPS=3] [EXTRA=...] scripts/bench_ppo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-3}
. scripts/bench_prelude.sh
rm -rf runs/bench/ppo-out
/usr/bin/time -f '{"peak_rss_mib": %M}' -o runs/bench/ppo-rss.json "$BIN" --threads "$THREADS" ppo \
  --set model_name_or_path="$MODEL" --set train_file=bench/prompts.jsonl --set output_dir=runs/bench/ppo-out \
  --set per_device_train_batch_size=8 --set max_completion_length=64 --set num_ppo_epochs=4 \
  --set max_steps="$STEPS" --set learning_rate=3e-6 --set temperature=1.0 \
  --set "reward=\"command:python3 examples/rewards/count_digits.py\"" \
  --set logging_steps=1 --set save_steps=100000 --set seed=42 ${EXTRA:-} > runs/bench/ppo-summary.json
python3 - <<'PY'
import json, os, statistics
m = [json.loads(l) for l in open("runs/bench/ppo-out/metrics.jsonl") if '"loss"' in l]
rss = json.load(open("runs/bench/ppo-rss.json"))["peak_rss_mib"] / 1024
elapsed = [r["num_tokens"] / r["train_tokens_per_second"] for r in m]
steps = [b - a for a, b in zip(elapsed, elapsed[1:])]
print(json.dumps({"workload": "ppo", "impl": "preftune", "extra": os.environ.get("EXTRA", ""), "threads": 2,
                  "steps": len(m), "prompts_per_rollout": 8, "max_completion_length": 64, "num_ppo_epochs": 4,
                  "median_step_s": statistics.median(steps), "peak_rss_mib": rss}))
PY
