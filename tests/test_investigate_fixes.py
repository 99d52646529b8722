"""Issue 15 review fixes: URL text never becomes markup; every metric, the timeline and the alerts re-filter;
an alert's export is exactly its evidence; bounded filters; the back-test uses the running settings."""

from __future__ import annotations

import subprocess
import urllib.parse

import pytest
from invhelp import T0, tshark_count, write_mixed
from test_dashboard import app, array, count, figures, metric, rendered, run_until
from test_dashboard import fresh as fresh  # the fixture: a new engine per test

EVIL = {"host": "![x](http://127.0.0.1:9/track.png)", "port": ":red[**RED-BOLD**]",
        "sensor": "[EVIL-LINK](https://example.invalid/phish)"}


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> str:
    return write_mixed(tmp_path_factory.mktemp("invfix") / "mixed.pcap")


def loaded(monkeypatch, path: str, **query: str | list[str]):
    """The page over `path`, opened with `query` in its URL, run until the file is read."""
    monkeypatch.setenv("NTM_PCAP", path)
    at = app()
    for k, v in query.items():
        at.query_params[k] = v
    return run_until(at, lambda a: metric(a, "Status").value == "finished")


def test_url_text_in_chips_and_messages_is_escaped_never_markup(fresh, capture):
    at = loaded(fresh, capture, **EVIL)
    assert not at.exception
    labels = [b.label for b in at.button if b.key and b.key.startswith("chip_")]
    assert len(labels) == 3
    for key, value in EVIL.items():
        want = f"✕ {key} = {value}"
        label = next(x for x in labels if rendered(x) == want)
        # Every Markdown character of the URL's text is backslash-escaped: shown as itself.
        for ch in "![]()*:":
            assert label.count("\\" + ch) == want.count(ch), (ch, label)
    shown = [e.value for e in [*at.error, *at.warning, *at.info, *at.caption, *at.markdown]]
    for text in (t for t in shown if any(m in t for m in ("track", "EVIL", "RED"))):
        assert "](" not in text.replace("\\]\\(", "") and "**" not in text, text


@pytest.mark.browser
def test_url_text_in_chips_is_no_markup_in_a_real_browser(tmp_path):
    from conftest import wait_for
    from playwright.sync_api import sync_playwright
    from test_browser import CHROME_ARGS, CHROMIUM, dashboard

    path = write_mixed(tmp_path / "m.pcap", seconds=5, spike_from=999)
    with dashboard(["--pcap", path], tmp_path / "server.log", REFRESH_S="30") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROME_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 2000})
        asked = []  # any request for the image the URL names
        page.on("request", lambda r: asked.append(r.url) if r.url.startswith("http://127.0.0.1:9/") else None)
        page.goto(url + "/?" + urllib.parse.urlencode(list(EVIL.items())))
        page.wait_for_selector(".st-key-filter_chips button", timeout=90_000)
        assert wait_for(lambda: page.locator(".st-key-filter_chips button").count() >= 4, 60)
        chips = page.locator(".st-key-filter_chips")
        assert chips.locator("img").count() == 0 and chips.locator("strong").count() == 0
        assert chips.locator("a").count() == 0
        texts = chips.locator("button").all_inner_texts()
        for key, value in EVIL.items():
            assert any(f"{key} = {value}" in t for t in texts), texts
        assert page.locator("img[src*='track.png']").count() == 0 and not asked
        browser.close()


def scan_pcap(path) -> str:
    """A TCP SYN scan of 30 ports 10.9.0.5 -> 10.9.0.7 (answered with RST), with UDP between the same hosts
    in the same seconds: traffic that is not the scan's."""
    from scapy.all import IP, TCP, UDP, Ether, wrpcap

    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    pkts = []
    for i, port in enumerate(range(100, 130)):
        syn = eth / IP(src="10.9.0.5", dst="10.9.0.7") / TCP(sport=40000, dport=port, flags="S")
        rst = eth / IP(src="10.9.0.7", dst="10.9.0.5") / TCP(sport=port, dport=40000, flags="RA")
        u = eth / IP(src="10.9.0.5", dst="10.9.0.7") / UDP(sport=5000, dport=6000)
        syn.time, rst.time, u.time = T0 + i * 0.05, T0 + i * 0.05 + 0.001, T0 + i * 0.05 + 0.002
        pkts += [syn, rst, u]
    wrpcap(str(path), pkts)
    return str(path)


@pytest.fixture
def downloads(monkeypatch) -> dict:
    """The data each download button of the page is given, by label (AppTest has no runtime to serve it)."""
    from streamlit.delta_generator import DeltaGenerator

    given: dict = {}
    real = DeltaGenerator.download_button

    def spy(self, label, data, *args, **kw):
        given[label] = data
        return real(self, label, data, *args, **kw)

    monkeypatch.setattr(DeltaGenerator, "download_button", spy)
    return given


def data_of(given: dict, label: str) -> bytes:
    """A download's bytes, its deferred callable run as a click runs it."""
    data = given[label]
    data = data() if callable(data) else data
    return data.encode() if isinstance(data, str) else bytes(data)


def tshark_rows(path: str, display_filter: str) -> list[tuple[str, ...]]:
    """(time, src, dst, protocol, dst port) of each packet tshark's filter keeps: the independent reading."""
    from invhelp import tshark_count

    tshark_count(path, "frame")  # skips with the reason when tshark is missing
    out = subprocess.run(["tshark", "-r", path, "-Y", display_filter, "-T", "fields", "-e", "frame.time_epoch",
                          "-e", "ip.src", "-e", "ip.dst", "-e", "ip.proto", "-e", "tcp.dstport"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    return [tuple(line.split("\t")) for line in out]


def value(text: str) -> float:
    """A metric's number in its base unit ('12.3 kbit/s' -> 12300)."""
    num, _, unit = text.partition(" ")
    scale = {"kbit/s": 1e3, "Mbit/s": 1e6, "Gbit/s": 1e9}.get(unit, 1)
    return float(num.replace(",", "")) * scale


def timeline_packets(at) -> int:
    """Packets the timeline draws (its packets/s traces, all directions)."""
    fig = figures(at).get("Traffic by capture time") or {"data": []}
    return int(sum(array(t["y"]).sum() for t in fig["data"] if t.get("yaxis") == "y"))


def detectors(at) -> list[str]:
    """The detectors of the alerts table's rows."""
    found = [d.value for d in at.dataframe if "detector" in d.value.columns]
    return list(found[0]["detector"]) if found else []


def test_a_time_span_filters_rates_duration_buffer_and_timeline(fresh, capture):
    span = f"frame.time_epoch >= {T0 + 10} && frame.time_epoch < {T0 + 20}"
    rows = tshark_rows(capture, span)
    want, want_bytes = tshark_count(capture, span)
    total, _ = tshark_count(capture, "frame")
    at = loaded(fresh, capture, **{"from": str(T0 + 10), "to": str(T0 + 20)})
    assert not at.exception
    assert count(at) == want < total
    assert metric(at, "Packets/s").value == f"{want / 10:,.1f}"
    shown = metric(at, "Bit/s").value  # one decimal of its unit
    assert value(shown) == pytest.approx(want_bytes * 8 / 10, abs=0.051 * value("1 " + shown.split()[1]))
    times = [float(r[0]) for r in rows]
    secs = int(max(times) - min(times))
    assert metric(at, "Duration").value == f"{secs // 60}:{secs % 60:02d}"
    assert metric(at, "Buffer").value == f"{want:,} of {total:,}"
    assert timeline_packets(at) == want


def test_a_protocol_filter_filters_the_timeline_and_the_alerts(fresh, tmp_path):
    path = scan_pcap(tmp_path / "scan.pcap")
    udp, _ = tshark_count(path, "udp")
    at = loaded(fresh, path)
    assert "port_scan" in detectors(at)  # the TCP scan, unfiltered
    alerts = int(metric(at, "Alerts").value)
    at = loaded(fresh, path, proto="udp")
    assert count(at) == udp and timeline_packets(at) == udp
    shown = detectors(at)
    assert "port_scan" not in shown  # a TCP scan is not UDP traffic
    assert int(metric(at, "Alerts").value) == len(shown) == alerts - 1
    tcp, _ = tshark_count(path, "tcp")
    at = loaded(fresh, path, proto="tcp")
    assert count(at) == tcp and timeline_packets(at) == tcp and int(metric(at, "Alerts").value) >= 1


def test_an_alerts_export_is_exactly_its_evidence_whatever_the_viewers_filter(fresh, tmp_path, downloads):
    path = scan_pcap(tmp_path / "scan.pcap")
    at = loaded(fresh, path, port="100")  # the viewer's filter keeps the alert but only 2 of its packets
    assert not at.exception
    link = next(m.value for m in at.markdown if m.value.startswith("Evidence"))
    q = urllib.parse.parse_qs(link.rsplit("](?", 1)[1].split(")", 1)[0])
    lo, hi = float(q["from"][0]), float(q["to"][0])
    want = tshark_rows(path, f"ip.src==10.9.0.5 && ip.dst==10.9.0.7 && tcp && frame.time_epoch >= {lo} "
                             f"&& frame.time_epoch < {hi}")
    assert len(want) >= 20  # the scan's probes up to the alert, not only port 100's
    csv = data_of(downloads, "Its packets (CSV)").decode().splitlines()
    assert len(csv) - 1 == len(want)
    assert all(",TCP,10.9.0.5," in line and ",10.9.0.7," in line for line in csv[1:])
    pcap = tmp_path / "evidence.pcap"
    pcap.write_bytes(data_of(downloads, "Its packets' headers (pcap)"))
    got = tshark_rows(str(pcap), "frame")
    assert [r[1:] for r in got] == [r[1:] for r in want]
    assert [float(r[0]) for r in got] == pytest.approx([float(r[0]) for r in want], abs=1e-6)


def test_a_baseline_diff_runs_when_asked_once_per_buffer_and_says_when_truncated(monkeypatch, tmp_path):
    """Reruns with a saved baseline never diff the buffer; 'Compare' does, once per buffer generation; a
    truncated baseline says so and does not call a host it saw (but did not keep) new."""
    import streamlit as st
    from invhelp import mixed_packets
    from scapy.all import wrpcap

    from investigate import baseline as bl
    from packet_processor import stop_all

    path = tmp_path / "quiet.pcap"
    wrpcap(str(path), mixed_packets(seconds=20, spike_from=999))
    calls = []
    real = bl.diff
    monkeypatch.setattr(bl, "diff", lambda base, rows: calls.append(len(rows)) or real(base, rows))
    monkeypatch.setattr(bl, "MAX_KEYS", 2)  # of the 8 hosts (HOSTS, SERVER, fd00::1, ::2) 2 are kept
    stop_all()
    st.cache_resource.clear()
    monkeypatch.setenv("NTM_STORE", str(tmp_path / "h.duckdb"))
    try:
        at = loaded(monkeypatch, str(path))
        at.text_input(key="baseline_name").input("quiet").run()
        at.button(key="baseline_save").click().run()
        for _ in range(3):
            at.run()
        assert calls == []  # a saved baseline costs no rerun a diff of the buffer
        assert any("kept only the 2 earliest" in w.value.replace("\\", "") for w in at.warning)
        at.button(key="baseline_compare").click().run()
        at.run()
        at.button(key="baseline_compare").click().run()
        assert len(calls) == 1  # the same buffer: the cached diff
        hosts = next(d.value for d in at.dataframe if "new host" in d.value.columns)
        assert len(hosts) == 8 - 2 and set(hosts["since baseline"]) == {"not kept in the baseline"}
    finally:
        stop_all()
        st.cache_resource.clear()


def test_filters_are_bounded_and_what_is_ignored_is_not_applied():
    from investigate import filters as flt

    conds, errors = flt.parse([("host", f"10.{i}.0.0/16") for i in range(100)], limit=16)
    assert len(conds) == 16 and any("100 filters given, at most 16 apply (FILTER_MAX)" in e for e in errors)
    conds, errors = flt.parse([("host", "10.0.0.0/8")] * 100, limit=16)  # one condition, given 100 times
    assert len(conds) == 1 and not errors
    # from >= to is said to be ignored, and it is: the other filters still apply, the time ones do not.
    conds, errors = flt.parse([("from", "200"), ("to", "100"), ("proto", "udp")])
    assert [c.key for c in conds] == ["proto"] and any("is ignored" in e for e in errors)


def test_filter_max_bounds_the_page_and_says_so(fresh, capture):
    fresh.setenv("NTM_FILTER_MAX", "3")
    at = loaded(fresh, capture, host=["10.0.0.0/8", "10.1.0.0/16", "10.1.0.3", "10.1.0.3/32"])
    assert any("at most 3 apply" in rendered(e.value) for e in at.error)
    assert sum(1 for b in at.button if b.key and b.key.startswith("chip_")) == 4  # every chip is shown


def test_an_unknown_typed_key_is_said_not_dropped(fresh, capture):
    at = loaded(fresh, capture)
    at.text_input(key="filter_add").input("prot=udp").run()
    assert any("prot=udp" in rendered(e.value) and "unknown filter key" in rendered(e.value) for e in at.error)
    assert "prot" not in at.query_params


def test_a_spike_alerts_link_opens_the_explanation_of_its_seconds(fresh, tmp_path):
    from invhelp import SPIKER

    path = write_mixed(tmp_path / "spike.pcap", seconds=70, spike_from=64, spike_pps=150, spread=True)
    at = loaded(fresh, path)
    table = next(d.value for d in at.dataframe if "evidence view" in d.value.columns)
    link = table.loc[table["detector"] == "spike", "evidence view"].iloc[0]
    query = urllib.parse.parse_qs(link[1:])
    assert query["explain"] == ["1"] and {"from", "to"} <= set(query)
    opened = loaded(fresh, path, **{k: v[0] for k, v in query.items()})  # the link, opened: nothing clicked
    assert not opened.exception
    assert opened.toggle(key="explain_span").value is True
    headline = next(rendered(s.value) for s in opened.success)
    assert f"by source host: {SPIKER}" in headline
    plain_span = loaded(fresh, path, **{"from": query["from"][0], "to": query["to"][0]})
    assert plain_span.toggle(key="explain_span").value is False  # a brushed span: asked for, not opened


def test_the_backtest_runs_in_the_background_with_a_progress_line(fresh, capture):
    """The page's script does not wait for the back-test: it says how far it got, then shows the table."""
    import threading

    from investigate import backtest as bt

    go = threading.Event()
    real = bt.run

    def slow(*args, **kw):
        go.wait(10)  # held until the page has drawn the progress line
        return real(*args, **kw)

    fresh.setattr(bt, "run", slow)
    at = loaded(fresh, capture)
    at.selectbox(key="bt_setting").set_value("SPIKE_MIN_PPS").run()
    at.text_input(key="bt_values_SPIKE_MIN_PPS").input("50, 400").run()
    at.button(key="bt_run").click().run()
    assert any("running in the background: 0 of 2 values tried" in rendered(i.value) for i in at.info)
    at.run()  # a refresh while it runs: still running, and no second one can start
    assert any("0 of 2 values tried" in rendered(i.value) for i in at.info)
    assert at.button(key="bt_run").disabled
    go.set()
    at = run_until(at, lambda a: any("times raised" in d.value.columns for d in a.dataframe), 30)
    table = next(d.value for d in at.dataframe if "times raised" in d.value.columns)
    assert table["value"].tolist() == [50, 400]


def test_the_word_mask_agrees_with_ipaddress():
    """mask() tests networks on whole 64-bit words: the same answer as ipaddress, IPv4 and IPv6, every prefix."""
    import ipaddress

    import numpy as np

    from analysis.headers import V4_PREFIX
    from investigate import filters as flt

    rng = np.random.default_rng(15)
    v4 = [ipaddress.ip_address(int(x)) for x in rng.integers(0, 2**32, 400)]
    v6 = [ipaddress.ip_address(int(a) << 64 | int(b)) for a, b in zip(rng.integers(0, 2**63, 400),
                                                                        rng.integers(0, 2**63, 400))]
    v6 += [ipaddress.ip_address("::1"), ipaddress.ip_address("::")]  # (::ffff:0:0/96 is where records keep IPv4)
    keys = [V4_PREFIX + a.packed for a in v4] + [a.packed for a in v6]
    rows = np.zeros(len(keys), dtype=[("src", "S16")])
    rows["src"] = keys
    texts = [f"{v4[0]}/{p}" for p in (0, 1, 7, 8, 13, 24, 31, 32)] + [f"{v6[0]}/{p}" for p in
                                                                       (0, 1, 48, 63, 64, 65, 96, 127, 128)]
    for text in [*texts, "::/0", "::/96", "0.0.0.0/0"]:
        net = ipaddress.ip_network(text, strict=False)
        want = [a.version == net.version and a in net for a in v4 + v6]
        got = flt.mask(rows, [flt.parse_one("src", text)]).tolist()
        assert got == want, text


def test_the_timeline_window_moves_only_for_a_span_outside_it():
    from types import SimpleNamespace

    import investigate_page as inv

    def snap(to):
        return SimpleNamespace(totals={"filter": {"to": to}})
    assert inv.view_end(snap(T0 + 30.5), T0 + 59, 60) == T0 + 59  # inside the last minute: a brush does not move it
    assert inv.view_end(snap(T0 - 100.5), T0 + 59, 60) == T0 - 101  # before it: the window ends at the span's end
    assert inv.view_end(snap(None), T0 + 59, 60) == T0 + 59
