#!/usr/bin/env bash
# Install everything (project venv + Label Studio's own venv for the end-to-end tests) and run the
# test suite. Extra arguments go to pytest. Benchmarks are separate: `pytest -m benchmark -s`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/install_label_studio.sh
. .venv/bin/activate
exec python -m pytest -q -m "not benchmark" "$@"
