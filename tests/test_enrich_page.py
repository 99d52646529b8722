"""The page's enrichment panel through AppTest: columns and views, hostile PTR names escaped, never blocking."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
from enrichhelp import HOSTILE, cleared, dnsmasq, packets_in, registered, silent_resolver, tcpdump
from pcapgen import pcap_bytes
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from test_dashboard import app as _app
from test_dashboard import figures, open_tab, run_until

import enrich


@pytest.fixture
def fresh(monkeypatch):
    with cleared():
        yield monkeypatch


EVIL = "10.213.0.66"


def capture(tmp_path, addrs: list[str]) -> str:
    eth = Ether(src="00:00:0c:01:02:03", dst="00:11:22:33:44:55")
    frames = []
    for i, a in enumerate(addrs):
        frames.append(eth / IP(src=EVIL, dst=a) / UDP(sport=5000 + i, dport=53) / b"q")
        frames.append(eth / IP(src=a, dst=EVIL) / TCP(sport=443, dport=40000 + i, flags="SA"))
    path = tmp_path / "who.pcap"
    path.write_bytes(pcap_bytes([(1_700_000_000.0 + i / 10, bytes(f)) for i, f in enumerate(frames)]))
    return str(path)


def app():
    """The page as it starts: the enrichment panel is on by default (no toggle to switch)."""
    return _app()


def frame_with(at, column: str):
    return next(d.value for d in at.dataframe if column in d.value.columns)


def talkers_have(at, column: str, value: str) -> bool:
    frames = [d.value for d in at.dataframe if "side" in d.value.columns]
    return bool(frames) and value in set(frames[0][column])


def test_columns_views_and_hostile_names_escaped(fresh, veth, tmp_path):
    fresh.setenv("NTM_PCAP", capture(tmp_path, ["8.8.8.8", "1.1.1.1"]))
    fresh.setenv("NTM_DNS_SERVER", veth.ns_ip)
    with dnsmasq(veth.ns, veth.ns_ip, {EVIL: HOSTILE, "8.8.8.8": "resolver.ntm.test"}):
        at = run_until(app(), lambda a: talkers_have(a, "name", HOSTILE) and talkers_have(a, "country", "US")
                       and talkers_have(a, "AS", "AS15169 Google LLC"), 30)  # each database loads in the background
    assert not at.exception
    assert [t.label for t in at.tabs][:7] == ["Top talkers", "Conversations", "Top countries",
                                              "Top networks (AS)", "By process", "Recent packets", "Alerts"]
    talkers = frame_with(at, "side")
    row = talkers[talkers["address"] == "8.8.8.8"].iloc[0]
    assert (row["name"], row["country"], row["AS"]) == ("resolver.ntm.test", "US", "AS15169 Google LLC")
    # The table shows the PTR text as text (st.dataframe does not render markdown or HTML).
    assert set(talkers[talkers["address"] == EVIL]["name"]) == {HOSTILE}
    figs = figures(at)
    hover = json.dumps(figs["Top sources: who"]["data"][0]["customdata"])
    assert "**bold**&lt;b&gt;x&lt;/b&gt;" in hover and "<b>x</b>" not in hover
    note = next(c.value for c in at.caption if "AS number and organisation" in c.value).replace("\\", "")
    assert "dated 2024-06-18" in note and "ip-location-db asn 2.3.2026061719 (dated 2026-06-17)" in note
    # Only the open tab is drawn: the others' tables and charts are made when their tab is chosen.
    assert not any({"A name", "maker", "target name", "connections"} & set(d.value.columns) for d in at.dataframe)
    assert not {"Top countries", "Top networks (AS)"} & set(figs)
    conv = frame_with(open_tab(at, "Conversations"), "A name")
    assert {"A country", "B AS", "A port", "B port", "A process", "B process"} <= set(conv.columns)
    assert "53/domain" in set(conv["A port"]) | set(conv["B port"])
    assert not any("side" in d.value.columns for d in at.dataframe)  # the talkers' tab is not drawn now
    recent = frame_with(open_tab(at, "Recent packets"), "maker")
    assert {"source name", "destination country", "service", "process"} <= set(recent.columns)
    assert set(recent["maker"]) == {"Cisco Systems, Inc"}
    assert {"source name", "target country", "source AS"} <= set(frame_with(open_tab(at, "Alerts"),
                                                                            "target name").columns)
    assert {"process", "pid", "packets", "bytes", "connections"} <= set(frame_with(open_tab(at, "By process"),
                                                                                   "connections").columns)
    figs = figures(open_tab(at, "Top countries"))
    assert "US" in figs["Top countries"]["data"][0]["y"] and "private" in figs["Top countries"]["data"][0]["y"]
    figs = figures(open_tab(at, "Top networks (AS)"))
    assert "AS15169 Google LLC" in figs["Top networks (AS)"]["data"][0]["y"]
    assert not at.exception
    # No markdown element carries the raw name (it would render as markup).
    assert not any("<b>x</b>" in m.value for m in [*at.markdown, *at.caption])


def test_page_stays_responsive_when_the_resolver_never_answers(fresh, veth, tmp_path):
    addrs = [f"198.18.0.{i}" for i in range(1, 16)]  # 16 addresses with the source
    fresh.setenv("NTM_PCAP", capture(tmp_path, addrs))
    fresh.setenv("NTM_DNS_SERVER", veth.ns_ip)
    fresh.setenv("NTM_RDNS_TIMEOUT_S", "3")
    fresh.setenv("NTM_RDNS_WORKERS", "1")
    with silent_resolver(veth.ns, veth.ns_ip):
        at = run_until(app(), lambda a: talkers_have(a, "side", "source"), 30)
        # One worker, 3 s per time-out: looking up 16 names in the page thread would take 48 s.
        t = time.monotonic()
        at.run()
        assert time.monotonic() - t < 10
        assert not at.exception
        assert set(frame_with(at, "side")["name"]) == {"…"}  # queued, shown as such
        stats = enrich.shared().names.stats
        assert stats.sent >= 1 and stats.answered == 0
        time.sleep(3.5)
        assert stats.timed_out >= 1


def test_reverse_dns_off_the_page_sends_no_query(fresh, veth, tmp_path):
    fresh.setenv("NTM_PCAP", capture(tmp_path, ["8.8.8.8", veth.host_ip]))
    fresh.setenv("NTM_DNS_SERVER", veth.ns_ip)
    fresh.setenv("NTM_REVERSE_DNS", "0")
    dump = str(tmp_path / "dns.pcap")
    with dnsmasq(veth.ns, veth.ns_ip, {EVIL: "evil.ntm.test"}), tcpdump(veth.host_if, "port 53", dump):
        at = run_until(app(), lambda a: talkers_have(a, "country", "US"), 30)
        for _ in range(3):
            at.run()
            time.sleep(0.5)
    assert not at.exception
    assert set(frame_with(at, "side")["name"]) == {""}
    assert enrich.shared().names.stats.sent == 0
    assert packets_in(dump) == 0
    assert any("Reverse DNS off" in c.value.replace("\\", "") for c in at.caption)


def test_enrichment_off_shows_no_panel_and_starts_no_lookup(fresh, tmp_path):
    """ENRICHMENT=0: the page has none of the panel's elements and builds no enricher."""
    fresh.setenv("NTM_PCAP", capture(tmp_path, ["8.8.8.8"]))
    fresh.setenv("NTM_ENRICHMENT", "0")
    at = run_until(app(), lambda a: any("endpoint A" in d.value.columns for d in a.dataframe), 30)
    assert not at.exception
    assert not any(s.value == "Who is on the other end" for s in at.subheader) and not at.tabs
    assert len(at.dataframe) == 2  # the page's own conversations and recent packets only (no alert here)
    assert not any({"side", "A name", "maker", "pid"} & set(d.value.columns) for d in at.dataframe)
    assert not enrich._SHARED  # no enricher: no DNS pool, no databases loaded, no process table


def test_enrichment_on_by_default_with_the_pages_own_tables(fresh, tmp_path):
    """On by default, beside the page's own tables (which tests pick by key, not by position)."""
    fresh.setenv("NTM_PCAP", capture(tmp_path, ["8.8.8.8"]))
    fresh.setenv("NTM_REVERSE_DNS", "0")
    at = run_until(app(), lambda a: talkers_have(a, "country", "US"), 30)
    assert not at.exception
    assert any(s.value == "Who is on the other end" for s in at.subheader)
    for tab, column in (("Top talkers", "side"), ("Conversations", "A name"), ("Recent packets", "maker"),
                        ("By process", "pid"), ("Alerts", "target name")):
        at = open_tab(at, tab)
        for own in ("endpoint A", "direction", column):
            assert sum(own in d.value.columns for d in at.dataframe) == 1, (tab, own)  # each table once
    procs = frame_with(open_tab(at, "By process"), "pid")  # a file: who holds a port now says nothing about its packets
    assert list(procs.columns) == ["process", "pid", "packets", "bytes", "connections"] and procs.empty
    assert any(c.value.startswith("Not live: the packets come from a file") for c in at.caption)
    assert set(frame_with(open_tab(at, "Recent packets"), "maker")["process"]) == {""}  # none is this machine's


HELD_PORT, CLIENT_PORT = 8822, 57000  # a port this test listens on (unregistered); 57000 is dircproxy's


def local_capture(tmp_path) -> str:
    """Loopback TCP: a client on CLIENT_PORT to HELD_PORT (SYN first), and a reply from 8080 to CLIENT_PORT."""
    frames = []
    for sport, dport, flags in ((CLIENT_PORT, HELD_PORT, "S"), (HELD_PORT, CLIENT_PORT, "SA"),
                                (CLIENT_PORT, HELD_PORT, "A"), (8080, CLIENT_PORT, "PA"),
                                (CLIENT_PORT, 8080, "A")):
        frames.append(Ether() / IP(src="127.0.0.1", dst="127.0.0.1") / TCP(sport=sport, dport=dport, flags=flags))
    path = tmp_path / "local.pcap"
    path.write_bytes(pcap_bytes([(1_700_000_000.0 + i / 10, bytes(f)) for i, f in enumerate(frames)]))
    return str(path)


def test_a_files_local_packets_say_not_live_and_only_the_server_end_names_its_service(fresh, tmp_path):
    """A file's packets between this machine's own addresses, on a port this process holds now: the process
    column says 'not live' (the socket table would name this process); the service is the server end's."""
    assert (registered(HELD_PORT, "tcp"), registered(CLIENT_PORT, "tcp"), registered(8080, "tcp")) == (
        "", "dircproxy", "http-alt")
    fresh.setenv("NTM_PCAP", local_capture(tmp_path))
    fresh.setenv("NTM_REVERSE_DNS", "0")
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", HELD_PORT))
        held.listen()
        at = app()
        at.session_state["who_tab"] = "Recent packets"
        at = run_until(at, lambda a: any("maker" in d.value.columns and len(d.value) == 5 for d in a.dataframe), 30)
        assert not at.exception
        table = enrich.shared().processes
        table.refresh()
        assert f"({os.getpid()})" in table.label("tcp", HELD_PORT)  # what a live row would name
        recent = frame_with(at, "maker")
        assert recent["process"].tolist() == ["not live"] * 5
        assert recent["service"].tolist()[::-1] == [  # newest first on the page; written oldest first
            str(HELD_PORT), str(HELD_PORT), str(HELD_PORT), "8080/http-alt", "8080/http-alt"]
        conv = frame_with(open_tab(at, "Conversations"), "A name")
        ends = {frozenset((r["A port"], r["B port"])) for _, r in conv.iterrows()}
        assert ends == {frozenset((str(HELD_PORT), str(CLIENT_PORT))), frozenset(("8080/http-alt", str(CLIENT_PORT)))}
        assert set(conv["A process"]) == set(conv["B process"]) == {"not live"}
