"""Seeded generator of a hostile, many-flow traffic mix whose every address is loopback.

Writes a classic pcap (Ethernet, microsecond timestamps) of N frames built from a few byte
templates patched with numpy (no per-packet Scapy), so 1,500,000 frames take seconds. Every IPv4
address is in 127.0.0.0/8 and every IPv6 address is ::1, so the file may be replayed onto `lo`.
The frames carry locally administered MAC addresses (02:6e:74:6d:...), which `lo` does not own:
the kernel drops them as "other host" after capturers saw them, so a replay provokes no replies,
and a capture filter on the source MAC isolates the replay from other traffic on `lo`.

The mix, as shares of packets (ask for others with --mix):
  scan   TCP SYN probes from a few scanners to random ports, answered by RST-ACK (80 %) or not
  flow   short TCP flows: SYN, SYN-ACK, ACK, FIN-ACK, FIN-ACK, ACK with random ports
  dns    UDP DNS query + answer (port 53)
  udp    other UDP, random ports, 0-1200 bytes of payload
  icmp   ICMP echo request + reply
  ipv6   over ::1: TCP SYN + RST-ACK, UDP, ICMPv6 echo request + reply
  vlan   802.1Q-tagged IPv4: UDP and TCP SYN

IPv4 header, TCP, UDP and ICMP checksums are correct. The generator is independent of
benchmarks/common.py on purpose: a second, differently built mix.

    python benchmarks/mixgen.py OUT.pcap [-n 1500000] [--seed 1] [--mix scan=30,flow=25,...]
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_MIX = {"scan": 30, "flow": 25, "dns": 10, "udp": 10, "icmp": 5, "ipv6": 10, "vlan": 10}
SRC_MAC = bytes.fromhex("026e746d0001")  # the capture filter `ether src 02:6e:74:6d:00:01` isolates a replay
DST_MAC = bytes.fromhex("026e746d0002")
SRC_MAC_TEXT = "02:6e:74:6d:00:01"
SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04
UDP_SIZES = (0, 18, 100, 512, 1200)


@dataclass(frozen=True)
class Template:
    """One frame shape: its bytes and where the patched fields are."""

    frame: bytes
    ip: int  # offset of the IP header
    l4: int  # offset of the transport header
    v6: bool
    proto: int  # 6, 17, 1, 58


def _eth(ethertype: int, vlan: int | None = None) -> bytes:
    if vlan is None:
        return DST_MAC + SRC_MAC + struct.pack("!H", ethertype)
    return DST_MAC + SRC_MAC + struct.pack("!HHH", 0x8100, vlan, ethertype)


def _ip4(proto: int, l4_len: int) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + l4_len, 0, 0x4000, 64, proto, 0,
                       b"\x7f\0\0\1", b"\x7f\0\0\1")


def _ip6(nxt: int, l4_len: int) -> bytes:
    one = b"\0" * 15 + b"\1"
    return struct.pack("!IHBB16s16s", 0x60000000, l4_len, nxt, 64, one, one)


def _tcp() -> bytes:
    return struct.pack("!HHIIBBHHH", 0, 0, 0, 0, 0x50, 0, 65535, 0, 0)


def _udp(payload: bytes) -> bytes:
    return struct.pack("!HHHH", 0, 0, 8 + len(payload), 0) + payload


def _dns(answer: bool) -> bytes:
    q = b"\x03www\x07example\x04test\x00\x00\x01\x00\x01"
    if not answer:
        return struct.pack("!HHHHHH", 0, 0x0100, 1, 0, 0, 0) + q
    rr = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x01\x2c\x00\x04\x7f\x00\x00\x35"
    return struct.pack("!HHHHHH", 0, 0x8180, 1, 1, 0, 0) + q + rr


def _template(l4: bytes, proto: int, v6: bool = False, vlan: int | None = None) -> Template:
    eth = _eth(0x86DD if v6 else 0x0800, vlan)
    ip = _ip6(proto, len(l4)) if v6 else _ip4(proto, len(l4))
    return Template(eth + ip + l4, len(eth), len(eth) + len(ip), v6, proto)


def templates() -> dict[str, Template]:
    """Every frame shape of the mix, by name."""
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0, 0) + bytes(range(56))
    icmp6 = struct.pack("!BBHHH", 128, 0, 0, 0, 0) + bytes(range(56))
    out = {
        "tcp": _template(_tcp(), 6),
        "dnsq": _template(_udp(_dns(False)), 17),
        "dnsr": _template(_udp(_dns(True)), 17),
        "icmp": _template(icmp, 1),
        "tcp6": _template(_tcp(), 6, v6=True),
        "udp6": _template(_udp(b"\0" * 64), 17, v6=True),
        "icmp6": _template(icmp6, 58, v6=True),
        "vtcp": _template(_tcp(), 6, vlan=7),
        "vudp": _template(_udp(b"\0" * 100), 17, vlan=7),
    }
    for size in UDP_SIZES:
        out[f"udp{size}"] = _template(_udp(bytes(size)), 17)
    return out


# ---- units: each kind of traffic is a sequence of short exchanges ("units") of fixed shape ----
# (name, [(template, direction 0 = forward / 1 = reply, tcp flags or icmp type)])
UNITS = {
    "scan": [("probe", [("tcp", 0, SYN), ("tcp", 1, RST | ACK)]), ("probe-unanswered", [("tcp", 0, SYN)])],
    "flow": [("flow", [("tcp", 0, SYN), ("tcp", 1, SYN | ACK), ("tcp", 0, ACK), ("tcp", 0, FIN | ACK),
                       ("tcp", 1, FIN | ACK), ("tcp", 0, ACK)])],
    "dns": [("dns", [("dnsq", 0, 0), ("dnsr", 1, 0)])],
    "udp": [(f"udp{s}", [(f"udp{s}", 0, 0)]) for s in UDP_SIZES],
    "icmp": [("echo", [("icmp", 0, 8), ("icmp", 1, 0)])],
    "ipv6": [("syn6", [("tcp6", 0, SYN), ("tcp6", 1, RST | ACK)]), ("udp6", [("udp6", 0, 0)]),
             ("echo6", [("icmp6", 0, 128), ("icmp6", 1, 129)])],
    "vlan": [("vudp", [("vudp", 0, 0)]), ("vtcp", [("vtcp", 0, SYN)])],
}
UNIT_WEIGHTS = {"probe": 4, "probe-unanswered": 1}  # 80 % of probes answered; others equal within a kind


def parse_mix(text: str) -> dict[str, float]:
    """'scan=30,flow=25' -> shares of packets; kinds not named get 0."""
    mix = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in UNITS:
            raise SystemExit(f"unknown kind {name!r}; kinds: {', '.join(UNITS)}")
        mix[name] = float(value)
    return mix


def _unit_table(mix: dict[str, float]) -> tuple[list[tuple[str, str, list]], np.ndarray]:
    """Every unit shape and the probability of drawing it, so that packets come out in the asked shares."""
    shapes, probs = [], []
    total = sum(mix.values())
    for kind, share in mix.items():
        if share <= 0:
            continue
        units = UNITS[kind]
        w = np.array([UNIT_WEIGHTS.get(name, 1) for name, _ in units], dtype=float)
        w /= w.sum()
        mean_len = sum(wi * len(steps) for wi, (_, steps) in zip(w, units))
        for wi, (name, steps) in zip(w, units):
            shapes.append((kind, name, steps))
            probs.append(share / total * wi / mean_len)  # units per packet of this share
    p = np.array(probs)
    return shapes, p / p.sum()


def _checksum(words: np.ndarray) -> np.ndarray:
    """Internet checksum of each row of big-endian 16-bit words (uint32 sums, folded)."""
    s = words.astype(np.uint64).sum(axis=1)
    while (s >> 16).any():
        s = (s & 0xFFFF) + (s >> 16)
    return (~s & 0xFFFF).astype(">u2")


def _be16(rows: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Columns lo:hi of a uint8 row array as big-endian 16-bit words (hi - lo even)."""
    return np.ascontiguousarray(rows[:, lo:hi]).view(">u2").astype(np.uint32)


def _put16(rows: np.ndarray, off: int, values: np.ndarray) -> None:
    rows[:, off:off + 2] = values.astype(">u2").view(np.uint8).reshape(-1, 2)


def _put32(rows: np.ndarray, off: int, values: np.ndarray) -> None:
    rows[:, off:off + 4] = values.astype(">u4").view(np.uint8).reshape(-1, 4)


def _fill(t: Template, f: dict[str, np.ndarray]) -> np.ndarray:
    """Rows of template `t` with the per-packet fields patched in and every checksum set."""
    n = len(f["sport"])
    rows = np.tile(np.frombuffer(t.frame, dtype=np.uint8), (n, 1))
    ip, l4 = t.ip, t.l4
    if t.v6:
        pseudo = np.full(n, 2, dtype=np.uint64)  # the pseudo-header's two ::1 addresses: their words sum to 2
    else:
        _put16(rows, ip + 4, f["ip_id"])
        _put32(rows, ip + 12, f["src"])
        _put32(rows, ip + 16, f["dst"])
        _put16(rows, ip + 10, _checksum(_be16(rows, ip, ip + 20)))
        pseudo = _be16(rows, ip + 12, ip + 20).sum(axis=1).astype(np.uint64)
    length = len(t.frame) - l4
    if t.proto in (6, 17):
        _put16(rows, l4, f["sport"])
        _put16(rows, l4 + 2, f["dport"])
    if t.proto == 6:
        _put32(rows, l4 + 4, f["seq"])
        _put32(rows, l4 + 8, f["ack"])
        rows[:, l4 + 13] = f["flags"]
    elif t.proto == 17 and "txid" in f and len(t.frame) - l4 > 10:
        _put16(rows, l4 + 8, f["txid"])
    elif t.proto in (1, 58):
        rows[:, l4] = f["flags"]  # the ICMP type
        _put16(rows, l4 + 4, f["sport"])  # identifier
        _put16(rows, l4 + 6, f["dport"])  # sequence
    body = rows[:, l4:]
    if length % 2:
        body = np.concatenate([body, np.zeros((n, 1), np.uint8)], axis=1)
    words = np.ascontiguousarray(body).view(">u2").astype(np.uint64).sum(axis=1)
    if t.proto != 1:  # ICMPv4 has no pseudo-header
        words = words + pseudo + t.proto + length
    csum_off = {6: 16, 17: 6, 1: 2, 58: 2}[t.proto]
    csum = _checksum(words[:, None])
    if t.proto == 17:
        csum[csum == 0] = 0xFFFF  # RFC 768: a UDP checksum of 0 means "none", so 0 is sent as all ones
    _put16(rows, l4 + csum_off, csum)
    return rows


Parts = list[tuple[np.ndarray, np.ndarray]]


def generate(n: int, seed: int = 1, mix: dict[str, float] | None = None) -> tuple[Parts, dict[str, int]]:
    """The mix as (packet indices, frame rows) per template, and the packets per kind."""
    rng = np.random.default_rng(seed)
    shapes, probs = _unit_table(mix or DEFAULT_MIX)
    lens = np.array([len(s[2]) for s in shapes])
    n_units = int(n / (lens * probs).sum() * 1.05) + 16
    unit_shape = rng.choice(len(shapes), size=n_units, p=probs)
    ends = np.cumsum(lens[unit_shape])
    n_units = int(np.searchsorted(ends, n, side="left")) + 1
    unit_shape = unit_shape[:n_units]
    # Per-unit fields: two loopback hosts, ports, sequence numbers, ids.
    scanners = 0x7F000000 | rng.integers(1, 1 << 24, size=8, dtype=np.uint32)
    u_src = 0x7F000000 | rng.integers(1, 1 << 24, size=n_units, dtype=np.uint32)
    u_dst = 0x7F000000 | rng.integers(1, 1 << 24, size=n_units, dtype=np.uint32)
    is_scan = np.array([s[0] == "scan" for s in shapes])[unit_shape]
    u_src[is_scan] = scanners[rng.integers(0, 8, size=int(is_scan.sum()))]
    u_dst[is_scan] = scanners[rng.integers(0, 8, size=int(is_scan.sum()))] ^ 0x00FF0000  # 8 scanned hosts
    u_sport = rng.integers(1024, 65536, size=n_units, dtype=np.uint32)
    u_dport = rng.integers(1, 65536, size=n_units, dtype=np.uint32)
    dns = np.array([s[0] == "dns" for s in shapes])[unit_shape]
    u_dport[u_dport == 53] = 54  # port 53 belongs to the dns kind alone, so a reader can tell the kinds apart
    u_dport[dns] = 53
    u_seq = rng.integers(0, 1 << 32, size=n_units, dtype=np.uint64)
    u_ack = rng.integers(0, 1 << 32, size=n_units, dtype=np.uint64)
    u_id = rng.integers(0, 1 << 16, size=n_units, dtype=np.uint32)
    # Packets: unit index and step within the unit.
    starts = np.concatenate([[0], ends[:n_units - 1]])
    unit_of = np.repeat(np.arange(n_units), lens[unit_shape])[:n]
    step = np.arange(n) - starts[unit_of]
    shape_of = unit_shape[unit_of]
    tnames = templates()
    names = list(tnames)
    step_tmpl = np.zeros((len(shapes), lens.max()), dtype=np.int16)
    step_dir = np.zeros_like(step_tmpl)
    step_flag = np.zeros_like(step_tmpl)
    for i, (_, _, steps) in enumerate(shapes):
        for j, (tn, d, fl) in enumerate(steps):
            step_tmpl[i, j], step_dir[i, j], step_flag[i, j] = names.index(tn), d, fl
    tmpl = step_tmpl[shape_of, step]
    reply = step_dir[shape_of, step].astype(bool)
    out = []
    for ti, name in enumerate(names):
        idx = np.flatnonzero(tmpl == ti)
        if not len(idx):
            continue
        u, r = unit_of[idx], reply[idx]
        fwd_seq = (u_seq[u] + (step[idx] >= 2) + (step[idx] >= 5)) & 0xFFFFFFFF  # SYN and FIN take one each
        rev_seq = (u_ack[u] + (step[idx] >= 4)) & 0xFFFFFFFF
        flags = step_flag[shape_of[idx], step[idx]]
        f = {
            "src": np.where(r, u_dst[u], u_src[u]), "dst": np.where(r, u_src[u], u_dst[u]),
            "sport": np.where(r, u_dport[u], u_sport[u]), "dport": np.where(r, u_sport[u], u_dport[u]),
            "seq": np.where(r, rev_seq, fwd_seq),
            "ack": np.where(flags & ACK, np.where(r, fwd_seq + 1, rev_seq + 1) & 0xFFFFFFFF, 0),
            "flags": flags.astype(np.uint8), "ip_id": (u_id[u] + step[idx]) & 0xFFFF, "txid": u_id[u],
        }
        t = tnames[name]
        if t.proto in (1, 58):  # identifier and sequence for echo
            f["sport"], f["dport"] = u_id[u], (u_sport[u] & 0xFFFF)
        out.append((idx, _fill(t, f)))
    kinds = np.array([list(UNITS).index(s[0]) for s in shapes])[shape_of]
    counts = {k: int(c) for k, c in zip(UNITS, np.bincount(kinds, minlength=len(UNITS)))}
    return out, counts


def write_pcap(path: str | Path, parts: Parts, n: int,
               pps: float = 100_000.0, t0: float = 1_700_000_000.0) -> int:
    """Write the frames in packet order as a pcap; returns the file size."""
    length = np.zeros(n, dtype=np.int64)
    for idx, rows in parts:
        length[idx] = rows.shape[1]
    rec_off = 24 + np.concatenate([[0], np.cumsum(16 + length)[:-1]])
    total = int(rec_off[-1] + 16 + length[-1])
    buf = np.zeros(total, dtype=np.uint8)
    buf[:24] = np.frombuffer(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1), dtype=np.uint8)
    us = (np.arange(n, dtype=np.int64) * 1_000_000 / pps).astype(np.int64) + int(t0) * 1_000_000
    hdr = np.empty((n, 4), dtype="<u4")
    hdr[:, 0], hdr[:, 1], hdr[:, 2], hdr[:, 3] = us // 1_000_000, us % 1_000_000, length, length
    _scatter(buf, rec_off, hdr.view(np.uint8).reshape(n, 16))
    for idx, rows in parts:
        _scatter(buf, rec_off[idx] + 16, rows)
    buf.tofile(str(path))
    return total


def _scatter(buf: np.ndarray, offsets: np.ndarray, rows: np.ndarray, chunk: int = 1 << 22) -> None:
    """buf[offsets[i] + j] = rows[i, j], in chunks that bound the index array's memory."""
    width = rows.shape[1]
    step = max(1, chunk // width)
    cols = np.arange(width)
    for s in range(0, len(offsets), step):
        buf[(offsets[s:s + step, None] + cols).ravel()] = rows[s:s + step].ravel()


def make_mix(path: str | Path, n: int = 1_500_000, seed: int = 1, mix: dict[str, float] | None = None,
             pps: float = 100_000.0) -> dict[str, int]:
    """Generate and write the mix; returns the packets per kind."""
    parts, counts = generate(n, seed, mix)
    write_pcap(path, parts, n, pps)
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("-n", "--packets", type=int, default=1_500_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mix", default="", help="shares of packets per kind, e.g. scan=30,flow=25,dns=10 "
                    f"(default {','.join(f'{k}={v}' for k, v in DEFAULT_MIX.items())})")
    ap.add_argument("--pps", type=float, default=100_000.0, help="packets per second of capture time")
    args = ap.parse_args()
    t = time.perf_counter()
    counts = make_mix(args.out, args.packets, args.seed, parse_mix(args.mix) if args.mix else None, args.pps)
    took = time.perf_counter() - t
    size = Path(args.out).stat().st_size
    sys.stdout.write(json.dumps({"file": args.out, "packets": args.packets, "bytes": size, "seconds": round(took, 2),
                                 "kinds": counts}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
