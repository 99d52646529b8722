"""A filter spec read from and written to the URL's query string, applied to buffered packets with numpy masks.

A spec is a tuple of (key, text) pairs, combined with AND; the same key may appear twice (a conversation
is host=A & host=B & port=P & port=Q). `view` turns a Snapshot into the Snapshot of the matching packets,
counted afresh, so every panel that reads a Snapshot shows the filtered numbers unchanged.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

import numpy as np

import config
from analysis.counters import BIN_FIELDS, Counters
from analysis.headers import CLASSES, DIRECTIONS, addr_text
from capture.sources import V4_PREFIX

KEYS = ("src", "dst", "host", "port", "proto", "vlan", "sensor", "from", "to", "country", "asn")
ADDRESS_KEYS = ("src", "dst", "host")
# Either end's country (ISO code or range label) or network (AS number, or the networks view's label), as
# the enrichment panel's bars key them (Enricher.country_of / network_of).
GEO_KEYS = ("country", "asn")
# Distinct addresses looked up per end for a country/AS filter when only single look-ups can answer (the
# vectorised look-up, enrich.geo's keys_of, has no cap): each costs a database look-up the first time.
# Beyond it, the busiest are looked up and the page says the figures are approximate.
GEO_LOOKUP_MAX = 50_000
# Addresses whose country/network key is kept across reruns, per key (country, asn): ~100 bytes each.
GEO_CACHE_MAX = 131_072
Spec = tuple[tuple[str, str], ...]


class FilterError(ValueError):
    """A filter value that cannot be read; the message says which and why."""


@dataclass(frozen=True)
class Condition:
    """One parsed filter: key, the text as given, and the value it means."""

    key: str
    text: str
    value: Any  # (net bytes, prefix bits) | int | float | str

    def label(self) -> str:
        """The chip text, e.g. 'src = 10.0.0.1'."""
        return f"{self.key} = {self.text}"


def _net(text: str) -> tuple[bytes, int]:
    """An address or network as (16-byte key, prefix bits over the 16 bytes); IPv4 maps like the records."""
    try:
        net = ipaddress.ip_network(text.strip().strip("[]"), strict=False)
    except ValueError:
        raise FilterError(f"not an IP address or network: {text!r}") from None
    if net.version == 4:
        return V4_PREFIX + net.network_address.packed, 96 + net.prefixlen
    return net.network_address.packed, net.prefixlen


def parse_time(text: str, tz: tzinfo | None = None) -> float:
    """Epoch seconds, or ISO 8601 (a time without an offset is in zone `tz`, else in the server's local zone)."""
    s = text.strip()
    try:
        value = float(s)
    except ValueError:
        try:
            when = datetime.fromisoformat(s.replace("Z", "+00:00") if s.endswith("Z") else s)
        except ValueError:
            raise FilterError(f"not a time (epoch seconds or ISO 8601): {text!r}") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=tz) if tz is not None else when.astimezone()
        return when.timestamp()
    if not math.isfinite(value):
        raise FilterError(f"not a time (epoch seconds or ISO 8601): {text!r}")
    return value


def _int(text: str, key: str, lo: int, hi: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise FilterError(f"{key} must be a whole number from {lo} to {hi}: {text!r}") from None
    if not lo <= value <= hi:
        raise FilterError(f"{key} must be a whole number from {lo} to {hi}: {text!r}")
    return value


def parse_one(key: str, text: str, tz: tzinfo | None = None) -> Condition:
    """One (key, text) pair as a Condition; FilterError with a clear message when it means nothing."""
    if key in ADDRESS_KEYS:
        return Condition(key, text.strip(), _net(text))
    if key == "port":
        return Condition(key, text.strip(), _int(text, "port", 0, 65535))
    if key == "vlan":
        return Condition(key, text.strip(), _int(text, "vlan", 1, 4094))
    if key == "proto":
        name = text.strip().lower()
        if name not in CLASSES:
            raise FilterError(f"proto must be one of {', '.join(CLASSES)}: {text!r}")
        return Condition(key, name, CLASSES.index(name))
    if key in ("from", "to"):
        return Condition(key, text.strip(), parse_time(text, tz))
    if key == "sensor":
        return Condition(key, text.strip(), text.strip())
    if key in GEO_KEYS:
        return Condition(key, text.strip(), _geo_value(key, text))
    raise FilterError(f"unknown filter key {key!r} (known: {', '.join(KEYS)})")


def _geo_value(key: str, text: str) -> int | str:
    """country: the text (matched ignoring case); asn: an AS number ('AS15169' or '15169') or a label."""
    t = text.strip()
    if not t:
        raise FilterError(f"{key} needs a value: a country code or label (country=US), an AS number (asn=15169)")
    digits = t[2:] if t[:2].upper() == "AS" else t
    if key == "asn" and digits.isdigit():
        return _int(digits, "asn", 0, 4_294_967_295)
    return t


def geo_keys(key: str):
    """The function that gives an address's country or network key (the enrichment's shared databases)."""
    import enrich

    en = enrich.shared()
    return en.country_of if key == "country" else en.network_of


def geo_keys_many(key: str):
    """The function that gives many addresses' country or network keys at once (enrich.geo's vectorised
    look-up: (hi, lo) words -> (index per address, texts)), or None when only geo_keys can answer."""
    import enrich

    geo = enrich.shared().geo
    if not geo.vectorised:
        return None
    return lambda hi, lo: geo.keys_of(key, hi, lo)


def geo_match(value: int | str, key_text: str) -> bool:
    """Whether a country/network key is the one a filter value names."""
    if isinstance(value, int):
        return key_text.split(" ", 1)[0] == f"AS{value}"
    return key_text.casefold() == value.casefold()


def parse(pairs: Iterable[tuple[str, str]], tz: tzinfo | None = None,
          limit: int | None = None) -> tuple[list[Condition], list[str]]:
    """(conditions that parse, one message per pair that does not): a bad value never raises.

    At most `limit` conditions (FILTER_MAX) apply: each costs a pass over the buffer at every rerun."""
    # The same condition twice is the same AND: counted and applied once.
    pairs = list(dict.fromkeys((k, t.strip()) for k, t in pairs))
    limit = config.get("FILTER_MAX") if limit is None else limit
    conds, errors = [], []
    if len(pairs) > limit:
        errors.append(f"{len(pairs)} filters given, at most {limit} apply (FILTER_MAX): the first {limit} are "
                      f"used, the other {len(pairs) - limit} are ignored")
        pairs = pairs[:limit]
    for key, text in pairs:
        try:
            conds.append(parse_one(key, text, tz))
        except FilterError as exc:
            errors.append(str(exc))
    lows = [c.value for c in conds if c.key == "from"]
    highs = [c.value for c in conds if c.key == "to"]
    if lows and highs and max(lows) >= min(highs):
        # Said and done: the time filter is dropped, the others apply.
        errors.append("from must be earlier than to: the time filter (from, to) is ignored")
        conds = [c for c in conds if c.key not in ("from", "to")]
    return conds, errors


def from_query(params: Mapping[str, Any]) -> Spec:
    """The spec held in a query string (st.query_params, or a dict of str / list of str); other keys are ignored."""
    out = []
    for key in KEYS:
        if key not in params:
            continue
        values = params.get_all(key) if hasattr(params, "get_all") else params[key]
        for v in [values] if isinstance(values, str) else values:
            out.append((key, str(v)))
    return tuple(out)


def unknown_keys(spec: Spec) -> list[str]:
    """The keys of a spec that are not filter keys (a typed 'prot=udp'): said, never silently dropped."""
    return sorted({k for k, _ in spec if k not in KEYS})


def to_query(spec: Spec) -> dict[str, list[str]]:
    """The spec as query parameters (a key given twice becomes a list)."""
    out: dict[str, list[str]] = {}
    for key, text in spec:
        out.setdefault(key, []).append(text)
    return out


def with_filter(spec: Spec, key: str, text: str, replace: bool = True) -> Spec:
    """The spec with key=text added; `replace` first drops the key's other values (a new click on a bar)."""
    kept = tuple(p for p in spec if not (replace and p[0] == key) and p != (key, text))
    return (*kept, (key, text))


def without(spec: Spec, pair: tuple[str, str]) -> Spec:
    """The spec without one pair (a chip removed)."""
    return tuple(p for p in spec if p != pair)


# -- masks --------------------------------------------------------------------------------------


def _addr_bytes(rows: np.ndarray, field: str) -> np.ndarray:
    return np.ascontiguousarray(rows[field]).view(np.uint8).reshape(len(rows), 16)


def addr_mask(addrs: np.ndarray, net: tuple[bytes, int]) -> np.ndarray:
    """Which of the (n, 16) uint8 addresses lie in the network (16-byte key, prefix bits)."""
    key, bits = net
    whole, rest = divmod(bits, 8)
    want = np.frombuffer(key, np.uint8)
    mask = np.ones(len(addrs), bool)
    if key[:12] != V4_PREFIX and bits < 96:
        # An IPv6 network as wide as ::/96 would also cover the IPv4 addresses the records map into
        # ::ffff:0:0/96; an IPv6 filter means IPv6 traffic.
        mask &= ~(addrs[:, :12] == np.frombuffer(V4_PREFIX, np.uint8)).all(axis=1)
    if whole:
        mask &= (addrs[:, :whole] == want[:whole]).all(axis=1)
    if rest:
        m = (0xFF << (8 - rest)) & 0xFF
        mask &= (addrs[:, whole] & m) == (want[whole] & m)
    return mask


_ALL = (1 << 64) - 1


def words(rows: np.ndarray, field: str) -> tuple[np.ndarray, np.ndarray]:
    """An address field as two native uint64 (the high and low 8 bytes, big-endian): a network test is then
    four whole-word operations per row, not sixteen byte compares."""
    w = _addr_bytes(rows, field).view(">u8")
    return w[:, 0].astype(np.uint64), w[:, 1].astype(np.uint64)


def words_mask(hi: np.ndarray, lo: np.ndarray, net: tuple[bytes, int]) -> np.ndarray:
    """Which addresses (as `words`) lie in the network: addr_mask's answer, faster."""
    key, bits = net
    k = int.from_bytes(key, "big")
    m = (((1 << bits) - 1) << (128 - bits)) if bits else 0
    mh, ml = np.uint64(m >> 64), np.uint64(m & _ALL)
    out = (hi & mh) == np.uint64((k >> 64) & int(mh))
    if int(ml):
        out &= (lo & ml) == np.uint64(k & int(ml))
    if key[:12] != V4_PREFIX and bits < 96:  # an IPv6 network means IPv6 traffic (see addr_mask)
        out &= ~((hi == 0) & ((lo >> np.uint64(32)) == np.uint64(0xFFFF)))
    return out


_K = np.uint64(0x9E3779B97F4A7C15)


def _distinct(hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first row of each distinct address, each row's distinct number, rows per distinct address),
    through one uint64 per address (an exact check catches the rare two addresses that share it)."""
    with np.errstate(over="ignore"):
        h = hi * _K + lo
    _, first, inv, counts = np.unique(h, return_index=True, return_inverse=True, return_counts=True)
    if not ((hi[first][inv] == hi).all() and (lo[first][inv] == lo).all()):
        both = np.stack([hi, lo], axis=1)  # a collision: the slow exact way
        _, first, inv, counts = np.unique(both, axis=0, return_index=True, return_inverse=True, return_counts=True)
    return first, inv.ravel(), counts


class GeoCache:
    """Address -> country/network key, kept across reruns (bounded): a key found once costs a dict look-up
    afterwards, not a database look-up. Only complete answers are kept (both databases loaded), and a new
    database version empties it."""

    def __init__(self, max_items: int = GEO_CACHE_MAX) -> None:
        self.max_items = max_items
        self._lock = threading.Lock()
        self._maps: dict[str, dict[bytes, str]] = {}
        self._version: tuple = ()

    def keys(self, kind: str, addrs: list[bytes], key_of, version: tuple | None) -> list[str]:
        """The key of each 16-byte address (`key_of` for the ones not kept); `version` None: keep nothing."""
        with self._lock:
            if version is not None and version != self._version:
                self._maps.clear()
                self._version = version
            known = dict(self._maps.get(kind) or {})  # a copy: other sessions' threads add to it
        out, found = [], {}
        for b in addrs:
            k = known.get(b)
            if k is None:
                k = found[b] = key_of(addr_text(b))
            out.append(k)
        if found and version is not None:
            with self._lock:
                m = self._maps.setdefault(kind, {})
                if len(m) + len(found) > self.max_items:
                    m.clear()  # whole, not piecemeal: the busiest come back at the next rerun
                m.update(itertools.islice(found.items(), self.max_items))
        return out


GEO_CACHE = GeoCache()


def geo_version() -> tuple | None:
    """The loaded databases' versions, or None while either still loads (its answers are then incomplete)."""
    import enrich

    geo = enrich.shared().geo
    if not ((geo.source or geo.error) and (geo.asn.ready or geo.asn.error)):
        return None
    return geo.source, geo.error, geo.asn.version, geo.asn.error


def geo_match_texts(cond: Condition, addrs: list[str]) -> list[bool]:
    """Whether each address (text; one that is no address never matches) is in the condition's country or
    network: all at once through the vectorised look-up when it answers (stored conversations' ends)."""
    keys, ok = [], []
    for a in addrs:
        try:
            ip = ipaddress.ip_address(a.strip("[]"))
        except ValueError:
            ok.append(False)
            continue
        packed = (V4_PREFIX + ip.packed) if ip.version == 4 else ip.packed
        keys.append(int.from_bytes(packed, "big"))
        ok.append(True)
    many = geo_keys_many(cond.key)
    if many is not None:
        index, texts = many(np.array([k >> 64 for k in keys], np.uint64), np.array([k & _ALL for k in keys], np.uint64))
        verdict = [geo_match(cond.value, t) for t in texts]
        hits = iter([verdict[i] for i in index.tolist()])
    else:
        key_of = geo_keys(cond.key)
        hits = iter([geo_match(cond.value, key_of(addr_text(k.to_bytes(16, "big")))) for k in keys])
    return [next(hits) if good else False for good in ok]


def geo_mask(rows: np.ndarray, cond: Condition, words_of, notes: list[str] | None = None) -> np.ndarray:
    """Rows with either end in the country or network a country/asn condition names. Non-IP rows (ARP,
    LLDP: their address fields are zeros, which would read as '::', 'reserved') never match."""
    ip = rows["cls"] != CLASSES.index("non_ip")
    out = np.zeros(len(rows), bool)
    if not ip.any():
        return out
    many = geo_keys_many(cond.key)
    if many is not None:
        # Every distinct address at once, with numpy over the databases' sorted ranges: no cap, no cache.
        for field in ("src", "dst"):
            hi, lo = words_of(field)
            first, inv, _ = _distinct(hi[ip], lo[ip])
            index, texts = many(hi[ip][first], lo[ip][first])
            verdict = np.array([geo_match(cond.value, k) for k in texts], bool)
            out[ip] |= verdict[index][inv]
        return out
    key_of = geo_keys(cond.key)
    version = geo_version()
    for field in ("src", "dst"):
        hi, lo = words_of(field)
        first, inv, counts = _distinct(hi[ip], lo[ip])
        look = np.arange(len(first))
        if len(first) > GEO_LOOKUP_MAX:  # the busiest addresses; the others count as not matching
            look = np.argsort(-counts, kind="stable")[:GEO_LOOKUP_MAX]
            if notes is not None:
                notes.append(f"{cond.key} filter: only the {GEO_LOOKUP_MAX:,} busiest of {len(first):,} {field} "
                             "addresses were looked up; packets of the others are left out (approximate)")
        raw = np.ascontiguousarray(rows[field][ip][first[look]]).view(np.uint8).reshape(-1, 16)
        texts = GEO_CACHE.keys(cond.key, [r.tobytes() for r in raw], key_of, version)
        # Few distinct keys (countries, networks): each is matched once.
        verdict = {k: geo_match(cond.value, k) for k in set(texts)}
        hit = np.zeros(len(first), bool)
        hit[look] = [verdict[k] for k in texts]
        out[ip] |= hit[inv]
    return out


def mask(rows: np.ndarray, conds: Iterable[Condition], notes: list[str] | None = None) -> np.ndarray:
    """Which rows match every condition (sensor is not a field of a single capture's records: see view);
    `notes` collects what makes the answer approximate."""
    out = np.ones(len(rows), bool)
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def words_of(field: str) -> tuple[np.ndarray, np.ndarray]:
        if field not in cache:
            cache[field] = words(rows, field)
        return cache[field]

    def inside(field: str, net: tuple[bytes, int]) -> np.ndarray:
        return words_mask(*words_of(field), net)

    for c in conds:
        if c.key == "src":
            out &= inside("src", c.value)
        elif c.key == "dst":
            out &= inside("dst", c.value)
        elif c.key == "host":
            out &= inside("src", c.value) | inside("dst", c.value)
        elif c.key == "port":
            out &= (rows["sport"] == c.value) | (rows["dport"] == c.value)
        elif c.key == "proto":
            out &= rows["cls"] == c.value
        elif c.key == "vlan":
            out &= rows["vlan"] == c.value
        elif c.key == "from":
            out &= rows["ts"] >= c.value
        elif c.key == "to":
            out &= rows["ts"] < c.value
        elif c.key in GEO_KEYS:
            out &= geo_mask(rows, c, words_of, notes)
    return out


# -- the filtered view ---------------------------------------------------------------------------


def coverage(snap) -> dict[str, Any]:
    """What the buffer holds of the capture: whole (exact) or only its last N packets since T (approximate)."""
    held = len(snap.packets)
    total = int(snap.totals.get("packets") or 0)
    since = float(snap.packets["ts"].min()) if held else None
    return {"buffered": held, "total": total, "whole": held >= total, "since": since}


# The protocol classes each detector's traffic is made of (analysis/detect.py); spike and new_host: any.
ALERT_PROTOS = {"syn_flood": ("tcp",), "icmp_flood": ("icmp", "icmpv6"), "udp_flood": ("udp",),
                "reflection": ("udp",), "arp_spoof": ("non_ip",)}


def alert_ends(alert) -> tuple[tuple[str, str], tuple[str, str]]:
    """The (key, text) of an alert's two ends as filters. An ARP spoof's source is a MAC and its target the
    address claimed: the evidence is the ARP packets whose sender address is that address (src=)."""
    if alert.detector == "arp_spoof":
        return ("src", str(alert.target)), ("src", str(alert.source))
    return ("src", str(alert.source)), ("dst", str(alert.target))


def alert_traffic(alert) -> tuple[tuple[str, ...] | None, int | None]:
    """(protocol classes, port) an alert's traffic is made of, where the alert names them (None: any)."""
    if alert.detector == "port_scan":
        proto, sep, port = str(alert.target).partition("/")
        if sep and proto in CLASSES and port.isdigit():  # a horizontal scan names its service: 'tcp/443'
            return (proto,), int(port)
        if "NULL/FIN/Xmas" in str(alert.evidence):  # stealth probes are TCP
            return ("tcp",), None
        return ("tcp", "udp"), None  # a vertical scan: failed TCP or UDP attempts
    return ALERT_PROTOS.get(alert.detector), None


_SCAN_PROTOS: dict[tuple, str] = {}  # (source, target, first, last) -> protocol: a span's packets do not change
_SCAN_PROTOS_MAX = 4096
_SCAN_LOCK = threading.Lock()


def scan_proto(rows: np.ndarray, alert) -> str:
    """A vertical scan's protocol (the alert does not name it): of TCP and UDP from its source to its target
    in its whole seconds, the one reaching more destination ports (remembered: one pass per alert span)."""
    key = (alert.source, alert.target, alert.first_ts, alert.last_ts)
    with _SCAN_LOCK:  # every session's thread shares the dict
        hit = _SCAN_PROTOS.get(key)
    if hit is not None:
        return hit
    proto = _scan_proto(rows, alert)
    with _SCAN_LOCK:
        if len(_SCAN_PROTOS) >= _SCAN_PROTOS_MAX:
            _SCAN_PROTOS.clear()
        _SCAN_PROTOS[key] = proto
    return proto


def _scan_proto(rows: np.ndarray, alert) -> str:
    conds = []
    for key, text in (("src", alert.source), ("dst", alert.target)):
        try:
            conds.append(parse_one(key, str(text)))
        except FilterError:
            return "tcp"
    conds += [Condition("from", "", float(int(alert.first_ts))), Condition("to", "", float(int(alert.last_ts)) + 1)]
    mine = rows[mask(rows, conds)]
    ports = {p: len(np.unique(mine["dport"][mine["cls"] == CLASSES.index(p)])) for p in ("tcp", "udp")}
    return max(ports, key=lambda p: (ports[p], p == "tcp"))


def _in_net(texts: Iterable[str], net: tuple[bytes, int]) -> bool:
    for text in texts:
        try:
            if addr_mask(np.frombuffer(_net(str(text))[0], np.uint8).reshape(1, 16), net)[0]:
                return True
        except FilterError:
            continue  # a MAC or a text target: not an address
    return False


def _in_geo(texts: Iterable[str], cond: Condition) -> bool:
    key_of = None
    for text in texts:
        try:
            addr = str(ipaddress.ip_address(str(text).strip("[]")))
        except ValueError:
            continue  # a MAC or a text target: no country
        key_of = key_of or geo_keys(cond.key)
        if geo_match(cond.value, key_of(addr)):
            return True
    return False


def alert_matches(alert, conds: Iterable[Condition], rows: np.ndarray | None = None) -> bool:
    """Whether an alert concerns the filtered traffic: its source/target in the address filters, its time
    span overlapping from/to, its protocol and port (where the alert names them) those of the filters.
    `rows` (the buffer) settles a vertical scan's protocol when a protocol filter asks."""
    conds = list(conds)
    ends = {"src": (alert.source,), "dst": (alert.target,), "host": (alert.source, alert.target)}
    if alert.detector == "arp_spoof":  # its evidence is the ARP packets that claim the address (their src)
        ends["src"] = (alert.source, alert.target)
    protos, port = alert_traffic(alert)
    if protos is not None and len(protos) > 1 and rows is not None and any(c.key == "proto" for c in conds):
        protos = (scan_proto(rows, alert),)
    for c in conds:
        if c.key in ends and not _in_net(ends[c.key], c.value):
            return False
        if c.key in GEO_KEYS and not _in_geo((alert.source, alert.target), c):
            return False
        if (c.key == "from" and alert.last_ts < c.value) or (c.key == "to" and alert.first_ts >= c.value):
            return False
        if (c.key == "proto" and protos is not None and CLASSES[c.value] not in protos) or (
                c.key == "port" and port is not None and c.value != port):
            return False
    return True


def view(snap, conds: list[Condition], top_max: int, bin_seconds: int):
    """The Snapshot of the buffered packets matching every condition, counted afresh (exact over the buffer).

    Engine-wide figures that no record carries (drops, stages, store) stay as they are; `totals["filter"]`
    says what the numbers cover."""
    # take() of the matching indexes copies the records ~2.5x faster than boolean indexing does.
    notes: list[str] = []
    rows = snap.packets.take(np.flatnonzero(mask(snap.packets, conds, notes))) if conds else snap.packets
    c = Counters(top_max)
    # The timeline keeps the seconds the page keeps: the buffer can hold more seconds than that.
    c.add(rows, max(bin_seconds, 1))
    totals = dict(snap.totals)
    totals.update({
        "packets": c.packets, "bytes": c.bytes, "bytes_captured": c.bytes_captured, "malformed": c.malformed,
        "transport_counts": dict(zip(CLASSES, c.cls_packets.tolist())),
        "transport_bytes": dict(zip(CLASSES, c.cls_bytes.tolist())),
        "direction_counts": dict(zip(DIRECTIONS, c.dir_packets.tolist())),
        "direction_bytes": dict(zip(DIRECTIONS, c.dir_bytes.tolist())),
        "first_ts": c.first_ts, "last_ts": c.last_ts, "min_ts": c.min_ts, "max_ts": c.max_ts,
        "filter": {**coverage(snap), "matched": c.packets, "conditions": [x.label() for x in conds], "notes": notes,
                   # The time span asked for (None: unbounded), for rates over the filtered span.
                   "from": max((x.value for x in conds if x.key == "from"), default=None),
                   "to": min((x.value for x in conds if x.key == "to"), default=None)},
    })
    rows = np.asarray(rows)
    rows.flags.writeable = False
    grid = np.array([[s, *v] for s, v in sorted(c.bins.items())], dtype=np.int64).reshape(-1, 1 + len(BIN_FIELDS))
    grid.flags.writeable = False
    tables = {name: getattr(c, name).frozen() for name in Counters.TABLES}
    alerts = tuple(a for a in snap.alerts if alert_matches(a, conds, snap.packets))
    return dataclasses.replace(snap, packets=rows, totals=totals, bins=grid, alerts=alerts, **tables)
