"""Range questions answered from the store alone, in the shapes the engine's summary and snapshot use."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from analysis.headers import CLASSES, DIRECTIONS
from store.base import Store, TimeRange

MAX_POINTS = 1500
BIN_WIDTHS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


def parse_time(text: str | float | int | None, default: int) -> int:
    """Epoch seconds (a number) or ISO 8601 (UTC when it names no zone) -> the epoch second it names."""
    if text is None or text == "":
        return default
    if isinstance(text, int | float):
        return math.floor(text)
    try:
        return math.floor(float(text))
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"not a time: {text!r} (give epoch seconds or ISO 8601, e.g. 2024-05-01T12:00:00Z)") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return math.floor(dt.timestamp())


def time_range(since: Any = None, until: Any = None, sensor: str | None = None) -> TimeRange:
    """A TimeRange from CLI/page bounds (both inclusive of the seconds they name)."""
    r = TimeRange(parse_time(since, 0), parse_time(until, 2 ** 62), sensor or None)
    if r.until < r.since:
        raise ValueError(f"--until ({until}) is before --since ({since})")
    return r


def history_summary(store: Store, since: Any = None, until: Any = None, sensor: str | None = None) -> dict[str, Any]:
    """The range as the engine's `summary` JSON (same keys and meanings), plus how exact its top tables are.

    Totals, first/last times come from the per-second rows of the seconds named; top tables from the
    per-minute rows of the minutes overlapping the range (`tops_since`..`tops_until`), and
    `approximate` lists per table the keys left out by the per-minute caps with the error bound.
    """
    r = time_range(since, until, sensor)
    t = store.totals(r)
    first, last = t["min_ts"], t["max_ts"]
    edge = edge_traffic(store, r)
    return {
        "packets": t["packets"], "bytes_wire": t["bytes"], "bytes_captured": t["bytes_captured"],
        "transport_counts": {c: t[f"pk_{c}"] for c in CLASSES},
        "transport_bytes": {c: t[f"by_{c}"] for c in CLASSES},
        "direction_counts": {d: t[f"pk_{d}"] for d in DIRECTIONS},
        "direction_bytes": {d: t[f"by_{d}"] for d in DIRECTIONS},
        "top10_src_by_packets": _addrs(store.top_addrs(r, "src", "packets"), edge, "packets"),
        "top10_src_by_bytes": _addrs(store.top_addrs(r, "src", "bytes"), edge, "bytes"),
        "top10_dst_by_packets": _addrs(store.top_addrs(r, "dst", "packets"), edge, "packets"),
        "top10_tcp_dst_ports": _ports(store.top_ports(r, "tcp")),
        "top10_udp_dst_ports": _ports(store.top_ports(r, "udp")),
        "first_ts": first, "last_ts": last, "min_ts": first, "max_ts": last,
        "duration_s": (last - first) if t["packets"] else 0.0,
        "malformed": t["malformed"],
        "alerts": alerts(store, r),
        "since": r.since, "until": r.until if r.until < 2 ** 62 else None, "sensor": r.sensor,
        "tops_since": r.first_minute, "tops_until": r.until if r.until < 2 ** 62 else None,
        "approximate": {**approximation(store, r), **({"edges": edge} if edge["packets"] else {})},
        "error": None,
    }


def edge_traffic(store: Store, r: TimeRange) -> dict[str, int]:
    """Traffic of the minutes the range cuts, outside the range: what its per-minute top tables may hold
    beyond the seconds named (packets, bytes, and packets per class), exact from the per-second rows."""
    out = {"packets": 0, "bytes": 0, **{c: 0 for c in CLASSES}}
    last_minute_end = r.until - r.until % 60 + 59
    edges = [(r.first_minute, r.since - 1)]
    if r.until < 2 ** 62:
        edges.append((r.until + 1, last_minute_end))
    for lo, hi in edges:
        if lo > hi:
            continue
        t = store.totals(TimeRange(lo, hi, r.sensor))
        out["packets"] += int(t["packets"])
        out["bytes"] += int(t["bytes"])
        for c in CLASSES:
            out[c] += int(t[f"pk_{c}"])
    return out


def _addrs(df: pd.DataFrame, edge: dict[str, int] | None = None, by: str = "packets") -> list[dict[str, Any]]:
    """Top entries as the summary gives them; where the range cuts a minute, each carries the most its
    counts may exceed the range's (the edge minutes' traffic outside it), as the engine marks approximate ones."""
    out = []
    for a, p, b in zip(df["addr"], df["packets"], df["bytes"]):
        entry: dict[str, Any] = {"addr": str(a), "packets": int(p), "bytes": int(b)}
        if edge and edge["packets"]:
            entry["packets_error"] = min(entry["packets"], edge["packets"])
            entry["bytes_error"] = min(entry["bytes"], edge["bytes"])
            entry["error"] = entry[f"{by}_error"]
            entry["approx"] = True
        out.append(entry)
    return out


def _ports(df: pd.DataFrame) -> list[list[int]]:
    return [[int(p), int(c)] for p, c in zip(df["port"], df["packets"])]


def alerts(store: Store, r: TimeRange) -> list[dict[str, Any]]:
    """Alerts active in the range as Alert.as_dict() gives them, newest first."""
    df = store.alerts(r)
    keys = ("detector", "severity", "source", "target", "first_ts", "last_ts", "count", "evidence")
    out = []
    for row in df.itertuples(index=False):
        d = {k: getattr(row, k) for k in keys}
        d["first_ts"], d["last_ts"], d["count"] = float(d["first_ts"]), float(d["last_ts"]), int(d["count"])
        out.append(d)
    return out


def approximation(store: Store, r: TimeRange) -> dict[str, dict[str, int]]:
    """Per capped table (src, dst, tcp, udp, conv): keys left out and the most a top-N figure may be short."""
    df = store.caps(r)
    return {str(row.kind): {"minutes_capped": int(row.minutes), "keys_left_out": int(row.dropped_keys),
                            "packets_left_out": int(row.dropped_packets), "bytes_left_out": int(row.dropped_bytes),
                            "error_bound_packets": int(row.bound_packets), "error_bound_bytes": int(row.bound_bytes)}
            for row in df.itertuples(index=False)}


def bin_width(since: int, until: int, max_points: int = MAX_POINTS) -> int:
    """The smallest usual bin width (s) that draws since..until in at most max_points bins."""
    span = until - since + 1
    for w in BIN_WIDTHS:
        if math.ceil(span / w) <= max_points:
            return w
    return math.ceil(span / max_points / 86400) * 86400


def series(store: Store, since: Any = None, until: Any = None, sensor: str | None = None,
           cols: tuple[str, ...] = ("packets", "bytes"), max_points: int = MAX_POINTS) -> tuple[pd.DataFrame, int]:
    """(per-bin sums with bin start `t`, bin width in s): at most max_points bins over the range.

    Open-ended bounds take the stored traffic's own first and last second."""
    r = time_range(since, until, sensor)
    ext = store.extent(r)
    if ext is None:
        return pd.DataFrame(columns=["t", *cols]), 1
    lo, hi = max(r.since, ext[0]), min(r.until, ext[1])
    width = bin_width(lo, hi, max_points)
    return store.series(r, width, cols), width


def conversations(store: Store, since: Any = None, until: Any = None, sensor: str | None = None, n: int = 20,
                  by: str = "bytes") -> list[dict[str, Any]]:
    """Top conversations of the range, shaped as Snapshot.top_conversations (plus the VLAN)."""
    from packet_processor import proto_name  # the engine's names; imported late (the engine may import us)

    df = store.top_conversations(time_range(since, until, sensor), by, n)
    out = [{"a": row.a, "a_port": None if pd.isna(row.a_port) else int(row.a_port), "b": row.b,
            "b_port": None if pd.isna(row.b_port) else int(row.b_port), "proto": proto_name(int(row.proto)),
            "vlan": int(row.vlan), "packets": int(row.packets), "bytes": int(row.bytes),
            "first_ts": float(row.first_ts), "last_ts": float(row.last_ts)} for row in df.itertuples(index=False)]
    if f"{by}_error" in df.columns:  # a store's approximate answer: each figure the most it may be
        for entry, p, b in zip(out, df["packets_error"], df["bytes_error"]):
            entry.update(packets_error=int(p), bytes_error=int(b), approx=True)
            entry["error"] = entry[f"{by}_error"]
    return out
