#!/usr/bin/env bash
# Renders RUN_DIR/report.html in headless Chromium and saves a screenshot, to check the page and
# its plots display in a browser. Needs Debian's chromium (apt-get install chromium).
# Usage: scripts/check_report.sh RUN_DIR [OUT.png]
set -euo pipefail
DIR=${1:?usage: scripts/check_report.sh RUN_DIR [OUT.png]}
OUT=${2:-$DIR/report.png}
[ -f "$DIR/report.html" ] || { echo "$DIR/report.html missing: run preftune report $DIR" >&2; exit 1; }
PROFILE=$(mktemp -d)
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$PROFILE" --window-size=1200,2400 --screenshot="$OUT" \
  "file://$(realpath "$DIR/report.html")" 2>/dev/null
rm -rf "$PROFILE"
[ -s "$OUT" ] && echo "$OUT"
