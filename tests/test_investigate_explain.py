"""Explain a change and explain an alert (issue 15): the host a test made spike is named with its share;
an alert links to exactly its evidence and exports exactly those rows."""

from __future__ import annotations

import csv
import io

import pytest
from invhelp import SERVER, SPIKER, T0, tshark_count, write_mixed
from test_dashboard import app, count, metric, rendered, run_until
from test_dashboard import fresh as fresh  # the fixture: a new engine per test

import investigate_page as inv
from investigate import explain
from packet_processor import CaptureEngine, packets_csv, stop_all

SPAN = (T0 + 64, T0 + 70)  # the spike: 150 extra packets a second from SPIKER to random ports


@pytest.fixture(scope="module")
def spiky(tmp_path_factory) -> str:
    return write_mixed(tmp_path_factory.mktemp("spike") / "spike.pcap", seconds=70, spike_from=64, spike_pps=150,
                       spread=True)


def share_by_tshark(path: str, extra: str, lo: float, hi: float) -> float:
    """The key's share of the rise in packets/s, from tshark's counts of both windows."""
    length = hi - lo

    def n(a: float, b: float, f: str = "") -> int:
        cond = f"frame.time_epoch >= {a!r} && frame.time_epoch < {b!r}" + (f" && {f}" if f else "")
        return tshark_count(path, cond)[0]

    key_rise = (n(lo, hi, extra) - n(lo - length, lo, extra)) / length
    all_rise = (n(lo, hi) - n(lo - length, lo)) / length
    return key_rise / all_rise


def test_the_explainer_names_the_host_that_spiked_with_its_share(spiky):
    engine = CaptureEngine()
    try:
        engine.load_file(spiky)
        rows = engine.snapshot().packets
    finally:
        stop_all()
    ex = explain.explain(rows, *SPAN)
    share = share_by_tshark(spiky, f"ip.src=={SPIKER}", *SPAN)
    assert ex.best is not None and ex.best[0] == "source host"
    assert [r.key for r in ex.best[1]] == [SPIKER]
    assert ex.best[1][0].share == pytest.approx(share, abs=1e-9)
    assert ex.headline.startswith(f"1 key explains {100 * share:.0f} % of the rise in packets/s")
    assert f"by source host: {SPIKER} ({100 * share:.0f} %)" in ex.headline
    # The destination carried everything before and during: it explains the rise but says nothing new.
    assert ex.dims["destination host"][0].key == SERVER


def test_a_quiet_change_and_a_short_baseline_are_said(spiky):
    engine = CaptureEngine()
    try:
        engine.load_file(spiky)
        rows = engine.snapshot().packets
    finally:
        stop_all()
    first = explain.explain(rows, T0 + 2, T0 + 7)  # the capture starts at T0: 2 s of the 5 s before
    assert first.baseline_s == pytest.approx(2.0 - float(rows["ts"].min() - T0))
    assert first.headline
    with pytest.raises(ValueError, match="the span must end after it starts"):
        explain.explain(rows, T0 + 5, T0 + 5)


def test_a_spike_alert_explains_itself_and_exports_exactly_its_rows(fresh, spiky):
    fresh.setenv("NTM_PCAP", spiky)
    at = run_until(app(), lambda a: metric(a, "Status").value == "finished"
                   and any(o.startswith("spike") for o in a.selectbox(key="inv_alert").options), 60)
    box = at.selectbox(key="inv_alert")
    pick = next(i for i, o in enumerate(box.options) if o.startswith("spike"))
    box.set_value(pick).run()
    at.toggle(key="explain_alert").set_value(True).run()
    assert not at.exception
    headline = next(rendered(s.value) for s in at.success)
    alert = next(a for a in page_engine(spiky).snapshot().alerts if a.detector == "spike")
    lo, hi = float(int(alert.first_ts)), float(int(alert.last_ts)) + 1.0  # the seconds the alert names
    assert SPAN[0] <= lo < hi <= SPAN[1]
    share = share_by_tshark(spiky, f"ip.src=={SPIKER}", lo, hi)
    assert f"by source host: {SPIKER} ({100 * share:.0f} %)" in headline
    # The alert's evidence: its span, shown on the page with a click, and exported row for row.
    want, _ = tshark_count(spiky, f"frame.time_epoch >= {lo!r} && frame.time_epoch < {hi!r}")
    table = next(d.value for d in at.dataframe if "evidence view" in d.value.columns)
    link = table.loc[table["detector"] == "spike", "evidence view"].iloc[0]
    assert link == f"?from={int(lo)}&to={int(hi)}&explain=1"  # all traffic: its seconds, its explanation open
    at.button(key="inv_alert_show").click().run()
    assert at.query_params["from"] in (str(int(lo)), [str(int(lo))]) and count(at) == want
    assert any(d.proto.label == "Its packets (CSV)" for d in at.get("download_button"))
    snap = page_engine(spiky).snapshot()
    rows = inv.evidence_rows(snap, inv.alert_filters(alert), None)
    exported = list(csv.DictReader(io.StringIO(packets_csv(rows).decode())))
    assert len(rows) == len(exported) == want


def page_engine(path: str):
    """The page's engine (one per process, kept in st.cache_resource): the one that read `path` and alerted."""
    import packet_processor

    return next(e for e in packet_processor.engines() if e.source and e.source.path == path and e.snapshot().alerts)


def test_a_scan_alerts_link_opens_exactly_its_probes(fresh, tmp_path):
    """A port scan refused with RSTs: the alert's link keeps the scanner's probes to the target in its seconds."""
    from scapy.all import IP, TCP, Ether, wrpcap
    from test_dashboard import app as page_app

    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    pkts = []
    for i, port in enumerate(range(100, 130)):
        syn = eth / IP(src="10.9.0.5", dst="10.9.0.7") / TCP(sport=40000, dport=port, flags="S")
        rst = eth / IP(src="10.9.0.7", dst="10.9.0.5") / TCP(sport=port, dport=40000, flags="RA")
        syn.time, rst.time = T0 + i * 0.05, T0 + i * 0.05 + 0.001
        pkts += [syn, rst]
    path = str(tmp_path / "scan.pcap")
    wrpcap(path, pkts)
    fresh.setenv("NTM_PCAP", path)
    at = run_until(page_app(), lambda a: metric(a, "Status").value == "finished")
    table = next(d.value for d in at.dataframe if "evidence view" in d.value.columns)
    link = table["evidence view"].iloc[0]
    query = dict(p.split("=", 1) for p in link[1:].split("&"))
    assert (query["src"], query["dst"]) == ("10.9.0.5", "10.9.0.7")
    lo, hi = float(query["from"]), float(query["to"])
    want, _ = tshark_count(path, f"ip.src==10.9.0.5 && ip.dst==10.9.0.7 && frame.time_epoch >= {lo!r} "
                                 f"&& frame.time_epoch < {hi!r}")
    shared = page_app()
    for k, v in query.items():
        shared.query_params[k] = v
    shared = run_until(shared, lambda a: metric(a, "Status").value == "finished")
    assert count(shared) == want > 0


def test_the_explainer_groups_hosts_by_their_as(tmp_path):
    """Two public hosts of one AS rise together: the AS explains the rise, each host only part of it
    (AS from the enrichment's offline database, looked up here independently of the explainer)."""
    from scapy.all import IP, UDP, Ether, wrpcap

    from enrich.geo import GeoDB

    geo = GeoDB()
    geo.load()
    from conftest import need

    need(geo.wait_loaded(30) and bool(geo.source), "the offline geo/AS database is not installed")
    org = geo.lookup("8.8.8.8").as_org
    assert org and geo.lookup("8.8.4.4").as_org == org
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    pkts = []
    for sec in range(20):
        srcs = ["192.168.1.10"] * 5 + (["8.8.8.8"] * 20 + ["8.8.4.4"] * 20 if sec >= 10 else [])
        for i, s in enumerate(srcs):
            p = eth / IP(src=s, dst="192.168.1.2") / UDP(sport=53, dport=30000 + i)
            p.time = T0 + sec + i / (len(srcs) + 1)
            pkts.append(p)
    path = str(tmp_path / "as.pcap")
    wrpcap(path, pkts)
    engine = CaptureEngine()
    try:
        engine.load_file(path)
        rows = engine.snapshot().packets
    finally:
        stop_all()
    ex = explain.explain(rows, T0 + 10, T0 + 20, as_of=lambda a: geo.lookup(a).as_org)
    top = ex.dims["source AS"][0]
    assert (top.key, round(top.share, 6)) == (org, 1.0)
    assert [round(r.share, 6) for r in ex.dims["source host"][:2]] == [0.5, 0.5]
    assert ex.best is not None and ex.best[0] == "source AS" and "by source AS: " + org in ex.headline
