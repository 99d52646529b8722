"""Country and AS organisation from an offline database shipped inside a PyPI package (geoip2fast).

Nothing is downloaded: geoip2fast ships MaxMind GeoLite2 country+ASN data files inside the wheel. The
larger file (IPv4 and IPv6, country and ASN) is loaded once in a background thread, so neither the page nor
the capture waits for it; until it is loaded, public addresses get no country (and the range labels work
at once, from the address alone).
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from capture.heap import keep_out_of_gc
from enrich import ranges
from enrich.asn import LICENCE as ASN_LICENCE
from enrich.asn import AsnDB, floor_index
from enrich.cache import BoundedCache
from enrich.ranges import LABELS, range_label

log = logging.getLogger(__name__)

DATA_FILE = "geoip2fast-asn-ipv6.dat.gz"
LICENCE = ("GeoLite2 data created by MaxMind (https://www.maxmind.com), under the GeoLite2 End User Licence "
           "Agreement; packaged by geoip2fast (MIT licence); " + ASN_LICENCE)


@dataclass(frozen=True)
class GeoInfo:
    """What the database says about one address."""

    country: str | None  # ISO 3166 alpha-2, a range label, or None (not in the database / not loaded)
    asn: int | None  # from the AS-number database (enrich/asn.py); None when it has none or is not installed
    as_org: str | None


def _unmapped(addr: str) -> str:
    """The IPv4 address inside an IPv4-mapped IPv6 address (::ffff:a.b.c.d), else `addr` unchanged."""
    if ":" not in addr or "ffff" not in addr.lower():  # cheap filter: most addresses are not mapped
        return addr
    try:
        mapped = ipaddress.IPv6Address(addr).ipv4_mapped
    except ValueError:
        return addr
    return str(mapped) if mapped is not None else addr


class GeoDB:
    """Offline country/AS lookups; load() starts the one background load, lookup() never waits for it."""

    def __init__(self, cache_max: int = 65_536, data_file: str = DATA_FILE, asn_dir: str | None = None) -> None:
        self.data_file = data_file
        self.asn = AsnDB(asn_dir)
        self._db = None
        self._vec: _Vector | None = None  # the same database as arrays, for many addresses at once
        self._loading: threading.Thread | None = None
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self._settled = threading.Event()  # the loader thread's work all done (the AS numbers too)
        self._cache = BoundedCache(cache_max)
        self.error: str | None = None
        self.load_s: float | None = None
        self.source = ""  # e.g. MAXMIND:GeoLite2-CountryASN-IPv4IPv6-en-20240618

    def load(self) -> None:
        """Start loading the database in a background thread (once)."""
        with self._lock:
            if self._loading is None:
                self._loading = threading.Thread(target=self._load, name="geo-load", daemon=True)
                self._loading.start()

    def _load(self) -> None:
        t = time.perf_counter()
        try:
            from geoip2fast import GeoIP2Fast
            db = GeoIP2Fast(geoip2fast_data_file=self.data_file)
            self.source = str(getattr(db, "source_info", ""))
            try:  # before _db: whoever sees the database loaded sees its arrays
                self._vec = _vector_of(db)
            except Exception as exc:  # the arrays are a speed-up: single look-ups still answer without them
                log.warning("geo database kept for single look-ups only: %s", exc)
            self._db = db
        except Exception as exc:
            self.error = f"geo database not loaded: {exc}"
            log.warning("%s", self.error)
        self.load_s = time.perf_counter() - t
        self._loaded.set()
        self.asn.load(here=True)  # then the AS numbers, in this same thread (one loader thread, not two)
        if self._db is not None:
            keep_out_of_gc()
        self._settled.set()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Start the load if needed and wait for it; True when a database is ready."""
        self.load()
        self._loaded.wait(timeout)
        self.asn.wait_loaded(timeout, start=False)  # the geo thread loads it next
        self._settled.wait(timeout)
        return self._db is not None

    @property
    def date(self) -> str:
        """The database's date (YYYY-MM-DD) from its source name, '' before it is loaded."""
        tail = self.source.rsplit("-", 1)[-1]
        return f"{tail[:4]}-{tail[4:6]}-{tail[6:8]}" if len(tail) == 8 and tail.isdigit() else ""

    def lookup(self, addr: str) -> GeoInfo:
        """Country (or range label) and AS organisation of an address; never blocks on the load."""
        addr = _unmapped(addr)  # ::ffff:a.b.c.d is a.b.c.d (the databases key it as IPv4)
        label = range_label(addr)
        if label:
            return GeoInfo(label, None, None)
        hit = self._cache.get(addr)
        if hit is not None:
            return hit
        if self._db is None:
            self.load()
            return GeoInfo(None, None, None)
        info = self._with_asn(addr, self._query(addr))
        if self.asn.ready or self.asn.error:  # cache only complete answers: the AS load may still run
            self._cache.put(addr, info)
        return info

    @property
    def vectorised(self) -> bool:
        """Whether keys_of answers (False only when the loaded database is laid out otherwise than it reads)."""
        return self._db is None or self._vec is not None

    def keys_of(self, kind: str, hi, lo) -> tuple | None:
        """Many addresses' country ('country') or network ('asn') keys at once, as Enricher.country_of /
        network_of give them: (index into texts per address, texts); None when only lookup() can answer."""
        return _keys_of(self, kind, hi, lo)

    def _with_asn(self, addr: str, info: GeoInfo) -> GeoInfo:
        """The AS number (and that database's organisation name, which goes with the number)."""
        if info.country in ("reserved",) or not self.asn.ready:
            return info
        try:
            hit = self.asn.lookup(ipaddress.ip_address(addr).packed)
        except ValueError:
            return info
        if hit is None or hit.asn is None:
            return info
        return GeoInfo(info.country, hit.asn, hit.org or info.as_org)

    def _query(self, addr: str) -> GeoInfo:
        try:
            d = self._db.lookup(addr)
        except Exception as exc:
            log.debug("geo lookup %r failed: %s", addr, exc)
            return GeoInfo(None, None, None)
        cc = d.country_code if d.country_code and d.country_code != "--" else None
        org = d.asn_name if d.asn_name and d.asn_name not in ("<unknown>", "IANA.ORG") else None
        if d.is_private and cc is None:
            return GeoInfo("reserved", None, None)
        return GeoInfo(cc, None, org)


# -- many addresses at once (a country=/asn= filter over a whole buffer) ---------------------------------------
#
# lookup() answers one address through geoip2fast (Python bisects, ~20 µs). A filter over a buffer asks for
# tens of thousands of distinct addresses, so keys_of() answers them all with numpy binary searches over
# the same ranges, kept as 128-bit keys (two uint64 halves), and gives exactly lookup()'s answers,
# geoip2fast's own quirks included (tests/test_investigate_geo_vector.py compares them address by address).

_U64 = np.uint64
NOT_IN_DB = "not in database"


def _within(q_hi: np.ndarray, q_lo: np.ndarray, f_hi: np.ndarray, f_lo: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """q - f < 2**bits (q >= f; bits 0..128): whether q lies in the range of 2**bits addresses from f."""
    d_lo = q_lo - f_lo
    d_hi = q_hi - f_hi - (q_lo < f_lo).astype(_U64)
    bits = bits.astype(np.int64)
    one = _U64(1)
    up = np.left_shift(one, np.clip(bits - 64, 0, 63).astype(_U64))
    down = np.left_shift(one, np.clip(bits, 0, 63).astype(_U64))
    return np.where(bits >= 128, True,
                    np.where(bits >= 64, d_hi < up, (d_hi == 0) & (d_lo < down)))


@dataclass(frozen=True)
class _Ranges:
    """One geoip2fast range list flattened: starts as (hi, lo), prefix length, the name index of each."""

    hi: np.ndarray
    lo: np.ndarray
    netlen: np.ndarray
    ids: np.ndarray


def _ranges(index: list, firsts: list, netlens: list, ids: list) -> _Ranges | None:
    """The chunked lists as flat arrays, or None when they are not laid out as lookup() reads them."""
    if not index or index[0] != 0 or any(i != c[0] for i, c in zip(index, firsts, strict=True)):
        return None
    flat = list(itertools.chain.from_iterable(firsts))
    lens = np.fromiter(itertools.chain.from_iterable(netlens), np.int16, len(flat))
    if any(a >= b for a, b in itertools.pairwise(flat)) or len(lens) != len(flat) or lens.max() > 128:
        return None
    mask = (1 << 64) - 1
    return _Ranges(np.array([x >> 64 for x in flat], _U64), np.array([x & mask for x in flat], _U64),
                   lens, np.fromiter(itertools.chain.from_iterable(ids), np.int32, len(flat)))


@dataclass(frozen=True)
class _Vector:
    """A loaded geoip2fast database as arrays: country ranges, AS-name ranges and their name tables."""

    country: _Ranges
    asname: _Ranges | None
    ipv6: bool  # geoip2fast sizes every AS-name range as IPv6 in a database with IPv6 (as lookup() does)
    codes: list[str | None]  # per country index: the country code lookup() gives (None: '--' or empty)
    coded: np.ndarray  # per country index: whether codes has one
    private: np.ndarray  # per country index: geoip2fast's is_private
    org_ok: np.ndarray  # per AS-name index: a name lookup() keeps ('<unknown>', 'IANA.ORG' and '' are not)
    orgs: list[str]


def _vector_of(db) -> _Vector | None:
    """The arrays of a just-loaded GeoIP2Fast (its data are module globals), or None if laid out otherwise."""
    try:
        from geoip2fast import geoip2fast as g
        country = _ranges(g.mainIndex, g.mainListFirstIP, g.mainListNetlength, g.mainListIDCountryCodes)
        asname = (_ranges(g.mainIndexASN, g.mainListFirstIPASN, g.mainListNetlengthASN, g.mainListIDASN)
                  if db.asn else None)
        names = [n.split(":")[0] for n in g.mainListNamesCountry]
        orgs = list(g.mainListNamesASN) if db.asn else []
    except (AttributeError, ImportError, ValueError, TypeError) as exc:
        log.info("geo database kept for single look-ups only: %s", exc)
        return None
    if country is None or (db.asn and asname is None) or not db.country:
        log.info("geo database kept for single look-ups only: its ranges are not laid out as expected")
        return None
    private = np.arange(len(names)) < 16  # geoip2fast: the first 16 country entries are special networks
    codes = [(db.error_code_private_networks if p else c) or None for c, p in zip(names, private, strict=True)]
    codes = [None if c == "--" else c for c in codes]
    org_ok = np.array([bool(o) and o not in ("<unknown>", "IANA.ORG") for o in orgs] or [False], bool)
    coded = np.array([c is not None for c in codes], bool)
    return _Vector(country, asname, bool(db.ipv6), codes, coded, private, org_ok, orgs)


def _bounds(nets, top: int) -> list[int]:
    """Start and end + 1 of each network (and address), within [0, top)."""
    out = []
    for n in nets:
        first, last = int(n[0]), int(n[-1])
        out += [first, last + 1] if last + 1 < top else [first]
    return out


@lru_cache(maxsize=1)
def _label_table() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """range_label as sorted segments (v4 starts, v4 labels, v6 starts hi, lo, v6 labels; label -1 = none).

    Every predicate range_label uses is membership of a network (ipaddress's own constants and the private
    list in enrich/ranges.py) or equality with one address; the label is constant between their bounds, so
    it is asked once per segment."""
    nets: dict[int, list] = {4: [], 6: []}
    for const in (ipaddress._IPv4Constants, ipaddress._IPv6Constants):
        for v in vars(const).values():
            for x in v if isinstance(v, list | tuple) else [v]:
                if isinstance(x, ipaddress._BaseNetwork):
                    nets[x.version].append(x)
                elif isinstance(x, ipaddress._BaseAddress):
                    nets[x.version].append(ipaddress.ip_network(x))
    for n in ranges._PRIVATE:
        nets[n.version].append(n)
    nets[4] += [ipaddress.ip_network(a) for a in ("0.0.0.0/32", "255.255.255.255/32")]
    nets[6] += [ipaddress.ip_network(a) for a in ("::/128", "::1/128", "::ffff:0:0/96")]
    b4 = sorted(set([0, *_bounds(nets[4], 1 << 32)]))
    b6 = sorted(set([0, *_bounds(nets[6], 1 << 128)]))
    index = {lab: i for i, lab in enumerate(LABELS)}
    l4 = np.array([index.get(range_label(str(ipaddress.IPv4Address(b))), -1) for b in b4], np.int64)
    l6 = np.array([index.get(range_label(str(ipaddress.IPv6Address(b))), -1) for b in b6], np.int64)
    mask = (1 << 64) - 1
    return (np.array(b4, _U64), l4, np.array([b >> 64 for b in b6], _U64), np.array([b & mask for b in b6], _U64), l6)


def labels_of(v4: np.ndarray, q_hi: np.ndarray, q_lo: np.ndarray) -> np.ndarray:
    """range_label's answer as an index into LABELS (-1: none) for many addresses: where `v4`, q_lo is the
    IPv4 address, else (q_hi, q_lo) the IPv6 one."""
    b4, l4, b6h, b6l, l6 = _label_table()
    out = np.empty(len(q_lo), np.int64)
    out[v4] = l4[np.searchsorted(b4, q_lo[v4], side="right") - 1]
    out[~v4] = l6[floor_index(b6h, b6l, q_hi[~v4], q_lo[~v4])]
    return out


_MAPPED = _U64(0xFFFF)


def split_keys(hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The records' 16-byte addresses (as two big-endian uint64 halves) as (is IPv4, hi, lo) with an IPv4
    address (mapped ::ffff:a.b.c.d) in lo alone, as lookup() reads it after unmapping."""
    hi, lo = np.asarray(hi, _U64), np.asarray(lo, _U64)
    v4 = (hi == 0) & ((lo >> _U64(32)) == _MAPPED)
    return v4, np.where(v4, _U64(0), hi), np.where(v4, lo & _U64(0xFFFFFFFF), lo)


def _floor(r: _Ranges, q_hi: np.ndarray, q_lo: np.ndarray) -> np.ndarray:
    return np.maximum(floor_index(r.hi, r.lo, q_hi, q_lo), 0)  # index 0 starts at 0 (checked): never -1


def _keys_vector(geo: GeoDB, vec: _Vector | None, kind: str, hi: np.ndarray, lo: np.ndarray
                 ) -> tuple[np.ndarray, list[str]]:
    v4, q_hi, q_lo = split_keys(hi, lo)
    n = len(q_lo)
    lab = labels_of(v4, q_hi, q_lo)
    country = np.full(n, -1, np.int64)  # index into vec.codes
    reserved = np.zeros(n, bool)
    org = np.full(n, -1, np.int64)  # geoip2fast's AS name (index into vec.orgs)
    asn, asn_org, asn_names = np.zeros(n, np.int64), np.full(n, -1, np.int64), []
    ask = np.nonzero(lab < 0)[0]
    if vec is not None and len(ask):
        h, low = q_hi[ask], q_lo[ask]
        c = vec.country
        i = _floor(c, h, low)
        small = (h == 0) & (low <= _U64(1 << 32))  # geoip2fast: iplong <= MAX_IPv4 sizes the range as IPv4
        found = _within(h, low, c.hi[i], c.lo[i], np.where(small, 32, 128) - c.netlen[i])
        cid = c.ids[i]
        has_code = found & vec.coded[cid]
        res = found & ~has_code & vec.private[cid]
        country[ask] = np.where(has_code, cid, -1)
        reserved[ask] = res
        if vec.asname is not None:
            a = vec.asname
            j = _floor(a, h, low)
            size = (128 if vec.ipv6 else 32) - a.netlen[j]
            named = _within(h, low, a.hi[j], a.lo[j], size) & vec.org_ok[a.ids[j]]
            org[ask] = np.where(found & ~res & named, a.ids[j], -1)
        if geo.asn.ready:
            sel = ~reserved & (lab < 0)
            got = geo.asn.lookup_many(v4[sel], q_hi[sel], q_lo[sel])
            asn[sel], asn_org[sel], asn_names = got
    if kind == "country":
        code = np.where(lab >= 0, lab, np.where(reserved, LABELS.index("reserved"),
                                                np.where(country >= 0, country + len(LABELS) + 1, len(LABELS))))
        uniq, inv = np.unique(code, return_inverse=True)
        texts = [LABELS[u] if u < len(LABELS) else NOT_IN_DB if u == len(LABELS) else vec.codes[u - len(LABELS) - 1]
                 for u in uniq.tolist()]
        return inv.ravel(), texts
    # network: label; reserved; AS number (+ its database's name, else geoip2fast's); geoip2fast's name; none.
    # One int64 per address names its text: a label 0..4; an AS number with its name (20 bits: which name
    # table and index) from 8 on; geoip2fast's name alone -2 - index; nothing -1.
    name = np.where(asn_org >= 0, asn_org + 1, np.where(org >= 0, len(asn_names) + 1 + org, 0))
    if len(asn_names) + len(vec.orgs if vec else ()) + 1 >= 1 << 20:
        raise ValueError("more AS names than the key packs")  # never with today's databases (~200,000)
    code = np.where(lab >= 0, lab, np.where(reserved, LABELS.index("reserved"),
                    np.where(asn > 0, 8 + (asn << 20 | name), -2 - org)))
    uniq, inv = np.unique(code, return_inverse=True)
    texts = []
    for u in uniq.tolist():
        if 0 <= u < len(LABELS):
            texts.append(LABELS[u])
        elif u >= 8:
            num, k = (u - 8) >> 20, (u - 8) & ((1 << 20) - 1)
            text = "" if k == 0 else asn_names[k - 1] if k <= len(asn_names) else vec.orgs[k - 1 - len(asn_names)]
            texts.append(f"AS{num} {text}".strip())
        else:
            texts.append(NOT_IN_DB if u == -1 else vec.orgs[-2 - u])
    return inv.ravel(), texts


def _keys_of(geo: GeoDB, kind: str, hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, list[str]] | None:
    """GeoDB.keys_of: each address's country key (kind 'country') or network key ('asn') as Enricher.country_of /
    network_of give it, for many addresses at once: (index into texts per address, texts). The addresses are
    the records' 16-byte keys as two big-endian uint64 halves. None when only single look-ups can answer
    (the database is laid out otherwise than this code reads it)."""
    db, vec = geo._db, geo._vec
    if db is not None and vec is None:
        return None
    if db is None:
        geo.load()
    return _keys_vector(geo, vec if db is not None else None, kind, hi, lo)
