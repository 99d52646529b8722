"""Every setting of Network Traffic Monitor, in one table.

Each setting has a default and a one-line help. Any of them can be overridden from the
environment as ``NTM_<NAME>`` (for example ``NTM_BUFFER_SIZE=100000``); the dashboard's
command-line flags override the few that have one. README.md documents the same table
(a test keeps the two in step).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "NTM_"


@dataclass(frozen=True)
class Setting:
    """One configurable value: its name, default and what it does."""

    name: str
    default: Any
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("BUFFER_SIZE", 10_000, "Packets kept in the rolling buffer (the recent-packets table and CSV export)."),
    Setting("BIN_SECONDS", 900, "Seconds of per-second packet/byte history kept for the timeline."),
    Setting("TOP_TABLE_MAX", 10_000, "Most addresses (or conversations, or ports) kept in each top-N table; "
            "the smallest are pruned beyond it."),
    Setting("INTERFACE", "", "Live interface to capture on; empty means the interface of the default route."),
    Setting("BPF_FILTER", "", "Capture filter (BPF syntax, as in tcpdump) applied at start-up."),
    Setting("PCAP", "", "Capture file to load as the source at start-up instead of a live interface."),
    Setting("LOCAL_NETS", "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,127.0.0.0/8,169.254.0.0/16,"
            "fc00::/7,fe80::/10,::1/128",
            "Networks counted as 'local' when reading a capture file (live capture uses the host's own addresses)."),
    Setting("RING_BLOCK_KB", 1024, "Size of one block of the kernel capture ring (TPACKET_V3), in KiB."),
    Setting("RING_BLOCKS", 64, "Number of blocks in the kernel capture ring; blocks x size is the kernel buffer."),
    Setting("RING_BLOCK_TIMEOUT_MS", 50, "The kernel hands over a partly filled ring block after this many ms."),
    Setting("SNAPLEN", 262_144, "Bytes captured per packet at most (headers are all that is kept)."),
    Setting("POLL_MS", 200, "How long the capture thread waits for packets before checking for stop (ms)."),
    Setting("NATIVE", True, "Use the compiled helpers (native/*.c, built with the system's C compiler) for the "
            "record walk, the common-case parser and grouping; off runs their numpy/Python twins (same results)."),
    Setting("MALLOC_KEEP_MB", 64, "Free memory (MB) the C allocator may keep for reuse rather than return to the "
            "kernel, so each batch's arrays do not page-fault afresh; 0 leaves the allocator's defaults."),
    Setting("BATCH_SIZE", 65536, "Packets of a capture file parsed and added to the buffer together."),
    Setting("ADDR_REFRESH_S", 5.0, "How often the capture thread re-reads the host's own addresses (s)."),
    Setting("RATE_WINDOW_S", 5, "Seconds averaged for the current packets/s and bit/s."),
    Setting("REFRESH_S", 2.0, "Dashboard auto-refresh interval (s)."),
    Setting("RECENT_ROWS", 100, "Rows shown in the recent-packets table."),
    Setting("CAPTURE_DIR", "captures", "Folder whose capture files can be opened by path from the dashboard."),
    Setting("UPLOAD_MAX_MB", 200, "Largest capture file accepted by upload (MB)."),
    Setting("UPLOAD_DIR_MAX_MB", 1000, "Most disk space (MB) all uploaded captures may use together; the oldest "
            "uploads not being read are deleted first, and the folder is deleted when the dashboard exits."),
    Setting("REPLAY_SPEED", 0.0, "Replay speed for capture files: 0 loads at once, 1 is the original pace, "
            "2 twice as fast."),
    Setting("EXCLUDE_OWN_TRAFFIC", True, "Leave the dashboard's own web traffic (its server port) out of the capture."),
    Setting("SERVER_PORT", 8501, "The dashboard's web port, used to leave its own traffic out."),
    Setting("LOG_LEVEL", "INFO", "Logging level (DEBUG, INFO, WARNING, ERROR)."),
    Setting("ACCESS_PASSWORD", "", "When set, the page asks for this password before it shows any data "
            "(for a dashboard exposed beyond 127.0.0.1); empty means no password."),
    Setting("ALERTS_MAX", 500, "Most alerts kept; a repeat of the same detector, source and target updates its row."),
    Setting("DETECTOR_STATE_MAX", 65_536, "Most entries in each detector table (oldest forgotten first), "
            "so floods from spoofed sources cannot grow memory."),
    Setting("SCAN_WINDOW_S", 300, "Port scans: failed attempts are counted over this window (Zeek scan.zeek: 5 min)."),
    Setting("SCAN_PORTS", 15, "Port scans: failed or unanswered ports on one host from one source that make a "
            "vertical scan (Zeek scan.zeek: 15)."),
    Setting("SCAN_HOSTS", 10, "Port scans: hosts that refuse or ignore one port from one source that make a "
            "horizontal scan (between Snort's 5 in 60 s and Zeek's 25 in 5 min)."),
    Setting("SCAN_STEALTH_PORTS", 3, "Port scans: NULL/FIN/Xmas probes (no SYN, no ACK) to this many ports of "
            "one host raise an alert at once; no ordinary client sends them."),
    Setting("SYN_FLOOD_PPS", 1000, "SYN flood: SYNs per second to one host, with under 10 % answered by SYN-ACK "
            "(well above what a busy client opens; hping3 --flood sends tens of thousands)."),
    Setting("ICMP_FLOOD_PPS", 500, "ICMP flood: echo requests per second to one host (ntopng flags ICMP "
            "floods from 250 flows/s)."),
    Setting("UDP_FLOOD_PPS", 20_000, "UDP flood: UDP packets per second to one host."),
    Setting("SPIKE_SIGMAS", 4.0, "Traffic spike: a second above the EWMA mean by this many standard deviations "
            "(and 3 times the mean) raises an alert."),
    Setting("SPIKE_MIN_PPS", 100, "Traffic spike: seconds below this many packets never count as a spike."),
    Setting("SPIKE_WARMUP_S", 60, "Traffic spike: seconds of traffic learned before any spike alert."),
    Setting("NEW_HOST_LEARN_S", 300, "New host: addresses of the LOCAL_NETS first seen after this many seconds "
            "of traffic raise an alert (the ones before are the baseline)."),
    Setting("SCAN_UNANSWERED_S", 3.0, "Port scans: a SYN or UDP probe with no answer after this many seconds "
            "counts as failed (nmap's initial retransmission timeout is 1 s)."),
    Setting("STORE", "", "History store file (DuckDB); empty means history.duckdb in $XDG_DATA_HOME "
            "(or ~/.local/share)/network-traffic-monitor/."),
    Setting("STORE_FLUSH_S", 5.0, "How often the history rollup writes to the store (s): at most this much "
            "history is lost when the process is killed."),
    Setting("RETENTION_DAYS", 7.0, "Days of live history kept, by capture time; imported capture files are kept "
            "until removed."),
    Setting("STORE_PRUNE_S", 600.0, "How often the store's retention prune runs (s)."),
    Setting("STORE_SENSOR", "", "Name that tags every history row (the fleet's sensor name); empty means the "
            "host name."),
    Setting("STORE_TOP_MAX", 2000, "Per minute, most sources, destinations and ports kept in each history top "
            "table; beyond it the smallest are left out and the error bound is stored."),
    Setting("STORE_CONV_MAX", 50_000, "Per minute, most conversations kept in history; the rest are counted "
            "as left out."),
    Setting("STORE_PENDING_MAX", 60, "History batches kept in memory while the store cannot be written "
            "(retried in order); beyond it the oldest are dropped and counted."),
    Setting("FLEET_FLUSH_S", 2.0, "How often a fleet sensor ships its history rows to ClickHouse (s)."),
    Setting("FLEET_SPOOL_MB", 512, "Most disk space (MB) a fleet sensor's spool may use while ClickHouse cannot "
            "take its batches; beyond it the oldest batches are dropped and counted."),
    Setting("FLEET_SPOOL_DIR", "", "A fleet sensor's spool folder; empty means spool-<name> in $XDG_STATE_HOME "
            "(or ~/.local/state)/network-traffic-monitor/."),
    Setting("FLEET_QUEUE_BATCHES", 512, "Parsed batches waiting for a fleet sensor's rollup; beyond it batches are "
            "skipped and counted (the capture never waits)."),
    Setting("CLICKHOUSE_DATABASE", "ntm", "ClickHouse database of the fleet's history tables."),
    Setting("CLICKHOUSE_SECURE", False, "Talk TLS to ClickHouse (clickhouse-driver's secure, the server's "
            "tcp_port_secure); user and password come from CLICKHOUSE_USER and CLICKHOUSE_PASSWORD_FILE."),
    Setting("CLICKHOUSE_CA_CERTS", "", "CA file that verifies the ClickHouse server's TLS certificate; empty "
            "means the system's CAs."),
)

_BY_NAME = {s.name: s for s in SETTINGS}


def _coerce(raw: str, default: Any) -> Any:
    """Turn an environment string into the type of the default."""
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


def get(name: str) -> Any:
    """The value of a setting: NTM_<NAME> from the environment, else its default."""
    setting = _BY_NAME[name]
    raw = os.environ.get(ENV_PREFIX + name)
    if raw is None:
        return setting.default
    return _coerce(raw, setting.default)


def as_dict() -> dict[str, Any]:
    """All settings with their current values."""
    return {s.name: get(s.name) for s in SETTINGS}
