#!/usr/bin/env bash
# Installs Debian's Chromium and ChromeDriver for the labelling app's browser test (and
# scripts/check_report.sh) when they are missing. Needs root and apt; idempotent.
set -euo pipefail
if command -v chromedriver >/dev/null && command -v chromium >/dev/null; then exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install chromium and chromium-driver (Debian packages) for the browser test" >&2
  exit 1
fi
echo "installing chromium and chromium-driver" >&2
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
