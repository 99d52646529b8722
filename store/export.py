"""Exports people open elsewhere: CSV and Parquet of a range's series, conversations and alerts,
and a pcap of packet headers synthesised from the engine's packed records (which hold no payload)."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.headers import ICMP, ICMPV6, NON_IP, TCP, UDP
from store.base import SECOND_VALUES, Store
from store.history import conversations, time_range

# -- tables ----------------------------------------------------------------------------


def seconds_frame(store: Store, since: Any = None, until: Any = None, sensor: str | None = None,
                  bin_s: int = 1) -> pd.DataFrame:
    """The per-second (or per-bin) series of the range: bin start `t` (epoch s), UTC time, every counter."""
    df = store.series(time_range(since, until, sensor), bin_s, tuple(SECOND_VALUES))
    df.insert(1, "time", pd.to_datetime(df["t"], unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
    return df


def conversations_frame(store: Store, since: Any = None, until: Any = None, sensor: str | None = None,
                        n: int = 1_000_000) -> pd.DataFrame:
    """The range's conversations (both directions together, per VLAN), most bytes first."""
    rows = conversations(store, since, until, sensor, n=n)
    cols = ["a", "a_port", "b", "b_port", "proto", "vlan", "packets", "bytes", "first_ts", "last_ts"]
    df = pd.DataFrame(rows, columns=cols)
    for c in ("a_port", "b_port"):
        df[c] = df[c].astype("Int32")
    return df


def alerts_frame(store: Store, since: Any = None, until: Any = None, sensor: str | None = None) -> pd.DataFrame:
    """The range's alerts with their evidence, newest first."""
    return store.alerts(time_range(since, until, sensor)).reset_index(drop=True)


def to_csv(df: pd.DataFrame) -> bytes:
    """A DataFrame as CSV bytes (a download button's data)."""
    return df.to_csv(index=False).encode()


def to_parquet(df: pd.DataFrame) -> bytes:
    """A DataFrame as Parquet bytes (pyarrow)."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False, engine="pyarrow")
    return buf.getvalue()


def export_range(store: Store, folder: str, since: Any = None, until: Any = None, sensor: str | None = None,
                 fmt: str = "csv") -> dict[str, str]:
    """Write seconds, conversations and alerts of the range as `fmt` (csv or parquet) files; their paths."""
    out = {}
    write = to_csv if fmt == "csv" else to_parquet
    Path(folder).mkdir(parents=True, exist_ok=True)
    for name, make in (("seconds", seconds_frame), ("conversations", conversations_frame),
                       ("alerts", alerts_frame)):
        path = str(Path(folder) / f"{name}.{fmt}")
        Path(path).write_bytes(write(make(store, since, until, sensor)))
        out[name] = path
    return out


# -- header-only pcap ------------------------------------------------------------------

PCAP_NS_MAGIC = 0xA1B23C4D  # nanosecond timestamps
LINKTYPE_ETHERNET = 1
HEADER_SNAPLEN = 128  # Ethernet + 802.1Q + IPv6 + TCP is 78 bytes: every synthesised frame fits
ETH_SRC_DEFAULT = bytes.fromhex("020000000001")
ETH_DST = bytes.fromhex("020000000002")


def _checksum(data: bytes) -> int:
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _transport(r: Any, cls: int, no_l4: bool) -> bytes:
    if no_l4:
        return b""
    if cls == TCP:
        flags = int(r["tcp_flags"])
        return struct.pack("!HHIIBBHHH", int(r["sport"]), int(r["dport"]), 0, 0, (5 << 4) | ((flags >> 8) & 1),
                           flags & 0xFF, 0, 0, 0)
    if cls == UDP:
        return struct.pack("!HHHH", int(r["sport"]), int(r["dport"]), 8, 0)
    if cls in (ICMP, ICMPV6):
        return struct.pack("!BBHI", int(r["icmp_type"]) & 0xFF, int(r["icmp_code"]) & 0xFF, 0, 0)
    return b""


def _missing_l4(r: Any, cls: int) -> bool:
    """No transport fields were parsed (a later fragment, or a cut header): the frame stops at IP."""
    if cls in (TCP, UDP):
        return int(r["sport"]) < 0
    if cls in (ICMP, ICMPV6):
        return int(r["icmp_type"]) < 0
    return False


def _ip(r: Any, cls: int, wire_rest: int) -> bytes:
    no_l4 = _missing_l4(r, cls)
    l4 = _transport(r, cls, no_l4)
    proto = int(r["proto"]) & 0xFF
    src, dst = bytes(r["src"]).ljust(16, b"\0"), bytes(r["dst"]).ljust(16, b"\0")
    if int(r["ipver"]) == 6:
        payload = min(0xFFFF, max(len(l4), wire_rest - 40))
        if cls == UDP and l4:
            l4 = l4[:4] + struct.pack("!H", payload) + l4[6:]
        return struct.pack("!IHBB", 6 << 28, payload, proto, 64) + src + dst + l4
    total = min(0xFFFF, max(20 + len(l4), wire_rest))
    if cls == UDP and l4:
        l4 = l4[:4] + struct.pack("!H", max(8, total - 20)) + l4[6:]
    frag = 1 if no_l4 else 0  # offset 8 bytes: tshark then expects no transport header, as the record says
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, frag, 64, proto, 0, src[12:], dst[12:])
    head = head[:10] + struct.pack("!H", _checksum(head)) + head[12:]
    return head + l4


def _arp(r: Any) -> bytes:
    hw = bytes(r["hw_src"]).ljust(6, b"\0")[:6]
    return struct.pack("!HHBBH", 1, 0x0800, 6, 4, int(r["arp_op"])) + hw + bytes(r["src"])[12:16] + \
        bytes(6) + bytes(r["dst"])[12:16]


def header_frame(r: Any, vlan: int = 0) -> bytes:
    """One record as an Ethernet frame cut after its transport header (no payload)."""
    hw = bytes(r["hw_src"])
    eth = ETH_DST + (hw if len(hw) == 6 and any(hw) else ETH_SRC_DEFAULT)
    tag = struct.pack("!HH", 0x8100, vlan & 0x0FFF) if vlan else b""
    cls = int(r["cls"])
    wire_rest = int(r["wire_len"]) - 14 - len(tag)
    if cls == NON_IP:
        et = int(r["ethertype"])
        body = _arp(r) if et == 0x0806 and int(r["arp_op"]) else b""
        return eth + tag + struct.pack("!H", et) + body
    ip = _ip(r, cls, wire_rest)
    return eth + tag + struct.pack("!H", 0x86DD if int(r["ipver"]) == 6 else 0x0800) + ip


def header_pcap(records: np.ndarray) -> bytes:
    """A pcap (nanosecond, Ethernet, snap length HEADER_SNAPLEN) with one header-only frame per record.

    Each frame's original length is the packet's wire length (at least the synthesised length),
    so tools show the frames as cut by the snap length, which they are."""
    out = [struct.pack("<IHHiIII", PCAP_NS_MAGIC, 2, 4, 0, 0, HEADER_SNAPLEN, LINKTYPE_ETHERNET)]
    has_vlan = "vlan" in (records.dtype.names or ())
    for r in records:
        frame = header_frame(r, int(r["vlan"]) if has_vlan else 0)
        ns = round(float(r["ts"]) * 1e9)
        out.append(struct.pack("<IIII", ns // 1_000_000_000, ns % 1_000_000_000, len(frame),
                               max(int(r["wire_len"]), len(frame))))
        out.append(frame)
    return b"".join(out)
