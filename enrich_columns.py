"""Enrichment columns for the live page's own tables (issue 14): host name, country, AS, service, process, maker.

Only the rows a table shows are enriched, and each distinct address, port, MAC and (address, port) once: the
answers are memoised per enricher across reruns (`Memo`, bounded), so a rerun over the same rows costs
dictionary look-ups, and the work per refresh is bounded by the rows shown, never by the buffer. Every
look-up reads a cache: a reverse-DNS miss is only queued to the enricher's bounded pool, its cell says
PENDING and fills in at a later refresh. The page calls none of this with ENRICHMENT off, so no enricher
exists and nothing is sent.
Names from PTR records are shown as cell text (st.dataframe renders neither Markdown nor HTML) and escaped
for Plotly hovers (visualizations.chart_text).
"""

from __future__ import annotations

import ipaddress
import re
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

PENDING = "…"  # the reverse-DNS lookup is queued: a later refresh shows the name
ADDR_COLUMNS = ("host", "country", "AS")
# Packets read from a file: the socket table says who holds a port *now* on this machine, which says nothing
# about who sent a recorded packet (another machine, or a process long gone), so no process is named.
NOT_LIVE = "not live"
MEMO_MAX = 20_000  # answers kept per kind across reruns (addresses, ports, MACs, process ends)
NAME_KEEP_S = 30.0  # an address's answer is asked again after this (its PTR name may have arrived or expired)


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


def is_live(snap) -> bool:
    """Whether a snapshot's packets are this machine's live traffic (Source.describe: 'interface …'), not a
    file's: only then can the socket table name their processes."""
    return not str(getattr(snap.status, "source", "")).startswith("file ")


class Memo:
    """Bounded maps (least recently stored goes first) that outlive one refresh: one per enricher."""

    def __init__(self, maxsize: int = MEMO_MAX) -> None:
        self.maxsize = maxsize
        self.maps: dict[str, OrderedDict] = {k: OrderedDict() for k in ("who", "service", "process", "maker")}

    def get(self, kind: str, key):
        """The stored answer, or None."""
        return self.maps[kind].get(key)

    def put(self, kind: str, key, value) -> None:
        """Store an answer; the oldest goes when the map is full."""
        m = self.maps[kind]
        m[key] = value
        if len(m) > self.maxsize:
            m.popitem(last=False)


_MEMOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # enricher -> Memo (gone with the enricher)


def memo_of(en) -> Memo:
    """The enricher's Memo (created on first use)."""
    try:
        memo = _MEMOS.get(en)
        if memo is None:
            memo = _MEMOS[en] = Memo()
        return memo
    except TypeError:  # an object that takes no weak reference: a memo for this refresh only
        return Memo()


def server_end(sport: int | None, dport: int | None, flags: str = "") -> str:
    """Which end of a TCP/UDP packet is the server: 'dst' or 'src' ('' without ports).

    The rule: a SYN goes to the server (dst), a SYN-ACK comes from it (src); otherwise the lower port is the
    server's (well-known and registered ports sit below the ephemeral range clients use: 32768-60999 on
    Linux, 49152-65535 elsewhere), equal ports the destination. So a reply from 443 is https, and a reply
    *to* a client whose ephemeral port happens to be registered (e.g. 33434/traceroute) is not named by it."""
    if sport is None or dport is None:
        return "dst" if dport is not None else ("src" if sport is not None else "")
    words = flags.upper().split()  # the table's text: 'SYN', 'SYN ACK', 'PSH ACK', …
    if "SYN" in words:
        return "src" if "ACK" in words else "dst"
    return "src" if sport < dport else "dst"


class Lookups:
    """One refresh's look-ups: each address, port and MAC answered from the enricher's caches, memoised
    across reruns (`Memo`); `live` False (a file) names no process."""

    def __init__(self, en, live: bool = True) -> None:
        self.en = en
        self.live = live
        self.memo = memo_of(en)
        self._now = time.monotonic()
        # The geo and AS databases load in the background: answers given before they are in are not kept.
        # A missing AS database (asn.error) is final too: geo caches its answers then, and so does the memo.
        self._geo_final = bool(en.geo.wait_loaded(0) and (en.geo.asn.ready or en.geo.asn.error))

    def who(self, addr: str) -> tuple[str, str, str]:
        """(host name, country or range label, AS) of an address; ('', '', '') for text that is no address."""
        hit = self.memo.get("who", addr)
        if hit is not None and hit[0] > self._now:
            return hit[1]
        cells = self._who(addr) if addr and is_address(addr) else ("", "", "")
        # A queued name, or a country/AS before the databases are in, is asked again at the next refresh;
        # a complete answer is kept NAME_KEEP_S.
        final = cells[0] != PENDING and self._geo_final
        self.memo.put("who", addr, (self._now + (NAME_KEEP_S if final else 0.0), cells))
        return cells

    def _who(self, addr: str) -> tuple[str, str, str]:
        g = self.en.geo.lookup(addr)
        return self.en.name_text(addr), g.country or "", as_text(g.asn, g.as_org)

    def service(self, port, proto: str) -> str:
        """'443/https' for a TCP/UDP port with a registered name, else ''."""
        if port is None or proto not in ("tcp", "udp"):
            return ""
        key = (int(port), proto)
        hit = self.memo.get("service", key)
        if hit is None:
            name = self.en.services.name(key[0], proto)
            hit = f"{key[0]}/{name}" if name else ""
            self.memo.put("service", key, hit)
        return hit

    def server_service(self, sport, dport, proto: str, flags: str = "") -> str:
        """The service of the packet's server end only (server_end's rule), else ''."""
        end = server_end(sport, dport, flags)
        return self.service(dport if end == "dst" else sport, proto) if end else ""

    def process(self, addr: str, port, proto: str) -> str:
        """The owning local process of one end ('' for a remote end or no port, 'unknown' when no owner is
        seen, NOT_LIVE for a file's packets)."""
        if port is None or proto not in ("tcp", "udp") or not addr:
            return ""
        table = self.en.processes
        key = (addr, int(port), proto)
        hit = self.memo.get("process", key)
        if hit is not None and hit[0] == table.refreshes:  # valid until the socket table is read again
            label = hit[1]
        else:
            label = table.label(proto, int(port)) if table.is_local(addr) else ""
            self.memo.put("process", key, (table.refreshes, label))
        return NOT_LIVE if label and not self.live else label

    def maker(self, mac: bytes) -> str:
        """The OUI maker of a MAC address ('' when unknown or all zeros: no link-layer source)."""
        mac = bytes(mac).ljust(6, b"\0")  # numpy's S6 drops trailing zero bytes: 02:…:00 must stay 6 bytes
        hit = self.memo.get("maker", mac)
        if hit is None:
            hit = "" if not any(mac) else (self.en.oui.maker(mac) or "")
            self.memo.put("maker", mac, hit)
        return hit

    def peek(self, addr: str) -> tuple[str, str, str]:
        """who() without queuing a reverse-DNS lookup (a name only if already known): the text filter's use.

        A memoised answer is used only while it is final and unexpired; otherwise (a pending name, a country
        from before the databases loaded) the resolver's and geo's caches are asked again (no query is sent),
        so a name that arrived since, even for an address the filter hides, is matched."""
        hit = self.memo.get("who", addr)
        if hit is not None and hit[0] > self._now:
            return hit[1]
        if not addr or not is_address(addr):
            return ("", "", "")
        g = self.en.geo.lookup(addr)
        return self.en.names.cached(addr) or "", g.country or "", as_text(g.asn, g.as_org)

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
        # Only the server end names a service (server_end: the lower port; a conversation has no flags).
        server = "src" if end == "a" else "dst"
        add[f"{key} service"] = [look.service(r[f"{end}_port"], str(r["proto"]).lower())
                                 if server_end(_port(r["a_port"]), _port(r["b_port"])) == server else ""
                                 for r in rows]
        add[f"{key} process"] = [look.process(str(r[end]), r[f"{end}_port"], str(r["proto"]).lower()) for r in rows]
    return _joined(frame, add)


def recent(look: Lookups, table: pd.DataFrame, macs: np.ndarray) -> pd.DataFrame:
    """The recent-packets table with both ends' host, country and AS, the service, each end's local process
    and the source MAC's maker; `macs[i]` is row i's source MAC (hw_src)."""
    proto = [str(p).lower() for p in table["protocol"]]
    sport = [_port(p) for p in table["src port"]]
    dport = [_port(p) for p in table["dst port"]]
    flags = table["TCP flags"] if "TCP flags" in table.columns else [""] * len(table)
    # The server end's service only (server_end): a reply from 443 is https; a reply to a client's
    # ephemeral port is not named after whatever that port is registered for.
    service = [look.server_service(s, d, t, str(f or "")) for s, d, t, f in zip(sport, dport, proto, flags)]
    return _joined(table, {
        **look.ends(table["source"], "src"), **look.ends(table["destination"], "dst"),
        "service": service,
        "src process": [look.process(a, p, t) for a, p, t in zip(table["source"], sport, proto)],
        "dst process": [look.process(a, p, t) for a, p, t in zip(table["destination"], dport, proto)],
        "src maker": [look.maker(bytes(m)) for m in macs]})


# A MAC standing alone: not part of a longer run of hex and colons (IPv6 text such as
# 2001:db8:aa:bb:cc:dd:ee:ff holds six two-digit groups that are no MAC).
MAC_TEXT = re.compile(r"(?<![0-9a-f:])[0-9a-f]{2}(?::[0-9a-f]{2}){5}(?![0-9a-f:])", re.IGNORECASE)
MAKERS_MAX = 4  # MACs named per alert: an ARP spoof's evidence holds two, the claimed and the earlier


def makers_text(look: Lookups, *texts: str) -> str:
    """'aa:bb:cc:dd:ee:ff Maker; …' for the distinct MAC addresses in an alert's texts (source, target,
    evidence), each with its OUI maker or 'unknown maker'; '' when they name no MAC."""
    seen: list[str] = []
    for text in texts:
        for mac in MAC_TEXT.findall(str(text or "")):
            if mac.lower() not in seen and len(seen) < MAKERS_MAX:
                seen.append(mac.lower())
    return "; ".join(f"{m} {look.maker(bytes.fromhex(m.replace(':', ''))) or 'unknown maker'}" for m in seen)


def alerts(look: Lookups, frame: pd.DataFrame) -> pd.DataFrame:
    """The alerts table with host, country and AS of each alert's source and target, and the device maker of
    each MAC address its source, target or evidence names (ARP spoofing's are MACs). Cells are text: the
    table renders neither Markdown nor HTML, so a maker's name from the manuf file shows as itself."""
    makers = [makers_text(look, s, t, e) for s, t, e in zip(frame["source"], frame["target"], frame["evidence"])]
    return _joined(frame, {**look.ends(frame["source"], "source"), **look.ends(frame["target"], "target"),
                           "device makers": makers})


def shown_macs(rows: np.ndarray, index: Sequence[int]) -> np.ndarray:
    """The source MACs of the buffer rows a table shows (`index` into `rows`)."""
    if "hw_src" not in (rows.dtype.names or ()):
        return np.zeros((len(index), 6), dtype=np.uint8)
    return rows["hw_src"][np.asarray(index, dtype=np.int64)]


FILTER_KEYS_MAX = 5_000  # distinct addresses and MACs the recent-packets filter looks at (newest first)
TCP_CLS, UDP_CLS = 0, 1  # analysis.headers' classes of the rows' `cls`
SYN, ACK = 0x02, 0x10


def server_ports(rows: np.ndarray) -> np.ndarray:
    """Per row, the server end's port by server_end's rule (vectorised; -1 without ports)."""
    sport, dport = rows["sport"].astype(np.int64), rows["dport"].astype(np.int64)
    flags = rows["tcp_flags"].astype(np.int64)
    syn = (rows["cls"] == TCP_CLS) & ((flags & SYN) != 0)
    from_src = np.where(syn, (flags & ACK) != 0, sport < dport)
    return np.where(from_src, sport, dport)


def _ports_named(look: Lookups, needle: str, proto: str) -> list[int]:
    # Every registered port whose '443/https' text holds the needle (a few thousand entries: bounded).
    table = look.en.services.table
    return [port for (port, p), name in table.items() if p == proto and needle in f"{port}/{name}".lower()]


def text_matches(look: Lookups, rows: np.ndarray, frame: pd.DataFrame, text: str) -> tuple[np.ndarray, str]:
    """Which of `rows` (frame: their packets_frame) show `text` in an enrichment cell: host name, country, AS,
    service, process or maker (case-insensitive), and a note when the bound cut what was looked at.

    Bounded: each distinct address (the FILTER_KEYS_MAX newest) and MAC is looked up once from the caches
    (no reverse-DNS query is queued by filtering), ports and processes by their small tables; rows are then
    selected by hash look-ups (pandas' isin on the address texts, never a sort of the object arrays), so the
    cost grows linearly with the rows."""
    needle = text.strip().lower()
    mask = np.zeros(len(rows), dtype=bool)
    if not needle or not len(rows):
        return mask, ""
    src, dst = frame["source"].to_numpy(dtype=object), frame["destination"].to_numpy(dtype=object)
    distinct = pd.unique(np.column_stack((src[::-1], dst[::-1])).ravel())  # newest rows first, both ends
    addrs = distinct[:FILTER_KEYS_MAX]
    hit = [a for a in addrs if any(needle in c.lower() for c in look.peek(str(a)))]
    if hit:
        mask |= _among(src, hit) | _among(dst, hit)
    server = server_ports(rows)
    for cls, proto in ((TCP_CLS, "tcp"), (UDP_CLS, "udp")):
        if named := _ports_named(look, needle, proto):
            mask |= (rows["cls"] == cls) & np.isin(server, named)
    mask |= _process_matches(look, rows, src, dst, addrs, needle)
    macs, cut = _maker_matches(look, rows, needle)
    mask |= macs
    note = ""
    if len(distinct) > FILTER_KEYS_MAX or cut:
        note = (f"Names, countries, AS and makers were matched for the {FILTER_KEYS_MAX:,} newest distinct "
                f"addresses and MACs of the buffer (of {len(distinct):,} addresses): older ones only by address.")
    return mask, note


def _among(values: np.ndarray, keys: list) -> np.ndarray:
    """values[i] in keys, per row, by hashing (np.isin sorts object arrays with Python compares: ~0.7 s for
    10 k rows against 3,000 keys)."""
    if not len(keys):
        return np.zeros(len(values), dtype=bool)
    return pd.Series(values, dtype=object).isin(keys).to_numpy(dtype=bool)


def _process_matches(look: Lookups, rows: np.ndarray, src, dst, addrs, needle: str) -> np.ndarray:
    """Rows whose local end's port is held by a process whose 'name (pid)' holds the needle (live only)."""
    out = np.zeros(len(rows), dtype=bool)
    if not look.live:
        return out
    table = look.en.processes
    owned = {(proto, port) for (proto, port), (pid, name, _) in table.owners().items()
             if needle in f"{name} ({pid})".lower()}
    if not owned:
        return out
    local = [a for a in addrs if table.is_local(str(a))]
    for cls, proto in ((TCP_CLS, "tcp"), (UDP_CLS, "udp")):
        ports = [port for p, port in owned if p == proto]
        if ports:
            of = rows["cls"] == cls
            out |= of & _among(src, local) & np.isin(rows["sport"], ports)
            out |= of & _among(dst, local) & np.isin(rows["dport"], ports)
    return out


def _maker_matches(look: Lookups, rows: np.ndarray, needle: str) -> tuple[np.ndarray, bool]:
    """Rows whose source MAC's maker holds the needle; whether the distinct MACs were cut at the bound."""
    if "hw_src" not in (rows.dtype.names or ()):
        return np.zeros(len(rows), dtype=bool), False
    macs = rows["hw_src"]
    distinct = pd.unique(macs[::-1])
    hit = [m for m in distinct[:FILTER_KEYS_MAX] if needle in look.maker(m).lower()]
    return np.isin(macs, hit) if hit else np.zeros(len(rows), dtype=bool), len(distinct) > FILTER_KEYS_MAX
