"""The network card's and driver's own receive-loss counters, apart from the capture ring's drops.

A packet the NIC or its driver drops (no receive buffer, FIFO overrun, a frame the stack would
not take) never reaches any capture socket, so the ring's drop count cannot include it. Linux
exposes the driver's counters in /sys/class/net/IF/statistics; the engine shows their growth
since the capture started.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

SYSFS = "/sys/class/net"
NIC_COUNTERS = ("rx_dropped", "rx_missed_errors", "rx_fifo_errors")


def _read_counters(iface: str, root: str) -> dict[str, int] | None:
    out = {}
    for name in NIC_COUNTERS:
        try:
            with open(os.path.join(root, iface, "statistics", name), "rb") as f:
                out[name] = int(f.read().strip() or 0)
        except (OSError, ValueError):
            return None
    return out


def nic_counters(iface: str, root: str | None = None) -> dict[str, int] | None:
    """The interface's rx_dropped, rx_missed_errors and rx_fifo_errors (for 'any': summed over every
    interface); None when the interface or its statistics are not there. root: SYSFS (read at each
    call, so a test can point the engine at a tree of its own)."""
    root = SYSFS if root is None else root
    if iface == "any":
        try:
            names = sorted(os.listdir(root))
        except OSError:
            return None
        total = dict.fromkeys(NIC_COUNTERS, 0)
        found = False
        for name in names:
            one = _read_counters(name, root)
            if one is not None:
                found = True
                for key, value in one.items():
                    total[key] += value
        return total if found else None
    if not iface or "/" in iface or iface in (".", ".."):
        return None
    return _read_counters(iface, root)


def nic_dropped_since(base: dict[str, int] | None, now: dict[str, int] | None) -> int | None:
    """Packets the NIC/driver lost between two readings (None when either is unknown).

    The three counters overlap on some drivers (a FIFO overrun may also count as missed), so the
    sum can overstate; it never understates. A counter that went down (the interface was
    recreated) counts from zero."""
    if base is None or now is None:
        return None
    total = 0
    for key in NIC_COUNTERS:
        delta = now.get(key, 0) - base.get(key, 0)
        total += delta if delta >= 0 else now.get(key, 0)
    return total
