#!/usr/bin/env bash
# The project's test command (README; .ci/run calls exactly this): fetch the real assets (cached,
# sha256-checked) and, under CI=true, install the browser for the labelling app's browser test;
# then run every test in the workspace. Real-model and browser tests fail under CI=true when the
# assets or the browser are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh >/dev/null
if [ "${CI:-}" = true ]; then scripts/install-browser.sh; fi
cargo test --workspace
