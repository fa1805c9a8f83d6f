#!/usr/bin/env bash
# `preftune serve` against the official openai Python client (installed into .venv-openai from
# PyPI), curl and a 32-client load test. Prints the results as one JSON line.
#   scripts/test-openai-client.sh [MODEL] [--clients N] [--max-tokens N]
# MODEL defaults to the tiny test model; pass SmolLM2-135M-Instruct for real throughput figures.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-fixtures/models/tiny-llama}
shift || true
cargo build --release -p preftune-cli >&2
[ -x .venv-openai/bin/python ] || { python3 -m venv .venv-openai && .venv-openai/bin/pip install -q 'openai==1.*'; }
KEYS=$(mktemp); PORT=$((20000 + RANDOM % 20000))
KEY="test-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
echo "$KEY" > "$KEYS"
target/release/preftune serve --model "$MODEL" --bind "127.0.0.1:$PORT" --api-key-file "$KEYS" 2>/dev/null &
PID=$!
trap 'kill $PID 2>/dev/null; rm -f "$KEYS"' EXIT
for _ in $(seq 100); do curl -s "127.0.0.1:$PORT" >/dev/null && break; sleep 0.2; done
.venv-openai/bin/python scripts/test-openai-client.py "http://127.0.0.1:$PORT/v1" "$KEY" "$@"
