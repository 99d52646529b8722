"""Every setting of Network Traffic Monitor, in one table.

Each setting has a default and a one-line help. Any of them can be overridden from the
environment as ``NTM_<NAME>`` (for example ``NTM_BUFFER_SIZE=100000``); the dashboard's
command-line flags override the few that have one. README.md documents the same table
(a test keeps the two in step).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "NTM_"


@dataclass(frozen=True)
class Setting:
    """One configurable value: its name, default and what it does."""

    name: str
    default: Any
    help: str
    low: float | None = None  # the least valid value (numbers), inclusive
    high: float | None = None  # the greatest valid value (numbers), inclusive
    choices: tuple[str, ...] | None = None  # the valid values (text)
    check: Callable[[Any], str | None] | None = None  # text: what is wrong with a value, None if nothing
    secret: bool = False  # never echoed in an error message (a webhook URL holds its token)


def bad_networks(spec: str) -> str | None:
    """LOCAL_NETS: the entries that are not networks, or None when every entry is one."""
    bad = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        try:
            ipaddress.ip_network(part, strict=False)
        except ValueError:
            bad.append(part)
    return None if not bad else "not networks: " + ", ".join(repr(b) for b in bad)


def bad_file(path: str) -> str | None:
    """A file setting: empty, or a file this process can read."""
    if path and not os.access(path, os.R_OK):
        return f"{path!r} is not a readable file"
    return None


def bad_url(value: str) -> str | None:
    """NOTIFY_WEBHOOK, DASHBOARD_URL: empty, or an http(s) URL with a host."""
    from urllib.parse import urlsplit

    if not value:
        return None
    parts = urlsplit(str(value))
    return None if parts.scheme in ("http", "https") and parts.hostname else "not an http:// or https:// URL"


def bad_urls(value: str) -> str | None:
    """NOTIFY_WEBHOOK: empty, or http(s) URLs separated by spaces."""
    bad = [u for u in str(value).split() if bad_url(u)]
    return None if not bad else f"{len(bad)} of the URLs are not http:// or https:// URLs"


def bad_syslog(value: str) -> str | None:
    """NOTIFY_SYSLOG: empty, or udp://HOST:PORT or tcp://HOST:PORT, several separated by spaces."""
    from urllib.parse import urlsplit

    for part in str(value).split():
        try:
            parts = urlsplit(part)
            ok = parts.scheme in ("udp", "tcp") and parts.hostname and parts.port
        except ValueError:
            ok = False
        if not ok:
            return f"{part!r} is not udp://HOST:PORT or tcp://HOST:PORT"
    return None


def bad_emails(value: str) -> str | None:
    """NOTIFY_EMAIL_TO: empty, or comma-separated addresses."""
    bad = [a for a in (p.strip() for p in str(value).split(",")) if a and ("@" not in a or " " in a)]
    return None if not bad else "not e-mail addresses: " + ", ".join(repr(b) for b in bad)


def out_of_range(name: str, value: Any) -> str | None:
    """What is wrong with `value` for setting `name` (a run-time change from the page), None if nothing."""
    setting = _BY_NAME[name]
    if setting.check is not None:
        return setting.check(value)
    if setting.choices is not None:
        return None if str(value).upper() in setting.choices else f"{name} must be {_allowed(setting)}"
    if setting.low is not None and not isinstance(value, bool):
        high = setting.high if setting.high is not None else value
        if not isinstance(value, int | float) or not setting.low <= value <= high:
            return f"{name} must be {_allowed(setting)}"
    return None


SETTINGS: tuple[Setting, ...] = (
    Setting("BUFFER_SIZE", 10_000, "Packets kept in the rolling buffer (the recent-packets table and CSV export).",
            low=1, high=50_000_000),
    Setting("BIN_SECONDS", 900, "Seconds of per-second packet/byte history kept for the timeline.",
            low=1, high=86_400 * 7),
    Setting("TOP_TABLE_MAX", 10_000, "Most addresses (or conversations) kept in each top-N table; exact until "
            "it fills, then a Space-Saving summary whose entries carry an error bound.", low=10, high=10_000_000),
    Setting("INTERFACE", "", "Live interface to capture on; empty means the interface of the default route."),
    Setting("BPF_FILTER", "", "Capture filter (BPF syntax, as in tcpdump) applied at start-up."),
    Setting("PCAP", "", "Capture file to load as the source at start-up instead of a live interface."),
    Setting("LOCAL_NETS", "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,127.0.0.0/8,169.254.0.0/16,"
            "fc00::/7,fe80::/10,::1/128",
            "Networks counted as 'local' when reading a capture file (live capture uses the host's own addresses).",
            check=bad_networks),
    Setting("RING_BLOCK_KB", 1024, "Size of one block of the kernel capture ring (TPACKET_V3), in KiB.",
            low=4, high=1 << 20),
    Setting("RING_BLOCKS", 64, "Number of blocks in the kernel capture ring; blocks x size is the kernel buffer.",
            low=1, high=1 << 16),
    Setting("RING_BLOCK_TIMEOUT_MS", 50, "The kernel hands over a partly filled ring block after this many ms.",
            low=1, high=60_000),
    Setting("SNAPLEN", 262_144, "Bytes captured per packet at most (headers are all that is kept).",
            low=64, high=262_144),
    Setting("PROMISC", True, "Capture in promiscuous mode (as tcpdump does without -p), so a mirror port's traffic "
            "is seen; false never does. Not on `any`, where it means nothing."),
    Setting("POLL_MS", 200, "How long the capture thread waits for packets before checking for stop (ms).",
            low=1, high=10_000),
    Setting("NATIVE", True, "Use the compiled helpers (native/*.c, built with the system's C compiler) for the "
            "record walk, the common-case parser, grouping and the detectors' tables; off runs their numpy/Python "
            "twins (same results)."),
    Setting("MALLOC_KEEP_MB", 64, "Free memory (MB) the C allocator may keep for reuse rather than return to the "
            "kernel, so each batch's arrays do not page-fault afresh; 0 leaves the allocator's defaults.",
            low=0, high=1 << 20),
    Setting("BATCH_SIZE", 65536, "Packets of a capture file parsed and added to the buffer together.",
            low=1, high=1 << 22),
    Setting("ADDR_REFRESH_S", 5.0, "How often the capture thread re-reads the host's own addresses (s).",
            low=0.1, high=86_400),
    Setting("FILTER_MAX", 16, "Most filter conditions (URL query keys) a view applies; each costs a pass over "
            "the buffer at every refresh, the others are ignored with a message.", low=1, high=64),
    Setting("RATE_WINDOW_S", 5, "Seconds averaged for the current packets/s and bit/s.", low=1, high=3_600),
    Setting("REFRESH_S", 2.0, "Dashboard auto-refresh interval (s).", low=0.1, high=3_600),
    Setting("RECENT_ROWS", 100, "Rows shown in the recent-packets table.", low=1, high=1_000_000),
    Setting("CAPTURE_DIR", "captures", "Folder whose capture files can be opened by path from the dashboard."),
    Setting("UPLOAD_MAX_MB", 200, "Largest capture file accepted by upload (MB).", low=1, high=1 << 20),
    Setting("UPLOAD_DIR_MAX_MB", 1000, "Most disk space (MB) all uploaded captures may use together; the oldest "
            "uploads not being read are deleted first, and the folder is deleted when the dashboard exits.",
            low=1, high=1 << 24),
    Setting("REPLAY_SPEED", 0.0, "Replay speed for capture files: 0 loads at once, 1 is the original pace, "
            "2 twice as fast.", low=0, high=1e6),
    Setting("EXCLUDE_OWN_TRAFFIC", True, "Leave the dashboard's own web traffic (its server port) out of the capture."),
    Setting("SERVER_PORT", 8501, "The dashboard's web port, used to leave its own traffic out.", low=1, high=65_535),
    Setting("RUN_AS_USER", "", "Started as root, the dashboard and the capture CLI switch to this user (name or "
            "uid) once a small helper holding only CAP_NET_RAW is running; empty means the user who ran sudo "
            "(SUDO_UID), else nobody."),
    Setting("LOG_LEVEL", "INFO", "Logging level (DEBUG, INFO, WARNING, ERROR).",
            choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
    Setting("ACCESS_PASSWORD", "", "When set, the page asks for this password before it shows any data "
            "(for a dashboard exposed beyond 127.0.0.1); empty means no password."),
    Setting("ALERTS_MAX", 500, "Most alerts kept; a repeat of the same detector, source and target updates its row. "
            "When full, the oldest of the lowest severity goes, never one more severe than the newcomer.",
            low=1, high=1_000_000),
    Setting("ALERTS_PER_DETECTOR", 100, "Most alerts kept per detector, so one noisy detector cannot crowd out "
            "the others; what a full book drops or refuses is counted per detector and shown.", low=1, high=1_000_000),
    Setting("DETECTOR_STATE_MAX", 65_536, "Size of each detector table: hash-slot tables get 2 x this many slots "
            "(fixed), exact tables keep at most this many keys (the oldest or smallest go first), so floods from "
            "spoofed sources cannot grow memory.", low=16, high=100_000_000),
    Setting("SCAN_WINDOW_S", 300, "Port scans: distinct failed attempts are counted in epochs of this length, "
            "dropped whole at their end (Zeek scan.zeek: 5 min); two series offset by half an epoch, so a scan "
            "within half of it is never split.", low=1, high=86_400),
    Setting("SCAN_PORTS", 15, "Port scans: failed or unanswered ports on one host from one source that make a "
            "vertical scan (Zeek scan.zeek: 15).", low=1, high=65_536),
    Setting("SCAN_HOSTS", 10, "Port scans: hosts that refuse or ignore one port from one source that make a "
            "horizontal scan (between Snort's 5 in 60 s and Zeek's 25 in 5 min).", low=1, high=1 << 32),
    Setting("SCAN_STEALTH_PORTS", 3, "Port scans: NULL/FIN/Xmas probes (no SYN, no ACK) to this many ports of "
            "one host raise an alert at once; no ordinary client sends them.", low=1, high=65_536),
    Setting("SYN_FLOOD_PPS", 1000, "SYN flood: SYNs per second to one host, with under 10 % answered by SYN-ACK "
            "(well above what a busy client opens; hping3 --flood sends tens of thousands).", low=1, high=1e9),
    Setting("ICMP_FLOOD_PPS", 500, "ICMP flood: echo requests per second to one host (ntopng flags ICMP "
            "floods from 250 flows/s).", low=1, high=1e9),
    Setting("UDP_FLOOD_PPS", 20_000, "UDP flood: UDP packets per second to one host.", low=1, high=1e9),
    Setting("REFLECTION_BPS", 10_000_000, "Reflection/amplification: bit/s of UDP answers from reflector service "
            "ports (DNS, NTP, SNMP, SSDP, CLDAP, memcached, ...) to one host in one second, at least half of them "
            "unasked, that raise an alert: 10 Mbit/s, far above one host's own lookups (kbit/s) and a tenth of a "
            "100 Mbit/s uplink.", low=1, high=1e12),
    Setting("REFLECTION_SOURCES", 10, "Reflection/amplification: distinct reflectors (sources) that must answer "
            "the host in that second: one busy server's answers are not an attack (as SCAN_HOSTS for sweeps).",
            low=1, high=1_000_000),
    Setting("SPIKE_SIGMAS", 4.0, "Traffic spike: a second above the EWMA mean by this many standard deviations "
            "(and 3 times the mean) raises an alert.", low=0.1, high=1_000),
    Setting("SPIKE_MIN_PPS", 100, "Traffic spike: seconds below this many packets never count as a spike.",
            low=0, high=1e9),
    Setting("SPIKE_WARMUP_S", 60, "Traffic spike: seconds of traffic learned before any spike alert.",
            low=0, high=86_400 * 30),
    Setting("NEW_HOST_LEARN_S", 300, "New host: addresses of the LOCAL_NETS first seen after this many seconds "
            "of traffic raise an alert (the ones before are the baseline).", low=0, high=86_400 * 365),
    Setting("SCAN_UNANSWERED_S", 3.0, "Port scans: a SYN or UDP probe with no answer after this many seconds "
            "counts as failed (nmap's initial retransmission timeout is 1 s).", low=0.1, high=3_600),
    Setting("DETECTORS_PROCESS", True, "Run the detectors in a worker process fed through a bounded queue (the "
            "capture never waits for them); off runs them in a thread of the capture's process instead."),
    Setting("DETECTORS_IDLE", True, "A live capture's detector worker process runs at Linux's SCHED_IDLE: where "
            "it shares a core with the capture, it runs when the capture leaves the core. On a host whose every "
            "core is busy the detectors then skip batches (counted and shown); off, the worker keeps a share at "
            "DETECTORS_NICE."),
    Setting("DETECTORS_NICE", 10, "How many steps nicer than the capture the detector worker process runs (0-19): "
            "when the two share a core, the capture goes first and the worker skips batches (counted) instead.",
            low=0, high=19),
    Setting("STAGE_QUEUE_PACKETS", 262_144, "Most packets queued for each consumer stage (the detectors); a live "
            "batch that does not fit is skipped by that stage and counted, never by the counters.",
            low=1, high=1 << 26),
    Setting("HISTORY", True, "The dashboard records its live captures into the history store (STORE) and offers "
            "the time ranges beyond the buffer; the capture command records only with --store."),
    Setting("STORE", "", "History store file (DuckDB); empty means history.duckdb in $XDG_DATA_HOME "
            "(or ~/.local/share)/network-traffic-monitor/."),
    Setting("STORE_FLUSH_S", 5.0, "How often the history rollup writes to the store (s): at most this much "
            "history is lost when the process is killed.", low=0.1, high=3_600),
    Setting("RETENTION_DAYS", 7.0, "Days of live history kept, by capture time; imported capture files are kept "
            "until removed.", low=0.001, high=36_500),
    Setting("STORE_PRUNE_S", 600.0, "How often the store's retention prune runs (s).", low=1, high=86_400 * 7),
    Setting("STORE_SENSOR", "", "Name that tags every history row (the fleet's sensor name); empty means the "
            "host name."),
    Setting("STORE_TOP_MAX", 2000, "Per minute, most sources, destinations and ports kept in each history top "
            "table; beyond it the smallest are left out and the error bound is stored.", low=1, high=1_000_000),
    Setting("STORE_CONV_MAX", 50_000, "Per minute, most conversations kept in history; the rest are counted "
            "as left out.", low=1, high=10_000_000),
    Setting("STORE_PENDING_MAX", 60, "History batches kept in memory while the store cannot be written "
            "(retried in order); beyond it the oldest are dropped and counted.", low=1, high=100_000),
    Setting("ENRICHMENT", True, "Who is on the other end: the page's names/countries/networks/processes panel, "
            "and a live capture's per-process totals; off shows no panel and starts no look-up or process table."),
    Setting("REVERSE_DNS", True, "Look up host names (PTR) for the addresses shown, in a small background pool; "
            "off sends no DNS query at all."),
    Setting("DNS_SERVER", "", "Resolver address for reverse DNS; empty means the system's (/etc/resolv.conf)."),
    Setting("RDNS_TIMEOUT_S", 2.0, "Reverse DNS: time-out of one lookup (s); a lookup that times out is cached "
            "as failed.", low=0.05, high=60),
    Setting("RDNS_TTL_S", 3600.0, "Reverse DNS: how long an answer, or a failure, is kept before it is asked "
            "again (s).", low=1, high=86_400 * 7),
    Setting("RDNS_WORKERS", 2, "Reverse DNS: worker threads doing lookups (each waits at most RDNS_TIMEOUT_S).",
            low=1, high=64),
    Setting("RDNS_QUEUE_MAX", 1000, "Reverse DNS: most lookups waiting for a worker; more are dropped (counted) "
            "and asked again the next time the address is shown.", low=1, high=1_000_000),
    Setting("ENRICH_CACHE_MAX", 10_000, "Most entries in each enrichment cache (names, countries/AS, process "
            "ports); the least recently used go first.", low=16, high=10_000_000),
    Setting("PROCESS_REFRESH_S", 1.0, "How often the socket table (sock_diag, or psutil.net_connections) is "
            "re-read to name the local process of each port (s).", low=0.1, high=3_600),
    Setting("FLEET_FLUSH_S", 2.0, "How often a fleet sensor ships its history rows to ClickHouse (s).",
            low=0.1, high=3_600),
    Setting("FLEET_DELTAS", False, "A fleet sensor's flushes ship only what changed in the open minute (about 5x "
            "fewer rows) instead of the open minute whole; the fleet page then reads a day about 4x slower."),
    Setting("FLEET_SPOOL_MB", 512, "Most disk space (MB) a fleet sensor's spool may use while ClickHouse cannot "
            "take its batches; beyond it the oldest batches are dropped and counted.", low=1, high=1 << 24),
    Setting("FLEET_SPOOL_DIR", "", "A fleet sensor's spool folder; empty means spool-<name> in $XDG_STATE_HOME "
            "(or ~/.local/state)/network-traffic-monitor/."),
    Setting("CLICKHOUSE_DATABASE", "ntm", "ClickHouse database of the fleet's history tables."),
    Setting("CLICKHOUSE_SECURE", False, "Talk TLS to ClickHouse (clickhouse-driver's secure, the server's "
            "tcp_port_secure); user and password come from CLICKHOUSE_USER and CLICKHOUSE_PASSWORD_FILE."),
    Setting("CLICKHOUSE_CA_CERTS", "", "CA file (PEM) that verifies the ClickHouse server's TLS certificate "
            "(with CLICKHOUSE_SECURE); empty means the system's CAs.", check=bad_file),
    Setting("CLICKHOUSE_QUERY_TIMEOUT_S", 10.0, "Longest wait (s) for ClickHouse to answer a read (the fleet page, "
            "`history --clickhouse`) or a connection's handshake; a server that does not answer in time is an error "
            "the page shows, and the store is free again. Writes and migrations keep a longer timeout.",
            low=0.5, high=600),
    Setting("FLEET_METRICS_ADDR", "127.0.0.1", "Address a fleet sensor's Prometheus metrics (--metrics-port) listen "
            "on; 0.0.0.0 (or ::) lets a Prometheus server on another host scrape them (--metrics-addr)."),
    Setting("NOTIFY_WEBHOOK", "", "Webhook URLs (separated by spaces) that each receive one JSON document per "
            "alert (with a Slack-compatible `text` field); empty sends none. Treated as a secret (a URL often "
            "holds a token): never shown or logged whole.", check=bad_urls, secret=True),
    Setting("NOTIFY_WEBHOOK_TOKEN_FILE", "", "File holding a bearer token sent as the webhook's Authorization "
            "header; empty sends none."),
    Setting("NOTIFY_SYSLOG", "", "Syslog receivers for alerts (RFC 5424 with structured data), separated by "
            "spaces: udp://HOST:PORT or tcp://HOST:PORT (octet-counted frames); empty sends none.",
            check=bad_syslog),
    Setting("NOTIFY_EMAIL_TO", "", "E-mail addresses (comma-separated) that receive alerts through SMTP_HOST; "
            "empty sends none.", check=bad_emails),
    Setting("NOTIFY_EMAIL_FROM", "", "Sender address of alert e-mails; empty means network-traffic-monitor@<host "
            "name>."),
    Setting("SMTP_HOST", "", "SMTP server for alert e-mails (STARTTLS is used whenever the server offers it)."),
    Setting("SMTP_PORT", 587, "SMTP server port.", low=1, high=65_535),
    Setting("SMTP_USER", "", "SMTP login user; empty logs in as nobody. The password comes from SMTP_PASSWORD_FILE "
            "or the environment variable SMTP_PASSWORD, never from the page."),
    Setting("SMTP_PASSWORD_FILE", "", "File holding the SMTP password (read at each delivery, never shown)."),
    Setting("SMTP_CA_FILE", "", "CA file that verifies the SMTP server's certificate after STARTTLS; empty means "
            "the system's CAs."),
    Setting("NOTIFY_DIGEST_MIN", 0, "E-mail: 0 sends one message per alert; N collects the alerts of N minutes "
            "into one digest message.", low=0, high=1_440),
    Setting("NOTIFY_REPEAT_S", 300.0, "A repeat of the same detector, source and target within this many seconds "
            "of its last notification updates the alert's count and sends nothing.", low=0, high=86_400 * 7),
    Setting("NOTIFY_RATE_MAX", 10, "Most alert notifications per destination in NOTIFY_RATE_WINDOW_S; beyond it "
            "alerts are counted and one 'N more alerts suppressed' message follows when the window ends.",
            low=1, high=1_000_000),
    Setting("NOTIFY_RATE_WINDOW_S", 60.0, "The window of NOTIFY_RATE_MAX (s).", low=0.1, high=86_400),
    Setting("NOTIFY_RETRIES", 3, "Times a failed delivery is tried again (waits NOTIFY_BACKOFF_S, doubling each "
            "time) before it is given up and counted.", low=0, high=100),
    Setting("NOTIFY_BACKOFF_S", 2.0, "Wait before the first retry of a failed delivery (s); doubled for each "
            "further retry, at most 300 s.", low=0.01, high=3_600),
    Setting("NOTIFY_TIMEOUT_S", 5.0, "Time-out of one delivery attempt (connect and send), s.", low=0.1, high=600),
    Setting("NOTIFY_QUEUE_MAX", 1000, "Most notifications waiting per destination; beyond it the oldest is given "
            "up and counted (delivery never slows the capture).", low=1, high=1_000_000),
    Setting("DASHBOARD_URL", "", "The dashboard's address as colleagues reach it (http://host:8501); when set, "
            "each notification links to the view filtered to the alert's source, target, port and time.",
            check=bad_url),
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


class SettingError(ValueError):
    """A setting's value is not valid; the message names the variable, the value and what is allowed."""


def get(name: str) -> Any:
    """The value of a setting: NTM_<NAME> from the environment, else its default."""
    setting = _BY_NAME[name]
    raw = os.environ.get(ENV_PREFIX + name)
    if raw is None:
        return setting.default
    try:
        return _coerce(raw, setting.default)
    except ValueError:
        kind = type(setting.default).__name__
        raise SettingError(f"{ENV_PREFIX}{name}={raw!r} is not a valid {kind} ({setting.help})") from None


def _number(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def _allowed(setting: Setting) -> str:
    if setting.choices is not None:
        return "one of " + ", ".join(setting.choices)
    hi = "" if setting.high is None else f" and at most {_number(setting.high)}"
    return f"at least {_number(setting.low)}{hi}"


def _shown(setting: Setting) -> str:
    """The variable's value as an error message may show it (a secret one is hidden)."""
    return "<hidden>" if setting.secret else repr(os.environ.get(ENV_PREFIX + setting.name))


def problems() -> list[str]:
    """What is wrong with the current settings, one clear sentence per bad value (empty when all is well)."""
    out = []
    for setting in SETTINGS:
        try:
            value = get(setting.name)
        except SettingError as exc:
            out.append(str(exc))
            continue
        bad = False
        if setting.check is not None:
            why = setting.check(value)
            if why is not None:
                out.append(f"{ENV_PREFIX}{setting.name}={_shown(setting)} is not valid: {why} ({setting.help})")
            continue
        if setting.choices is not None:
            bad = str(value).upper() not in setting.choices
        elif setting.low is not None and not isinstance(value, bool):
            bad = not (setting.low <= value <= (setting.high if setting.high is not None else value))
        if bad:
            out.append(f"{ENV_PREFIX}{setting.name}={os.environ.get(ENV_PREFIX + setting.name)!r} is out of range: "
                       f"it must be {_allowed(setting)} ({setting.help})")
    return out


def validate() -> None:
    """Raise SettingError naming every invalid setting; called at start-up, before any thread starts."""
    bad = problems()
    if bad:
        raise SettingError("invalid settings: " + "; ".join(bad))


def as_dict() -> dict[str, Any]:
    """All settings with their current values."""
    return {s.name: get(s.name) for s in SETTINGS}
