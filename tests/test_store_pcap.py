"""The header pcap export, read by tshark: one frame per record, cut after the transport header."""

from __future__ import annotations

import shutil
import struct
import subprocess

import numpy as np
import pytest
from conftest import need

import config
from analysis.headers import LocalMatcher, parse_batch, parse_nets
from capture.sources import FileReader
from store.export import HEADER_SNAPLEN, header_pcap

MARKER = b"NTM-PAYLOAD-MARKER-3e9b"
FIELDS = ("frame.time_epoch", "frame.len", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "tcp.srcport", "tcp.dstport",
          "tcp.flags", "udp.srcport", "udp.dstport", "icmp.type", "icmpv6.type", "arp.opcode", "arp.src.proto_ipv4")


@pytest.fixture(scope="module")
def tshark() -> str:
    path = shutil.which("tshark")
    need(path is not None, "tshark is not installed (apt-get install tshark)")
    return path


def read_records(path: str) -> np.ndarray:
    matcher = LocalMatcher(nets=parse_nets(config.get("LOCAL_NETS")))
    return np.concatenate([parse_batch(raw, matcher) for raw in FileReader(path).batches(65536)])


def fields(tshark: str, path: str, names: tuple[str, ...] = FIELDS) -> list[list[str]]:
    args = [tshark, "-r", path, "-T", "fields", "-E", "separator=|", "-o", "tcp.relative_sequence_numbers:FALSE"]
    for f in names:
        args += ["-e", f]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=60).stdout
    return [line.split("|") for line in out.splitlines()]


def test_crafted_packets_read_back_by_tshark(tshark, tmp_path):
    scapy = pytest.importorskip("scapy.all")
    t0 = 1_700_000_000.123456
    pkts = [scapy.Ether(src="02:aa:00:00:00:01") / scapy.IP(src="10.5.0.1", dst="10.5.0.2")
            / scapy.TCP(sport=40000, dport=443, flags="S") / MARKER,
            scapy.Ether() / scapy.IP(src="10.5.0.2", dst="10.5.0.1") / scapy.UDP(sport=53, dport=40001) / MARKER,
            scapy.Ether() / scapy.IPv6(src="fd00::1", dst="fd00::2") / scapy.UDP(sport=5000, dport=5001) / MARKER,
            scapy.Ether() / scapy.IP(src="10.5.0.1", dst="10.5.0.3") / scapy.ICMP(type=8) / MARKER,
            scapy.Ether() / scapy.IPv6(src="fd00::2", dst="fd00::1") / scapy.ICMPv6EchoRequest() / MARKER,
            scapy.Ether(src="02:aa:00:00:00:09") / scapy.ARP(op=2, psrc="10.5.0.9", pdst="10.5.0.1",
                                                             hwsrc="02:aa:00:00:00:09"),
            scapy.Ether() / scapy.IP(src="10.5.0.1", dst="10.5.0.2") / scapy.TCP(sport=40000, dport=443,
                                                                               flags="PA") / (MARKER * 40)]
    for i, p in enumerate(pkts):
        p.time = t0 + i * 0.25
    src = tmp_path / "in.pcap"
    scapy.wrpcap(str(src), pkts)
    data = header_pcap(read_records(str(src)))
    assert MARKER not in data and MARKER.hex().encode() not in data.hex().encode()
    assert struct.unpack_from("<I", data, 16)[0] == HEADER_SNAPLEN
    out = tmp_path / "headers.pcap"
    out.write_bytes(data)
    rows = [dict(zip(FIELDS, r)) for r in fields(tshark, str(out))]
    assert len(rows) == len(pkts)
    for i, (row, p) in enumerate(zip(rows, pkts)):
        assert float(row["frame.time_epoch"]) == pytest.approx(t0 + i * 0.25, abs=1e-6)
        assert int(row["frame.len"]) == len(p)  # the original length, not the cut one
    assert (rows[0]["ip.src"], rows[0]["ip.dst"], rows[0]["tcp.srcport"], rows[0]["tcp.dstport"]) == \
        ("10.5.0.1", "10.5.0.2", "40000", "443")
    assert int(rows[0]["tcp.flags"], 16) == 0x02 and int(rows[6]["tcp.flags"], 16) == 0x18
    assert (rows[1]["udp.srcport"], rows[1]["udp.dstport"]) == ("53", "40001")
    assert (rows[2]["ipv6.src"], rows[2]["ipv6.dst"], rows[2]["udp.dstport"]) == ("fd00::1", "fd00::2", "5001")
    assert rows[3]["icmp.type"] == "8" and rows[4]["icmpv6.type"] == "128"
    assert rows[5]["arp.opcode"] == "2" and rows[5]["arp.src.proto_ipv4"] == "10.5.0.9"
    caps = subprocess.run([tshark, "-r", str(out), "-T", "fields", "-e", "frame.cap_len"], capture_output=True,
                          text=True, check=True).stdout.split()
    assert [int(c) for c in caps] == [54, 42, 62, 42, 62, 42, 54]  # headers only: no payload byte


def test_corpus_file_headers_match_tshark_on_the_original(tshark, shared_pcaps, tmp_path):
    src = str(shared_pcaps / "files" / "http_three_streams.pcap")
    out = tmp_path / "headers.pcap"
    out.write_bytes(header_pcap(read_records(src)))
    names = ("frame.time_epoch", "frame.len", "ip.src", "ip.dst", "ip.proto", "tcp.srcport", "tcp.dstport",
             "tcp.flags")
    original, synthesised = fields(tshark, src, names), fields(tshark, str(out), names)
    assert len(synthesised) == len(original) == 28
    for a, b in zip(original, synthesised):
        assert float(a[0]) == pytest.approx(float(b[0]), abs=1e-6)
        assert a[1:] == b[1:]
