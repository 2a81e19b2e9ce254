#!/usr/bin/env bash
# Installs what the headless-browser check of the page needs: Debian's chromium and
# playwright-core (the library only; it drives the system chromium, no browser download).
set -euo pipefail
cd "$(dirname "$0")"
if ! [ -x /usr/bin/chromium ]; then
  apt-get update -qq
  apt-get install -y -qq chromium
fi
npm install --no-audit --no-fund --silent
