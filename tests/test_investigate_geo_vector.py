"""The country/AS filters' vectorised look-up (GeoDB.keys_of) gives, address by address, exactly the answer of
the single look-up the enrichment panel uses (Enricher.country_of / network_of): random IPv4 and IPv6
addresses, the edges of every kind of range (the geo database's country and AS-name ranges, the AS-number
database's ranges, the range labels' networks), with the databases loaded, and while one is missing."""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest
from conftest import need

import enrich
from analysis.headers import addr_text
from enrich.asn import DEFAULT_DIR
from enrich.geo import _label_table

M64 = (1 << 64) - 1
TOP = (1 << 128) - 1


@pytest.fixture(scope="module")
def loaded():
    need((DEFAULT_DIR / "asn-ipv4-num.csv").exists(), "the AS database is missing: run scripts/setup.sh")
    en = enrich.Enricher(reverse_dns=False, processes=False)
    assert en.geo.wait_loaded(120) and en.geo.asn.ready
    yield en
    en.stop()


def m4(addrs) -> list[int]:
    """IPv4 addresses as the records key them (mapped, ::ffff:a.b.c.d), ends of the IPv4 space kept inside it."""
    return [0xFFFF << 32 | a for a in addrs if 0 <= a < (1 << 32)]


def keys(addrs: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """16-byte address keys (IPv4 mapped, see m4) as two uint64."""
    return np.array([a >> 64 for a in addrs], np.uint64), np.array([a & M64 for a in addrs], np.uint64)


def mismatches(en, addrs: list[int]) -> list[tuple]:
    hi, lo = keys(addrs)
    got = {kind: en.geo.keys_of(kind, hi, lo) for kind in ("country", "asn")}
    wrong = []
    for i, (h, low) in enumerate(zip(hi.tolist(), lo.tolist(), strict=True)):
        text = addr_text(h.to_bytes(8, "big") + low.to_bytes(8, "big"))
        for kind, one in (("country", en.country_of), ("asn", en.network_of)):
            inv, texts = got[kind]
            if texts[inv[i]] != one(text):
                wrong.append((text, kind, texts[inv[i]], one(text)))
    return wrong


def edges(starts: list[int], ends: list[int], rng, k: int) -> list[int]:
    """Each sampled range's first and last address and their outside neighbours (kept in 128 bits)."""
    pick = rng.choice(len(starts), min(k, len(starts)), replace=False)
    out = []
    for i in pick.tolist():
        out += [starts[i], starts[i] - 1, ends[i], ends[i] + 1]
    return [a for a in out if 0 <= a <= TOP]


def v6(rng, n: int, top_bits: int = 128) -> list[int]:
    return [int.from_bytes(rng.bytes(16), "big") >> (128 - top_bits) for _ in range(n)]


def test_random_addresses_get_the_single_look_ups_answer(loaded):
    rng = np.random.default_rng(15)
    v4 = rng.integers(0, 1 << 32, 6000, dtype=np.uint64).tolist()
    unicast = [(0x2000 << 112) | a for a in v6(rng, 3000, 125)]  # 2000::/3: where the databases have ranges
    wrong = mismatches(loaded, m4(v4) + unicast + v6(rng, 1000) + v6(rng, 500, 40))
    assert not wrong, f"{len(wrong)} differ, e.g. {wrong[:5]}"


def test_range_edges_get_the_single_look_ups_answer(loaded):
    from geoip2fast import geoip2fast as g

    rng = np.random.default_rng(16)
    addrs: list[int] = []
    for firsts, lens in ((g.mainListFirstIP, g.mainListNetlength), (g.mainListFirstIPASN, g.mainListNetlengthASN)):
        flat = [x for c in firsts for x in c]
        bits = [n for c in lens for n in c]
        size = [1 << ((32 if s < (1 << 32) else 128) - n) for s, n in zip(flat, bits, strict=True)]
        near = edges(flat, [s + z - 1 for s, z in zip(flat, size, strict=True)], rng, 1500)
        addrs += m4(a for a in near if a < (1 << 32)) + [a for a in near if a >= (1 << 32)]
    for table, v4 in ((loaded.geo.asn._v4, True), (loaded.geo.asn._v6, False)):
        s, e = table.start.astype(object), table.end.astype(object)
        if table.start_lo is not None:
            s = [int(a) << 64 | int(b) for a, b in zip(table.start, table.start_lo, strict=True)]
            e = [int(a) << 64 | int(b) for a, b in zip(table.end, table.end_lo, strict=True)]
        near = edges([int(x) for x in s], [int(x) for x in e], rng, 1500)
        addrs += m4(near) if v4 else near
    b4, _, b6h, b6l, _ = _label_table()
    addrs += m4(b + d for b in b4.tolist() for d in (-1, 0, 1))
    for h, low in zip(b6h.tolist(), b6l.tolist(), strict=True):
        b = h << 64 | low
        addrs += [b, b - 1, b + 1]
    # In the records an address in ::ffff:0:0/96 is an IPv4 address (m4 writes those); no other key is.
    addrs = [a for a in addrs if 0 <= a <= TOP]
    wrong = mismatches(loaded, addrs)
    assert len(addrs) > 20_000 and not wrong, f"{len(wrong)} differ, e.g. {wrong[:5]}"


def test_labels_ipv4_and_ipv6_examples(loaded):
    """Known answers, so the comparison cannot agree on a wrong answer of both."""
    names = ["10.1.2.3", "127.0.0.1", "169.254.1.1", "224.0.0.251", "240.0.0.1", "100.64.0.1", "8.8.8.8",
             "::1", "fe80::1", "ff02::1", "fd00::1", "2001:db8::1", "2001:4860:4860::8888"]
    ips = [ipaddress.ip_address(a) for a in names]
    hi, lo = keys([int(ip) if ip.version == 6 else m4([int(ip)])[0] for ip in ips])
    inv, texts = loaded.geo.keys_of("country", hi, lo)
    got = [texts[i] for i in inv]
    assert got[:6] == ["private", "loopback", "link-local", "multicast", "reserved", "private"]
    assert got[6] == "US" and got[7:12] == ["loopback", "link-local", "multicast", "private", "reserved"]
    inv, texts = loaded.geo.keys_of("asn", hi, lo)
    assert texts[inv[6]].startswith("AS15169 ") and texts[inv[12]].startswith("AS15169 ")


def test_without_the_as_database_or_the_geo_database_the_answers_still_agree(tmp_path):
    rng = np.random.default_rng(17)
    addrs = m4(rng.integers(1 << 24, 224 << 24, 2000, dtype=np.uint64).tolist()) + \
        [(0x2000 << 112) | a for a in v6(rng, 1000, 125)]
    no_asn = enrich.Enricher(reverse_dns=False, processes=False)
    no_asn.geo.asn.folder = tmp_path  # nothing there: AS numbers not available
    assert no_asn.geo.wait_loaded(120) and no_asn.geo.asn.error
    no_geo = enrich.Enricher(reverse_dns=False, processes=False)
    no_geo.geo.data_file = str(tmp_path / "missing.dat.gz")
    no_geo.geo.wait_loaded(120)
    assert no_geo.geo.error
    for en in (no_asn, no_geo):
        wrong = mismatches(en, addrs)
        assert not wrong, f"{len(wrong)} differ, e.g. {wrong[:5]}"
        en.stop()
