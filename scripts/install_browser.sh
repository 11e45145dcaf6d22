#!/usr/bin/env bash
# Install what the browser test (tests/e2e/test_browser.py) needs, idempotent and quiet:
#   * Debian's `chromium` at /usr/bin/chromium (apt-get, as root) when it is missing;
#   * npm `playwright-core` (pinned in tests/e2e/browser/package-lock.json) via `npm ci`, which
#     never downloads a browser of its own (the script passes executablePath=/usr/bin/chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
CHROMIUM=${ADCLICK_CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install_browser.sh: $CHROMIUM is missing; run as root or: sudo apt-get install -y chromium" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  log=$(mktemp)
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; } >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
fi
if ! command -v npm >/dev/null; then
  echo "install_browser.sh: npm (Node.js >= 18) is needed for playwright-core" >&2
  exit 1
fi
cd tests/e2e/browser
lock_sum=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ -f node_modules/.adclick-lock-sha256 ] && [ "$(cat node_modules/.adclick-lock-sha256)" = "$lock_sum" ]; then
  echo "browser test dependencies already installed ($("$CHROMIUM" --version 2>/dev/null | head -1))"
  exit 0
fi
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error
echo "$lock_sum" > node_modules/.adclick-lock-sha256
echo "browser test dependencies installed ($("$CHROMIUM" --version 2>/dev/null | head -1))"
