"""Helpers for the store tests: crafted packed records and a rollup over a fresh store."""

from __future__ import annotations

import ipaddress

import numpy as np

from analysis.headers import PACKET_DTYPE


def addr(text: str) -> bytes:
    """16-byte address key (IPv4 as ::ffff:a.b.c.d), as the parser stores it."""
    ip = ipaddress.ip_address(text)
    if ip.version == 4:
        return b"\0" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def records(rows: list[dict], dtype: np.dtype = PACKET_DTYPE) -> np.ndarray:
    """Packed records from dicts (ts, src, dst, sport, dport, cls, wire_len, ... ); sensible defaults."""
    arr = np.zeros(len(rows), dtype)
    for i, r in enumerate(rows):
        cls = r.get("cls", 1)
        arr[i]["ts"] = r["ts"]
        arr[i]["wire_len"] = r.get("wire_len", 100)
        arr[i]["cap_len"] = r.get("cap_len", r.get("wire_len", 100))
        arr[i]["cls"] = cls
        arr[i]["ipver"] = r.get("ipver", 0 if cls == 5 else (6 if ":" in r.get("src", "") else 4))
        arr[i]["proto"] = r.get("proto", {0: 6, 1: 17, 2: 1, 3: 58, 4: 47, 5: -1}[cls])
        arr[i]["ethertype"] = r.get("ethertype", 0x86DD if arr[i]["ipver"] == 6 else 0x0800)
        arr[i]["src"] = addr(r.get("src", "10.1.0.1"))
        arr[i]["dst"] = addr(r.get("dst", "10.1.0.2"))
        arr[i]["sport"] = r.get("sport", 1000 if cls < 2 else -1)
        arr[i]["dport"] = r.get("dport", 2000 if cls < 2 else -1)
        arr[i]["tcp_flags"] = r.get("tcp_flags", 0)
        arr[i]["icmp_type"] = r.get("icmp_type", 8 if cls in (2, 3) else -1)
        arr[i]["icmp_code"] = r.get("icmp_code", 0 if cls in (2, 3) else -1)
        arr[i]["arp_op"] = r.get("arp_op", 0)
        arr[i]["hw_src"] = r.get("hw_src", b"")
        arr[i]["direction"] = r.get("direction", 2)
        if "vlan" in (dtype.names or ()):
            arr[i]["vlan"] = r.get("vlan", 0)
    return arr


def udp_burst(t0: float, n: int, src: str = "10.1.0.1", dst: str = "10.1.0.2", dport: int = 2000,
              wire_len: int = 100, spacing: float = 0.001) -> np.ndarray:
    """n UDP packets src -> dst:dport starting at t0, `spacing` s apart (vectorised)."""
    arr = records([{"ts": t0, "src": src, "dst": dst, "dport": dport, "wire_len": wire_len}])
    out = np.repeat(arr, n)
    out["ts"] = t0 + np.arange(n) * spacing
    return out
