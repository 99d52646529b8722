"""Damaged pcapng files never crash the reader, and a file's own drop counts are read (issue 12.3, 12.4)."""

from __future__ import annotations

import json
import struct
import subprocess

import pytest
from conftest import PYTHON, ROOT
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from capture.sources import FileReader
from packet_processor import CaptureEngine

FRAME = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.0.0.1", dst="10.0.0.2")
              / UDP(sport=1, dport=2) / b"payload")
SHB, IDB, OPB, SPB, ISB, EPB = 0x0A0D0D0A, 1, 2, 3, 5, 6


def block(btype: int, body: bytes, order: str = "<") -> bytes:
    body += b"\x00" * (-len(body) % 4)
    return struct.pack(order + "II", btype, len(body) + 12) + body + struct.pack(order + "I", len(body) + 12)


def option(code: int, value: bytes, order: str = "<") -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + b"\x00" * (-len(value) % 4)


def u64(value: int, order: str = "<") -> bytes:
    return struct.pack(order + "Q", value)


def shb(order: str = "<") -> bytes:
    return block(SHB, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1), order)


def idb(order: str = "<", linktype: int = 1) -> bytes:
    return block(IDB, struct.pack(order + "HHI", linktype, 0, 0), order)


def epb(iface: int = 0, order: str = "<", opts: bytes = b"", ticks: int = 1_700_000_000_000_000) -> bytes:
    body = struct.pack(order + "IIIII", iface, ticks >> 32, ticks & 0xFFFFFFFF, len(FRAME), len(FRAME)) + FRAME
    body += b"\x00" * (-len(body) % 4)
    return block(EPB, body + opts, order)


def isb(iface: int, opts: bytes, order: str = "<") -> bytes:
    return block(ISB, struct.pack(order + "III", iface, 0, 0) + opts + option(0, b"", order), order)


def read(tmp_path, image: bytes) -> tuple[list, FileReader]:
    path = tmp_path / "f.pcapng"
    path.write_bytes(image)
    reader = FileReader(str(path))
    return list(reader), reader


GOOD = shb() + idb() + epb() + epb() + epb()  # blocks at 0, 28, 48, 48 + len(epb), ...


def test_a_12_byte_epb_or_idb_at_the_end_keeps_the_packets_and_names_the_block(tmp_path):
    """The review's reproduction (capture_sources.py:346, 375-377 raised struct.error)."""
    end = len(GOOD)
    for btype, name in ((EPB, "enhanced packet"), (IDB, "interface description")):
        recs, reader = read(tmp_path, GOOD + struct.pack("<III", btype, 12, 12))
        assert len(recs) == 3
        assert reader.error == (f"corrupt {name} block 6 (type {btype:#x}) at byte offset {end}: bad block "
                                f"length 12 (a multiple of 4, at least {32 if btype == EPB else 20})")


@pytest.mark.parametrize("btype,least", [(SHB, 28), (IDB, 20), (OPB, 32), (SPB, 16), (ISB, 24), (EPB, 32)])
def test_every_block_type_cut_short_with_agreeing_lengths(tmp_path, btype, least):
    """A block shorter than its fixed fields, whose two length fields agree: an error, never a raise."""
    for length in range(12, least, 4):
        body = (b"\x4d\x3c\x2b\x1a" if btype == SHB else b"").ljust(length - 12, b"\x00")[:length - 12]
        short = struct.pack("<II", btype, length) + body + struct.pack("<I", length)
        # A 12-byte section header has its trailer where the byte-order magic belongs.
        expect = "bad byte-order magic 0c000000" if btype == SHB and length == 12 else f"bad block length {length}"
        for tail in (b"", epb()):  # at the end, and with a good packet after it
            recs, reader = read(tmp_path, GOOD + short + tail)
            assert len(recs) == 3, (length, tail)
            assert f"block 6 (type {btype:#x}) at byte offset {len(GOOD)}: {expect}" in reader.error


def test_lying_lengths_huge_lengths_and_caplen_beyond_the_block(tmp_path):
    second_epb = 48 + len(epb())
    cases = {}
    huge = bytearray(GOOD)
    struct.pack_into("<I", huge, second_epb + 4, 0xFFFFFFFC)
    cases["huge block length"] = (huge, f"file cut short: enhanced packet block 4 (type 0x6) at byte offset "
                                        f"{second_epb} claims 4294967292 bytes")
    trailer = bytearray(GOOD)
    struct.pack_into("<I", trailer, second_epb + len(epb()) - 4, 1000)
    cases["trailer"] = (trailer, f"block 4 (type 0x6) at byte offset {second_epb}: block lengths disagree")
    caplen = bytearray(GOOD)
    struct.pack_into("<I", caplen, second_epb + 20, 0xFFFFFFFF)
    cases["caplen"] = (caplen, f"block 4 (type 0x6) at byte offset {second_epb}: packet 2's captured length "
                               f"4294967295 does not fit")
    iface = bytearray(GOOD)
    struct.pack_into("<I", iface, second_epb + 8, 7)
    cases["interface"] = (iface, "packet 2 names interface 7, which was never described")
    for name, (image, expect) in cases.items():
        recs, reader = read(tmp_path, bytes(image))
        assert len(recs) == 1, name
        assert expect in reader.error, (name, reader.error)


def test_a_second_section_of_the_other_byte_order_is_read(tmp_path):
    image = GOOD + shb(">") + idb(">", 101) + block(EPB, struct.pack(">IIIII", 0, 0, 5, 20, 20)
                                                     + bytes(IP(src="10.9.9.9", dst="10.0.0.1")), ">")
    recs, reader = read(tmp_path, image)
    assert reader.error is None and len(recs) == 4
    assert recs[3][3] == 101 and recs[3][1] == bytes(IP(src="10.9.9.9", dst="10.0.0.1"))
    recs, reader = read(tmp_path, image[:-4])  # and cut short, in the other byte order
    assert len(recs) == 3 and f"block 8 (type 0x6) at byte offset {len(GOOD) + 28 + 20}" in reader.error


def test_the_cli_prints_its_json_for_a_damaged_pcapng(tmp_path):
    path = tmp_path / "short-epb.pcapng"
    path.write_bytes(GOOD + struct.pack("<III", EPB, 12, 12))
    out = subprocess.run([PYTHON, "packet_processor.py", "summary", str(path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert "Traceback" not in out.stderr
    summary = json.loads(out.stdout)
    assert summary["packets"] == 3 and "enhanced packet block 6" in summary["error"]
    assert out.returncode == 2, out.stderr  # read in part: tshark's status for a cut-short file
    engine = CaptureEngine()
    assert engine.load_file(str(path))["packets"] == 3


# ---------------------------------------------------------------------------------------------
# The capturer's own drops (isb_ifdrop 5, isb_osdrop 7, epb_dropcount 4)
# ---------------------------------------------------------------------------------------------


def test_statistics_blocks_give_the_capturers_drops(tmp_path):
    image = (shb() + idb() + idb() + epb(0) + isb(0, option(5, u64(3)) + option(7, u64(1)))
             + epb(1) + isb(0, option(5, u64(10)) + option(7, u64(2)))  # cumulative: the latest counts
             + isb(1, option(4, u64(500)) + option(5, u64(4))))  # isb_ifrecv is not a drop
    recs, reader = read(tmp_path, image)
    assert reader.error is None and len(recs) == 2
    assert reader.capturer_drops == 10 + 2 + 4
    assert "the capturer that wrote this file dropped 16 packets" in reader.describe_file()


def test_epb_dropcount_and_the_obsolete_packet_blocks_drops(tmp_path):
    opb = block(OPB, struct.pack("<HHIIII", 0, 5, 0, 0, len(FRAME), len(FRAME)) + FRAME)
    opb_unknown = block(OPB, struct.pack("<HHIIII", 0, 0xFFFF, 0, 0, len(FRAME), len(FRAME)) + FRAME)
    image = (shb() + idb() + epb(opts=option(4, u64(2)) + option(0, b"")) + epb()
             + epb(opts=option(4, u64(1_000_000)) + option(0, b"")) + opb + opb_unknown)
    recs, reader = read(tmp_path, image)
    assert reader.error is None and len(recs) == 5
    assert reader.capturer_drops == 1_000_007
    assert "dropped 1,000,007 packets" in reader.describe_file()


def test_sections_add_their_drops_and_a_silent_file_says_nothing(tmp_path):
    two = (shb() + idb() + epb() + isb(0, option(5, u64(6))) + shb(">") + idb(">")
           + isb(0, option(7, u64(9, ">"), ">"), ">"))
    _, reader = read(tmp_path, two)
    assert reader.error is None and reader.capturer_drops == 15
    _, silent = read(tmp_path, GOOD + isb(0, option(4, u64(3))))  # statistics without a drop counter
    assert silent.capturer_drops is None and "dropped" not in silent.describe_file()
    _, zero = read(tmp_path, GOOD + isb(0, option(5, u64(0))))
    assert zero.capturer_drops == 0 and "dropped 0 packets" in zero.describe_file()


def test_the_engine_shows_the_files_own_drops(tmp_path):
    path = tmp_path / "lossy.pcapng"
    path.write_bytes(shb() + idb() + epb() + isb(0, option(5, u64(40)) + option(7, u64(2))))
    engine = CaptureEngine()
    assert engine.load_file(str(path))["packets"] == 1
    assert "the capturer that wrote this file dropped 42 packets" in engine.status().file_note
