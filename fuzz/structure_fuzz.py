"""Structure-level fuzzing of the pcap and pcapng readers (capture.sources.FileReader).

Each input is a capture file built here from known frames (pcap in every byte order, resolution and
version; pcapng with one or more sections of either byte order, several interfaces, Enhanced, Simple
and obsolete Packet Blocks, Interface Statistics Blocks, options and unknown blocks), then damaged at
the level of its structure: cut at any byte, every block type cut short (a 12-byte EPB or IDB), lying
block, trailer, option and record lengths, a captured length beyond its block, huge lengths, an
interface that was never described, a second section header of the other byte order, flipped bytes.

What must hold, for every input:
  * reading never raises, through the record iterator and through batches();
  * an undamaged file reads completely, exactly as built, with no error, and its capturer drops are
    those its statistics say;
  * every record that ends before the first damaged byte is read, unchanged, in order;
  * a cut file gives exactly the records that end before the cut;
  * an error names the byte offset of the damage's block or record (never an earlier one), and for
    pcapng the block.

    python fuzz/structure_fuzz.py [--inputs 1000000] [--seed 1]      (also: fuzz/long_fuzz.py --structure)
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from capture.sources import FileReader  # noqa: E402

SHB = 0x0A0D0D0A
# Frames of a few kinds and lengths (their content does not matter to the reader, only their size).
FRAMES = [bytes(range(i % 251, i % 251 + 1)) * n for i, n in
          ((1, 0), (2, 1), (3, 14), (4, 42), (5, 60), (6, 61), (7, 62), (8, 63), (9, 100), (10, 1514))]


@dataclass
class Image:
    """A built capture file: its bytes, its records in order with the offset where each one's block
    or record ends, every block's (start, end), and the drops its statistics report."""

    data: bytes
    kind: str  # "pcap" or "pcapng"
    records: list[tuple] = field(default_factory=list)  # (ts, data, wire, linktype)
    ends: list[int] = field(default_factory=list)  # end offset of each record's block
    blocks: list[tuple[int, int]] = field(default_factory=list)  # (start, end) of each block / record
    drops: int | None = None


# ----------------------------------------------------------------------------------------------
# Building valid files
# ----------------------------------------------------------------------------------------------


def build_pcap(rng: random.Random) -> Image:
    """A classic pcap file: random byte order, micro- or nanoseconds, version 2.4 or 2.2."""
    order = rng.choice("<>")
    nano = rng.random() < 0.5
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    minor = rng.choice([4, 4, 2])
    linktype = rng.choice([1, 101, 113])
    out = bytearray(struct.pack(order + "IHHiIII", magic, 2, minor, 0, 0, rng.choice([65535, 262144, 96]),
                                linktype))
    img = Image(b"", "pcap", blocks=[(0, 24)])
    unit = 1e-9 if nano else 1e-6
    for _ in range(rng.randint(0, 8)):
        frame = rng.choice(FRAMES)
        sec, frac = rng.randint(0, 2**32 - 1), rng.randint(0, 999_999)
        wire = len(frame) + rng.choice([0, 0, 4, 1000])
        start = len(out)
        out += struct.pack(order + "IIII", sec, frac, len(frame), wire) + frame
        img.records.append((sec + frac * unit, frame, wire, linktype))
        img.ends.append(len(out))
        img.blocks.append((start, len(out)))
    img.data = bytes(out)
    return img


def _option(order: str, code: int, value: bytes) -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + b"\x00" * (-len(value) % 4)


def _block(order: str, btype: int, body: bytes) -> bytes:
    body += b"\x00" * (-len(body) % 4)
    return struct.pack(order + "II", btype, len(body) + 12) + body + struct.pack(order + "I", len(body) + 12)


@dataclass
class _Iface:
    linktype: int
    resol: int  # tsresol option byte (decimal when bit 7 is clear)
    snaplen: int
    isb: int | None = None
    epb: int | None = None


def _section(rng: random.Random, img: Image, out: bytearray) -> None:
    """Append one pcapng section (its own byte order, interfaces and packets) to `out`."""
    order = rng.choice("<>")
    shb_opts = _option(order, 4, b"fuzz") + _option(order, 0, b"") if rng.random() < 0.5 else b""
    _append(img, out, _block(order, SHB, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1) + shb_opts))
    ifaces: list[_Iface] = []
    last_ts = 0.0
    for _ in range(rng.randint(0, 14)):
        choice = rng.random()
        if not ifaces or choice < 0.15:
            iface = _Iface(rng.choice([1, 101, 113]), rng.choice([6, 9, 3]), rng.choice([0, 0, 262144, 64]))
            opts = _option(order, 9, bytes([iface.resol]))
            if rng.random() < 0.5:
                opts += _option(order, 2, b"eth%d" % len(ifaces))
            opts += _option(order, 0, b"")
            ifaces.append(iface)
            _append(img, out, _block(order, 1, struct.pack(order + "HHI", iface.linktype, 0, iface.snaplen) + opts))
        elif choice < 0.65:
            last_ts = _packet(rng, img, out, order, ifaces, rng.choice([6, 6, 6, 2]))
        elif choice < 0.75:
            frame = rng.choice(FRAMES)
            iface = ifaces[0]
            wire = len(frame)
            cap = min(wire, iface.snaplen) if iface.snaplen else wire
            _append(img, out, _block(order, 3, struct.pack(order + "I", wire) + frame), (last_ts, frame[:cap], wire,
                                                                                           iface.linktype))
        elif choice < 0.9:
            index = rng.randrange(len(ifaces))
            opts = b""
            counters = {}
            for code in (5, 7):
                if rng.random() < 0.6:
                    counters[code] = rng.choice([0, 3, 70000, 2**40])
                    opts += _option(order, code, struct.pack(order + "Q", counters[code]))
            opts += _option(order, 4, struct.pack(order + "Q", 99))  # isb_ifrecv: not a drop count
            if counters:
                ifaces[index].isb = sum(counters.values())
            _append(img, out, _block(order, 5, struct.pack(order + "III", index, 0, 1) + opts + _option(order, 0, b"")))
        else:  # a block the reader does not know (custom, name resolution): skipped
            _append(img, out, _block(order, rng.choice([4, 0x40000BAD, 0x0BAD]), bytes(rng.randrange(0, 40))))
    for iface in ifaces:
        known = [d for d in (iface.isb, iface.epb) if d is not None]
        if known:
            img.drops = (img.drops or 0) + max(known)


def _packet(rng: random.Random, img: Image, out: bytearray, order: str, ifaces: list[_Iface], btype: int) -> float:
    index = rng.randrange(len(ifaces))
    iface = ifaces[index]
    frame = rng.choice(FRAMES)
    ticks = rng.randint(0, 2**63)
    wire = len(frame) + rng.choice([0, 0, 8])
    if btype == 6:
        body = struct.pack(order + "IIIII", index, ticks >> 32, ticks & 0xFFFFFFFF, len(frame), wire) + frame
        body += b"\x00" * (-len(body) % 4)
        if rng.random() < 0.3:
            lost = rng.choice([0, 1, 5000])
            body += _option(order, 4, struct.pack(order + "Q", lost)) + _option(order, 0, b"")
            iface.epb = (iface.epb or 0) + lost
    else:
        lost = rng.choice([0, 2, 0xFFFF])
        body = struct.pack(order + "HHIIII", index, lost, ticks >> 32, ticks & 0xFFFFFFFF, len(frame), wire) + frame
        if lost != 0xFFFF:
            iface.epb = (iface.epb or 0) + lost
    ts = ticks * 10.0 ** -iface.resol
    _append(img, out, _block(order, btype, body), (ts, frame, wire, iface.linktype))
    return ts


def _append(img: Image, out: bytearray, block: bytes, record: tuple | None = None) -> None:
    start = len(out)
    out += block
    img.blocks.append((start, len(out)))
    if record is not None:
        img.records.append(record)
        img.ends.append(len(out))


def build_pcapng(rng: random.Random) -> Image:
    """A pcapng file of one to three sections, each in a random byte order."""
    img = Image(b"", "pcapng")
    out = bytearray()
    for _ in range(rng.choice([1, 1, 2, 3])):
        _section(rng, img, out)
    img.data = bytes(out)
    return img


# ----------------------------------------------------------------------------------------------
# Damage
# ----------------------------------------------------------------------------------------------

HUGE = [0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFC, 0x10000000]


def damage(rng: random.Random, img: Image) -> tuple[bytes, int, bool]:
    """A damaged copy of the image: (bytes, offset of the first changed byte, whether it is a plain cut)."""
    data = bytearray(img.data)
    start, end = rng.choice(img.blocks)
    if img.kind == "pcapng":
        order = _ng_order(img.data, start)
    else:
        order = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    op = rng.random()
    if op < 0.25:  # cut anywhere, or inside a chosen block
        cut = rng.randrange(start, end + 1) if rng.random() < 0.7 else rng.randrange(len(data) + 1)
        return bytes(data[:cut]), cut, True
    if op < 0.45 and img.kind == "pcapng":  # the block cut short, with lengths that agree
        return _short_block(rng, data, start, end, order)
    if op < 0.65:  # a lying length: block/trailer length, caplen, wire length, option length
        return _lying_length(rng, data, start, end, order, img.kind)
    if op < 0.75 and img.kind == "pcapng":  # a second section of the other byte order, itself damaged or not
        other = build_pcapng(rng)
        at = rng.choice([b[0] for b in img.blocks] + [len(data)])
        return bytes(data[:at] + other.data + data[at:]), at, False
    # flipped bytes in a header
    first = len(data)
    for _ in range(rng.randint(1, 3)):
        s, e = rng.choice(img.blocks)
        if e > s:
            i = rng.randrange(s, min(e, s + 32))
            data[i] = rng.randrange(256)
            first = min(first, i)
    return bytes(data), first, False


def _ng_order(data: bytes, start: int) -> str:
    """The byte order of the section a pcapng block at `start` belongs to (its last SHB before it)."""
    at = data.rfind(b"\x0a\x0d\x0d\x0a", 0, start + 1)
    while at >= 0:
        bom = data[at + 8:at + 12]
        if bom in (b"\x4d\x3c\x2b\x1a", b"\x1a\x2b\x3c\x4d"):
            return "<" if bom == b"\x4d\x3c\x2b\x1a" else ">"
        at = data.rfind(b"\x0a\x0d\x0d\x0a", 0, at)
    return "<"


def _short_block(rng: random.Random, data: bytearray, start: int, end: int, order: str) -> tuple[bytes, int, bool]:
    """Replace the block with a shorter one of the same type whose two lengths agree (a 12-byte EPB...)."""
    btype = struct.unpack_from(order + "I", data, start)[0]
    length = rng.randrange(12, max(13, end - start), 4)
    body = bytes(data[start + 8:start + 8 + length - 12]).ljust(length - 12, b"\x00")
    block = struct.pack(order + "II", btype, length) + body + struct.pack(order + "I", length)
    tail = bytes(data[end:]) if rng.random() < 0.5 else b""  # at the end of the file, or in the middle
    return bytes(data[:start]) + block + tail, start + 4, False


def _lying_length(rng, data: bytearray, start: int, end: int, order: str, kind: str) -> tuple[bytes, int, bool]:
    size = end - start
    lie = rng.choice([*HUGE, 0, 4, 8, 12, 13, 16, size - 4, size + 4, size * 2, rng.randrange(2**32)])
    lie &= 0xFFFFFFFF
    if kind == "pcap":
        at = 16 if start == 0 else start + rng.choice([8, 12, 8])  # snap length; caplen or wire length
    else:
        btype = struct.unpack_from(order + "I", data, start)[0]
        where = rng.random()
        if where < 0.35:
            at = start + 4
        elif where < 0.5:
            at = end - 4
        elif btype in (6, 2) and size >= 32:
            at = start + 20  # the captured length: beyond the block, or short of the data
        elif btype == 1 and size >= 20:
            at = start + 12  # the snap length
        elif size >= 24:
            at = start + rng.randrange(8, size - 4, 2)  # an option header (code/length), or any field
            struct.pack_into(order + "H", data, at, lie & 0xFFFF)
            return bytes(data), at, False
        else:
            at = start + 4
        if where < 0.5 and rng.random() < 0.5:  # both lengths lie alike: the framing check passes
            struct.pack_into(order + "I", data, start + 4, lie)
            if end - 4 >= 0:
                struct.pack_into(order + "I", data, end - 4, lie)
            return bytes(data), start + 4, False
    struct.pack_into(order + "I", data, at, lie)
    return bytes(data), at, False


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------

OFFSET = re.compile(r"byte offset (\d+)")


def read(path: str) -> tuple[list[tuple], FileReader, int]:
    """(records, the reader, how many records batches() gave): both reading paths, any exception escapes."""
    reader = FileReader(path)
    records = [(ts, bytes(d), wire, lt) for ts, d, wire, lt in reader]
    again = FileReader(path)
    batched = sum(len(b) for b in again.batches(size=3))
    assert again.error == reader.error, (again.error, reader.error)
    return records, reader, batched


def _same(a: tuple, b: tuple) -> bool:
    return a[1:] == b[1:] and abs(a[0] - b[0]) <= 1e-6 * max(1.0, abs(b[0])) * 1e-3


def check_one(rng: random.Random, path: str) -> str:
    """Build, check, damage and check one file; returns the kind of damage (for the tallies)."""
    img = build_pcap(rng) if rng.random() < 0.4 else build_pcapng(rng)
    with open(path, "wb") as fh:
        fh.write(img.data)
    good, reader, batched = read(path)
    assert reader.error is None, (reader.error, img.data.hex())
    assert len(good) == batched == len(img.records), (len(good), batched, len(img.records))
    for got, want in zip(good, img.records, strict=True):
        assert got[1:] == want[1:] and abs(got[0] - want[0]) <= 1e-6 * max(1.0, abs(want[0])), (got, want)
    if img.kind == "pcapng":
        assert reader.capturer_drops == img.drops, (reader.capturer_drops, img.drops)
        reader.describe_file()
    data, first, cut = damage(rng, img)
    with open(path, "wb") as fh:
        fh.write(data)
    got, bad, batched = read(path)
    assert len(got) == batched, (len(got), batched)
    assert bad.capturer_drops is None or bad.capturer_drops >= 0
    bad.describe_file()
    kept = [i for i, e in enumerate(img.ends) if e <= first]
    assert len(got) >= len(kept), (len(got), len(kept), first, data.hex())
    for i in kept:  # every record before the damage, unchanged and in order
        assert got[i] == good[i], (i, got[i], good[i])
    if cut:
        assert len(got) == len(kept), (len(got), len(kept), first)
        if first not in [0] + [e for _, e in img.blocks] and len(data):
            assert bad.error, first
    if bad.error:
        assert _names_the_damage(bad.error, img, first, data), (bad.error, first)
    return "cut" if cut else "other"


def _names_the_damage(error: str, img: Image, first: int, data: bytes) -> bool:
    """The error names a byte offset no earlier than the block or record holding the first damaged byte."""
    if error.startswith(("empty file", "not a pcap", "file cut short: the pcap header")):
        return first < 24 or not data
    m = OFFSET.search(error)
    if m is None:
        return False
    holder = max((s for s, _ in img.blocks if s <= first), default=0)
    if img.kind == "pcapng" and "block" not in error:
        return False
    return int(m.group(1)) >= holder


def run(inputs: int, seed: int, budget_s: float | None = None) -> dict[str, int]:
    """Fuzz `inputs` files (or until budget_s seconds pass); returns tallies of what ran."""
    rng = random.Random(seed)
    tallies = {"inputs": 0, "cut": 0, "other": 0}
    logging.getLogger("capture.sources").setLevel(logging.ERROR)  # each damaged file logs a warning
    folder = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    fd, path = tempfile.mkstemp(suffix=".cap", dir=folder)
    os.close(fd)
    t0 = time.monotonic()
    try:
        for _ in range(inputs):
            if budget_s is not None and time.monotonic() - t0 > budget_s:
                break
            state = rng.getstate()
            try:
                tallies[check_one(rng, path)] += 1
            except Exception as exc:  # say how to replay it, then fail
                rng.setstate(state)
                raise AssertionError(f"structure fuzz input {tallies['inputs'] + 1} (seed {seed}) failed: "
                                     f"{type(exc).__name__}: {exc}") from exc
            tallies["inputs"] += 1
    finally:
        os.unlink(path)
    return tallies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    t = time.perf_counter()
    tallies = run(args.inputs, args.seed)
    print(f"structure-fuzzed {tallies['inputs']:,} files ({tallies['cut']:,} cut, {tallies['other']:,} otherwise "
          f"damaged) in {time.perf_counter() - t:.0f} s, seed {args.seed}: no exception, every record before "
          f"the damage kept, every error names where")


if __name__ == "__main__":
    main()
