"""The Streamlit page through streamlit.testing's AppTest: panels, numbers, live growth, errors, sharing."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import string
import subprocess
import time
from collections.abc import Iterator

import numpy as np
import pytest
import streamlit as st
from conftest import PYTHON, ROOT
from pcapgen import pcap_bytes, pcapng_bytes
from streamlit.testing.v1 import AppTest
from test_files import sample_frames

from packet_processor import stop_all

APP = "../dashboard.py"  # AppTest resolves paths from this file's folder


@pytest.fixture
def fresh(monkeypatch) -> Iterator[pytest.MonkeyPatch]:
    """A new process-wide engine for each test (the page keeps one in st.cache_resource)."""
    stop_all()
    st.cache_resource.clear()
    yield monkeypatch
    stop_all()
    st.cache_resource.clear()


def app() -> AppTest:
    return AppTest.from_file(APP, default_timeout=60)


def metric(at: AppTest, label: str):
    return next(m for m in at.metric if m.label == label)


def table(at: AppTest, column: str):
    """The page's table with this column label (not by position: the enrichment panel adds tables;
    AppTest gives a display table no key): "endpoint A" is the conversations, "direction" the recent packets."""
    found = [d for d in at.dataframe if column in d.value.columns]
    assert len(found) == 1, [list(d.value.columns) for d in at.dataframe]
    return found[0]


def count(at: AppTest, label: str = "Packets") -> int:
    return int(metric(at, label).value.replace(",", ""))


def run_until(at: AppTest, pred, timeout: float = 10.0) -> AppTest:
    end = time.monotonic() + timeout
    at.run()
    while not pred(at) and time.monotonic() < end:
        time.sleep(0.2)
        at.run()
    return at


def open_tab(at: AppTest, label: str, key: str = "who_tab") -> AppTest:
    """Open a tab of the enrichment panel and rerun: only the open tab is drawn (lazy tabs; the browser's tab
    click sets the same state)."""
    at.session_state[key] = label
    return at.run()


def array(v) -> np.ndarray:
    """A figure array from Plotly's JSON, plain list or binary 'bdata'."""
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"])
    return np.asarray(v)


def figures(at: AppTest) -> dict[str, dict]:
    out = {}
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        out[spec["layout"]["title"]["text"]] = spec
    return out


def rendered(markdown: str) -> str:
    """What CommonMark shows for text whose punctuation is backslash-escaped."""
    return re.sub(r"\\(.)", r"\1", markdown)


def write_capture(tmp_path, name: str = "mix.pcap", frames=None) -> str:
    path = tmp_path / name
    path.write_bytes(pcap_bytes(sample_frames() if frames is None else frames))
    return str(path)


def test_file_source_renders_every_panel_and_matches_the_cli(fresh, tmp_path):
    path = write_capture(tmp_path)
    fresh.setenv("NTM_PCAP", path)
    at = run_until(app(), lambda a: metric(a, "Status").value == "finished")
    assert not at.exception
    cli = json.loads(subprocess.run([PYTHON, "packet_processor.py", "summary", path], cwd=ROOT,
                                    capture_output=True, text=True, check=True).stdout)
    assert count(at) == cli["packets"] == 8
    assert f"{cli['bytes_wire']:,} bytes" in metric(at, "Bytes").proto.help
    assert count(at, "Malformed") == cli["malformed"] and count(at, "Dropped") == cli["dropped"] == 0
    assert metric(at, "Buffer").value == "8 / 10,000"
    assert metric(at, "Duration").value == "0:03"  # 3.5 s of capture time
    figs = figures(at)
    page_figs = {"Protocols by packets", "Traffic by capture time", "Top 10 sources", "Top 10 destinations",
                 "Top destination ports", "Packet sizes (recent buffer)"}
    # The enrichment panel (enrich_page.py), shown by default: only its open tab is drawn, the first at start.
    assert set(figs) == page_figs | {"Top sources: who", "Top destinations: who"}
    assert set(figures(open_tab(at, "Top countries"))) == page_figs | {"Top countries"}
    assert set(figures(open_tab(at, "Top networks (AS)"))) == page_figs | {"Top networks (AS)"}
    assert set(figures(open_tab(at, "Top talkers"))) == set(figs)
    pie = figs["Protocols by packets"]["data"][0]
    assert array(pie["values"]).tolist() == [cli["transport_counts"][k] for k in
                                             ("tcp", "udp", "icmp", "icmpv6", "other_ip", "non_ip")]
    assert pie["labels"] == ["TCP", "UDP", "ICMP", "ICMPv6", "Other IP", "ARP/other"]
    times = figs["Traffic by capture time"]["data"][0]["x"]
    assert times[-1].startswith("2023-11-14")  # capture time, never 1970
    top = figs["Top 10 sources"]["data"][0]
    assert top["y"][-1] == cli["top10_src_by_packets"][0]["addr"]
    conv, recent = table(at, "endpoint A"), table(at, "direction")
    assert len(recent.value) == 8 and recent.value.iloc[0]["protocol"] == "UDP"  # newest first
    assert list(recent.value.columns) == ["time", "direction", "protocol", "source", "src port", "destination",
                                          "dst port", "size", "TCP flags",
                                          # ENRICHMENT on by default: enrich_columns.py's, at the right
                                          "src host", "src country", "src AS", "dst host", "dst country",
                                          "dst AS", "service", "src process", "dst process", "src maker"]
    assert len(conv.value) >= 1
    assert at.get("download_button")
    sb = at.sidebar
    assert {b.key for b in sb.button} >= {"start", "stop", "clear", "refresh_now"}
    assert {t.key for t in sb.toggle} == {"paused", "auto_refresh"}
    assert sb.radio(key="source_kind").value == "Capture file"


def test_recent_packets_text_filter(fresh, tmp_path):
    fresh.setenv("NTM_PCAP", write_capture(tmp_path))
    at = run_until(app(), lambda a: metric(a, "Status").value == "finished")
    at.text_input(key="pkt_filter").input("8.8.8.8").run()
    recent = table(at, "direction").value
    assert len(recent) == 2 and set(recent["protocol"]) == {"UDP"}


def test_empty_capture_says_what_to_do(fresh, tmp_path):
    fresh.setenv("NTM_PCAP", write_capture(tmp_path, "empty.pcap", frames=[]))
    at = run_until(app(), lambda a: metric(a, "Status").value == "finished")
    assert any("No packets yet" in i.value for i in at.info)


def test_damaged_file_shows_the_error_and_the_packets_before_it(fresh, tmp_path):
    path = tmp_path / "cut.pcap"
    path.write_bytes(pcap_bytes(sample_frames())[:-5])
    fresh.setenv("NTM_PCAP", str(path))
    at = run_until(app(), lambda a: metric(a, "Status").value == "error")
    assert count(at) == 7
    assert any("cut short" in e.value and "record 8" in e.value for e in at.error)


def test_two_sessions_share_one_engine(fresh, tmp_path):
    first = write_capture(tmp_path, "a.pcap")
    write_capture(tmp_path, "b.pcap", frames=sample_frames()[:3])
    fresh.setenv("NTM_PCAP", first)
    fresh.setenv("NTM_CAPTURE_DIR", str(tmp_path))
    one = run_until(app(), lambda a: metric(a, "Status").value == "finished")
    two = run_until(app(), lambda a: metric(a, "Status").value == "finished")
    assert count(one) == count(two) == 8
    one.sidebar.text_input(key="pcap_path").input("b.pcap")
    one.sidebar.button(key="start").click().run()
    two = run_until(two, lambda a: count(a) == 3)
    assert count(two) == 3 and "b.pcap" in rendered(metric(two, "Status").proto.help)
    two.sidebar.button(key="clear").click().run()
    one.run()
    assert count(one) == 0


def test_file_path_outside_the_capture_folder_is_refused(fresh, tmp_path):
    fresh.setenv("NTM_PCAP", write_capture(tmp_path))
    fresh.setenv("NTM_CAPTURE_DIR", str(tmp_path / "inbox"))
    (tmp_path / "inbox").mkdir()
    at = run_until(app(), lambda a: metric(a, "Status").value == "finished")
    at.sidebar.text_input(key="pcap_path").input("../mix.pcap")
    at.sidebar.button(key="start").click().run()
    assert any("outside the capture folder" in e.value for e in at.sidebar.error)
    assert count(at) == 8  # the running capture is untouched


@pytest.mark.live
def test_live_lo_totals_grow_across_reruns(fresh, root_only):
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    port = rx.getsockname()[1]
    fresh.setenv("NTM_INTERFACE", "lo")
    fresh.setenv("NTM_BPF_FILTER", f"udp port {port}")
    at = app().run()
    assert metric(at, "Status").value == "running", at.error
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(10):
        tx.sendto(b"a", ("127.0.0.1", port))
    at = run_until(at, lambda a: count(a) >= 10)
    first = count(at)
    for _ in range(15):
        tx.sendto(b"b", ("127.0.0.1", port))
    at = run_until(at, lambda a: count(a) >= first + 15)
    assert (first, count(at)) == (10, 25)
    assert not at.exception
    tx.close()
    rx.close()


@pytest.mark.live
def test_bad_bpf_filter_shows_the_error_and_keeps_the_capture(fresh, root_only):
    fresh.setenv("NTM_INTERFACE", "lo")
    fresh.setenv("NTM_BPF_FILTER", "udp port 9")
    at = app().run()
    assert metric(at, "Status").value == "running"
    before = metric(at, "Status").proto.help
    at.sidebar.radio(key="source_kind").set_value("Live interface")
    at.sidebar.text_input(key="bpf").input("tcp port banana")
    at.sidebar.button(key="start").click().run()
    assert not at.exception
    assert any("bad BPF filter" in e.value and "banana" in e.value for e in at.sidebar.error)
    assert metric(at, "Status").value == "running" and metric(at, "Status").proto.help == before


def test_alerts_show_in_the_page(fresh, tmp_path):
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    frames = []
    for i, port in enumerate(range(100, 120)):
        frames.append((1_700_000_000.0 + i * 0.01, bytes(eth / IP(src="10.9.0.5", dst="10.9.0.7")
                                                         / TCP(sport=40000, dport=port, flags="S"))))
        frames.append((1_700_000_000.005 + i * 0.01, bytes(eth / IP(src="10.9.0.7", dst="10.9.0.5")
                                                           / TCP(sport=port, dport=40000, flags="RA"))))
    fresh.setenv("NTM_PCAP", write_capture(tmp_path, "scan.pcap", frames=frames))
    at = run_until(app(), lambda a: metric(a, "Status").value == "finished")
    assert count(at, "Alerts") == 1
    row = table(at, "evidence").value.iloc[0]  # the page's alerts (the enrichment panel's has no evidence)
    assert (row["detector"], row["source"], row["target"], row["severity"]) == ("port_scan", "10.9.0.5",
                                                                                "10.9.0.7", "medium")
    assert "20 ports on 10.9.0.7" in row["evidence"] and row["what it means"]
    shapes = figures(at)["Traffic by capture time"]["layout"]["shapes"]
    assert len(shapes) == 1  # the alert's marker on the timeline
    at.button(key="alerts_ack").click().run()
    assert count(at, "Alerts") == 0
    at.multiselect(key="alert_sev").set_value(["high"]).run()
    assert table(at, "evidence").value.empty


@pytest.mark.live
def test_a_dead_capture_thread_is_shown(fresh, root_only):
    import subprocess

    import packet_processor

    fresh.setenv("NTM_INTERFACE", "lo")
    fresh.setenv("NTM_BPF_FILTER", "icmp")
    at = app().run()
    assert any("capture thread alive" in c.value for c in at.caption)

    def boom(*args, **kwargs):
        raise RuntimeError("injected fault")

    fresh.setattr(packet_processor, "parse_batch", boom)
    subprocess.run(["ping", "-c", "1", "127.0.0.1"], capture_output=True, check=True)
    at = run_until(at, lambda a: metric(a, "Status").value == "error"
                   and any("capture thread not running" in c.value for c in a.caption))
    assert any("capture stopped: RuntimeError: injected fault" in rendered(e.value) for e in at.error)


def test_access_password_guards_every_number(fresh, tmp_path):
    fresh.setenv("NTM_PCAP", write_capture(tmp_path))
    fresh.setenv("NTM_ACCESS_PASSWORD", "s3cret-pass")
    at = app().run()
    assert not at.metric and not at.get("plotly_chart") and not at.dataframe and not at.sidebar.button
    at.text_input(key="password").input("wrong").run()
    assert any("Wrong password" in e.value for e in at.error) and not at.metric
    at.text_input(key="password").input("s3cret-pass").run()
    at = run_until(at, lambda a: bool(a.metric) and metric(a, "Status").value == "finished")
    assert count(at) == 8


def test_no_password_by_default(fresh, tmp_path):
    fresh.setenv("NTM_PCAP", write_capture(tmp_path))
    at = app().run()
    assert at.metric and all(t.key != "password" for t in at.text_input)


def test_names_from_outside_show_as_text_not_markdown(fresh, tmp_path):
    fresh.setenv("NTM_PCAP", write_capture(tmp_path, "x_**bold**_<b>.pcap"))
    at = run_until(app(), lambda a: metric(a, "Status").value == "finished")
    health = next(c.value for c in at.caption if "capture thread" in c.value)
    assert r"x\_\*\*bold\*\*\_\<b\>\.pcap" in health


def escaped(text: str) -> str:
    """Every ASCII punctuation character backslash-escaped: CommonMark then shows the text as it is."""
    return "".join("\\" + c if c in string.punctuation else c for c in text)


def test_status_tooltip_shows_hostile_text_as_plain_text(fresh, tmp_path):
    name = "[click](javascript:alert(1)) **b** <img src=x> :red[r] $x$ www.evil.example.pcap"
    path = write_capture(tmp_path, name)
    fresh.setenv("NTM_PCAP", path)
    at = run_until(app(), lambda a: metric(a, "Status").value == "finished")
    tip = metric(at, "Status").proto.help
    assert tip == escaped(f"file {path} (at once)")  # no Markdown construct survives an escaped punctuation
    assert rendered(tip) == f"file {path} (at once)"  # and the viewer reads the name as it is


# -- time zones ------------------------------------------------------------------------------------

@pytest.fixture
def berlin(fresh):
    """TZ=Europe/Berlin for the page (and for the C library, as a process that started with it)."""
    fresh.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield fresh
    fresh.undo()
    time.tzset()


def test_times_follow_daylight_saving_on_both_sides_of_a_change(berlin, tmp_path):
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    frame = bytes(Ether() / IP(src="10.7.0.1", dst="10.7.0.2") / UDP(sport=5353, dport=5353))
    # Berlin: CET (+1) until 2023-03-26 01:00 UTC, CEST (+2) until 2023-10-29 01:00 UTC, then CET again.
    utc = ["2023-03-26 00:30:00", "2023-03-26 01:30:00", "2023-10-29 00:30:00", "2023-10-29 02:00:00"]
    berlin_wall = ["2023-03-26 01:30:00.000", "2023-03-26 03:30:00.000",
                   "2023-10-29 02:30:00.000", "2023-10-29 03:00:00.000"]
    stamps = [pd_ts(u) for u in utc]
    berlin.setenv("NTM_PCAP", write_capture(tmp_path, "dst.pcap", frames=[(t, frame) for t in stamps]))
    at = run_until(app(), lambda a: metric(a, "Status").value == "finished")
    assert not at.exception
    conv, recent = table(at, "endpoint A"), table(at, "direction")
    assert recent.value["time"].tolist() == berlin_wall[::-1]  # newest first
    assert (conv.value.iloc[0]["first seen"], conv.value.iloc[0]["last seen"]) == (berlin_wall[0], berlin_wall[-1])


def pd_ts(utc: str) -> float:
    """Epoch seconds of a UTC wall time, computed by the standard library (not by the code under test)."""
    from datetime import UTC, datetime

    return datetime.strptime(utc, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()


# -- timestamps beyond any calendar ----------------------------------------------------------------

FAR = 2 ** 64 / 1e6 - 10  # the largest microsecond pcapng timestamp, ~584,000 years after 1970


def far_capture(tmp_path, far_last: bool) -> str:
    frames = [(ts, data, 0) for ts, data in sample_frames()]
    frames.insert(len(frames) if far_last else 3, (FAR, frames[0][1], 0))
    path = tmp_path / ("far-last.pcapng" if far_last else "far.pcapng")
    path.write_bytes(pcapng_bytes(frames, [1]))
    return str(path)


@pytest.mark.parametrize("far_last", [False, True])
def test_timestamps_beyond_the_calendar_do_not_break_the_page(fresh, tmp_path, far_last):
    fresh.setenv("NTM_PCAP", far_capture(tmp_path, far_last))
    at = run_until(app(), lambda a: metric(a, "Status").value == "finished")
    assert not at.exception, at.exception
    assert count(at) == 9
    recent = table(at, "direction").value
    assert "1.84467e+13 s since 1970 (outside the calendar)" in recent["time"].tolist()
    assert recent["time"].str.startswith("2023-11-14").sum() == 8
    conv = table(at, "endpoint A").value
    assert "1.84467e+13 s since 1970 (outside the calendar)" in conv["last seen"].tolist()
    figs = figures(at)
    assert {"Protocols by packets", "Traffic by capture time", "Top 10 sources"} <= set(figs)
    if far_last:  # the window ends at the far packet: nothing to draw on a time axis, and the page says why
        assert not figs["Traffic by capture time"]["data"]
        assert any("outside any calendar" in c.value for c in at.caption)
    else:
        assert figs["Traffic by capture time"]["data"][0]["x"][-1].startswith("2023-11-14")


# -- pause ----------------------------------------------------------------------------------------

def test_only_a_paused_viewer_keeps_a_snapshot(fresh, tmp_path):
    fresh.setenv("NTM_PCAP", write_capture(tmp_path))
    at = run_until(app(), lambda a: metric(a, "Status").value == "finished")
    assert "frozen" not in at.session_state  # a viewer that is not paused holds no copy of the buffer
    at.sidebar.toggle(key="paused").set_value(True).run()
    assert "frozen" in at.session_state and metric(at, "Status").value == "paused view"
    at.sidebar.button(key="clear").click().run()
    assert count(at) == 8  # the paused view still shows the moment it froze
    at.sidebar.toggle(key="paused").set_value(False).run()
    assert "frozen" not in at.session_state and count(at) == 0


@pytest.mark.live
def test_a_paused_view_keeps_the_rates_of_the_moment_it_froze(fresh, root_only):
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    port = rx.getsockname()[1]
    fresh.setenv("NTM_INTERFACE", "lo")
    fresh.setenv("NTM_BPF_FILTER", f"udp dst port {port}")
    fresh.setenv("NTM_RATE_WINDOW_S", "10")
    at = app().run()
    assert metric(at, "Status").value == "running", at.error
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(100):
        tx.sendto(b"p", ("127.0.0.1", port))
    at = run_until(at, lambda a: count(a) == 100)
    time.sleep(1.5)  # the packets' second is whole: the rate window (ending 1 s ago) holds them
    at.sidebar.toggle(key="paused").set_value(True).run()
    frozen = (metric(at, "Packets/s").value, metric(at, "Bit/s").value)
    assert frozen[0] == "10.0"  # 100 packets over the 10 s window
    lag = next(c.value for c in at.caption if "last packets added" in c.value)
    for _ in range(50):
        tx.sendto(b"q", ("127.0.0.1", port))
    time.sleep(11)  # longer than the window: a view computed against the clock would show 0 now
    at.run()
    assert (metric(at, "Packets/s").value, metric(at, "Bit/s").value) == frozen and count(at) == 100
    assert next(c.value for c in at.caption if "last packets added" in c.value) == lag  # as fresh as it was
    at.sidebar.toggle(key="paused").set_value(False).run()
    at = run_until(at, lambda a: count(a) == 150)
    assert count(at) == 150 and metric(at, "Packets/s").value == "0.0"  # live again: the clock moved on
    tx.close()
    rx.close()


# -- uploads --------------------------------------------------------------------------------------

def upload(at: AppTest, name: str, data: bytes) -> AppTest:
    at.sidebar.radio(key="source_kind").set_value("Capture file")
    at.sidebar.get("file_uploader")[0].set_value((name, data, "application/octet-stream"))
    return at.run()


def big_frames(n: int) -> list[tuple[float, bytes]]:
    frame = sample_frames()[2][1] + b"\0" * 1100
    return [(1_700_000_000.0 + i * 0.001, frame) for i in range(n)]


@pytest.fixture
def uploads(fresh, tmp_path) -> Iterator[pytest.MonkeyPatch]:
    """An isolated temporary folder for the page's upload folder."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    fresh.setenv("TMPDIR", str(tmp))
    fresh.setattr("tempfile.tempdir", None)  # read TMPDIR again
    yield fresh


def upload_files(tmp_path) -> list[str]:
    return sorted(p.name.split("-", 5)[-1] for p in (tmp_path / "tmp").glob("ntm-uploads-*/*"))


def test_an_upload_is_loaded_and_a_replaced_upload_is_deleted(uploads, tmp_path):
    uploads.setenv("NTM_PCAP", write_capture(tmp_path))
    at = run_until(app(), lambda a: metric(a, "Status").value == "finished")
    at = upload(at, "first.pcap", pcap_bytes(sample_frames()))
    at.sidebar.button(key="start").click().run()
    at = run_until(at, lambda a: metric(a, "Status").value == "finished" and "first.pcap" in
                   rendered(metric(a, "Status").proto.help))
    assert count(at) == 8 and upload_files(tmp_path) == ["first.pcap"]
    at = upload(at, "second.pcap", pcap_bytes(sample_frames()[:3]))
    at.sidebar.button(key="start").click().run()
    at = run_until(at, lambda a: count(a) == 3)
    assert count(at) == 3 and upload_files(tmp_path) == ["second.pcap"]  # the first is gone
    at.sidebar.get("file_uploader")[0].clear()
    at.run()
    assert upload_files(tmp_path) == [] and count(at) == 3  # removed from the page: deleted, numbers stay


def test_the_upload_folder_is_capped(uploads, tmp_path):
    uploads.setenv("NTM_PCAP", write_capture(tmp_path))
    uploads.setenv("NTM_UPLOAD_DIR_MAX_MB", "1")
    blob = pcap_bytes(big_frames(500))  # ~0.58 MB: two of them do not fit in 1 MB
    assert 500_000 < len(blob) < 1_000_000
    one = run_until(app(), lambda a: metric(a, "Status").value == "finished")
    two = run_until(app(), lambda a: metric(a, "Status").value == "finished")
    one = upload(one, "one.pcap", blob)
    assert upload_files(tmp_path) == ["one.pcap"]
    two = upload(two, "two.pcap", blob)
    assert upload_files(tmp_path) == ["two.pcap"]  # the oldest upload made room
    two.sidebar.button(key="start").click().run()
    two = run_until(two, lambda a: count(a) == 500)
    one = upload(one, "three.pcap", blob)  # the file being captured stays: no room
    assert upload_files(tmp_path) == ["two.pcap"]
    assert any("no room for three.pcap" in rendered(e.value) and "UPLOAD_DIR_MAX_MB" in rendered(e.value)
               for e in one.sidebar.error)
    assert count(one) == 500


EXIT_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from streamlit.testing.v1 import AppTest
from pcapgen import pcap_bytes, pcapng_bytes
from test_files import sample_frames
at = AppTest.from_file({app!r}, default_timeout=60).run()
at.sidebar.radio(key="source_kind").set_value("Capture file")
at.sidebar.get("file_uploader")[0].set_value(("x.pcap", pcap_bytes(sample_frames()), "application/octet-stream"))
at.run()
print(at.session_state["upload_path"])
from packet_processor import stop_all
stop_all()
"""


def test_the_upload_folder_is_deleted_at_exit_and_dead_processes_folders_at_start(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dead = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp / f"ntm-uploads-{dead}-abc"
    stale.mkdir()
    (stale / "old.pcap").write_bytes(b"x" * 100)
    alive = tmp / f"ntm-uploads-{os.getpid()}-def"  # this process lives on: its folder stays
    alive.mkdir()
    script = EXIT_SCRIPT.format(tests=str(ROOT / "tests"), app=str(ROOT / "dashboard.py"))
    out = subprocess.run([PYTHON, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TMPDIR": str(tmp), "NTM_PCAP": write_capture(tmp_path)})
    assert out.returncode == 0, out.stderr
    kept = out.stdout.strip().splitlines()[-1]
    assert kept.startswith(str(tmp / "ntm-uploads-")) and kept.endswith("-x.pcap")
    assert not os.path.exists(os.path.dirname(kept))  # deleted when the process exited
    assert not stale.exists() and alive.exists()


# -- what other stages report ---------------------------------------------------------------------

@pytest.fixture
def reported(fresh):
    """The engine's totals with what the pipeline, NIC, file and alert book report."""
    import packet_processor

    real = packet_processor.CaptureEngine.snapshot

    def snapshot(self):
        snap = real(self)
        snap.totals.update({"nic_dropped": 7, "file_dropped": 3,
                            "alerts_suppressed": {"spike": 10, "new_host": 2, "port_scan": 0},
                            "stages": {"detectors": {"packets_in": 1000, "packets_skipped": 28,
                                                     "minute_analysed_pct": 97.2},
                                       "store": {"packets_in": 1000, "packets_skipped": 0,
                                                 "minute_analysed_pct": 100.0}}})
        return snap

    fresh.setattr(packet_processor.CaptureEngine, "snapshot", snapshot)
    yield fresh


def test_losses_of_every_kind_and_skipping_stages_are_shown(reported, tmp_path):
    reported.setenv("NTM_PCAP", write_capture(tmp_path))
    at = run_until(app(), lambda a: metric(a, "Status").value == "finished")
    assert not at.exception
    warnings = [rendered(w.value) for w in at.warning]
    assert any("network card or its driver dropped 7 packets" in w for w in warnings)
    assert any("The capturer that wrote this file dropped 3 packets" in w for w in warnings)
    assert any("detectors analysed 97.2 % of packets in the last minute" in w and "28 of 1,000" in w
               for w in warnings)
    captions = [rendered(c.value) for c in at.caption]
    assert any("store analysed 100.0 % of packets in the last minute" in c for c in captions)
    assert not any("store" in w for w in warnings)  # a stage that keeps up is no warning
    assert any(c.startswith("12 alerts suppressed (new_host: 2, spike: 10)") for c in captions)
    assert "dropped 7 more" in metric(at, "Dropped").proto.help and count(at, "Dropped") == 0


def test_approximate_top_counts_are_marked(fresh, tmp_path):
    import packet_processor

    real_addr, real_conv = packet_processor.Snapshot.top_addresses, packet_processor.Snapshot.top_conversations

    def with_error(rows):
        return [{**r, "error": 1 if i == 0 else 0} for i, r in enumerate(rows)]

    fresh.setattr(packet_processor.Snapshot, "top_addresses",
                  lambda self, *a, **k: with_error(real_addr(self, *a, **k)))
    fresh.setattr(packet_processor.Snapshot, "top_conversations",
                  lambda self, *a, **k: with_error(real_conv(self, *a, **k)))
    fresh.setenv("NTM_PCAP", write_capture(tmp_path))
    at = run_until(app(), lambda a: metric(a, "Status").value == "finished")
    top = figures(at)["Top 10 sources"]["data"][0]
    assert top["y"][-1] == "10.0.0.1" and top["text"][-1] == "≥ 3"  # 4 packets counted, 1 of them uncertain
    assert set(top["text"][:-1]) == {""}  # exact entries carry no mark
    conv = table(at, "endpoint A").value
    assert conv["packets"].tolist()[:2] == ["≥ 1", "2"]  # 2 and 2 counted; the first has 1 uncertain
    assert any("≥ marks a count from a full top table" in c.value for c in at.caption)


def test_vlan_ids_are_shown_when_records_carry_them(fresh, tmp_path):
    import dataclasses

    import packet_processor

    real = packet_processor.CaptureEngine.snapshot
    vids = [100, 100, 100, 0, 0, 200, 0, 100]

    def snapshot(self):
        snap = real(self)
        names = snap.packets.dtype.names
        dtype = snap.packets.dtype if "vlan" in names else np.dtype([*snap.packets.dtype.descr, ("vlan", "<u2")])
        rows = np.zeros(len(snap.packets), dtype)
        for name in snap.packets.dtype.names:
            rows[name] = snap.packets[name]
        rows["vlan"] = vids[:len(rows)]
        return dataclasses.replace(snap, packets=rows)

    fresh.setattr(packet_processor.CaptureEngine, "snapshot", snapshot)
    fresh.setenv("NTM_PCAP", write_capture(tmp_path))
    at = run_until(app(), lambda a: metric(a, "Status").value == "finished")
    recent = table(at, "direction").value
    assert recent["VLAN"].fillna(-1).tolist()[::-1] == [100, 100, 100, -1, -1, 200, -1, 100]
    vlans = figures(at)["VLANs (recent buffer)"]["data"][0]
    assert dict(zip(vlans["y"], array(vlans["x"]).tolist())) == {"VLAN 100": 4, "VLAN 200": 1}
    vids[:] = [0] * 8  # no tagged packet in the buffer: neither the column nor the chart
    at.run()
    assert "VLAN" not in table(at, "direction").value.columns and "VLANs (recent buffer)" not in figures(at)


@pytest.mark.live
def test_promiscuous_toggle_reaches_the_capture(fresh, root_only):
    import packet_processor

    asked = []
    real_start = packet_processor.CaptureEngine.start
    fresh.setattr(packet_processor.CaptureEngine, "start", lambda self, source: asked.append(source)
                  or real_start(self, source))
    fresh.setenv("NTM_INTERFACE", "lo")
    fresh.setenv("NTM_BPF_FILTER", "udp port 9")
    at = app().run()
    assert at.sidebar.toggle(key="promisc").value is True  # PROMISC defaults to on, as tcpdump
    assert [s.promisc for s in asked] == [True]
    at.sidebar.toggle(key="promisc").set_value(False)
    at.sidebar.button(key="start").click().run()
    assert not at.sidebar.error and metric(at, "Status").value == "running"
    assert [s.promisc for s in asked] == [True, False] and asked[1].iface == "lo"


@pytest.mark.live
def test_the_nics_own_drops_reach_the_page_from_the_engine(fresh, root_only, tmp_path):
    """The engine's real NIC figure (lo's counters read from a sysfs-like tree the test owns), not a
    patched totals dict: its rise since the start is on the page, and Clear starts it afresh."""
    from capture import nic

    stats = tmp_path / "lo" / "statistics"
    stats.mkdir(parents=True)
    values = {"rx_dropped": 500, "rx_missed_errors": 0, "rx_fifo_errors": 9}

    def write() -> None:
        for name, v in values.items():
            (stats / name).write_text(f"{v}\n")

    write()
    fresh.setattr(nic, "SYSFS", str(tmp_path))
    fresh.setenv("NTM_INTERFACE", "lo")
    fresh.setenv("NTM_BPF_FILTER", "udp port 9")
    at = app().run()
    assert metric(at, "Status").value == "running"
    assert not any("network card" in rendered(w.value) for w in at.warning)  # nothing lost since the start
    values["rx_dropped"] += 17
    values["rx_fifo_errors"] += 2
    write()

    def shows(n: int):
        return lambda a: any(f"network card or its driver dropped {n:,} packets" in rendered(w.value)
                             for w in a.warning)

    at = run_until(at, shows(19))
    assert shows(19)(at) and "dropped 19 more" in metric(at, "Dropped").proto.help
    at.sidebar.button(key="clear").click().run()
    assert not shows(19)(at) and not any("network card" in rendered(w.value) for w in at.warning)


def test_after_its_first_full_draw_the_page_leaves_its_imports_out_of_the_collectors_full_passes(fresh, tmp_path):
    """A full pass of the cyclic garbage collector walks every tracked object holding the GIL, and the capture
    thread in the page's process waits for all of it (~100,000 objects after a draw, ~40 ms here). Once the
    page has drawn the live view, what it imported (Plotly's figure classes, our drawing functions) is frozen
    out of those passes, once per process; a page with nothing to draw yet freezes nothing."""
    import gc
    import threading

    import plotly.graph_objects as go

    import visualizations as viz
    from capture import heap

    for t in threading.enumerate():  # an earlier test's geo database load freezes when it ends: not during this
        if t.name == "geo-load":
            t.join(120)
    heap.release_gc()  # whatever an earlier test froze; as in a new process
    try:
        fresh.setenv("NTM_ENRICHMENT", "0")  # no geo database load: its own freeze would blur this one
        fresh.setenv("NTM_PCAP", write_capture(tmp_path, "empty.pcap", frames=[]))
        at = run_until(app(), lambda a: metric(a, "Status").value == "finished")
        assert not at.exception and gc.get_freeze_count() == 0  # nothing drawn yet: nothing frozen

        stop_all()
        st.cache_resource.clear()
        fresh.setenv("NTM_PCAP", write_capture(tmp_path))
        at = run_until(app(), lambda a: metric(a, "Status").value == "finished" and len(figures(a)) >= 6)
        assert not at.exception
        tracked = {id(o) for o in gc.get_objects()}  # every generation but the permanent one
        assert id(viz.timeline) not in tracked and id(go.Figure) not in tracked
        frozen = gc.get_freeze_count()
        assert frozen > 20_000
        at.run()
        assert gc.get_freeze_count() <= frozen  # once per process, not at every rerun (some frozen objects die)
        later = [object()]  # a container made after the draw is the collector's again
        assert id(later) in {id(o) for o in gc.get_objects()}
    finally:
        heap.release_gc()
