"""Network Traffic Monitor: the Streamlit page. UI only; the capture lives in packet_processor.

Run:  sudo streamlit run dashboard.py [-- --iface NAME --filter 'BPF' --pcap FILE --speed X]
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import sys
import tempfile
import time
from datetime import datetime

import streamlit as st
from streamlit import config as streamlit_config
from streamlit_autorefresh import st_autorefresh

import config
import visualizations as viz
from capture import broker
from capture.sources import default_interface, list_interfaces, safe_capture_path, validate_bpf
from packet_processor import CaptureEngine, Snapshot, Source, packets_csv, packets_frame

log = logging.getLogger(__name__)
LOCAL_TZ = datetime.now().astimezone().tzinfo
SPEEDS = {"Load at once": 0.0, "Original pace (1x)": 1.0, "2x": 2.0, "10x": 10.0, "100x": 100.0}
WINDOWS = {"1 min": 60, "5 min": 300, "15 min": 900}
EMPTY_HELP = "No packets yet — is the interface up? Is the filter too narrow?"


def parse_flags(argv: list[str]) -> argparse.Namespace:
    """Flags given after `--` on the streamlit command line (unknown ones are ignored)."""
    ap = argparse.ArgumentParser(prog="dashboard.py", add_help=False, allow_abbrev=False)
    ap.add_argument("--iface", default=None)
    ap.add_argument("--filter", default=None)
    ap.add_argument("--pcap", default=None)
    ap.add_argument("--speed", type=float, default=None)
    flags, _ = ap.parse_known_args(argv)
    return flags


def server_port() -> int:
    """The port this Streamlit server listens on."""
    try:
        return int(st.get_option("server.port"))
    except (RuntimeError, TypeError, ValueError):
        return int(config.get("SERVER_PORT"))


def capture_filter(user_bpf: str, exclude_own: bool, port: int) -> str:
    """The BPF actually applied: the user's filter, minus the dashboard's own web traffic if asked."""
    own = f"not (tcp port {port})"
    user_bpf = user_bpf.strip()
    if not exclude_own:
        return user_bpf
    return f"({user_bpf}) and {own}" if user_bpf else own


def initial_source() -> Source:
    """The start-up source: --pcap or PCAP, else a live interface with --iface/--filter."""
    flags = parse_flags(sys.argv[1:])
    pcap = flags.pcap or config.get("PCAP")
    speed = flags.speed if flags.speed is not None else config.get("REPLAY_SPEED")
    if pcap:
        return Source("file", path=os.path.abspath(pcap), speed=speed)
    iface = flags.iface or config.get("INTERFACE") or default_interface()
    user_bpf = flags.filter if flags.filter is not None else config.get("BPF_FILTER")
    return Source("live", iface=iface, bpf=capture_filter(user_bpf, config.get("EXCLUDE_OWN_TRAFFIC"),
                                                          server_port()))


@st.cache_resource(show_spinner=False)
def get_engine() -> CaptureEngine:
    """The one capture of this process, shared by every browser tab."""
    logging.basicConfig(level=config.get("LOG_LEVEL"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # the upload route reads this option per request, so UPLOAD_MAX_MB holds before any body is read
        streamlit_config.set_option("server.maxUploadSize", config.get("UPLOAD_MAX_MB"))
    except Exception:  # an older Streamlit: .streamlit/config.toml's value stays
        log.warning("could not apply UPLOAD_MAX_MB to the server's upload limit", exc_info=True)
    engine = CaptureEngine()
    engine.start(initial_source())
    return engine


# ---------------------------------------------------------------------------------------
# Sidebar
# ---------------------------------------------------------------------------------------


def sidebar(engine: CaptureEngine) -> None:
    """Source, filter and control widgets; acting on them changes the shared capture."""
    sb = st.sidebar
    sb.title("Network Traffic Monitor")
    _widget_defaults(engine.source)
    kind = sb.radio("Source", ["Live interface", "Capture file"], key="source_kind", horizontal=True)
    source = _live_inputs(sb) if kind == "Live interface" else _file_inputs(sb)
    start_col, stop_col = sb.columns(2)
    if start_col.button("Start", key="start", type="primary", width="stretch") and source is not None:
        _start(engine, source)
    if stop_col.button("Stop", key="stop", width="stretch"):
        engine.stop()
    sb.toggle("Pause view", key="paused", help="Freeze this page; the capture goes on.")
    if sb.button("Clear", key="clear", help="Empty the buffer and counters for every viewer."):
        engine.clear()
    if msg := st.session_state.get("control_error"):
        sb.error(msg)
    sb.divider()
    sb.toggle("Auto-refresh", value=True, key="auto_refresh",
              help=f"Redraw every {config.get('REFRESH_S'):g} s (REFRESH_S).")
    sb.button("Refresh now", key="refresh_now")


def split_filter(bpf: str, port: int) -> tuple[str, bool]:
    """Undo capture_filter: (the user's part, whether own traffic is left out)."""
    own = f"not (tcp port {port})"
    if bpf == own:
        return "", True
    if bpf.startswith("(") and bpf.endswith(f") and {own}"):
        return bpf[1:-len(f") and {own}")], True
    return bpf, False


def _widget_defaults(source: Source | None) -> None:
    """A new viewer's sidebar starts from the capture that is running, not from blank widgets."""
    if source is None or "source_kind" in st.session_state:
        return
    state = st.session_state
    if source.kind == "file":
        state["source_kind"] = "Capture file"
        state["speed"] = next((k for k, v in SPEEDS.items() if v == source.speed), "Load at once")
    else:
        state["source_kind"] = "Live interface"
        state["iface"] = source.iface
        state["bpf"], state["own_traffic"] = split_filter(source.bpf, server_port())


@st.cache_data(ttl=5, show_spinner=False)
def _interfaces() -> list[str]:
    """The interface list, asked of the kernel at most every 5 s however many pages rerun."""
    return list_interfaces()


def _live_inputs(sb) -> Source | None:
    names = _interfaces()
    if st.session_state.get("iface") not in names:
        default = default_interface()
        st.session_state["iface"] = default if default in names else names[0]
    iface = sb.selectbox("Interface", names, key="iface")
    user_bpf = sb.text_input("BPF filter", key="bpf", placeholder="e.g. tcp port 443 or icmp")
    st.session_state.setdefault("own_traffic", config.get("EXCLUDE_OWN_TRAFFIC"))
    exclude = sb.checkbox("Hide this dashboard's own traffic", key="own_traffic",
                          help=f"Leaves out tcp port {server_port()} (the page itself).")
    return Source("live", iface=iface, bpf=capture_filter(user_bpf, exclude, server_port()))


def _file_inputs(sb) -> Source | None:
    limit = config.get("UPLOAD_MAX_MB")
    # The browser refuses a bigger file before sending a byte; the server, whose limit follows the
    # same setting (see get_engine), refuses it while reading; the check below is the last word.
    upload = sb.file_uploader(f"Upload a capture (max {limit} MB)", type=["pcap", "pcapng", "cap"],
                              key="upload", max_upload_size=limit)
    folder = config.get("CAPTURE_DIR")
    name = sb.text_input(f"…or a file in {folder}/", key="pcap_path")
    speed = SPEEDS[sb.selectbox("Replay", list(SPEEDS), key="speed")]
    if upload is not None:
        if upload.size > limit * 1_000_000:
            st.session_state["control_error"] = f"{upload.name} is {upload.size / 1e6:.1f} MB; the limit is {limit} MB"
            return None
        # One file per upload, written once: the page reruns every few seconds, and a capture
        # may be reading the file, so it is never rewritten in place.
        name = f"{upload.file_id}-{os.path.basename(upload.name) or 'upload.pcap'}"
        path = os.path.join(_upload_dir(), name.replace(os.sep, "_"))
        if not os.path.exists(path):
            with open(path + ".part", "wb") as fh:
                fh.write(upload.getbuffer())
            os.replace(path + ".part", path)
        return Source("file", path=path, speed=speed)
    if name.strip():
        try:
            return Source("file", path=safe_capture_path(name.strip(), folder), speed=speed)
        except ValueError as exc:
            st.session_state["control_error"] = str(exc)
            return None
    return None


@st.cache_resource(show_spinner=False)
def _upload_dir() -> str:
    return tempfile.mkdtemp(prefix="ntm-uploads-")


def _start(engine: CaptureEngine, source: Source) -> None:
    """Validate, then switch the shared capture to `source`; a bad filter leaves the capture as it was."""
    st.session_state.pop("control_error", None)
    if source.kind == "live":
        problem = validate_bpf(source.bpf, source.iface)
        if problem:
            st.session_state["control_error"] = plain(problem)
            return
    if not engine.start(source):
        st.session_state["control_error"] = plain(engine.status().error or "")


# ---------------------------------------------------------------------------------------
# Main area
# ---------------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB'."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    return f"{n} B"


def human_rate(bits: float) -> str:
    """Bits per second as text."""
    for unit in ("bit/s", "kbit/s", "Mbit/s", "Gbit/s"):
        if bits < 1000 or unit == "Gbit/s":
            return f"{bits:,.1f} {unit}"
        bits /= 1000
    return f"{bits} bit/s"


def capture_clock(snap: Snapshot) -> tuple[float | None, float]:
    """(end of the rate/timeline window in capture time, capture duration in seconds)."""
    t = snap.totals
    if snap.status.source.startswith("interface"):
        now = time.time()
        started = snap.status.started_wall or now
        # Whole seconds only: the current second is still filling.
        return now - 1, max(0.0, now - started)
    if t["packets"]:
        return t["last_ts"], t["last_ts"] - t["first_ts"]
    return None, 0.0


_MARKDOWN = str.maketrans({c: "\\" + c for c in "\\`*_[]<>#|~$"})


def plain(text: str) -> str:
    """Text shown as itself where Streamlit would read Markdown (file and interface names are data)."""
    return text.translate(_MARKDOWN)


def status_banner(snap: Snapshot) -> None:
    """Running/paused/stopped, or the error with its fix."""
    s = snap.status
    if s.state == "error":
        st.error(f"Capture error: {plain(s.error or '')}")
    elif s.state == "running" and not s.alive:
        st.error("capture stopped: the capture thread is no longer running")
    elif snap.totals["dropped"]:
        st.warning(f"The kernel dropped {snap.totals['dropped']:,} packets: the numbers below are missing them.")
    if s.file_note:
        st.caption(f"The capture file says: {plain(s.file_note)}")


def metrics(snap: Snapshot, end: float | None, duration: float) -> None:
    """The metrics row: totals, duration, rates, drops, buffer fill and status."""
    t = snap.totals
    pps, bps = snap.rate(config.get("RATE_WINDOW_S"), end) if end is not None else (0.0, 0.0)
    cols = st.columns(5)
    cols[0].metric("Packets", f"{t['packets']:,}", help="Every packet seen since the capture started.")
    cols[1].metric("Bytes", human_bytes(t["bytes"]), help=f"{t['bytes']:,} bytes on the wire since start.")
    cols[2].metric("Packets/s", f"{pps:,.1f}", help=f"Average over the last {config.get('RATE_WINDOW_S')} s.")
    cols[3].metric("Bit/s", human_rate(bps), help=f"Average over the last {config.get('RATE_WINDOW_S')} s.")
    cols[4].metric("Duration", _duration(duration))
    cols = st.columns(5)
    cols[0].metric("Dropped", f"{t['dropped']:,}", help="Packets the kernel dropped (capture ring full).")
    cols[1].metric("Malformed", f"{t['malformed']:,}", help="Packets whose headers were cut short or lied.")
    cols[2].metric("Buffer", f"{t['buffer_len']:,} / {snap.buffer_size:,}",
                   help="Packets held for the tables and CSV (BUFFER_SIZE); totals are not limited by it.")
    state = snap.status.state
    cols[3].metric("Status", "paused view" if st.session_state.get("paused") else state,
                   help=snap.status.source)
    open_alerts = sum(1 for a in snap.alerts if not a.acknowledged)
    cols[4].metric("Alerts", f"{open_alerts:,}", help="Findings of the detectors not yet acknowledged.")
    st.caption(plain(health_text(snap)))


def health_text(snap: Snapshot) -> str:
    """The capture thread's health in one line: alive or not, and how fresh the numbers are."""
    s = snap.status
    thread = "capture thread alive" if s.alive else "capture thread not running"
    if s.last_batch_wall is None:
        return f"{thread}; no packet yet · {s.source}"
    lag = max(0.0, time.time() - s.last_batch_wall)
    return f"{thread}; last packets added {lag:.1f} s ago · {s.source}"


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def charts(snap: Snapshot, end: float | None) -> None:
    """Protocol pie, timeline, top talkers, ports, sizes and conversations."""
    left, right = st.columns([1, 2])
    with left:
        by = st.radio("Pie by", ["packets", "bytes"], horizontal=True, key="pie_by")
        counts = snap.totals["transport_counts" if by == "packets" else "transport_bytes"]
        st.plotly_chart(viz.protocol_pie(counts, by), key="pie")
    with right:
        window = WINDOWS[st.radio("Window", list(WINDOWS), horizontal=True, key="window")]
        frame = viz.timeline_frame(snap.bins, window, end, LOCAL_TZ)
        marks = [a.last_ts for a in snap.alerts if end is not None and end - window < a.last_ts <= end + 1]
        st.plotly_chart(viz.timeline(frame, marks), key="timeline")
    top_by = st.radio("Top talkers by", ["packets", "bytes"], horizontal=True, key="top_by")
    a, b = st.columns(2)
    a.plotly_chart(viz.top_bar(snap.top_addresses("src", top_by), "Top 10 sources", top_by), key="top_src")
    b.plotly_chart(viz.top_bar(snap.top_addresses("dst", top_by), "Top 10 destinations", top_by), key="top_dst")
    c, d = st.columns(2)
    c.plotly_chart(viz.ports_bar(snap.top_ports("tcp", 10, top_by), snap.top_ports("udp", 10, top_by), top_by),
                   key="ports")
    d.plotly_chart(viz.size_histogram(snap.packets["wire_len"]), key="sizes")
    st.subheader("Top conversations")
    st.dataframe(viz.conversations_table(snap.top_conversations(20, top_by), LOCAL_TZ), hide_index=True,
                 key="conversations")


def alerts_panel(snap: Snapshot, engine: CaptureEngine) -> None:
    """The detectors' findings, newest first, filterable by severity, with acknowledge and clear."""
    st.subheader("Alerts")
    if not snap.alerts:
        st.caption("No alerts: the detectors (port scans, floods, spikes, new hosts, ARP spoofing) found nothing.")
        return
    severities = st.multiselect("Severity", ["high", "medium", "low"], default=["high", "medium", "low"],
                                key="alert_sev")
    shown = [a for a in snap.alerts if a.severity in severities]
    st.dataframe(viz.alerts_table(shown, LOCAL_TZ), hide_index=True, key="alerts")
    ack, clear = st.columns(2)
    # Callbacks run before the next rerun draws the page, so the metrics above see the change.
    ack.button("Acknowledge all shown", key="alerts_ack", on_click=_acknowledge, args=(engine, shown))
    clear.button("Clear alerts", key="alerts_clear", on_click=engine.alerts.clear)


def _acknowledge(engine: CaptureEngine, alerts: list) -> None:
    for a in alerts:
        engine.alerts.acknowledge(a)


def recent_packets(snap: Snapshot, engine: CaptureEngine) -> None:
    """Newest packets first, with a text filter and a CSV download of the whole buffer."""
    st.subheader("Recent packets")
    text = st.text_input("Filter by address, port or protocol", key="pkt_filter")
    n = config.get("RECENT_ROWS")
    rows = snap.packets if text.strip() else snap.packets[-n:]
    table = viz.recent_table(packets_frame(rows, LOCAL_TZ), n, text)
    st.dataframe(table.drop(columns=["ts", "captured", "ICMP type", "malformed"]), hide_index=True,
                 key="recent")
    st.download_button("Download the whole buffer (CSV)", data=lambda: _csv(engine), file_name="packets.csv",
                       mime="text/csv", key="csv", on_click="ignore")


def _csv(engine: CaptureEngine) -> bytes:
    return packets_csv(engine.snapshot().packets, LOCAL_TZ)


def signed_in() -> bool:
    """True when no ACCESS_PASSWORD is set, or this viewer has given it; else ask for it."""
    password = config.get("ACCESS_PASSWORD")
    if not password or st.session_state.get("signed_in"):
        return True
    st.title("Network Traffic Monitor")
    given = st.text_input("Password", type="password", key="password")
    if st.button("Sign in", key="sign_in") or given:
        if hmac.compare_digest(given.encode(), password.encode()):
            st.session_state["signed_in"] = True
            st.session_state.pop("password", None)
            st.rerun()
        st.error("Wrong password.")
    return False


def page() -> None:
    """Build the whole page once; the auto-refresh reruns it."""
    st.set_page_config(page_title="Network Traffic Monitor", layout="wide")
    if not signed_in():
        return  # nothing about the traffic is shown or sent before the password
    engine = get_engine()
    sidebar(engine)
    if st.session_state.get("paused") and "frozen" in st.session_state:
        snap = st.session_state["frozen"]
    else:
        snap = engine.snapshot()
        st.session_state["frozen"] = snap
    end, duration = capture_clock(snap)
    status_banner(snap)
    metrics(snap, end, duration)
    if not snap.totals["packets"]:
        if snap.status.state != "error":
            st.info(EMPTY_HELP)
    else:
        charts(snap, end)
        alerts_panel(snap, engine)
        recent_packets(snap, engine)
    if st.session_state.get("auto_refresh", True) and not st.session_state.get("paused"):
        st_autorefresh(interval=int(config.get("REFRESH_S") * 1000), key="tick")


if "streamlit.web.bootstrap" in sys.modules and broker.separate().still_root:  # not in AppTest's process
    st.warning(broker.separate().text)  # as root: the capture helper starts, then this process gives up root
page()
