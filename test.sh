#!/usr/bin/env bash
# Set up (first time) and run every check: ruff, then the whole test suite (live capture, namespaces, browser).
# Live capture and network namespaces need root: this re-runs itself with sudo.
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" != 0 ]; then
  exec sudo --preserve-env=PATH,CI "$0" "$@"
fi
scripts/setup.sh --test
echo "== ruff check"
.venv/bin/ruff check .
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
