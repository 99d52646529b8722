"""Enrichment without the network: range labels, services, OUI makers, the offline geo/AS database, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest
from conftest import PYTHON, ROOT, need, run
from pcapgen import pcap_bytes
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from enrich.oui import MANUF_FILE, OUI, parse_manuf
from enrich.ranges import range_label
from enrich.services import Services, parse_services


@pytest.mark.parametrize("addr,label", [
    ("10.1.2.3", "private"), ("172.20.0.1", "private"), ("192.168.1.1", "private"), ("100.64.0.1", "private"),
    ("fd12::1", "private"), ("127.0.0.1", "loopback"), ("::1", "loopback"), ("169.254.3.4", "link-local"),
    ("fe80::1", "link-local"), ("224.0.0.251", "multicast"), ("ff02::1", "multicast"),
    ("239.255.255.250", "multicast"), ("192.0.2.7", "reserved"), ("198.51.100.1", "reserved"),
    ("203.0.113.9", "reserved"), ("2001:db8::1", "reserved"), ("240.0.0.1", "reserved"),
    ("0.0.0.0", "reserved"), ("255.255.255.255", "reserved"), ("::ffff:10.0.0.1", "private"),
    ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("not an address", None),
])
def test_range_labels(addr, label):
    assert range_label(addr) == label


def test_services_both_protocols_from_etc_services():
    s = Services()
    need(s.origin == "/etc/services", "no /etc/services (Debian: netbase)")
    assert s.label(443, "tcp") == "443/https" and s.label(53, "udp") == "53/domain"
    assert s.label(53, "TCP") == "53/domain" and s.name(5353, "udp") == "mdns"
    assert s.label(40000, "tcp") == "40000" and s.label(None) == "" and s.label(-1) == ""


def test_services_parser_first_name_wins_and_skips_junk():
    table = parse_services("http 80/tcp www # WorldWideWeb\nwww 80/tcp\nbad line\nx 12/sctp\nntp 123/udp\n")
    assert table == {(80, "tcp"): "http", (123, "udp"): "ntp"}


def test_oui_makers_from_wireshark_manuf():
    need(MANUF_FILE.exists(), "Wireshark's manuf file is missing (apt-get install libwireshark-data)")
    oui = OUI()
    # 00:00:0C is Cisco's first block; 00:1B:C5:00:00:xx is a /36 block inside an IEEE 'IAB' range.
    assert "Cisco" in oui.maker("00:00:0c:12:34:56")
    assert oui.maker(bytes.fromhex("001bc5000001")) == "Converging Systems Inc."
    assert oui.maker(b"\0" * 6) is None


def test_manuf_parser_longest_prefix():
    table = parse_manuf("00:11:22\tShort\tShort Inc\n00:11:22:30:00:00/28\tLong\tLong Ltd\n# c\n")
    assert table[24][0x001122] == "Short Inc" and table[28][0x0011223] == "Long Ltd"


GEO_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from enrich import Enricher
e = Enricher(reverse_dns=False, processes=False)
assert e.geo.wait_loaded(120), e.geo.error
addrs = sys.argv[2:]
print(json.dumps({"about": e.about(), "geo": {a: e.address(a) for a in addrs}}))
"""

# Independent knowledge (RIR registrations and the operators' own pages), not the database's output:
# Google Public DNS is AS15169 (Google LLC, US); Cloudflare's 1.1.1.1 is AS13335 (Cloudflare, Inc.),
# registered by APNIC in Australia (APNIC-LABS research prefix); Quad9 9.9.9.9 is AS19281 (Quad9, ARIN,
# US); OpenDNS 208.67.222.222 is AS36692 (Cisco OpenDNS, US). The country is GeoLite2's (2024-06-18),
# the AS number and organisation come from one database (ip-location-db 'asn', 2026-06-17).
PUBLIC = {"8.8.8.8": ("US", 15169, "google"), "2001:4860:4860::8888": ("US", 15169, "google"),
          "1.1.1.1": ("AU", 13335, "cloudflare"), "2606:4700:4700::1111": ("US", 13335, "cloudflare"),
          "9.9.9.9": ("US", 19281, "quad9"), "208.67.222.222": ("US", 36692, "opendns")}
LABELLED = {"192.168.7.7": "private", "127.0.0.1": "loopback", "169.254.9.9": "link-local",
            "224.0.0.1": "multicast", "ff02::fb": "multicast", "192.0.2.1": "reserved"}


def test_geo_and_as_offline_in_a_namespace_without_a_route():
    """The lookups answer inside a network namespace with no route at all: nothing is fetched."""
    need(os.geteuid() == 0 and shutil.which("ip"), "the no-network namespace needs root and iproute2")
    ns = f"ntm-geo-{uuid.uuid4().hex[:6]}"
    run(["ip", "netns", "add", ns])
    try:
        routes = run(["ip", "route", "show"], ns=ns).stdout + run(["ip", "-6", "route", "show"], ns=ns).stdout
        assert routes.strip() == ""  # no route, not even loopback (lo is down)
        out = run([PYTHON, "-c", GEO_SCRIPT, str(ROOT), *PUBLIC, *LABELLED], ns=ns, timeout=300).stdout
    finally:
        run(["ip", "netns", "del", ns], check=False)
    got = json.loads(out)
    for addr, (country, asn, org) in PUBLIC.items():
        g = got["geo"][addr]
        assert (g["country"], g["asn"]) == (country, asn) and org in g["as_org"].lower(), (addr, g)
    for addr, label in LABELLED.items():
        assert got["geo"][addr] == {"country": label, "asn": None, "as_org": None}, addr
    assert got["about"]["geo_date"] == "2024-06-18" and "GeoLite2" in got["about"]["geo_database"]
    assert got["about"]["asn_date"] == "2026-06-17" and got["about"]["asn_error"] is None


def test_summary_enrich_adds_geo_and_services(tmp_path):
    eth = Ether(src="00:00:0c:01:02:03", dst="00:11:22:33:44:55")
    frames = [eth / IP(src="10.0.0.5", dst="8.8.8.8") / UDP(sport=5000, dport=53) / b"q",
              eth / IP(src="10.0.0.5", dst="8.8.8.8") / UDP(sport=5000, dport=53) / b"q",
              eth / IP(src="8.8.8.8", dst="10.0.0.5") / UDP(sport=53, dport=5000) / b"r",
              eth / IP(src="10.0.0.5", dst="1.1.1.1") / TCP(sport=40001, dport=443, flags="S")]
    path = tmp_path / "e.pcap"
    path.write_bytes(pcap_bytes([(1_700_000_000.0 + i, bytes(f)) for i, f in enumerate(frames)]))
    env = {**os.environ, "NTM_REVERSE_DNS": "0"}
    plain = json.loads(subprocess.run([PYTHON, "packet_processor.py", "summary", str(path)], cwd=ROOT, env=env,
                                      capture_output=True, text=True, check=True).stdout)
    out = json.loads(subprocess.run([PYTHON, "packet_processor.py", "summary", str(path), "--enrich"], cwd=ROOT,
                                    env=env, capture_output=True, text=True, check=True).stdout)
    src = {e.get("address", e.get("addr")): e for e in out["top10_src_by_packets"]}
    dst = {e.get("address", e.get("addr")): e for e in out["top10_dst_by_packets"]}
    assert src["10.0.0.5"]["country"] == "private" and src["10.0.0.5"]["asn"] is None
    assert (dst["8.8.8.8"]["country"], dst["8.8.8.8"]["asn"], dst["8.8.8.8"]["as_org"]) == ("US", 15169, "Google LLC")
    assert (dst["1.1.1.1"]["asn"], dst["1.1.1.1"]["as_org"]) == (13335, "Cloudflare, Inc.")
    assert "name" not in dst["1.1.1.1"]
    # Backward compatible: [port, count] first, the service name third; counts untouched.
    assert out["top10_udp_dst_ports"] == [[53, 2, "domain"], [5000, 1, None]]
    assert out["top10_tcp_dst_ports"] == [[443, 1, "https"]]
    assert [p[:2] for p in out["top10_udp_dst_ports"]] == plain["top10_udp_dst_ports"]
    assert out["packets"] == plain["packets"] == 4
    assert out["enrichment"]["rdns"]["sent"] == 0


def test_a_loaded_geo_database_is_left_out_of_the_garbage_collectors_full_passes():
    """The geo/AS database's objects live as long as the process: once loaded they are in the collector's
    permanent generation (gc.freeze), so a full pass, which holds the GIL, never walks them; a stopped
    Enricher hands them back (its database, reference cycles and all, can then be freed)."""
    import gc

    from enrich import Enricher

    gc.unfreeze()  # whatever an earlier test froze
    en = Enricher(reverse_dns=False, processes=False)
    en.start()
    assert en.geo.wait_loaded(120), en.geo.error
    tracked = {id(o) for o in gc.get_objects()}  # every generation but the permanent one
    assert id(en.geo._db) not in tracked and gc.get_freeze_count() > 0
    en.stop()
    assert gc.get_freeze_count() == 0 and id(en.geo._db) in {id(o) for o in gc.get_objects()}


def test_the_geo_lookup_cache_is_bounded_and_an_evicted_address_is_answered_again():
    """Looking up more distinct public addresses than cache_max keeps at most cache_max answers; an address
    pushed out is looked up again with the same answer."""
    from capture.heap import release_gc
    from enrich.geo import GeoDB

    geo = GeoDB(cache_max=50)
    try:
        assert geo.wait_loaded(120), geo.error
        first = geo.lookup("8.8.8.8")
        assert (first.country, first.asn) == ("US", 15169)
        for i in range(200):
            geo.lookup(f"9.{i // 250}.{i % 250}.1")
        assert len(geo._cache) == 50 and geo._cache.get("8.8.8.8") is None  # evicted: least recently used
        again = geo.lookup("8.8.8.8")
        assert (again.country, again.asn, again.as_org) == (first.country, first.asn, first.as_org)
    finally:
        release_gc()  # the loaded database froze the collector's view (an Enricher's stop would hand it back)
