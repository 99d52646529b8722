"""The compiled helpers (native/*.c) against their Python references: identical results, always."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess

import numpy as np
import pandas as pd
import pytest
from conftest import PYTHON, ROOT, need
from hypothesis import given, settings
from hypothesis import strategies as st

import analysis.headers as headers
import native
from capture.sources import walk_records


@pytest.fixture(scope="module", autouse=True)
def compiled() -> None:
    need(shutil.which("cc") is not None or shutil.which("gcc") is not None,
         "no C compiler: the Python versions run instead, and there is nothing to compare")
    assert native.available(), "a C compiler is here, yet a helper did not build"


def records(lengths: list[int], order: str, junk: bytes) -> bytes:
    """A pcap body: one 16-byte header per length (captured = original), then junk at the end."""
    out = b"".join(struct.pack(order + "IIII", 1, 2, n, n) + bytes(n) for n in lengths)
    return out + junk


@settings(max_examples=400, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=40), st.sampled_from("<>"), st.binary(max_size=40),
       st.integers(1, 50), st.integers(0, 400), st.booleans(), st.integers(0, 64))
def test_pcap_walk_matches_python(lengths, order, junk, size, limit, swapped, start):
    buf = records(lengths, order, junk)
    start = min(start, len(buf))
    data = np.frombuffer(buf, np.uint8)
    want = walk_records(buf, start, size, order, limit, swapped)
    got = native.pcap_walk(data, start, size, order == ">", limit, swapped)
    assert np.array_equal(got[0], want[0]) and got[1:] == want[1:]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 3000), st.sampled_from([1, 3, 8, 16, 24, 40, 42, 44]), st.integers(1, 6), st.integers(0, 99))
def test_group_rows_matches_numpy(n, width, alphabet, seed):
    raw = np.random.default_rng(seed).integers(0, alphabet, (n, width), dtype=np.uint8)
    first, codes = native.group_rows(raw) if n else (np.empty(0, np.int64), np.empty(0, np.int64))
    ref_first, ref_codes = headers.group_rows_numpy(raw)
    assert np.array_equal(first, ref_first) and np.array_equal(codes, ref_codes)
    # And against np.unique: the same partition of the rows.
    _, inv = np.unique(raw.view(f"V{width}").ravel(), return_inverse=True) if n else (None, np.empty(0))
    pairs = set(zip(codes.tolist(), np.ravel(inv).tolist()))
    assert len(pairs) == len(first) == len(np.unique(inv))


def test_numpy_grouping_survives_a_hash_collision(monkeypatch):
    """If two different rows ever hashed alike, the check against each group's first row catches it."""
    raw = np.array([[1, 2], [3, 4], [1, 2], [5, 6]], np.uint8)
    monkeypatch.setattr(pd, "factorize", lambda h: (np.zeros(len(h), np.int64), h[:1]))  # everything collides
    first, codes = headers.group_rows_numpy(raw)
    assert first.tolist() == [0, 1, 3] and codes.tolist() == [0, 1, 0, 2]


def test_files_read_the_same_without_the_compiled_helpers(tmp_path, shared_pcaps):
    """The summaries (counts, tables, errors) of damaged and ordinary files, with and without native code."""
    names = ["truncated_fuzz_null.pcap", "busy_gnutella.pcap", "nsec_big_endian.pcap", "http_4k_requests.pcap",
             "arp_busy_malformed.pcap"]
    files = [p for p in (shared_pcaps / "files").iterdir() if p.name in names]
    assert len(files) == len(names), "expected files of the shared corpus are missing"
    script = ("import json, sys; from packet_processor import CaptureEngine\n"
              "out = {}\n"
              "for f in sys.argv[1:]:\n"
              "    e = CaptureEngine(); s = e.load_file(f); snap = e.snapshot()\n"
              "    out[f] = [s['packets'], s['transport_counts'], s['error'], snap.top_addresses('src', n=20),\n"
              "              snap.top_conversations(20),\n"
              "              [(a.detector, a.source, a.target, a.count, a.evidence) for a in snap.alerts]]\n"
              "print(json.dumps(out, default=str))\n")

    def run(no_native: bool) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NTM_")}
        if no_native:
            env["NTM_NATIVE"] = "0"
        out = subprocess.run([PYTHON, "-c", script, *map(str, files)], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    assert run(False) == run(True)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(16, 200), min_size=1, max_size=50), st.integers(0, 64))
def test_block_walk_follows_tp_next_offset(gaps, first):
    """Offsets of a TPACKET_V3 block's packets: the C walk against the Python loop it replaces."""
    size = first + sum(gaps) + 64
    ring = np.zeros(size, np.uint8)
    want, off = [], first
    for gap in gaps:
        want.append(off)
        struct.pack_into("=I", ring, off, gap)
        off += gap
    assert native.block_walk(ring, first, len(gaps), size).tolist() == want
    # A link that leaves the block is refused, not followed.
    assert native.block_walk(ring, first, len(gaps) + 1, want[-1] + 4) is None


def test_conversation_keys_match_numpy():
    """Both directions of a conversation share one key, in C as in numpy, byte for byte."""
    from packet_processor import PACKET_DTYPE, _conversation_keys, conversation_keys_numpy

    rng = np.random.default_rng(5)
    arr = np.zeros(5000, PACKET_DTYPE)
    pool = rng.integers(0, 256, (6, 16), dtype=np.uint8)  # few addresses, so equal ends happen
    arr["src"] = pool[rng.integers(0, 6, 5000)].view("S16").ravel()
    arr["dst"] = pool[rng.integers(0, 6, 5000)].view("S16").ravel()
    arr["sport"] = rng.integers(-1, 70000, 5000)
    arr["dport"] = rng.integers(-1, 70000, 5000)
    arr["proto"] = rng.integers(-1, 300, 5000)
    assert _conversation_keys(arr).tobytes() == conversation_keys_numpy(arr).tobytes()
    swapped = arr.copy()
    swapped["src"], swapped["dst"] = arr["dst"], arr["src"]
    swapped["sport"], swapped["dport"] = arr["dport"], arr["sport"]
    assert _conversation_keys(swapped).tobytes() == _conversation_keys(arr).tobytes()


@pytest.mark.parametrize("ports", [0, 1, 2])
def test_flow_keys_match_numpy(ports):
    """The detectors' flow keys, in C as in numpy, byte for byte."""
    from analysis.detect import flow_keys_numpy
    from packet_processor import PACKET_DTYPE

    rng = np.random.default_rng(9)
    arr = np.zeros(3000, PACKET_DTYPE)
    raw = arr.view(np.uint8).reshape(3000, PACKET_DTYPE.itemsize)
    raw[:] = rng.integers(0, 256, (3000, PACKET_DTYPE.itemsize), dtype=np.uint8)  # every field, any value
    assert native.flow_keys(arr, ports).tobytes() == flow_keys_numpy(arr, ports).tobytes()
    idx = rng.integers(0, 3000, 700)  # a selection, with repeats and out of order
    assert native.flow_keys(arr, ports, idx).tobytes() == flow_keys_numpy(arr[idx], ports).tobytes()
    with pytest.raises(IndexError):
        native.flow_keys(arr, ports, np.array([0, 3000]))


def _merge_model(rows: dict, keys: np.ndarray, wire: np.ndarray, ts: np.ndarray | None) -> dict:
    """A top table's merge in plain Python: key -> [packets, bytes, first, last]; new keys appended in
    order of first appearance (dicts keep insertion order). Independent of the code under test."""
    for i, key in enumerate(keys.tolist()):
        t = None if ts is None else float(ts[i])
        row = rows.setdefault(key, [0, 0, t, t])
        row[0] += 1
        row[1] += int(wire[i])
        if t is not None:
            row[2], row[3] = min(row[2], t), max(row[3], t)
    return rows


def _as_rows(state: tuple) -> dict:
    keys, vals, times = state
    return {bytes(k): [int(v[0]), int(v[1]), *(([None, None]) if times is None else [float(x) for x in t])]
            for k, v, t in zip(keys, vals, times if times is not None else [None] * len(keys), strict=True)}


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 400), st.integers(1, 7), st.integers(1, 6), st.sampled_from([16, 42]), st.booleans(),
       st.integers(0, 99))
def test_top_merge_matches_a_plain_python_model(batch, batches, alphabet, width, times, seed):
    """native.top_merge, batch by batch, against a dict model of the merge (small cap, so the table
    prunes between batches; Space-Saving's pruning has its own test against true counts)."""
    from packet_processor import TopTable

    need(native.function("ntm_top_merge") is not None, "native/grouprows.c cannot be built here (no C compiler)")
    rng = np.random.default_rng(seed)
    dtype = np.dtype(f"V{width}")
    table = TopTable(dtype, 40, times)
    for _ in range(batches):
        keys = rng.integers(0, alphabet, (batch, width), dtype=np.uint8).view(dtype).ravel()
        wire = rng.integers(0, 70000, batch).astype(np.int64)
        ts = rng.random(batch) * 100 if times else None
        before = _as_rows(table.state[:3])
        got = native.top_merge(table.state[:3], keys, wire, ts)
        merged = _merge_model(before, keys, wire, ts)
        assert list(_as_rows(got)) == list(merged)  # the same keys in the same order
        assert _as_rows(got) == merged
        assert _as_rows(table.merged_numpy(keys, wire, ts)[:3]) == merged  # the numpy twin too
        table.add(keys, wire, ts)
        assert len(table) <= table.cap


def test_top_table_prunes_the_smallest_and_keeps_older_among_equals():
    """Over its cap a top table keeps the cap rows with the most packets; among equal counts, the older
    keys; the floor is the largest count pruned (Space-Saving)."""
    from packet_processor import TopTable

    table = TopTable(np.dtype("V16"), 10)
    key = lambda i: np.frombuffer(i.to_bytes(16, "big"), np.uint8).copy()  # noqa: E731
    keys = lambda ids: np.stack([key(i) for i in ids]).view("V16").ravel()  # noqa: E731
    table.add(keys(range(10)), np.full(10, 60, np.int64))
    table.add(keys([20, 21, 22, 5, 5, 21]), np.full(6, 100, np.int64))
    # 13 keys > cap 10: keep 10. Key 5 has 3 packets, 21 has 2; of the rest (1 each) the oldest: 0..4, 6..8.
    got = [int.from_bytes(bytes(k), "big") for k in table.keys]
    assert got == [0, 1, 2, 3, 4, 5, 6, 7, 8, 21]
    assert table.floor == (1, 100)  # pruned: 9 (1 packet, 60 bytes), 20 and 22 (1 packet, 100 bytes each)
    assert table.vals[got.index(5)].tolist() == [3, 60 + 200]
    assert table.vals[got.index(21)].tolist() == [2, 200]


# Addresses that sit on every branch of LocalMatcher.kinds: unspecified, IPv4 (mapped) unicast, multicast
# and broadcast, IPv6 unicast and multicast, loopback, and this host's own.
_KIND_ADDRS = [bytes(16), headers.V4_PREFIX + bytes([127, 0, 0, 1]), headers.V4_PREFIX + bytes([10, 1, 2, 3]),
               headers.V4_PREFIX + bytes([224, 0, 0, 251]), headers.V4_PREFIX + bytes([255] * 4),
               headers.V4_PREFIX + bytes([192, 168, 7, 9]), bytes([0xFF, 2]) + bytes(13) + b"\x01",
               bytes([0xFE, 0x80]) + bytes(13) + b"\x05", bytes(15) + b"\x01",
               bytes([0x20, 0x01, 0xD, 0xB8]) + bytes(12)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_KIND_ADDRS), st.binary(min_size=16, max_size=16)), max_size=60),
       st.lists(st.sampled_from(["10.0.0.0/8", "192.168.0.0/16", "127.0.0.0/8", "fe80::/10", "2001:db8::/32",
                                 "0.0.0.0/0", "224.0.0.0/4"]), max_size=4),
       st.lists(st.sampled_from(_KIND_ADDRS), max_size=3))
def test_address_kinds_match_numpy(keys, nets, ours):
    """native.addr_kinds (in place on a field of packed records) = LocalMatcher.kinds_numpy."""
    import ipaddress

    matcher = headers.LocalMatcher(addrs=ours, nets=[ipaddress.ip_network(n) for n in nets])
    recs = np.zeros(len(keys), headers.PACKET_DTYPE)
    recs["src"] = keys
    recs["dst"] = keys[::-1]
    for field in (recs["src"], recs["dst"], recs["src"][::-1], recs["dst"][1::2]):  # strided, reversed
        want = matcher.kinds_numpy(field)
        got = native.addr_kinds(field, matcher._addrs_c, matcher._nets_c)
        assert got.dtype == want.dtype and got.tolist() == want.tolist()
        assert matcher.kinds(field).tolist() == want.tolist()
        assert [matcher(bytes(k).ljust(16, b"\0")) for k in field] == want.tolist()  # the per-address classifier


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 4000), st.integers(1, 6), st.integers(1, 300), st.integers(0, 99))
def test_conversation_tally_matches_numpy(n, classes, ports, seed):
    """Per-process attribution's grouping (ids, first record, packets, wire bytes), in C as in numpy, for
    records of mixed classes whose addresses differ in their last bytes only (the ids' varying bits then sit
    high: a weak slot index would have crawled, not failed) and both directions of each conversation."""
    from analysis.headers import PACKET_DTYPE, TCP, UDP, V4_PREFIX
    from enrich.attribution import conversations_numpy

    rng = np.random.default_rng(seed)
    arr = np.zeros(n, PACKET_DTYPE)
    pool = np.array([V4_PREFIX + bytes([127, 1, i >> 8, i & 255]) for i in range(64)] +
                    [bytes(15) + b"\x01"], dtype="S16")
    arr["src"] = pool[rng.integers(0, len(pool), n)]
    arr["dst"] = pool[rng.integers(0, len(pool), n)]
    arr["sport"] = rng.integers(-1, ports, n)
    arr["dport"] = rng.integers(-1, ports, n)
    arr["cls"] = rng.choice(np.array([TCP, UDP, 0, 3, 4, 5], np.uint8)[:classes], n)
    arr["wire_len"] = rng.integers(0, 1 << 32, n, dtype=np.uint64)
    got = native.conv_tally(arr, TCP, UDP)
    want = conversations_numpy(arr)
    if want is None:
        assert len(got[0]) == 0
        return
    ids, first, packets, nbytes = got
    assert np.array_equal(ids, want[0]) and np.array_equal(packets, want[2]) and np.array_equal(nbytes, want[3])
    assert arr[first].tobytes() == want[1].tobytes()  # the same record of each: the first
    assert packets.sum() == np.isin(arr["cls"], (TCP, UDP)).sum()


def test_take_copies_the_records_numpy_indexing_would():
    """analysis.headers.take (whole records as opaque bytes) against numpy's own indexing of a structured
    array: by a mask, by indices (repeated, out of order), on a strided view, and on a plain array."""
    from analysis.headers import PACKET_DTYPE, take

    rng = np.random.default_rng(3)
    arr = np.frombuffer(rng.integers(0, 256, 500 * PACKET_DTYPE.itemsize, dtype=np.uint8).tobytes(), PACKET_DTYPE)
    mask, idx = rng.random(500) < 0.4, rng.integers(0, 500, 300)
    for source in (arr, arr[::3]):
        for which in (mask[:len(source)], idx[idx < len(source)], np.zeros(0, np.int64)):
            got = take(source, which)
            assert got.dtype == PACKET_DTYPE and got.tobytes() == source[which].tobytes()
    plain = rng.integers(0, 9, 50)
    assert np.array_equal(take(plain, plain > 4), plain[plain > 4])
