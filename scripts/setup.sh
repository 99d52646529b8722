#!/usr/bin/env bash
# Install what Network Traffic Monitor needs on Debian/Ubuntu: system packages, then .venv with requirements.
# Usage: scripts/setup.sh [--test]   (--test adds the tools the test suite drives: tshark, chromium, nmap...)
set -euo pipefail
cd "$(dirname "$0")/.."

APT_RUN="libpcap0.8 libpcap0.8-dev iproute2 python3-venv libcap2-bin gcc libc6-dev"
APT_TEST="iputils-ping openssl tcpdump tshark util-linux chromium chromium-driver nmap hping3 curl tcpreplay dnsmasq libwireshark-data clickhouse-server clickhouse-client"
want="$APT_RUN"
[ "${1:-}" = "--test" ] && want="$want $APT_TEST"

missing=""
for pkg in $want; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  echo "== apt-get install$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# Debian's interpreter first: after the privilege drop the dashboard runs as an unprivileged user,
# who must be able to read the interpreter the venv points at (a pyenv under /root is mode 700).
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  PY=python3
  if [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    PY=/usr/bin/python3
  fi
fi
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
if ! cmp -s requirements.txt .venv/.requirements.installed 2>/dev/null; then
  echo "== pip install -r requirements.txt"
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  cp requirements.txt .venv/.requirements.installed
fi
# The compiled helpers (native/*.c) are built now rather than at the first capture file; without a
# compiler the Python versions run instead, with the same results.
.venv/bin/python -c "import native; print('== compiled helpers:', 'built' if native.available() else 'not available (the Python versions run)')"
