#!/usr/bin/env bash
# Let an unprivileged user capture with this project's venv, instead of running it as root.
# Usage: sudo scripts/grant_capture.sh [VENV]        (default: .venv; --revoke [VENV] undoes it)
#
# Capture needs CAP_NET_RAW and nothing else: the socket, its filter, the ring, bind and promiscuous mode
# (PACKET_ADD_MEMBERSHIP, as libpcap does it) all work with it alone (tests/test_privilege.py shows it,
# as user nobody with only that capability). File capabilities belong to a
# binary, and a venv's python is usually a symlink to the system's (or pyenv's) interpreter: giving
# that binary the capability would let every Python script on the machine sniff the network. So the
# venv gets its own copy of the interpreter, and only the copy gets the capability.
set -euo pipefail
cd "$(dirname "$0")/.."
revoke=0
if [ "${1:-}" = "--revoke" ]; then revoke=1; shift; fi
venv=${1:-.venv}
py="$venv/bin/python3"
[ -e "$py" ] || { echo "no interpreter at $py: run scripts/setup.sh first" >&2; exit 1; }
if [ "$revoke" = 1 ]; then
  setcap -r "$(readlink -f "$py")" 2>/dev/null || true
  echo "capabilities removed from $(readlink -f "$py")"
  exit 0
fi
if [ -L "$py" ]; then
  real=$(readlink -f "$py")
  cp --remove-destination "$real" "$py"  # the venv's own copy; pyvenv.cfg still names the stdlib
fi
setcap cap_net_raw+eip "$py"
getcap "$py"
echo "Anyone who can run $py can now capture; restrict it with chmod/chgrp if the machine is shared."
