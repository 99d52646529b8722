"""Network Traffic Monitor: the Streamlit page. UI only; the capture lives in packet_processor.

Run:  sudo streamlit run dashboard.py [-- --iface NAME --filter 'BPF' --pcap FILE --speed X]
"""

from __future__ import annotations

import argparse
import atexit
import hmac
import logging
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import pandas as pd
import streamlit as st
from streamlit import config as streamlit_config
from streamlit_autorefresh import st_autorefresh

import alerts_page
import config
import enrich_columns as ec
import enrich_page
import history_page
import investigate_page as inv
import visualizations as viz
from capture import broker, heap
from capture.sources import default_interface, list_interfaces, safe_capture_path, validate_bpf
from packet_processor import CaptureEngine, Snapshot, Source, packets_csv, packets_frame

log = logging.getLogger(__name__)
SPEEDS = {"Load at once": 0.0, "Original pace (1x)": 1.0, "2x": 2.0, "10x": 10.0, "100x": 100.0}
WINDOWS = {"1 min": 60, "5 min": 300, "15 min": 900}
EMPTY_HELP = "No packets yet — is the interface up? Is the filter too narrow?"
UPLOAD_PREFIX = "ntm-uploads-"


def local_zone() -> tzinfo:
    """The host's time zone with its rules (daylight saving included): TZ, else /etc/localtime.

    A fixed offset taken once would put every timestamp on the other side of a daylight-saving
    change an hour off; a zone converts each timestamp with the offset of its own moment.
    """
    name = os.environ.get("TZ", "").lstrip(":")
    try:
        if name.startswith("/"):
            with open(name, "rb") as fh:
                return ZoneInfo.from_file(fh, key=name)
        if name:
            return ZoneInfo(name)
        real = os.path.realpath("/etc/localtime")
        if "/zoneinfo/" in real:
            return ZoneInfo(real.split("/zoneinfo/", 1)[1])
        with open("/etc/localtime", "rb") as fh:
            return ZoneInfo.from_file(fh, key="localtime")
    except (OSError, ValueError, ZoneInfoNotFoundError):
        # A POSIX TZ rule string or no zone database: the offset of now, as the best left.
        _zone_warning(name)
        return datetime.now().astimezone().tzinfo


@st.cache_resource(show_spinner=False)
def _zone_warning(name: str) -> None:
    """Say once per process (not at every rerun) that the zone has no rules here."""
    log.warning("time zone %r not found in the zone database; times use the current offset, "
                "which is wrong across a daylight-saving change", name)


LOCAL_TZ = local_zone()  # the script runs afresh on every rerun, so a change of TZ is seen at the next one


def parse_flags(argv: list[str]) -> argparse.Namespace:
    """Flags given after `--` on the streamlit command line (unknown ones are ignored)."""
    ap = argparse.ArgumentParser(prog="dashboard.py", add_help=False, allow_abbrev=False)
    ap.add_argument("--iface", default=None)
    ap.add_argument("--filter", default=None)
    ap.add_argument("--pcap", default=None)
    ap.add_argument("--speed", type=float, default=None)
    ap.add_argument("--clickhouse", default=None)  # HOST:PORT: the fleet page (fleet_page.py), no local capture
    ap.add_argument("--cluster", default=None)
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
    return Source("live", iface=iface, bpf=capture_filter(user_bpf, config.get("EXCLUDE_OWN_TRAFFIC"), server_port()),
                  promisc=config.get("PROMISC"))


@st.cache_resource(show_spinner=False)
def get_engine() -> CaptureEngine:
    """The one capture of this process, shared by every browser tab."""
    logging.basicConfig(level=config.get("LOG_LEVEL"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # the upload route reads this option per request, so UPLOAD_MAX_MB holds before any body is read
        streamlit_config.set_option("server.maxUploadSize", config.get("UPLOAD_MAX_MB"))
    except Exception:  # an older Streamlit: .streamlit/config.toml's value stays
        log.warning("could not apply UPLOAD_MAX_MB to the server's upload limit", exc_info=True)
    engine = CaptureEngine(record=config.get("HISTORY"))  # history: the per-user store unless STORE says
    atexit.register(engine.close_store)  # the last minute written and the store checkpointed at exit
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
        state["promisc"] = bool(source.promisc)


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
    st.session_state.setdefault("promisc", config.get("PROMISC"))
    promisc = sb.toggle("Promiscuous mode", key="promisc",
                        help="On: every frame the interface receives, as tcpdump captures by default (a mirror or "
                             "SPAN port shows other hosts' traffic). Off: only this host's own, broadcast and "
                             "multicast traffic, as `tcpdump -p` (PROMISC).")
    return Source("live", iface=iface, bpf=capture_filter(user_bpf, exclude, server_port()), promisc=promisc)


def _file_inputs(sb) -> Source | None:
    limit = config.get("UPLOAD_MAX_MB")
    # The browser refuses a bigger file before sending a byte; the server, whose limit follows the
    # same setting (see get_engine), refuses it while reading; the check below is the last word.
    upload = sb.file_uploader(f"Upload a capture (max {limit} MB)", type=["pcap", "pcapng", "cap"],
                              key="upload", max_upload_size=limit)
    folder = config.get("CAPTURE_DIR")
    name = sb.text_input(f"…or a file in {folder}/", key="pcap_path")
    speed = SPEEDS[sb.selectbox("Replay", list(SPEEDS), key="speed")]
    kept = _keep_upload(upload, limit)
    if upload is not None:
        return Source("file", path=kept, speed=speed) if kept else None
    if name.strip():
        try:
            return Source("file", path=safe_capture_path(name.strip(), folder), speed=speed)
        except ValueError as exc:
            st.session_state["control_error"] = str(exc)
            return None
    return None


def _keep_upload(upload, limit_mb: int) -> str | None:
    """The file this viewer's upload is kept in; the viewer's previous upload is deleted when replaced."""
    state = st.session_state
    previous = state.get("upload_path")
    path = None
    if upload is not None:
        if upload.size > limit_mb * 1_000_000:
            state["control_error"] = f"{plain(upload.name)} is {upload.size / 1e6:.1f} MB; the limit is {limit_mb} MB"
        else:
            name = f"{upload.file_id}-{os.path.basename(upload.name) or 'upload.pcap'}"
            path = _write_upload(os.path.join(_upload_dir(), name.replace(os.sep, "_")), upload)
    if previous and previous != path:
        # A capture replaying the old file keeps reading it: an open file outlives its name.
        _remove(previous)
        state.pop("upload_path", None)
    if path:
        state["upload_path"] = path
    return path


def _write_upload(path: str, upload) -> str | None:
    """Write an upload once (the page reruns every few seconds, and a capture may be reading it), within
    the folder's cap (UPLOAD_DIR_MAX_MB): the oldest other uploads go first; None when it cannot fit."""
    if os.path.exists(path):
        return path
    cap = config.get("UPLOAD_DIR_MAX_MB") * 1_000_000
    if not make_room(os.path.dirname(path), upload.size, cap, keep=_in_use()):
        st.session_state["control_error"] = (f"no room for {plain(upload.name)} ({upload.size / 1e6:.1f} MB): "
                                             f"uploads may use {cap / 1e6:g} MB in all (UPLOAD_DIR_MAX_MB), "
                                             "and the file being captured stays")
        return None
    with open(path + ".part", "wb") as fh:
        fh.write(upload.getbuffer())
    os.replace(path + ".part", path)
    return path


def _in_use() -> set[str]:
    """Files no clean-up may delete: the one the shared capture reads."""
    source = get_engine().source
    return {source.path} if source is not None and source.kind == "file" else set()


def make_room(folder: str, need: int, cap: int, keep: set[str] = frozenset()) -> bool:
    """Delete the oldest files of `folder` (not those in `keep`) until `need` more bytes fit in `cap`."""
    files = []
    for entry in os.scandir(folder):
        if entry.is_file():
            st_ = entry.stat()
            files.append((st_.st_mtime, entry.path, st_.st_size))
    used = sum(size for _, _, size in files)
    for _, path, size in sorted(files):
        if used + need <= cap:
            break
        if path not in keep:
            _remove(path)
            used -= size
    return used + need <= cap


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError:
        log.warning("could not delete the upload %s", path, exc_info=True)


@st.cache_resource(show_spinner=False)
def _upload_dir() -> str:
    """This process's upload folder, deleted at exit; folders left by dead processes are deleted first."""
    remove_stale_upload_dirs(tempfile.gettempdir())
    path = tempfile.mkdtemp(prefix=f"{UPLOAD_PREFIX}{os.getpid()}-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def remove_stale_upload_dirs(parent: str) -> list[str]:
    """Delete upload folders whose process is gone (killed before its exit clean-up); their paths."""
    gone = []
    for entry in os.scandir(parent):
        pid = entry.name[len(UPLOAD_PREFIX):].split("-", 1)[0]
        if not (entry.name.startswith(UPLOAD_PREFIX) and pid.isdigit() and entry.is_dir()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
            gone.append(entry.path)
        except PermissionError:
            pass  # alive, another user's
    return gone


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


def capture_clock(snap: Snapshot, now: float) -> tuple[float | None, float]:
    """(end of the rate/timeline window in capture time, capture duration in seconds).

    `now` is the wall time the snapshot was taken: a paused view keeps the rates of that moment.
    """
    t = snap.totals
    if snap.status.source.startswith("interface"):
        started = snap.status.started_wall or now
        # Whole seconds only: the current second is still filling.
        return now - 1, max(0.0, now - started)
    if t["packets"]:
        return t["last_ts"], t["last_ts"] - t["first_ts"]
    return None, 0.0


# CommonMark lets a backslash escape every ASCII punctuation character, and an escaped one is
# never markup: no emphasis, link, autolink (http: www.), HTML, math ($), or Streamlit's :colour[]
# and :icon: directives. Line breaks would start new blocks (lists, headings), so they become spaces.
_MARKDOWN = str.maketrans({**{c: "\\" + c for c in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"},
                           "\n": " ", "\r": " "})


def plain(text: str) -> str:
    """Text shown as itself where Streamlit reads Markdown (tooltips, captions, errors): names are data."""
    return text.translate(_MARKDOWN)


def count_of(value) -> int:
    """A drop count that may come as a number or as {counter: number} (NIC counters): the total."""
    if isinstance(value, dict):
        return sum(int(v or 0) for v in value.values())
    return int(value or 0)


def status_banner(snap: Snapshot) -> None:
    """Running/paused/stopped, or the error with its fix; every kind of loss, each named apart."""
    s = snap.status
    t = snap.totals
    if s.state == "error":
        st.error(f"Capture error: {plain(s.error or '')}")
    elif s.state == "running" and not s.alive:
        st.error("capture stopped: the capture thread is no longer running")
    elif t["dropped"]:
        st.warning(f"The kernel dropped {t['dropped']:,} packets (the capture ring was full): "
                   "the numbers below are missing them.")
    if nic := count_of(t.get("nic_dropped")):
        st.warning(f"The network card or its driver dropped {nic:,} packets before any capture could see them "
                   "(rx_dropped, rx_missed_errors, rx_fifo_errors): the numbers below are missing them.")
    if filed := count_of(t.get("file_dropped")):
        st.warning(f"The capturer that wrote this file dropped {filed:,} packets: they are not in the file.")
    for line, behind in stage_lines(t.get("stages")):
        (st.warning if behind else st.caption)(line)
    if s.file_note:
        st.caption(f"The capture file says: {plain(s.file_note)}")


def stage_lines(stages: dict | None) -> list[tuple[str, bool]]:
    """One line per consumer stage (detectors, store…): how much of the traffic it analysed, and
    whether it is skipping batches now (True) — the totals above never skip."""
    lines = []
    for name, s in (stages or {}).items():
        pct = s.get("minute_analysed_pct")
        skipped = int(s.get("packets_skipped") or 0)
        text = plain(f"{name} analysed {pct:.1f} % of packets in the last minute" if pct is not None
                     else f"{name}: no packets in the last minute")
        behind = pct is not None and pct < 100.0
        if skipped:
            text += f"; {skipped:,} of {int(s.get('packets_in') or 0):,} packets skipped since the start"
        if behind:
            text += f" — {plain(str(name))} is falling behind and skips whole batches; the totals stay exact"
        lines.append((text, behind))
    return lines


def rates(snap: Snapshot, end: float | None) -> tuple[float, float, str]:
    """(packets/s, bit/s, what they average): the last RATE_WINDOW_S s, or a time filter's whole span."""
    window = config.get("RATE_WINDOW_S")
    span = inv.rate_span(snap.totals.get("filter"), end)
    if span is not None:  # the matching packets all lie in [from, to): averaged over that span
        secs = span[1] - span[0]
        if secs <= 0:
            return 0.0, 0.0, "No time left in the filtered span."
        t = snap.totals
        return t["packets"] / secs, t["bytes"] * 8 / secs, f"Average over the filtered span ({secs:,.1f} s)."
    pps, bps = snap.rate(window, end) if end is not None else (0.0, 0.0)
    return pps, bps, f"Average over the last {window} s."


def metrics(snap: Snapshot, end: float | None, duration: float, now: float) -> None:
    """The metrics row: totals, duration, rates, drops, buffer fill and status (a filtered view: of its packets)."""
    t = snap.totals
    filtered = t.get("filter")
    pps, bps, over = rates(snap, end)
    if filtered is not None:  # the span the matching packets cover
        duration = t["max_ts"] - t["min_ts"] if t["packets"] else 0.0
    cols = st.columns(5)
    seen = ("Buffered packets that match the filters (see the note above)." if filtered
            else "Every packet seen since the capture started.")
    cols[0].metric("Packets", f"{t['packets']:,}", help=seen)
    cols[1].metric("Bytes", human_bytes(t["bytes"]), help=f"{t['bytes']:,} bytes on the wire since start.")
    cols[2].metric("Packets/s", f"{pps:,.1f}", help=over)
    cols[3].metric("Bit/s", human_rate(bps), help=over)
    cols[4].metric("Duration", _duration(duration), help="From the first to the last matching packet."
                   if filtered else "Capture time covered.")
    cols = st.columns(5)
    nic = t.get("nic_dropped")
    nic_help = "" if nic is None else f" The network card or driver dropped {count_of(nic):,} more (not counted here)."
    cols[0].metric("Dropped", f"{t['dropped']:,}", help="Packets the kernel dropped (capture ring full)." + nic_help)
    cols[1].metric("Malformed", f"{t['malformed']:,}", help="Packets whose headers were cut short or lied.")
    if filtered is not None:
        cols[2].metric("Buffer", f"{filtered['matched']:,} of {t['buffer_len']:,}",
                       help="Buffered packets that match the filters, of those buffered (BUFFER_SIZE "
                            f"{snap.buffer_size:,}).")
    else:
        cols[2].metric("Buffer", f"{t['buffer_len']:,} / {snap.buffer_size:,}",
                       help="Packets held for the tables and CSV (BUFFER_SIZE); totals are not limited by it.")
    state = snap.status.state
    cols[3].metric("Status", "paused view" if st.session_state.get("paused") else state,
                   help=plain(snap.status.source))  # a file name is data, never Markdown
    open_alerts = sum(1 for a in snap.alerts if not a.acknowledged)
    cols[4].metric("Alerts", f"{open_alerts:,}", help="Findings of the detectors not yet acknowledged"
                   + (" that concern the filtered traffic." if filtered else "."))
    st.caption(plain(health_text(snap, now)))


def health_text(snap: Snapshot, now: float) -> str:
    """The capture thread's health in one line: alive or not, and how fresh the numbers were at `now`."""
    s = snap.status
    thread = "capture thread alive" if s.alive else "capture thread not running"
    if s.last_batch_wall is None:
        return f"{thread}; no packet yet · {s.source}"
    lag = max(0.0, now - s.last_batch_wall)
    return f"{thread}; last packets added {lag:.1f} s ago · {s.source}"


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def charts(snap: Snapshot, end: float | None) -> None:
    """Protocol pie, VLANs, timeline, top talkers, ports, sizes and conversations."""
    left, right = st.columns([1, 2])
    with left:
        by = st.radio("Pie by", ["packets", "bytes"], horizontal=True, key="pie_by")
        counts = snap.totals["transport_counts" if by == "packets" else "transport_bytes"]
        chart(viz.protocol_pie(counts, by), "pie")
        if tagged(snap.packets):
            chart(viz.vlan_bar(snap.packets["vlan"]), "vlans")
    with right:
        window = WINDOWS[st.radio("Window", list(WINDOWS), horizontal=True, key="window")]
        end = inv.view_end(snap, end, window)  # a time filter's span before the window: the window ends there
        frame = viz.timeline_frame(snap.bins, window, end, LOCAL_TZ)
        marks = [a.last_ts for a in snap.alerts if end is not None and end - window < a.last_ts <= end + 1]
        chart(viz.timeline(frame, marks), "timeline")
        if end is not None and not viz.TS_MIN <= end <= viz.TS_MAX:
            st.caption(f"The capture's time ({end:.6g} s since 1970) lies outside any calendar: no timeline.")
    top_by = st.radio("Top talkers by", ["packets", "bytes"], horizontal=True, key="top_by")
    a, b = st.columns(2)
    src, dst = snap.top_addresses("src", top_by), snap.top_addresses("dst", top_by)
    look = lookups(snap)
    with a:
        chart(viz.top_bar(src, "Top 10 sources", top_by, look and ec.hover_notes(look, src)), "top_src")
    with b:
        chart(viz.top_bar(dst, "Top 10 destinations", top_by, look and ec.hover_notes(look, dst)), "top_dst")
    if look:
        st.dataframe(ec.talkers_table(look, src, dst, top_by), hide_index=True, key="top_talkers")
    c, d = st.columns(2)
    with c:
        chart(viz.ports_bar(snap.top_ports("tcp", 10, top_by), snap.top_ports("udp", 10, top_by), top_by), "ports")
    d.plotly_chart(viz.size_histogram(snap.packets["wire_len"]), key="sizes")
    st.subheader("Top conversations")
    conversations = snap.top_conversations(20, top_by)
    table = viz.conversations_table(conversations, LOCAL_TZ, top_by)
    if look:
        table = ec.conversations(look, table, conversations)
    st.dataframe(table, hide_index=True, key="conversations",
                 **inv.conversation_select(conversations))
    if any(r.get("error") for r in [*src, *dst, *conversations]):
        st.caption("≥ marks a count from a full top table (TOP_TABLE_MAX): the true count is at least that "
                   "(Space-Saving keeps the heaviest entries with a bounded error).")


def lookups(snap: Snapshot) -> ec.Lookups | None:
    """This refresh's enrichment look-ups, or None with ENRICHMENT off (then no enricher is built and
    no query is sent); a file's packets get no process (ec.NOT_LIVE)."""
    return ec.Lookups(enrich_page.enricher(), live=ec.is_live(snap)) if enrich_page.enabled() else None


def chart(fig, key: str) -> None:
    """A chart whose box (timeline) or clicked bar/slice adds a filter (investigate_page)."""
    st.plotly_chart(fig, key=key, **inv.selectable(key, fig, LOCAL_TZ))


def alerts_panel(snap: Snapshot, engine: CaptureEngine, whole: Snapshot | None = None) -> None:
    """The detectors' findings, newest first, filterable by severity, with acknowledge and clear; `whole`: the
    unfiltered snapshot, whose packets settle each evidence link."""
    st.subheader("Alerts")
    suppressed = snap.totals.get("alerts_suppressed") or {}
    if total := sum(int(n or 0) for n in suppressed.values()):
        each = ", ".join(f"{name}: {int(n):,}" for name, n in sorted(suppressed.items()) if n)
        st.caption(plain(f"{total:,} alerts suppressed ({each}): the alert list was full (ALERTS_MAX) "
                         "and keeps the more severe ones."))
    if not snap.alerts:
        st.caption("No alerts: the detectors (port scans, floods, spikes, new hosts, ARP spoofing) found nothing.")
        return
    severities = st.multiselect("Severity", ["high", "medium", "low"], default=["high", "medium", "low"],
                                key="alert_sev")
    shown = [a for a in snap.alerts if a.severity in severities]
    rows = (whole or snap).packets
    table = viz.alerts_table(shown, LOCAL_TZ)
    if look := lookups(snap):
        table = ec.alerts(look, table)
    st.dataframe(inv.with_links(table, shown, rows), hide_index=True, key="alerts",
                 column_config=inv.link_config())
    ack, clear = st.columns(2)
    # Callbacks run before the next rerun draws the page, so the metrics above see the change.
    ack.button("Acknowledge all shown", key="alerts_ack", on_click=_acknowledge, args=(engine, shown))
    clear.button("Clear alerts", key="alerts_clear", on_click=engine.alerts.clear)


def _acknowledge(engine: CaptureEngine, alerts: list) -> None:
    for a in alerts:
        engine.alerts.acknowledge(a)


def packets_table(rows: np.ndarray, tz: tzinfo | None, vlan: bool = False) -> pd.DataFrame:
    """packets_frame, safe for timestamps no calendar holds (pcapng allows them), with a VLAN column
    when asked and the records carry one."""
    ts = rows["ts"]
    outside = ~((ts >= viz.TS_MIN) & (ts <= viz.TS_MAX))
    if outside.any():
        rows = rows.copy()
        rows["ts"][outside] = 0.0  # formatted below, as the seconds they are
    frame = packets_frame(rows, tz)
    if outside.any():
        frame["time"] = viz.time_texts(ts, tz)
        frame["ts"] = ts
    frame = frame.drop(columns=[c for c in frame.columns if str(c).lower() == "vlan"])
    if vlan and "vlan" in (rows.dtype.names or ()):
        vid = rows["vlan"].astype(np.int32)
        frame.insert(frame.columns.get_loc("protocol"), "VLAN",
                     pd.arrays.IntegerArray(vid, (vid <= 0) | (vid >= 4095)))
    return frame


def recent_packets(snap: Snapshot, engine: CaptureEngine, frozen: bool) -> None:
    """Newest packets first, with a text filter and a CSV download of the whole buffer."""
    st.subheader("Recent packets")
    look = lookups(snap)
    what = ("address, port, protocol, host name, country, AS, service, process or maker" if look
            else "address, port or protocol")
    text = st.text_input(f"Filter by {what}", key="pkt_filter")
    n = config.get("RECENT_ROWS")
    rows = snap.packets if text.strip() else snap.packets[-n:]
    frame = packets_table(rows, LOCAL_TZ, tagged(snap.packets))
    if look:
        frame["row"] = np.arange(len(frame))  # which buffer row each shown line is: its source MAC
    table = recent_matches(look, rows, frame, n, text) if look and text.strip() else viz.recent_table(frame, n, text)
    if look:
        table = ec.recent(look, table.drop(columns=["row"]), ec.shown_macs(rows, table["row"]))
    st.dataframe(table.drop(columns=["ts", "captured", "ICMP type", "malformed"]), hide_index=True,
                 key="recent")
    # A paused or filtered view downloads what it shows; otherwise the buffer as it is at the click.
    filtered = "filter" in snap.totals
    data = (lambda: _csv(snap.packets)) if frozen or filtered else (lambda: _csv(engine.snapshot().packets))
    label = "Download the filtered packets (CSV)" if filtered else "Download the whole buffer (CSV)"
    st.download_button(label, data=data, file_name="packets.csv", mime="text/csv", key="csv", on_click="ignore")


def recent_matches(look: ec.Lookups, rows: np.ndarray, frame: pd.DataFrame, n: int, text: str) -> pd.DataFrame:
    """The newest n rows matching `text` by address, port or protocol (viz.recent_table) or in an enrichment
    column (host name, country, AS, service, process, maker: ec.text_matches, bounded)."""
    by_cells, note = ec.text_matches(look, rows, frame, text)
    keep = np.union1d(viz.recent_table(frame, n, text)["row"].to_numpy(dtype=np.int64), np.flatnonzero(by_cells))
    if note:
        st.caption(plain(note))
    return viz.recent_table(frame.iloc[keep[-n:]], n)


def tagged(rows: np.ndarray) -> bool:
    """Whether any packet of the buffer carries a VLAN tag: only then has the table a VLAN column."""
    return "vlan" in (rows.dtype.names or ()) and bool((rows["vlan"] > 0).any())


def _csv(rows: np.ndarray) -> bytes:
    ts = rows["ts"]
    if ((ts >= viz.TS_MIN) & (ts <= viz.TS_MAX)).all():
        return packets_csv(rows, LOCAL_TZ)
    return packets_table(rows, LOCAL_TZ).to_csv(index=False).encode()


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


def current_view(engine: CaptureEngine) -> tuple[Snapshot, float]:
    """(the snapshot this viewer sees, the wall time it was taken).

    A paused viewer keeps the snapshot of the moment it paused, and only while paused: a snapshot
    holds a copy of the whole buffer (~78 MB with 1,000,000 packets), so no other viewer keeps one.
    """
    state = st.session_state
    if not state.get("paused"):
        state.pop("frozen", None)
        return engine.snapshot(), time.time()
    if "frozen" not in state:
        state["frozen"] = (engine.snapshot(), time.time())
    return state["frozen"]


def page() -> None:
    """Build the whole page once; the auto-refresh reruns it."""
    st.set_page_config(page_title="Network Traffic Monitor", layout="wide")
    if not signed_in():
        return  # nothing about the traffic is shown or sent before the password
    if (flags := parse_flags(sys.argv[1:])).clickhouse:  # the fleet page: ClickHouse only, no engine
        import fleet_page

        return fleet_page.page(flags.clickhouse, flags.cluster, LOCAL_TZ)
    engine = get_engine()
    sidebar(engine)
    snap, taken = current_view(engine)
    end, duration = capture_clock(snap, taken)
    status_banner(snap)
    history_page.store_banner(snap.totals.get("store"))
    span = history_page.range_control(engine, taken)
    history_page.import_action(engine)
    if span is not None:  # a stored range: drawn from the history store, not the buffer
        span = inv.history_span(*span, LOCAL_TZ)
        got = inv.history_filter(engine, *span, LOCAL_TZ)
        history_page.history_view(engine, *span, LOCAL_TZ, got)
        inv.history_filtered(engine, *span, LOCAL_TZ, got)  # the conversations history_filter read: once
    else:
        live_view(engine, snap, end, duration, taken)
    alerts_page.settings(engine)
    if st.session_state.get("auto_refresh", True) and not st.session_state.get("paused"):
        st_autorefresh(interval=int(config.get("REFRESH_S") * 1000), key="tick")


def live_view(engine: CaptureEngine, snap: Snapshot, end: float | None, duration: float, taken: float) -> None:
    """The buffer and counters of the running capture (the Live time range), filtered as the URL says."""
    inv.health_panel(snap, taken)
    whole, snap = snap, inv.live_filter(snap, LOCAL_TZ)
    metrics(snap, end, duration, taken)
    if not snap.totals["packets"] and "filter" not in snap.totals:
        if snap.status.state != "error":
            st.info(EMPTY_HELP)
    else:
        charts(snap, end)
        enrich_page.panel(snap, LOCAL_TZ)
        alerts_panel(snap, engine, whole)
        alerts_page.alert_extras(snap, engine)
        inv.alert_tools(whole, LOCAL_TZ, snap.alerts)  # evidence from the whole buffer, not the filtered one
        inv.explain_panel(whole, LOCAL_TZ)
        inv.tools(engine, whole, LOCAL_TZ)
        recent_packets(snap, engine, frozen=bool(st.session_state.get("paused")))
        history_page.live_downloads(snap)
        # What the live view draws with is imported now: leave it out of the collector's full passes, whose
        # ~40 ms holding the GIL the capture thread would otherwise wait for again and again (capture/heap.py).
        heap.settle_once()


if "streamlit.web.bootstrap" in sys.modules and broker.separate().still_root:  # not in AppTest's process
    st.warning(broker.separate().text)  # as root: the capture helper starts, then this process gives up root
page()
