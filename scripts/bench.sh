#!/usr/bin/env bash
# Benchmarks for BENCHMARKS.md: preftune and (when PYTHON points at an interpreter with the
# reference stack, scripts/requirements-reference.txt) transformers, same workloads, one run.
# Usage: [PYTHON=/path/to/venv/bin/python] [THREADS=2] scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_prelude.sh
B=("$BIN" --threads "$THREADS" bench --model "$MODEL")
"${B[@]}" --workload matmul
"${B[@]}" --workload fwd-bwd --train-batch 8 --seq-len 128 --steps 3
"${B[@]}" --workload fwd-bwd --train-batch 8 --seq-len 128 --steps 3 --gradient-checkpointing
"${B[@]}" --workload fwd-bwd --train-batch 8 --seq-len 128 --steps 3 --composed-ops
"${B[@]}" --workload fwd-bwd --train-batch 8 --seq-len 128 --steps 3 --dtype bf16
"${B[@]}" --workload generate --gen-batch 16 --new-tokens 64
if [ -n "$(grep -m1 -o -E 'amx_bf16|avx512_bf16' /proc/cpuinfo || true)" ]; then
  "${B[@]}" --workload matmul --bf16
  "${B[@]}" --workload fwd-bwd --train-batch 8 --seq-len 128 --steps 3 --bf16
  "${B[@]}" --workload generate --gen-batch 16 --new-tokens 64 --bf16
fi
if [ -n "${PYTHON:-}" ]; then
  "$PYTHON" scripts/reference_bench.py matmul 2048 2>/dev/null
  "$PYTHON" scripts/reference_bench.py fwd-bwd "$MODEL" bench/prompts.jsonl 8 128 3 2>/dev/null
  "$PYTHON" scripts/reference_bench.py generate "$MODEL" bench/prompts.jsonl 16 64 2>/dev/null
  DTYPE=bf16 "$PYTHON" scripts/reference_bench.py fwd-bwd "$MODEL" bench/prompts.jsonl 8 128 3 2>/dev/null
  DTYPE=bf16 "$PYTHON" scripts/reference_bench.py generate "$MODEL" bench/prompts.jsonl 16 64 2>/dev/null
fi
