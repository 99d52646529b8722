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
if ! cat requirements.txt constraints.txt | cmp -s - .venv/.requirements.installed 2>/dev/null; then
  echo "== pip install -r requirements.txt (within constraints.txt)"
  .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -r requirements.txt
  cat requirements.txt constraints.txt >.venv/.requirements.installed
fi
# The compiled helpers (native/*.c) are built now rather than at the first capture file; without a
# compiler the Python versions run instead, with the same results.
.venv/bin/python -c "import native; print('== compiled helpers:', 'built' if native.available() else 'not available (the Python versions run)')"

# The project's own bytecode, as pip does for the packages: a start (the `summary` command, the detector
# worker) then loads it instead of compiling every module, ~40-60 ms, also where PYTHONDONTWRITEBYTECODE is set.
# Python checks each file's timestamp, so a source changed later is compiled afresh, never run stale.
.venv/bin/python -m compileall -q -j 0 analysis capture enrich fleet investigate native notify store ./*.py ||
  echo "== bytecode: some files were left to be compiled when imported"

# AS numbers (enrich/asn.py): no PyPI package ships an IP-to-AS-number table, so the npm registry's
# ip-location-db 'asn' package (CC BY 4.0) is fetched here, at install time; nothing is
# downloaded at run time. Pinned: its version is the database's date (2.3.YYYYMMDDHH).
ASN_PKG="@ip-location-db/asn@2.3.2026061719"
ASN_SHA256=b9425daf2f011c28f8586685d4f89166e77627e2c15fd93c6262c3e2dead6153
ASN_DIR=data/ip-location-db-asn
if [ "$(cat "$ASN_DIR/.installed" 2>/dev/null)" != "$ASN_PKG" ]; then
  echo "== $ASN_PKG (npm registry) -> $ASN_DIR"
  # The npm registry's tarball, fetched directly (no need to install npm and its hundreds of Debian
  # packages), checked against the pinned SHA-256 of that version.
  url="https://registry.npmjs.org/@ip-location-db/asn/-/asn-${ASN_PKG##*@}.tgz"
  tmp=$(mktemp -d)
  .venv/bin/python - "$url" "$tmp/asn.tgz" "$ASN_SHA256" <<'PY'
import hashlib, sys, urllib.request
url, dest, want = sys.argv[1:]
data = urllib.request.urlopen(url, timeout=120).read()
got = hashlib.sha256(data).hexdigest()
if got != want:
    sys.exit(f"{url}: SHA-256 {got}, expected {want}: not installed")
open(dest, "wb").write(data)
PY
  (cd "$tmp" && tar xzf asn.tgz)
  # 0755 explicitly (data/ too): the dashboard reads these files as `nobody` after the privilege drop,
  # and mkdir -p under a umask of 077 would make folders only root can enter.
  mkdir -p "$ASN_DIR"
  chmod 755 "$(dirname "$ASN_DIR")" "$ASN_DIR"
  for f in asn-ipv4-num.csv asn-ipv6-num.csv package.json DBIP-LICENSE ROUTEVIEWS-LICENSE NRO_LICENSE MODIFICATIONS; do
    install -m 644 "$tmp/package/$f" "$ASN_DIR/$f"
  done
  rm -rf "$tmp"
  echo "$ASN_PKG" > "$ASN_DIR/.installed"
fi
