"""Capture files through the engine: exact counts, pcapng, damage reporting, and accuracy against tshark."""

from __future__ import annotations

import json
import re
import struct
import subprocess

import pytest
from conftest import PYTHON, ROOT
from pcapgen import pcap_bytes, pcapng_bytes
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import ARP, Ether

from packet_processor import CaptureEngine

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
T0 = 1_700_000_000.25


def sample_frames() -> list[tuple[float, bytes]]:
    """Eight frames of every class with known timestamps."""
    pkts = [
        ETH / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=80, flags="S"),
        ETH / IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=80, dport=40000, flags="SA"),
        ETH / IP(src="10.0.0.1", dst="8.8.8.8") / UDP(sport=5000, dport=53) / (b"q" * 20),
        ETH / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(),
        ETH / IPv6(src="fe80::1", dst="ff02::1") / ICMPv6EchoRequest(),
        ETH / IP(src="10.0.0.1", dst="10.0.0.2", proto=47) / (b"\x00" * 8),
        ETH / ARP(psrc="10.0.0.1", pdst="10.0.0.2"),
        ETH / IP(src="8.8.8.8", dst="10.0.0.1") / UDP(sport=53, dport=5000) / (b"r" * 40),
    ]
    return [(T0 + i * 0.5, bytes(p)) for i, p in enumerate(pkts)]


def summarize(path) -> dict:
    return CaptureEngine().load_file(str(path))


def test_pcap_summary_counts_everything(tmp_path):
    frames = sample_frames()
    f = tmp_path / "mix.pcap"
    f.write_bytes(pcap_bytes(frames))
    s = summarize(f)
    assert s["packets"] == 8 and s["error"] is None
    assert s["bytes_wire"] == sum(len(d) for _, d in frames)
    assert s["transport_counts"] == {"tcp": 2, "udp": 2, "icmp": 1, "icmpv6": 1, "other_ip": 1, "non_ip": 1}
    assert s["first_ts"] == pytest.approx(T0, abs=1e-6)
    assert s["last_ts"] == pytest.approx(T0 + 3.5, abs=1e-6)
    # Top talkers count IP frames only: the ARP frame from 10.0.0.1 is not among them.
    assert s["top10_src_by_packets"][0] == {"addr": "10.0.0.1", "packets": 4,
                                             "bytes": sum(len(frames[i][1]) for i in (0, 2, 3, 5))}
    assert s["other_ip_protocols"] == {"47": 1}
    assert s["top10_udp_dst_ports"] == [[53, 1], [5000, 1]]
    # Private and link-local addresses are local for files: 10.0.0.1 -> 8.8.8.8 and fe80::1 -> ff02::1
    # leave, the reply from 8.8.8.8 comes in, the rest stays local, and ARP has both ends local.
    assert s["direction_counts"] == {"in": 1, "out": 2, "local": 5, "transit": 0}


@pytest.mark.parametrize("nanosecond,big_endian", [(False, False), (True, False), (False, True), (True, True)])
def test_pcap_variants_keep_timestamps(tmp_path, nanosecond, big_endian):
    frames = sample_frames()
    f = tmp_path / "v.pcap"
    f.write_bytes(pcap_bytes(frames, nanosecond=nanosecond, big_endian=big_endian))
    s = summarize(f)
    assert s["packets"] == 8 and s["error"] is None
    assert s["first_ts"] == pytest.approx(T0, abs=1e-6)


def test_pcapng_with_two_link_types_and_nanoseconds(tmp_path):
    eth = bytes(ETH / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2))
    raw = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(sport=3, dport=4))
    f = tmp_path / "two.pcapng"
    f.write_bytes(pcapng_bytes([(T0, eth, 0), (T0 + 1.000000001, raw, 1), (T0 + 0.5, eth, 0)],
                               linktypes=[1, 101], tsresol=9))
    s = summarize(f)
    assert s["packets"] == 3 and s["error"] is None
    assert s["transport_counts"]["udp"] == 2 and s["transport_counts"]["tcp"] == 1
    assert s["last_ts"] == pytest.approx(T0 + 0.5, abs=1e-6)  # file order, not time order
    assert s["max_ts"] == pytest.approx(T0 + 1.000000001, abs=1e-6)


def test_cut_at_every_byte_keeps_whole_records_and_says_where(tmp_path, monkeypatch):
    # The detectors in a thread: this is about the reader, and ~300 worker processes would take a minute.
    monkeypatch.setenv("NTM_DETECTORS_PROCESS", "false")
    frames = sample_frames()[:4]
    image = pcap_bytes(frames)
    ends = [24]
    for _, d in frames:
        ends.append(ends[-1] + 16 + len(d))
    f = tmp_path / "cut.pcap"
    for cut in range(len(image) + 1):
        f.write_bytes(image[:cut])
        s = summarize(f)
        whole = sum(1 for e in ends[1:] if e <= cut)
        assert s["packets"] == whole, cut
        if cut in ends:
            assert s["error"] is None, cut
        else:
            assert s["error"], cut
            if cut > 24:
                assert f"record {whole + 1} at byte offset {ends[whole]}" in s["error"]


def test_damaged_files_give_clear_errors(tmp_path):
    good = pcap_bytes(sample_frames())
    cases = {
        "empty.pcap": (b"", "empty file"),
        "text.pcap": (b"hello, this is not a capture\n" * 3, "unknown magic number"),
        "badmagic.pcap": (b"\x00\x01\x02\x03" + good[4:], "unknown magic number 00010203"),
    }
    # A record that claims 4 GB: the packets before it are kept.
    second = 24 + 16 + len(sample_frames()[0][1])
    huge = bytearray(good)
    struct.pack_into("<I", huge, second + 8, 0xFFFFFFFF)
    cases["huge.pcap"] = (bytes(huge), f"record 2 at byte offset {second}: captured length 4294967295")
    for name, (data, expect) in cases.items():
        f = tmp_path / name
        f.write_bytes(data)
        s = summarize(f)
        assert s["error"] and expect in s["error"], (name, s["error"])
    assert summarize(tmp_path / "huge.pcap")["packets"] == 1


def test_pcapng_bad_block_length(tmp_path):
    eth = bytes(ETH / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2))
    image = bytearray(pcapng_bytes([(T0, eth, 0), (T0 + 1, eth, 0)], linktypes=[1]))
    offsets = []
    off = 0
    while off < len(image):
        offsets.append(off)
        off += struct.unpack_from("<I", image, off + 4)[0]
    struct.pack_into("<I", image, offsets[-1] + 4, 13)  # not a multiple of 4
    f = tmp_path / "bad.pcapng"
    f.write_bytes(bytes(image))
    s = summarize(f)
    assert s["packets"] == 1
    assert "bad block length 13" in s["error"] and f"byte offset {offsets[-1]}" in s["error"]


def test_missing_file_is_an_error_not_a_crash(tmp_path):
    s = summarize(tmp_path / "nope.pcap")
    assert s["packets"] == 0 and "cannot read" in s["error"]


def test_cli_summary_prints_the_documented_keys(tmp_path):
    f = tmp_path / "mix.pcap"
    f.write_bytes(pcap_bytes(sample_frames()))
    out = subprocess.run([PYTHON, "packet_processor.py", "summary", str(f)], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    s = json.loads(out.stdout)
    for key in ("packets", "bytes_wire", "transport_counts", "transport_bytes", "top10_src_by_packets",
                "top10_src_by_bytes", "first_ts", "last_ts", "error"):
        assert key in s
    assert s["packets"] == 8


def test_accuracy_against_tshark_oracle(shared_pcaps):
    """The shared corpus: 33 public captures compared with tshark's statistics."""
    tool = shared_pcaps.parent / "tools" / "check_accuracy.py"
    out = subprocess.run([PYTHON, str(tool), "--cmd", f"{PYTHON} packet_processor.py summary {{file}}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    last = out.stdout.strip().splitlines()[-1]
    m = re.match(r"accuracy: (\d+) passed, (\d+) failed", last)
    assert m, out.stdout + out.stderr
    files = len(list((shared_pcaps / "files").iterdir()))
    assert (int(m.group(1)), int(m.group(2))) == (files, 0), out.stdout


def test_pcapng_describes_itself_as_bounded_untrusted_text(tmp_path):
    eth = bytes(ETH / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2))
    f = tmp_path / "notes.pcapng"
    f.write_bytes(pcapng_bytes([(T0, eth, 0), (T0 + 1, eth, 1)], linktypes=[1, 1],
                               shb_text={4: b"<script>alert(1)</script>", 3: b"Linux\x1b[31m 6.1",
                                         1: b"CLIENT_RANDOM secret", 2: b"x" * 5000},
                               if_names=[b"eth0", b"wlan\xff0"]))
    engine = CaptureEngine()
    engine.load_file(str(f))
    status = engine.status()
    assert engine.snapshot().totals["packets"] == 2 and status.error is None
    note = status.file_note
    assert note.startswith("written by: <script>alert(1)</script>; OS: Linux [31m 6.1; hardware: xxx")
    assert "interfaces: eth0, wlan\ufffd0" in note
    assert "secret" not in note and "\x1b" not in note  # comments are not kept; control bytes go
    assert len(note) < 600  # each value is cut to 120 characters
    engine.load_file(str(f.with_name("missing.pcap")))
    assert engine.status().file_note == ""  # a new source starts without the old file's words
