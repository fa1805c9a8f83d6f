#!/usr/bin/env bash
# Rollout sampling for BENCHMARKS.md, GRPO's shape: 8 chat prompts x 8 samples at T=1 up to 256 new
# tokens, EOS ending a sample. preftune's `bench --workload rollout` and (with PYTHON pointing at a
# venv with scripts/requirements-reference.txt) transformers' `generate` on the same batch, as
# GRPOTrainer samples without vLLM, with transformers' default (sdpa) attention; f32, then bf16
# where the CPU multiplies in bf16.
# Usage: [PYTHON=/path/to/venv/bin/python] [THREADS=2] scripts/bench_rollout.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_prelude.sh
SHAPE=(8 8 256)
B=("$BIN" --threads "$THREADS" bench --model "$MODEL" --workload rollout --gen-batch "${SHAPE[0]}"
   --num-generations "${SHAPE[1]}" --new-tokens "${SHAPE[2]}")
R=(scripts/reference_bench.py rollout "$MODEL" bench/prompts.jsonl "${SHAPE[@]}")
"${B[@]}"
[ -z "${PYTHON:-}" ] || "$PYTHON" "${R[@]}" 2>/dev/null | tail -1
if [ -n "$(grep -m1 -o -E 'amx_bf16|avx512_bf16' /proc/cpuinfo || true)" ]; then
  "${B[@]}" --bf16
  [ -z "${PYTHON:-}" ] || DTYPE=bf16 "$PYTHON" "${R[@]}" 2>/dev/null | tail -1
fi
