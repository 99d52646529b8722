"""The detectors' compiled tables (native/detect.c) against their numpy/Python references (issue 11).

Every table has a reference twin in analysis/detect.py; the compiled one must leave the same state and
give the same answers, and whole Detectors built on either must raise the same alerts with the same
evidence, suppress the same, and hold tables of the same sizes: on the mixgen mix, on an nmap -p-
burst, and on random batches (hypothesis) cut small, out of order and into tiny tables so that
evictions, lossy epochs and shrinks happen.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import need
from hypothesis import given, settings
from hypothesis import strategies as st

import analysis.detect as detect
import native
from analysis.headers import ICMP, NON_IP, PACKET_DTYPE, TCP, UDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from detectors import hostile, nmap_burst

T0 = 1_700_000_000.0


@pytest.fixture(scope="module", autouse=True)
def compiled() -> None:
    need(shutil.which("cc") is not None or shutil.which("gcc") is not None,
         "no C compiler: the Python versions run instead, and there is nothing to compare")
    assert native.function("ntm_unique_gather") is not None, "a C compiler is here, yet native/detect.c did not build"


def detectors(compiled: bool) -> detect.Detectors:
    """Detectors on the compiled tables or on the reference ones."""
    old = detect.NATIVE_TABLES
    detect.NATIVE_TABLES = compiled
    try:
        det = detect.Detectors()
    finally:
        detect.NATIVE_TABLES = old
    assert isinstance(det.pending, detect._PendingNative) == compiled
    return det


def unique_state(table: detect._Unique) -> tuple:
    """A _Unique's whole state, the same shape for both kinds."""
    single = (table.one_key.copy(), table.one_item.copy(), table.one_ts.copy())
    if isinstance(table, detect._UniqueNative):
        c = table.count_set
        counts = dict(zip(c.keys[:c.n].view(np.int64).tolist(),
                          zip(c.values["cnt"][:c.n].tolist(), c.values["first"][:c.n].tolist())))
        seen = set(table.seen_set.keys[:table.seen_set.n].view(np.int64).tolist())
        multi = set(table.multi_set.keys[:table.multi_set.n].tolist())
        order = c.keys[:c.n].view(np.int64).tolist()
    else:
        counts = {k: (n, table.first[k]) for k, n in table.count.items()}
        seen, multi, order = set(table.seen), set(table.multi.tolist()), list(table.count)
    return single, counts, order, seen, multi, table.lossy


def assert_same_state(a: detect.Detectors, b: detect.Detectors) -> None:
    """Every table of two Detectors holds the same."""
    assert a.table_sizes() == b.table_sizes()
    assert np.array_equal(a.pending.slots, b.pending.slots) and a.pending.sweep_at == b.pending.sweep_at
    for name in ("served", "last_udp", "asked", "fragments"):
        x, y = getattr(a, name), getattr(b, name)
        assert np.array_equal(x.keys, y.keys) and np.array_equal(x.ts, y.ts) and np.array_equal(x.value, y.value)
    for pa, pb in zip(a.phases, b.phases):
        assert pa.epoch == pb.epoch and pa.answered.items() == list(pb.answered.items())
        for name in ("vertical", "horizontal", "stealth"):
            sa, sb = unique_state(getattr(pa, name)), unique_state(getattr(pb, name))
            for x, y in zip(sa[0], sb[0]):
                assert np.array_equal(x, y)
            assert sa[1:] == sb[1:], name
    for kind, sa in a.seconds.items():
        sb = b.seconds[kind]
        assert sa.second == sb.second and sa.full == sb.full
        assert np.array_equal(sa.pairs.keys, sb.pairs.keys) and np.array_equal(sa.pairs.stamp, sb.pairs.stamp)
        keys = sb.keys if len(sb.keys) else np.empty(0, np.uint64)
        assert len(sa) == len(sb)
        pa, ca = sa.lookup(keys)
        assert np.array_equal(pa, sb.packets) and np.array_equal(ca, sb.sources)
    assert np.array_equal(a.reflected.pairs.keys, b.reflected.pairs.keys)
    known = set(a.known_hosts.keys[:a.known_hosts.n].view(np.int64).tolist())
    reported = set(a.reported_hosts.keys[:a.reported_hosts.n].view(np.int64).tolist())
    assert known == b.known_hosts and reported == b.reported_hosts


def both(batches: list[np.ndarray]) -> tuple[detect.AlertBook, detect.Detectors]:
    """The batches through compiled and reference detectors; asserts the same alerts, suppressions and state."""
    fast, slow = detectors(True), detectors(False)
    fast_book, slow_book = detect.AlertBook(), detect.AlertBook()
    for arr in batches:
        fast.observe(arr, fast_book)
        slow.observe(arr, slow_book)
        assert [a.as_dict() for a in fast_book.alerts()] == [a.as_dict() for a in slow_book.alerts()]
    assert fast_book.suppressed() == slow_book.suppressed()
    assert_same_state(fast, slow)
    return fast_book, fast


def cut(arr: np.ndarray, size: int) -> list[np.ndarray]:
    return [arr[i:i + size] for i in range(0, len(arr), size)]


def test_mixgen_mix_gives_the_same_alerts_and_state(tmp_path):
    """The benchmark's scan-heavy mix (benchmarks/mixgen.py, parsed as a file is) in 8,192-row batches."""
    import mixgen

    from analysis.headers import LocalMatcher, parse_batch
    from capture.sources import FileReader

    path = tmp_path / "mix.pcap"
    mixgen.make_mix(path, 120_000, seed=3)
    arr = np.concatenate([parse_batch(b, LocalMatcher()) for b in FileReader(str(path)).batches(65_536)])
    book, _ = both(cut(arr, 8_192))
    assert {"port_scan"} <= {a.detector for a in book.alerts()}


def test_nmap_burst_and_hostile_mix_give_the_same_alerts_and_state():
    """An nmap -sS -p- burst (one scanner, every port) and the random-spoofed hostile mix of benchmarks/detectors.py."""
    book, _ = both(cut(nmap_burst()[:80_000], 4_096))
    assert any(a.detector == "port_scan" for a in book.alerts())
    _, det = both(cut(hostile(120_000, seed=4), 16_384))
    sizes = det.table_sizes()
    assert sizes["pending"] > 1000 and sizes["served"] > 1000  # the tables were used


def test_tiny_tables_evict_shrink_and_go_lossy_alike(monkeypatch):
    """With 64-entry tables a many-scanner mix overflows every table (pushed-out probes, shrinks, a lossy
    epoch, full pair sets): the compiled and reference tables still agree exactly."""
    monkeypatch.setenv("NTM_DETECTOR_STATE_MAX", "64")
    monkeypatch.setenv("NTM_NEW_HOST_LEARN_S", "1")
    rng = np.random.default_rng(11)
    batches = [random_batch(rng, 2_000, T0 + 4 * i, 40) for i in range(12)]
    _, fast = both(batches + cut(hostile(20_000, seed=6, pps=5_000.0), 1_000))
    assert any(t.lossy for ph in fast.phases for t in (ph.vertical, ph.horizontal))  # the lossy path ran


def random_batch(rng: np.random.Generator, n: int, t0: float, hosts: int) -> np.ndarray:
    """n random rows over a small pool of addresses and ports, roughly in time order with a few late rows."""
    arr = np.zeros(n, PACKET_DTYPE)
    pool = np.zeros((hosts, 16), np.uint8)
    pool[:, 10:12] = 255
    pool[:, 12] = rng.choice([10, 127, 8], hosts)
    pool[:, 13:16] = rng.integers(0, 256, (hosts, 3))
    arr["src"] = pool[rng.integers(0, hosts, n)].view("S16").ravel()
    arr["dst"] = pool[rng.integers(0, hosts, n)].view("S16").ravel()
    ts = t0 + np.sort(rng.random(n)) * rng.choice([0.5, 5.0, 400.0])
    late = rng.random(n) < 0.05
    ts[late] -= rng.random(int(late.sum())) * 3
    arr["ts"] = ts
    kind = rng.integers(0, 4, n)
    arr["cls"] = np.choose(kind, [TCP, UDP, ICMP, NON_IP])
    arr["proto"] = np.choose(kind, [6, 17, 1, -1])
    arr["ipver"] = 4
    arr["ethertype"] = np.where(kind == 3, 0x0806, 0x0800)
    arr["arp_op"] = np.where(kind == 3, rng.integers(1, 3, n), 0)
    ports = np.array([22, 53, 80, 123, 443, 1900, 11211, 40000, 40001, 50000])
    arr["sport"] = np.where(kind < 2, ports[rng.integers(0, len(ports), n)], -1)
    arr["dport"] = np.where(kind < 2, ports[rng.integers(0, len(ports), n)], -1)
    flags = np.array([0x02, 0x12, 0x14, 0x04, 0x10, 0x01, 0x29, 0x00])
    arr["tcp_flags"] = np.where(kind == 0, flags[rng.integers(0, len(flags), n)], 0)
    arr["icmp_type"] = np.where(kind == 2, rng.choice([0, 3, 8], n), -1)
    arr["frag"] = np.where((kind == 1) & (rng.random(n) < 0.1), rng.choice([0x2000, 0x0010], n), 0)
    arr["ip_id"] = rng.integers(0, 4, n)
    arr["wire_len"] = arr["cap_len"] = rng.integers(60, 1500, n)
    arr["hw_src"] = rng.integers(0, 3, (n, 6), dtype=np.uint8).view("S6").ravel()
    return arr


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.lists(st.integers(1, 600), min_size=1, max_size=6),
       st.sampled_from([16, 64, 1024]), st.integers(2, 300))
def test_random_batches_give_the_same_alerts_and_state(seed, sizes, cap, hosts):
    """Random batches over a few hosts and ports, tables from 16 entries up: identical results and state."""
    rng = np.random.default_rng(seed)
    old = dict(os.environ)
    os.environ.update({"NTM_DETECTOR_STATE_MAX": str(cap), "NTM_SCAN_PORTS": "3",
                                     "NTM_SCAN_HOSTS": "3", "NTM_SYN_FLOOD_PPS": "20", "NTM_ICMP_FLOOD_PPS": "20",
                                     "NTM_UDP_FLOOD_PPS": "20", "NTM_REFLECTION_BPS": "1000",
                                     "NTM_REFLECTION_SOURCES": "2", "NTM_NEW_HOST_LEARN_S": "1"})
    try:
        t, batches = T0, []
        for n in sizes:
            batches.append(random_batch(rng, n, t, hosts))
            t = float(batches[-1]["ts"].max()) + float(rng.choice([0.0, 1.0, 200.0]))
        both(batches)
    finally:
        os.environ.clear()
        os.environ.update(old)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 40), st.lists(st.integers(0, 400), min_size=1, max_size=8))
def test_unique_table_matches_its_reference(seed, cap, sizes):
    """_Unique alone: few keys and items (singles, promotions, repeats), a cap small enough to shrink and go lossy."""
    rng = np.random.default_rng(seed)
    fast, slow = detect._UniqueNative(cap), detect._Unique(cap)
    for n in sizes:
        keys = rng.integers(1, 12, n).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        items = keys ^ rng.integers(0, 9, n).astype(np.uint64)
        ts = T0 + rng.random(n).round(1)  # ties: the stable time order matters
        got_keys, got_rows = fast.add(keys, items, ts)
        want = slow.add(keys, items, ts)
        assert list(zip(got_keys.tolist(), got_rows.tolist())) == list(want.items())
        assert np.array_equal(fast.counts(got_keys), slow.counts(got_keys))
        fs, ss = unique_state(fast), unique_state(slow)
        assert all(np.array_equal(x, y) for x, y in zip(fs[0], ss[0])) and fs[1:] == ss[1:]
        if rng.random() < 0.1:
            fast.reset(), slow.reset()


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.lists(st.integers(0, 300), min_size=1, max_size=6))
def test_slot_tables_match_their_references(seed, sizes):
    """_Pending, _Recent, _PairSet and _Second alone, on 16-slot tables with repeated keys in one call."""
    rng = np.random.default_rng(seed)
    pf, ps = detect._PendingNative(3.0, 8), detect._Pending(3.0, 8)
    rf, rs = detect._RecentNative(2.0, 8), detect._Recent(2.0, 8)
    sf, ss = detect._SecondNative(6), detect._Second(6)
    now = T0
    for n in sizes:
        keys = rng.integers(1, 40, n).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        ts = now + np.sort(rng.random(n)) * 3
        probes = np.zeros(n, detect.ATTEMPT_DTYPE)
        probes["h"], probes["ts"], probes["port"] = keys, ts, rng.integers(0, 100, n)
        assert np.array_equal(pf.add(probes), ps.add(probes))
        look = rng.integers(1, 40, n).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        assert np.array_equal(pf.contains(look), ps.contains(look))
        assert np.array_equal(pf.answer(look[: n // 2]), ps.answer(look[: n // 2]))
        assert np.array_equal(pf.slots, ps.slots)
        values = rng.integers(0, 1000, n)
        rf.add(keys, ts, values), rs.add(keys, ts, values)
        t = float(ts[-1]) if n else now
        assert np.array_equal(rf.contains(look, t), rs.contains(look, t))
        assert np.array_equal(rf.pop(look[: n // 3], t), rs.pop(look[: n // 3], t))
        assert np.array_equal(rf.keys, rs.keys) and np.array_equal(rf.ts, rs.ts) and np.array_equal(rf.value, rs.value)
        second = int(now)
        if sf.second != second:
            sf.start(second), ss.start(second)
        pairs = keys ^ rng.integers(0, 5, n).astype(np.uint64)
        if n:
            sf.add(keys, pairs), ss.add(keys, pairs)
        assert sf.full == ss.full and np.array_equal(sf.pairs.keys, ss.pairs.keys)
        assert np.array_equal(sf.pairs.stamp, ss.pairs.stamp)
        assert [x.tolist() for x in sf.lookup(look)] == [x.tolist() for x in ss.lookup(look)]
        assert len(sf) == len(ss)
        now += float(rng.choice([0.5, 1.0, 10.0]))
