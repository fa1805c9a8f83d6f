#!/usr/bin/env bash
# The project's test command (README; .ci/run calls exactly this): fetch the real assets (cached,
# sha256-checked), then run every test in the workspace. Real-model tests fail under CI=true when
# the assets are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh >/dev/null
cargo test --workspace
