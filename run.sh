#!/usr/bin/env bash
# Set up (first time) and start the dashboard. Capture needs root: this re-runs itself with sudo.
# Extra arguments go to the dashboard, e.g.  ./run.sh --iface eth0 --filter 'tcp port 443'
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" != 0 ] && [ -z "${NTM_NO_SUDO:-}" ]; then
  exec sudo --preserve-env=PATH "$0" "$@"
fi
scripts/setup.sh
exec .venv/bin/streamlit run dashboard.py -- "$@"
