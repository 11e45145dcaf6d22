#!/usr/bin/env bash
# Install everything (project venv + Label Studio's own venv for the end-to-end tests + headless
# Chromium and playwright-core for the browser test) and run the
# test suite. Extra arguments go to pytest. Benchmarks are separate: `pytest -m benchmark -s`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/install_label_studio.sh
bash scripts/install_browser.sh   # Debian chromium + npm playwright-core for tests/e2e/test_browser.py
bash scripts/install_redis.sh     # Debian redis-server for tests/reliability/test_scale_out.py
. .venv/bin/activate
exec python -m pytest -q -m "not benchmark" "$@"
