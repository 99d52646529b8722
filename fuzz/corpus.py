"""Seed frames for fuzzing: Scapy-built frames of every link type, and the shared captures' records."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from capture.sources import COOKED_BASE, FileReader  # noqa: E402

LINKTYPES = [1, 113, 276, 101, 228, 229, 0, 108, 9, 50, 226, 104, COOKED_BASE | 0x0800, COOKED_BASE | 0x86DD,
             COOKED_BASE | 0x0806, 147]


def built_frames() -> list[tuple[int, bytes]]:
    """(linktype, frame) pairs covering every link layer and network/transport header the parser reads."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
    from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Ether
    from scapy.layers.ppp import PPP

    ip = IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2, flags="S")
    v6 = IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment() / UDP()
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    out = [
        (1, bytes(eth / ip)), (1, bytes(eth / v6)), (1, bytes(eth / Dot1AD() / Dot1Q() / IP() / UDP())),
        (1, bytes(eth / ARP())), (1, bytes(eth / IP() / ICMP())), (1, bytes(eth / IPv6() / ICMPv6EchoRequest())),
        (1, bytes(eth) + b"\x81\x00\x00\x01" * 100 + bytes(IP() / UDP())),  # a VLAN stack 100 deep
        (113, bytes(CookedLinux(proto=0x0800) / ip)), (276, bytes(CookedLinuxV2(proto=0x86DD) / v6)),
        (101, bytes(ip)), (228, bytes(ip)), (229, bytes(v6)), (0, struct.pack("<I", 2) + bytes(ip)),
        (108, struct.pack(">I", 30) + bytes(v6)), (9, bytes(PPP(proto=0x21) / ip)), (226, bytes(24) + bytes(ip)),
        (104, b"\x0f\x00\x08\x00" + bytes(ip)), (COOKED_BASE | 0x0800, bytes(ip)), (1, b""),
        # Fragments (ip_id, frag) and tags (vlan): a first and a later IPv4 fragment under a tag, a later IPv6 one.
        (1, bytes(eth / Dot1Q(vlan=100) / IP(id=77, flags="MF") / UDP() / (b"x" * 16))),
        (1, bytes(eth / Dot1Q(vlan=4095) / IP(id=77, frag=2) / (b"x" * 16))),
        (1, bytes(eth / IPv6() / IPv6ExtHdrFragment(id=0xABCDEF01, offset=9, m=1) / (b"y" * 16))),
    ]
    # IPv6 extension headers that chain into each other as far as the frame goes.
    chain = bytes(IPv6(nh=0, plen=0)) + b"".join(bytes([0, 0]) + bytes(6) for _ in range(50))
    out.append((229, chain))
    return out


def file_frames(limit_per_file: int = 200) -> list[tuple[int, bytes]]:
    """Records of the shared public captures (empty when ../shared is not there)."""
    folder = ROOT.parent / "shared" / "pcaps" / "files"
    out = []
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            for i, (_, data, _, lt) in enumerate(FileReader(str(path))):
                if i >= limit_per_file:
                    break
                out.append((lt, data))
    return out
