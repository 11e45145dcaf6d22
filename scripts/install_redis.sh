#!/usr/bin/env bash
# Debian's redis-server for the scale-out test (tests/reliability/test_scale_out.py starts its own on
# 127.0.0.1 and stops it after). Nothing to do where it is installed already.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1 || [ -x /usr/sbin/redis-server ] || [ -x /usr/bin/redis-server ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q >/dev/null
$SUDO apt-get install -y -q --no-install-recommends redis-server >/dev/null
redis-server --version
