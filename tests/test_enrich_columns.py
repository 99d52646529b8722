"""The live page's own tables (top talkers, conversations, recent packets, alerts) with enrichment columns,
through AppTest on real traffic: names from a real resolver (dnsmasq), processes from curl and http.server
checked against `ss -p`, AS numbers against the AS database's CSV read here, hostile PTR text escaped."""

from __future__ import annotations

import csv
import ipaddress
import json
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import PYTHON, ROOT, need, wait_for
from enrichhelp import HOSTILE, cleared, dnsmasq, held_curl, held_resolver, pcap_totals, reference_dump, registered
from notifyhelp import nmap_scan
from pcapgen import pcap_bytes
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from test_dashboard import app, figures, open_tab, run_until

import enrich
from enrich.attribution import UNKNOWN, WAITING
from enrich.processes import shared_table


@pytest.fixture
def fresh(monkeypatch):
    with cleared():
        yield monkeypatch


WEB, CLIENT, TARGET = "127.0.0.7", "127.0.0.1", "127.0.0.2"  # the web server, curl, the scanned host
WEB_PORT = 8080  # http-alt in /etc/services: the service column has a name to show
NAMES = {WEB: "web.ntm.test", CLIENT: "client.ntm.test", TARGET: HOSTILE}
CONV_COLUMNS = ["endpoint A", "endpoint B", "protocol", "packets", "bytes", "first seen", "last seen"]
RECENT_COLUMNS = ["time", "direction", "protocol", "source", "src port", "destination", "dst port", "size",
                  "TCP flags"]
ALERT_COLUMNS = ["last seen", "severity", "detector", "source", "target", "count", "evidence", "what it means", "ack"]


def keyed(at, key: str):
    """The page's table with this widget key (AppTest keeps the key of a selectable dataframe only), else by
    a column only that table has."""
    marks = {"conversations": "endpoint A", "recent": "TCP flags", "alerts": "detector", "top_talkers": "top"}
    found = [d.value for d in at.dataframe if marks[key] in d.value.columns
             and not {"A name", "side", "maker", "target name"} & set(d.value.columns)]  # not the panel's tables
    assert len(found) <= 1, [list(f.columns) for f in found]
    return found[0] if found else None


@pytest.fixture
def web():
    """python -m http.server on WEB:WEB_PORT serving a 12 MB file."""
    need(shutil.which("curl") is not None, "curl is not installed")
    folder = Path("/tmp") / f"ntm-enrcol-{time.time_ns()}"
    folder.mkdir()
    (folder / "blob").write_bytes(b"x" * 12_000_000)
    proc = subprocess.Popen([PYTHON, "-m", "http.server", str(WEB_PORT), "--bind", WEB], cwd=folder,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: socket.socket().connect_ex((WEB, WEB_PORT)) == 0, 10), "http.server did not start"
        yield proc
    finally:
        proc.kill()
        proc.wait(5)
        shutil.rmtree(folder, ignore_errors=True)


def conversation(conv, endpoint: str):
    """(the conversation row with this endpoint, which end it is: 'A' or 'B', the other end)."""
    sel = conv[(conv["endpoint A"] == endpoint) | (conv["endpoint B"] == endpoint)]
    assert len(sel) == 1, sel
    row = sel.iloc[0]
    end = "A" if row["endpoint A"] == endpoint else "B"
    return row, end, "B" if end == "A" else "A"


def rows_of(frame, **match):
    sel = frame
    for k, v in match.items():
        sel = sel[sel[k] == v]
    return sel


def local_ports() -> set[int]:
    """The ports of every TCP and UDP socket on this host now."""
    return {c.laddr.port for c in psutil.net_connections("inet") if c.laddr}


def test_live_tables_show_names_processes_services_and_escape_hostile_names(fresh, veth, web, tmp_path):
    fresh.setenv("NTM_INTERFACE", "lo")
    # Below the ephemeral range (32768-60999), on no socket's port: no client (curl) can take it during the test.
    sport = random.choice(sorted(set(range(20_000, 32_000)) - local_ports()))
    fresh.setenv("NTM_BPF_FILTER", f"(host {WEB} and tcp port {WEB_PORT}) or (host {TARGET} and port {sport})")
    fresh.setenv("NTM_DNS_SERVER", veth.ns_ip)
    fresh.setenv("NTM_RECENT_ROWS", "1000")
    ref = tmp_path / "web.pcap"
    with dnsmasq(veth.ns, veth.ns_ip, NAMES):
        at = app()
        at.run()
        assert not at.exception
        with reference_dump(f"host {WEB} and tcp port {WEB_PORT}", ref):
            # curl's connection stays open until the page's process table (the worker's reads, mirrored) names it.
            pid, cport = held_curl(WEB, WEB_PORT, "/blob", lambda _pid, port: ("tcp", port) in shared_table().owners(),
                                   client=CLIENT)
        # Attribution keys a local end by protocol and port alone (the README says so): a probe to curl's
        # ephemeral port on TARGET would be named after curl (it failed CI once), and so would one to any other
        # socket's port on this host. The scanned range and the scan's source port keep clear of every socket.
        busy = local_ports()
        first = next(f for f in range(47_000, 60_000, 200) if busy.isdisjoint(range(f, f + 200)))
        nmap_scan(sport, f"{first}-{first + 199}", TARGET)

        def filled(a) -> bool:
            al, rec, conv = keyed(a, "alerts"), keyed(a, "recent"), keyed(a, "conversations")
            if al is None or TARGET not in set(al["target"]) or rec is None or conv is None:
                return False
            talkers = keyed(a, "top_talkers")
            if talkers is None or TARGET not in set(talkers["address"]):  # the scan reaches the bars later
                return False
            hosts = [*rec["src host"], *rec["dst host"], *conv["A host"], *conv["B host"], *al["source host"],
                     *al["target host"], *talkers["host"]]
            if "…" in hosts:  # every lookup answered (each table reads the cache as it is drawn)
                return False
            # The charts are drawn before the tables: in a rerun where an answer came in between, the tables
            # have the name and the top-talker hovers still show "…" (pending).
            hover = json.dumps(figures(a).get("Top 10 destinations", {}).get("data", [{}])[0].get("customdata"))
            return "\\u2026" not in hover and "…" not in hover
        at = run_until(at, filled, 20)
    assert not at.exception
    server = psutil.Process(web.pid).name()
    recent = keyed(at, "recent")
    assert list(recent.columns[:len(RECENT_COLUMNS)]) == RECENT_COLUMNS  # today's columns first, unchanged
    to_web = rows_of(recent, source=CLIENT, destination=WEB, **{"src port": cport})
    assert len(to_web)
    assert set(to_web["src host"]) == {NAMES[CLIENT]} and set(to_web["dst host"]) == {NAMES[WEB]}
    assert set(to_web["src country"]) == set(to_web["dst country"]) == {"loopback"}  # 127/8, never a country
    assert set(to_web["src AS"]) == {""}
    assert set(to_web["service"]) == {f"{WEB_PORT}/{socket.getservbyport(WEB_PORT, 'tcp')}"}
    assert set(to_web["src process"]) == {f"curl ({pid})"}  # the pid `ss -p` named for curl's port
    assert set(to_web["dst process"]) == {f"{server} ({web.pid})"}
    replies = rows_of(recent, source=WEB, destination=CLIENT, **{"dst port": cport})
    assert set(replies["service"]) == {f"{WEB_PORT}/http-alt"} and set(replies["dst process"]) == {f"curl ({pid})"}
    assert set(recent["src maker"]) == {""}  # lo's frames carry an all-zero MAC: no maker to name

    conv = keyed(at, "conversations")
    assert list(conv.columns[:len(CONV_COLUMNS)]) == CONV_COLUMNS
    row, web_end, cl_end = conversation(conv, f"{WEB}:{WEB_PORT}")
    assert (row[f"{web_end} host"], row[f"{web_end} service"], row[f"{web_end} process"]) == (
        NAMES[WEB], f"{WEB_PORT}/http-alt", f"{server} ({web.pid})")
    assert (row[f"{cl_end} host"], row[f"{cl_end} process"], row[f"{cl_end} country"]) == (
        NAMES[CLIENT], f"curl ({pid})", "loopback")

    alerts = keyed(at, "alerts")
    assert list(alerts.columns[:len(ALERT_COLUMNS)]) == ALERT_COLUMNS
    scan = alerts[(alerts["detector"] == "port_scan") & (alerts["target"] == TARGET)].iloc[0]
    assert (scan["source host"], scan["target host"], scan["target country"]) == (NAMES[CLIENT], HOSTILE, "loopback")

    talkers = keyed(at, "top_talkers")
    assert dict(zip(talkers["address"], talkers["host"])) == {a: NAMES[a] for a in set(talkers["address"])}
    # PTR text is data: the Plotly hover escapes it, no Markdown element carries it raw.
    hover = json.dumps(figures(at)["Top 10 destinations"]["data"][0]["customdata"])
    assert "**bold**&lt;b&gt;x&lt;/b&gt;" in hover and "<b>x</b>" not in hover
    assert not any("<b>x</b>" in m.value for m in [*at.markdown, *at.caption])

    # The panel's "By process" tab: curl and the server, each with every packet and byte of the one
    # connection (both ends are this machine), as tcpdump saw it; the scan's unowned ports are 'unknown'.
    ref_packets, ref_bytes = pcap_totals(ref)
    want = {"curl": (pid, ref_packets, ref_bytes, 1), server: (web.pid, ref_packets, ref_bytes, 1)}

    def by_process(a) -> dict:
        frame = next((d.value for d in a.dataframe if "connections" in d.value.columns and "pid" in d.value.columns),
                     None)
        if frame is None:
            return {}
        return {r["process"]: (r["pid"], r["packets"], r["bytes"], r["connections"]) for _, r in frame.iterrows()}

    at = open_tab(at, "By process")
    # The scan's ports are held apart ("not named yet") for the attribution's grace, then counted as unknown.
    at = run_until(at, lambda a: all(by_process(a).get(k) == v for k, v in want.items())
                   and WAITING not in by_process(a), 15)
    assert not at.exception
    rows = by_process(at)
    assert {k: rows.get(k) for k in want} == want, rows
    assert set(rows) - set(want) == {UNKNOWN}, rows  # nmap's raw-socket probes: no socket owns their ports
    assert ref_bytes > 12_000_000


def as_entry(addr: str) -> tuple[int, str]:
    """(AS number, organisation) of an IPv4 address from the shipped CSV, read here by a plain scan."""
    key = int(ipaddress.IPv4Address(addr))
    with open(ROOT / "data" / "ip-location-db-asn" / "asn-ipv4-num.csv", newline="") as fh:
        for start, end, asn, org in csv.reader(fh):
            if int(start) <= key <= int(end):
                return int(asn), org
    raise AssertionError(f"{addr} is in no range")


def public_capture(tmp_path) -> str:
    """UDP/DNS and HTTPS exchanges with public addresses, and a SYN scan of one (a file: no packet is sent)."""
    eth = Ether(src="00:00:0c:01:02:03", dst="00:11:22:33:44:55")
    me, frames = "10.213.0.5", []
    for i, far in [*enumerate(["8.8.8.8", "1.1.1.1"])] * 3:  # busier than any one scan probe: in the top 20
        frames += [eth / IP(src=me, dst=far) / UDP(sport=5000 + i, dport=53) / b"q",
                   eth / IP(src=far, dst=me) / UDP(sport=53, dport=5000 + i) / b"a",
                   eth / IP(src=me, dst=far) / TCP(sport=41000 + i, dport=443, flags="S"),
                   eth / IP(src=far, dst=me) / TCP(sport=443, dport=41000 + i, flags="SA")]
    frames += [eth / IP(src="1.1.1.1", dst=me) / TCP(sport=555, dport=p, flags="S") for p in range(20, 60)]
    frames += [eth / IP(src=me, dst="1.1.1.1") / TCP(sport=p, dport=555, flags="RA") for p in range(20, 60)]
    path = tmp_path / "public.pcap"
    path.write_bytes(pcap_bytes([(1_700_000_000.0 + i / 100, bytes(f)) for i, f in enumerate(frames)]))
    return str(path)


def test_public_addresses_get_the_as_databases_entry_and_makers(fresh, tmp_path):
    fresh.setenv("NTM_PCAP", public_capture(tmp_path))
    fresh.setenv("NTM_REVERSE_DNS", "0")
    at = run_until(app(), lambda a: keyed(a, "top_talkers") is not None
                   and "AS15169" in " ".join(keyed(a, "top_talkers")["AS"]), 30)  # the databases load in the background
    assert not at.exception
    want = {a: "AS{} {}".format(*as_entry(a)) for a in ("8.8.8.8", "1.1.1.1")}
    talkers = keyed(at, "top_talkers")
    got = {r["address"]: r["AS"] for _, r in talkers.iterrows() if r["address"] in want}
    assert got == want
    assert set(talkers[talkers["address"] == "10.213.0.5"]["country"]) == {"private"}
    assert set(talkers["host"]) == {""}  # REVERSE_DNS off: no name, no query
    conv = keyed(at, "conversations")
    dns, e, other = conversation(conv, "8.8.8.8:53")
    assert (dns[f"{e} service"], dns[f"{e} country"], dns[f"{e} AS"], dns[f"{e} process"]) == (
        "53/domain", "US", want["8.8.8.8"], "")
    assert (dns[f"{other} country"], dns[f"{other} AS"], dns[f"{other} service"]) == ("private", "", "")
    recent = keyed(at, "recent")
    assert set(recent["src maker"]) == {"Cisco Systems, Inc"}  # 00:00:0c is Cisco's OUI (IEEE registry)
    assert "443/https" in set(recent["service"])
    alerts = keyed(at, "alerts")
    scan = alerts[alerts["detector"] == "port_scan"].iloc[0]
    assert (scan["source"], scan["source AS"], scan["source country"]) == ("1.1.1.1", want["1.1.1.1"], "AU")
    assert "Cloudflare" in want["1.1.1.1"]


def test_enrichment_off_keeps_todays_tables_and_builds_no_enricher(fresh, tmp_path):
    fresh.setenv("NTM_PCAP", public_capture(tmp_path))
    fresh.setenv("NTM_ENRICHMENT", "0")
    at = run_until(app(), lambda a: keyed(a, "alerts") is not None, 30)
    assert not at.exception
    assert list(keyed(at, "conversations").columns) == CONV_COLUMNS
    assert list(keyed(at, "recent").columns) == RECENT_COLUMNS
    assert list(keyed(at, "alerts").columns) == [*ALERT_COLUMNS, "evidence view"]
    assert keyed(at, "top_talkers") is None
    hover = figures(at)["Top 10 sources"]["data"][0]["customdata"]
    assert all("<br>" not in h for h in hover)
    assert not enrich._SHARED  # no enricher: no DNS pool, no database, no process table


def test_unanswered_names_show_pending_and_the_page_does_not_wait(fresh, veth, tmp_path):
    """The resolver holds every query until the test releases it (no time-out decides anything): the page
    draws while the lookups are outstanding, says '…', and shows the outcome at a later refresh."""
    fresh.setenv("NTM_PCAP", public_capture(tmp_path))
    fresh.setenv("NTM_DNS_SERVER", veth.ns_ip)
    fresh.setenv("NTM_RDNS_TIMEOUT_S", "60")  # longer than the test: only the resolver ends a lookup
    fresh.setenv("NTM_RDNS_WORKERS", "1")
    with held_resolver(veth.ns, veth.ns_ip) as release:
        at = run_until(app(), lambda a: keyed(a, "alerts") is not None and enrich.shared().names.stats.sent, 30)
        at.run()
        assert not at.exception
        stats = enrich.shared().names.stats
        # A query was out and none had ended while the page ran and drew: it did not wait for one.
        assert stats.sent >= 1 and (stats.answered, stats.failed, stats.timed_out) == (0, 0, 0)
        assert hosts_shown(at) == [{"…"}] * 4  # queued, said so
        release()
        assert wait_for(lambda: stats.failed >= 3 and not enrich.shared().names._pending, 20), stats
        at.run()
        assert hosts_shown(at) == [{""}] * 4  # NXDOMAIN: no name, at the next refresh
        assert stats.timed_out == 0 and stats.answered == 0


def hosts_shown(at) -> list[set[str]]:
    """The host cells of the top talkers, conversations, recent packets and alerts tables."""
    tables = [keyed(at, k) for k in ("top_talkers", "conversations", "recent", "alerts")]
    return [set(tables[0]["host"]), set(tables[1]["A host"]) | set(tables[1]["B host"]),
            set(tables[2]["src host"]) | set(tables[2]["dst host"]),
            set(tables[3]["source host"]) | set(tables[3]["target host"])]


def test_local_rows_agrees_with_is_local_on_every_kind_of_address():
    """by_process finds this machine's ends with array compares (local_rows): the same answer as is_local."""
    from analysis.headers import addr_text
    from capture.sources import V4_PREFIX
    from enrich.attribution import local_rows
    from enrich.processes import ProcessTable

    table = ProcessTable()
    table.refresh()  # this machine's interface addresses, read as the page reads them
    mine = sorted(table.local_addresses())
    assert mine, "no interface address read"
    texts = [*mine, "127.0.0.1", "127.255.0.9", "::1", "::2", "8.8.8.8", "10.213.0.66", "2001:db8::1",
             "0.0.0.0", "::", "128.0.0.1", "::ffff:127.0.0.1"]
    keys = []
    for t in texts:
        ip = ipaddress.ip_address(t)
        keys.append(V4_PREFIX + ip.packed if ip.version == 4 else ip.packed)
    addrs = np.array(keys, dtype="S16")
    want = [table.is_local(addr_text(bytes(a))) for a in addrs]
    assert local_rows(addrs, table).tolist() == want
    assert want.count(True) >= len(mine) + 3  # the machine's own, two of 127/8 and ::1


# The makers of the test's OUIs as /usr/share/wireshark/manuf lists them (long names, read there by eye).
MAKERS = {"00:50:56": "VMware, Inc.", "00:00:0C": "Cisco Systems, Inc"}


CISCO, VMWARE = "00:00:0c:11:22:33", "00:50:56:aa:bb:cc"  # real OUIs: Cisco's and VMware's
ME, SERVER, CLIENT_PORT = "10.213.0.5", "127.0.0.7", 57000  # 57000: dircproxy in /etc/services, an ephemeral port


def filter_capture(tmp_path) -> tuple[str, list]:
    """(a file, its frames): DNS to 8.8.8.8, HTTPS to 1.1.1.1, a local web server's reply to a client port
    registered for another service, and an ARP reply claiming an address for a second MAC (an ARP spoof)."""
    eth = Ether(src=CISCO, dst="00:11:22:33:44:55")
    frames = []
    for i in range(10):
        frames += [eth / IP(src=ME, dst="8.8.8.8") / UDP(sport=5000 + i, dport=53) / b"q",
                   eth / IP(src="8.8.8.8", dst=ME) / UDP(sport=53, dport=5000 + i) / b"a"]
    for i in range(6):
        frames += [eth / IP(src=ME, dst="1.1.1.1") / TCP(sport=41000 + i, dport=443, flags="S"),
                   eth / IP(src="1.1.1.1", dst=ME) / TCP(sport=443, dport=41000 + i, flags="SA")]
    for _ in range(4):
        frames += [eth / IP(src=SERVER, dst=CLIENT) / TCP(sport=WEB_PORT, dport=CLIENT_PORT, flags="PA"),
                   eth / IP(src=CLIENT, dst=SERVER) / TCP(sport=CLIENT_PORT, dport=WEB_PORT, flags="A")]
    frames += [Ether(src=CISCO, dst="ff:ff:ff:ff:ff:ff") / ARP(op=2, hwsrc=CISCO, psrc="10.213.0.1", pdst=ME),
               Ether(src=VMWARE, dst="ff:ff:ff:ff:ff:ff") / ARP(op=2, hwsrc=VMWARE, psrc="10.213.0.1", pdst=ME)]
    path = tmp_path / "filter.pcap"
    path.write_bytes(pcap_bytes([(1_700_000_000.0 + i / 10, bytes(f)) for i, f in enumerate(frames)]))
    return str(path), frames


def test_filter_matches_enrichment_cells_and_alerts_name_device_makers(fresh, veth, tmp_path):
    """The recent-packets filter finds rows by host name, AS, service and maker; the service is the server
    end's; a file's local ends say 'not live'; the ARP spoof's MACs carry their makers."""
    # The preconditions: the client's port is registered for another service, the server's for http-alt.
    assert (registered(CLIENT_PORT, "tcp"), registered(WEB_PORT, "tcp")) == ("dircproxy", "http-alt")
    path, frames = filter_capture(tmp_path)
    fresh.setenv("NTM_PCAP", path)
    fresh.setenv("NTM_DNS_SERVER", veth.ns_ip)
    fresh.setenv("NTM_RECENT_ROWS", "1000")
    with dnsmasq(veth.ns, veth.ns_ip, {"8.8.8.8": "resolver.ntm.test"}):
        at = run_until(app(), lambda a: keyed(a, "recent") is not None and keyed(a, "alerts") is not None
                       and "resolver.ntm.test" in set(keyed(a, "recent")["dst host"])
                       and "Cloudflare" in " ".join(keyed(a, "recent")["dst AS"]), 30)
    assert not at.exception
    recent = keyed(at, "recent")
    assert len(recent) == len(frames)
    local = rows_of(recent, source=SERVER)
    assert set(local["service"]) == {f"{WEB_PORT}/http-alt"}  # not 57000/dircproxy: the client's port
    assert set(rows_of(recent, source=CLIENT)["service"]) == {f"{WEB_PORT}/http-alt"}
    assert set(local["src process"]) == set(local["dst process"]) == {"not live"}  # a file's packets
    conv = keyed(at, "conversations")
    row, web_end, cl_end = conversation(conv, f"{SERVER}:{WEB_PORT}")
    assert (row[f"{web_end} service"], row[f"{cl_end} service"]) == (f"{WEB_PORT}/http-alt", "")

    def shown(text: str):
        at.text_input(key="pkt_filter").set_value(text).run()
        assert not at.exception
        return keyed(at, "recent")

    def sent(pred) -> int:  # the reference: frames counted here from what was written
        return sum(1 for f in frames if IP in f and pred(f[IP]))

    by_name = shown("RESOLVER.ntm")  # part of a host name, any case
    assert set(by_name["source"]) | set(by_name["destination"]) >= {"8.8.8.8"}
    assert len(by_name) == sent(lambda ip: "8.8.8.8" in (ip.src, ip.dst)) == 20
    assert all("8.8.8.8" in (s, d) for s, d in zip(by_name["source"], by_name["destination"]))
    by_as = shown("cloudflare")
    assert len(by_as) == sent(lambda ip: "1.1.1.1" in (ip.src, ip.dst)) == 12
    by_service = shown("http-alt")
    assert len(by_service) == 8 and set(by_service["service"]) == {f"{WEB_PORT}/http-alt"}
    assert len(shown("dircproxy")) == 0  # 57000 is the client's port: no row names it
    by_maker = shown("vmware")
    assert len(by_maker) == 1 and set(by_maker["src maker"]) == {MAKERS["00:50:56"]}
    assert len(shown("no such text anywhere")) == 0

    alerts = keyed(at, "alerts")
    spoof = alerts[alerts["detector"] == "arp_spoof"].iloc[0]
    assert spoof["device makers"] == (f"{VMWARE} {MAKERS['00:50:56']}; {CISCO} {MAKERS['00:00:0C']}")


def test_a_rerun_over_the_same_rows_only_reads_the_memo_and_the_memo_is_bounded(tmp_path):
    """Per-row answers outlive the refresh: a second Lookups over the same rows asks no cache or table."""
    import enrich_columns as ec
    from enrich import Enricher
    from enrich.processes import ProcessTable

    en = Enricher(reverse_dns=False, processes=False)
    en.processes = ProcessTable()
    en.processes.refresh()  # a read of the socket table: the process answers stand until the next one
    assert en.geo.wait_loaded(120) and en.geo.asn.ready
    path, _ = filter_capture(tmp_path)
    from enrichhelp import file_snapshot
    snap = file_snapshot(path)
    from dashboard import packets_table
    table = packets_table(snap.packets, None)
    macs = ec.shown_macs(snap.packets, range(len(snap.packets)))
    calls: dict[str, int] = {}

    def counted(obj, name: str) -> None:
        real = getattr(obj, name)

        def wrapper(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return real(*a, **k)
        setattr(obj, name, wrapper)

    for obj, name in ((en.geo, "lookup"), (en.services, "name"), (en.processes, "label"),
                      (en.processes, "is_local"), (en.oui, "maker")):
        counted(obj, name)
    first = ec.recent(ec.Lookups(en), table, macs)
    assert calls["lookup"] >= 4 and calls["name"] >= 1 and calls["maker"] == 2  # the work, done once
    calls.clear()
    again = ec.recent(ec.Lookups(en), table, macs)
    assert calls == {} and again.equals(first)  # the rerun: dictionary look-ups only
    en.processes.refresh()  # a new read of the socket table: process answers are asked again
    ec.recent(ec.Lookups(en), table, macs)
    assert set(calls) == {"is_local", "label"}
    memo = ec.Memo(maxsize=3)
    for i in range(5):
        memo.put("service", i, str(i))
    assert list(memo.maps["service"]) == [2, 3, 4]  # bounded: the oldest went
    en.stop()


@pytest.mark.parametrize("sport,dport,flags,server", [
    (8080, 57000, "PSH ACK", "src"), (57000, 8080, "ACK", "dst"), (443, 41000, "SYN ACK", "src"),
    (41000, 443, "SYN", "dst"), (50000, 1234, "SYN", "dst"),  # a SYN names its destination, lower or not
    (1234, 50000, "SYN ACK", "src"), (53, 53, "", "dst"), (None, 53, "", "dst"), (None, None, "", "")])
def test_the_server_end_is_the_syns_destination_else_the_lower_port(sport, dport, flags, server):
    import enrich_columns as ec
    assert ec.server_end(sport, dport, flags) == server


def filter_inputs(tmp_path):
    """(the buffer rows, their packets table, the frames written) of filter_capture's file."""
    from enrichhelp import file_snapshot

    from dashboard import packets_table
    path, frames = filter_capture(tmp_path)
    snap = file_snapshot(path)
    return snap.packets, packets_table(snap.packets, None), frames


def sent_between(frames, addr: str) -> int:
    """Frames written with `addr` at either IP end (the reference, counted from what was written)."""
    return sum(1 for f in frames if IP in f and addr in (f[IP].src, f[IP].dst))


def test_the_filter_matches_a_country_and_says_when_the_addresses_were_cut(tmp_path, monkeypatch):
    """'AU' (1.1.1.1's country, as the page test shows it) selects exactly 1.1.1.1's rows; with fewer keys
    allowed than distinct addresses the note says so and the cut addresses are not matched by name."""
    import enrich_columns as ec
    from enrich import Enricher

    en = Enricher(reverse_dns=False, processes=False)
    assert en.geo.wait_loaded(120) and en.geo.asn.ready
    rows, frame, frames = filter_inputs(tmp_path)
    mask, note = ec.text_matches(ec.Lookups(en, live=False), rows, frame, "AU")
    assert int(mask.sum()) == sent_between(frames, "1.1.1.1") == 12 and note == ""
    assert set(frame["source"][mask]) | set(frame["destination"][mask]) == {"1.1.1.1", ME}
    # The newest rows are the ARP replies and the web server's: 1.1.1.1 is the oldest address but two.
    monkeypatch.setattr(ec, "FILTER_KEYS_MAX", 3)
    mask, note = ec.text_matches(ec.Lookups(en, live=False), rows, frame, "AU")
    assert not mask.any()
    assert note.startswith("Names, countries, AS and makers were matched for the 3 newest distinct")
    assert f"(of {len(frame[['source', 'destination']].stack().unique()):,} addresses)" in note
    en.stop()


def test_the_memo_keeps_answers_when_the_as_database_is_missing(tmp_path):
    """Without the AS data (its load fails) geo's answers are final: the memo keeps them, a rerun asks nothing."""
    import enrich_columns as ec
    from enrich import Enricher
    from enrich.geo import GeoDB

    en = Enricher(reverse_dns=False, processes=False)
    en.geo = GeoDB(asn_dir=str(tmp_path / "no-such-dir"))
    assert en.geo.wait_loaded(120) and en.geo.asn.error and not en.geo.asn.ready
    first = ec.Lookups(en).who("8.8.8.8")
    assert first[:2] == ("", "US") and not first[2].startswith("AS")  # the country; no AS number without its data
    calls = []
    real = en.geo.lookup
    en.geo.lookup = lambda a: calls.append(a) or real(a)
    assert ec.Lookups(en).who("8.8.8.8") == first and calls == []
    en.stop()


@pytest.mark.parametrize("text,macs", [
    ("2001:db8:aa:bb:cc:dd:ee:ff", []), ("fe80::aa:bb:cc:dd:ee:ff", []), ("aa:bb:cc:dd:ee:ff:00", []),
    ("1:aa:bb:cc:dd:ee:ff", []), ("aa:bb:cc:dd:ee:ff", ["aa:bb:cc:dd:ee:ff"]),
    ("is-at 00:50:56:AA:BB:CC (was 00:00:0c:11:22:33)", ["00:50:56:AA:BB:CC", "00:00:0c:11:22:33"])])
def test_the_mac_pattern_finds_macs_standing_alone_never_inside_ipv6_text(text, macs):
    import enrich_columns as ec
    assert ec.MAC_TEXT.findall(text) == macs


def test_a_host_name_that_arrives_after_a_filtered_rerun_is_matched(veth, tmp_path):
    """A name still queued at the first filtered rerun (memoised as pending) is matched once the resolver
    has it, though the filter hides the row and no rerun shows it in between."""
    import enrich_columns as ec
    from enrich import Enricher

    rows, frame, frames = filter_inputs(tmp_path)
    with dnsmasq(veth.ns, veth.ns_ip, {"8.8.8.8": "late.ntm.test"}):
        en = Enricher(reverse_dns=True, dns_server=veth.ns_ip, processes=False)
        look = ec.Lookups(en, live=False)
        assert look.who("8.8.8.8")[0] == ec.PENDING  # shown once unfiltered: the lookup is queued
        ec.text_matches(look, rows, frame, "late.ntm")  # the first filtered rerun (the name may not be in)
        assert wait_for(lambda: en.names.cached("8.8.8.8") == "late.ntm.test", 10)
        mask, _ = ec.text_matches(ec.Lookups(en, live=False), rows, frame, "late.ntm")
        assert int(mask.sum()) == sent_between(frames, "8.8.8.8") == 20
        en.geo.wait_loaded(120)  # the databases' background load ends before the interpreter does
        en.stop()


def test_the_filters_membership_agrees_with_a_set():
    """_among (hash look-ups) selects what Python's `in` over a set selects, strings and other objects alike."""
    import enrich_columns as ec
    rng = np.random.default_rng(7)
    values = np.array([f"10.0.{i // 256}.{i % 256}" for i in rng.integers(0, 3000, 20_000)] + [None, 5],
                      dtype=object)
    keys = [f"10.0.{i // 256}.{i % 256}" for i in range(0, 3000, 3)] + [5]
    want = [v in set(keys) for v in values]
    assert ec._among(values, keys).tolist() == want and 0 < sum(want) < len(want)
    assert not ec._among(values, []).any()
