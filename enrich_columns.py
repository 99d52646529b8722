"""Enrichment columns for the live page's own tables (issue 14): host name, country, AS, service, process, maker.

Only the rows a table shows are enriched, and each distinct address once per refresh (`Lookups` memoises),
so the work per refresh is bounded by the rows shown, never by the buffer. Every look-up reads a cache:
a reverse-DNS miss is only queued to the enricher's bounded pool, its cell says PENDING and fills in at a
later refresh. The page calls none of this with ENRICHMENT off, so no enricher exists and nothing is sent.
Names from PTR records are shown as cell text (st.dataframe renders neither Markdown nor HTML) and escaped
for Plotly hovers (visualizations.chart_text).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

PENDING = "…"  # the reverse-DNS lookup is queued: a later refresh shows the name
ADDR_COLUMNS = ("host", "country", "AS")


def is_address(text: str) -> bool:
    """Whether `text` is an IPv4/IPv6 address (alert sources and targets can be other text)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def as_text(asn: int | None, org: str | None) -> str:
    """'AS15169 Google LLC', the organisation alone, or ''."""
    if asn is not None:
        return f"AS{asn} {org or ''}".strip()
    return org or ""


class Lookups:
    """One refresh's look-ups: each address, port and MAC answered once from the enricher's caches."""

    def __init__(self, en) -> None:
        self.en = en
        self._addr: dict[str, tuple[str, str, str]] = {}
        self._maker: dict[bytes, str] = {}

    def who(self, addr: str) -> tuple[str, str, str]:
        """(host name, country or range label, AS) of an address; ('', '', '') for text that is no address."""
        hit = self._addr.get(addr)
        if hit is None:
            hit = self._addr[addr] = self._who(addr) if addr and is_address(addr) else ("", "", "")
        return hit

    def _who(self, addr: str) -> tuple[str, str, str]:
        g = self.en.geo.lookup(addr)
        return self.en.name_text(addr), g.country or "", as_text(g.asn, g.as_org)

    def service(self, port, proto: str) -> str:
        """'443/https' for a TCP/UDP port with a registered name, else ''."""
        if port is None or proto not in ("tcp", "udp"):
            return ""
        name = self.en.services.name(int(port), proto)
        return f"{int(port)}/{name}" if name else ""

    def process(self, addr: str, port, proto: str) -> str:
        """The owning local process of one end ('' for a remote end or no port, 'unknown' when no owner is seen)."""
        if port is None or proto not in ("tcp", "udp") or not addr or not self.en.processes.is_local(addr):
            return ""
        return self.en.processes.label(proto, int(port))

    def maker(self, mac: bytes) -> str:
        """The OUI maker of a MAC address ('' when unknown or all zeros: no link-layer source)."""
        hit = self._maker.get(mac)
        if hit is None:
            hit = self._maker[mac] = "" if not any(mac) else (self.en.oui.maker(mac) or "")
        return hit

    def ends(self, addrs, prefix: str) -> dict[str, list[str]]:
        """'<prefix> host', '<prefix> country' and '<prefix> AS' columns for these addresses."""
        cells = [self.who(str(a)) for a in addrs]
        return {f"{prefix} {name}": [c[i] for c in cells] for i, name in enumerate(ADDR_COLUMNS)}


def _joined(frame: pd.DataFrame, columns: dict[str, list]) -> pd.DataFrame:
    """`frame` with `columns` added at the right in one step (pandas' per-column insert rebuilds the column
    index each time: ~0.2 ms a column, most of this module's cost when done one by one)."""
    if not columns:
        return frame
    return pd.concat([frame, pd.DataFrame(columns, index=frame.index, dtype=object)], axis=1)


def _port(value) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


def talkers_table(look: Lookups, src: list[dict[str, Any]], dst: list[dict[str, Any]], by: str) -> pd.DataFrame:
    """The top sources and destinations shown in the bars, with host name, country and AS per address."""
    from visualizations import count_text

    rows = []
    for end, entries in (("source", src), ("destination", dst)):
        for r in entries:
            addr = str(r.get("addr", r.get("address", "")))
            host, country, asn = look.who(addr)
            rows.append({"top": end, "address": addr, "host": host, "country": country, "AS": asn,
                         by: count_text(int(r[by]), int(r.get("error", 0) or 0))})
    return pd.DataFrame(rows, columns=["top", "address", "host", "country", "AS", by])


def hover_notes(look: Lookups, rows: list[dict[str, Any]]) -> list[str]:
    """Per top-bar row: 'host · country · AS' (plain text; the chart escapes it)."""
    out = []
    for r in rows:
        parts = [p for p in look.who(str(r.get("addr", r.get("address", "")))) if p]
        out.append(" · ".join(parts))
    return out


def conversations(look: Lookups, frame: pd.DataFrame, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The conversations table (one row per entry of `rows`) with each end's host, country, AS, service and process."""
    add: dict[str, list[str]] = {}
    for end in ("a", "b"):
        cells = [look.who(str(r[end])) for r in rows]
        key = end.upper()
        for i, name in enumerate(ADDR_COLUMNS):
            add[f"{key} {name}"] = [c[i] for c in cells]
        add[f"{key} service"] = [look.service(r[f"{end}_port"], str(r["proto"]).lower()) for r in rows]
        add[f"{key} process"] = [look.process(str(r[end]), r[f"{end}_port"], str(r["proto"]).lower()) for r in rows]
    return _joined(frame, add)


def recent(look: Lookups, table: pd.DataFrame, macs: np.ndarray) -> pd.DataFrame:
    """The recent-packets table with both ends' host, country and AS, the service, each end's local process
    and the source MAC's maker; `macs[i]` is row i's source MAC (hw_src)."""
    proto = [str(p).lower() for p in table["protocol"]]
    sport = [_port(p) for p in table["src port"]]
    dport = [_port(p) for p in table["dst port"]]
    # The named side of the pair: a reply from 443 to an ephemeral port is still https.
    service = [look.service(d, t) or look.service(s, t) for s, d, t in zip(sport, dport, proto)]
    return _joined(table, {
        **look.ends(table["source"], "src"), **look.ends(table["destination"], "dst"),
        "service": service,
        "src process": [look.process(a, p, t) for a, p, t in zip(table["source"], sport, proto)],
        "dst process": [look.process(a, p, t) for a, p, t in zip(table["destination"], dport, proto)],
        "src maker": [look.maker(bytes(m)) for m in macs]})


def alerts(look: Lookups, frame: pd.DataFrame) -> pd.DataFrame:
    """The alerts table with host, country and AS of each alert's source and target."""
    return _joined(frame, {**look.ends(frame["source"], "source"), **look.ends(frame["target"], "target")})


def shown_macs(rows: np.ndarray, index: Sequence[int]) -> np.ndarray:
    """The source MACs of the buffer rows a table shows (`index` into `rows`)."""
    if "hw_src" not in (rows.dtype.names or ()):
        return np.zeros((len(index), 6), dtype=np.uint8)
    return rows["hw_src"][np.asarray(index, dtype=np.int64)]
