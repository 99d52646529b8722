"""Review 7 of the investigation work (issue 15), on a stored range: the history filters by vlan, country and
asn as README says, reads the stored conversations once a rerun, applies at most FILTER_MAX filters and says
so, and says in yellow that its figures are approximate where a minute held more than STORE_CONV_MAX.

The file (written, never sent) holds the enrichment tests' public and private flows and two VLANs' traffic,
a quarter of an hour ago; every expectation is tshark's reading of it."""

from __future__ import annotations

import time

import pytest
from conftest import need
from invhelp import tshark_count
from test_dashboard import count, rendered
from test_dashboard import fresh as fresh  # the fixture: a new engine per test
from test_enrich_ends import FLOWS
from test_investigate_history import filtered, history_page_at

import config
from packet_processor import engines


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> str:
    import shutil

    from scapy.all import IP, UDP, Dot1Q, Ether, IPv6, Raw, wrpcap

    need(shutil.which("tshark") is not None, "tshark is the reference (apt-get install tshark)")
    t = float(int(time.time()) // 60 * 60 - 900)
    pkts = []
    for src, dst, size, n in FLOWS:
        for i in range(n):
            ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
            pkts.append(Ether() / ip / UDP(sport=40000 + i, dport=53) / Raw(b"x" * size))
    for vlan, n in ((10, 5), (20, 3)):
        for i in range(n):
            pkts.append(Ether() / Dot1Q(vlan=vlan) / IP(src="10.20.0.1", dst="10.20.0.2")
                        / UDP(sport=7000 + i, dport=7001) / Raw(b"v" * 30))
    for i, p in enumerate(pkts):
        p.time = t + 5 + i * 0.5  # within two whole minutes
    path = tmp_path_factory.mktemp("review7h") / "stored.pcap"
    wrpcap(str(path), pkts)
    return str(path)


def notes(at) -> str:
    return " ".join(rendered(x.value) for x in [*at.caption, *at.warning])


def test_history_filters_by_vlan_country_and_asn(fresh, tmp_path, stored):
    import enrich

    at = history_page_at(fresh, tmp_path, stored)
    assert enrich.shared().geo.wait_loaded(60), "the geo database did not load"
    for query, display in ((dict(vlan="10"), "vlan.id==10"), (dict(vlan="20"), "vlan.id==20"),
                           (dict(country="US"), "ip.addr==8.8.8.8 || ip.addr==9.9.9.9 || "
                                                "ipv6.addr==2001:4860:4860::8888"),
                           (dict(asn="15169"), "ip.addr==8.8.8.8 || ipv6.addr==2001:4860:4860::8888"),
                           (dict(country="AU", vlan="10"), "ip.addr==1.1.1.1 && vlan.id==10")):
        want, _ = tshark_count(stored, display)
        at = filtered(at, **query)
        assert count(at) == want, (query, want)
    assert want == 0 and count(filtered(at, asn="13335")) == tshark_count(stored, "ip.addr==1.1.1.1")[0] > 0


def test_history_reads_the_stored_conversations_once_a_rerun(fresh, tmp_path, stored, monkeypatch):
    at = history_page_at(fresh, tmp_path, stored)
    reads: list[str] = []
    store_cls = type(next(e for e in engines() if e.store is not None).store)
    rows = store_cls.rows
    monkeypatch.setattr(store_cls, "rows", lambda self, table, *a, **k: (
        reads.append(table) if table == "conversations" else None) or rows(self, table, *a, **k))
    at = filtered(at, vlan="10")
    assert reads.count("conversations") == 1 and count(at) == tshark_count(stored, "vlan.id==10")[0]
    assert "Filtered: stored conversations" in [s.value for s in at.subheader]


def test_history_applies_at_most_filter_max_and_says_so(fresh, tmp_path, stored):
    at = history_page_at(fresh, tmp_path, stored)
    limit = config.get("FILTER_MAX")
    at = filtered(at, port=[str(7001)] + [str(p) for p in range(1, limit + 1)])
    errors = [rendered(e.value) for e in at.error]
    assert sum(f"at most {limit} apply (FILTER_MAX)" in e for e in errors) == 1, errors  # said once
    # The first FILTER_MAX apply: port 7001 AND port 1 .. : no conversation has all of them.
    assert count(at) == 0


def test_history_says_approximate_where_a_minute_held_more_than_store_conv_max(fresh, tmp_path, stored):
    fresh.setenv("NTM_STORE_CONV_MAX", "2")
    at = history_page_at(fresh, tmp_path, stored)
    at = filtered(at, vlan="10")  # five conversations of one minute, two kept
    assert "held more than STORE_CONV_MAX" in " ".join(rendered(w.value) for w in at.warning)
    assert count(at) < tshark_count(stored, "vlan.id==10")[0]
