"""The Streamlit page through streamlit.testing's AppTest: panels, numbers, live growth, errors, sharing."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import time
from collections.abc import Iterator

import numpy as np
import pytest
import streamlit as st
from conftest import PYTHON, ROOT
from pcapgen import pcap_bytes
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


def count(at: AppTest, label: str = "Packets") -> int:
    return int(metric(at, label).value.replace(",", ""))


def run_until(at: AppTest, pred, timeout: float = 10.0) -> AppTest:
    end = time.monotonic() + timeout
    at.run()
    while not pred(at) and time.monotonic() < end:
        time.sleep(0.2)
        at.run()
    return at


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
    assert set(figs) == {"Protocols by packets", "Traffic by capture time", "Top 10 sources",
                         "Top 10 destinations", "Top destination ports", "Packet sizes (recent buffer)"}
    pie = figs["Protocols by packets"]["data"][0]
    assert array(pie["values"]).tolist() == [cli["transport_counts"][k] for k in
                                             ("tcp", "udp", "icmp", "icmpv6", "other_ip", "non_ip")]
    assert pie["labels"] == ["TCP", "UDP", "ICMP", "ICMPv6", "Other IP", "ARP/other"]
    times = figs["Traffic by capture time"]["data"][0]["x"]
    assert times[-1].startswith("2023-11-14")  # capture time, never 1970
    top = figs["Top 10 sources"]["data"][0]
    assert top["y"][-1] == cli["top10_src_by_packets"][0]["addr"]
    conv, recent = at.dataframe
    assert len(recent.value) == 8 and recent.value.iloc[0]["protocol"] == "UDP"  # newest first
    assert list(recent.value.columns) == ["time", "direction", "protocol", "source", "src port", "destination",
                                          "dst port", "size", "TCP flags"]
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
    recent = at.dataframe[1].value
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
    assert count(two) == 3 and "b.pcap" in metric(two, "Status").proto.help
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
    table = next(d.value for d in at.dataframe if "detector" in d.value.columns)
    row = table.iloc[0]
    assert (row["detector"], row["source"], row["target"], row["severity"]) == ("port_scan", "10.9.0.5",
                                                                                "10.9.0.7", "medium")
    assert "20 ports on 10.9.0.7" in row["evidence"] and row["what it means"]
    shapes = figures(at)["Traffic by capture time"]["layout"]["shapes"]
    assert len(shapes) == 1  # the alert's marker on the timeline
    at.button(key="alerts_ack").click().run()
    assert count(at, "Alerts") == 0
    at.multiselect(key="alert_sev").set_value(["high"]).run()
    assert next(d.value for d in at.dataframe if "detector" in d.value.columns).empty


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
    assert any("capture stopped: RuntimeError: injected fault" in e.value for e in at.error)


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
    assert r"x\_\*\*bold\*\*\_\<b\>.pcap" in health
