#!/usr/bin/env bash
# Create .lsvenv (its own virtualenv, so Label Studio's pins never fight ours) with
# label-studio==1.23.2 and the exact dependency set in label_studio_constraints.txt, used by the
# end-to-end tests. Idempotent and quiet: does nothing when .lsvenv was installed from the same
# version and constraints.
set -euo pipefail
cd "$(dirname "$0")/.."
LS_VERSION=${LS_VERSION:-1.23.2}
PY=${PYTHON:-python3}
CONSTRAINTS=scripts/label_studio_constraints.txt
STAMP=.lsvenv/.installed-from
want="$LS_VERSION $(sha256sum "$CONSTRAINTS" | cut -d' ' -f1)"
if [ -x .lsvenv/bin/label-studio ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  echo "label-studio $LS_VERSION already in .lsvenv"
  exit 0
fi
if [ ! -x .lsvenv/bin/python ]; then
  "$PY" -m venv .lsvenv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
log=$(mktemp)
if ! .lsvenv/bin/pip install -q -c "$CONSTRAINTS" "label-studio==$LS_VERSION" >"$log" 2>&1; then
  cat "$log" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
echo "$want" >"$STAMP"
.lsvenv/bin/python -c "import importlib.metadata as m; print('label-studio', m.version('label-studio'), 'installed in .lsvenv')"
