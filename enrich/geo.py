"""Country and AS organisation from an offline database shipped inside a PyPI package (geoip2fast).

Nothing is downloaded: geoip2fast ships MaxMind GeoLite2 country+ASN data files inside the wheel. The
larger file (IPv4 and IPv6, country and ASN) is loaded once in a background thread, so neither the page nor
the capture waits for it; until it is loaded, public addresses get no country (and the range labels work
at once, from the address alone).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from dataclasses import dataclass

from enrich.asn import LICENCE as ASN_LICENCE
from enrich.asn import AsnDB
from enrich.cache import BoundedCache
from enrich.ranges import range_label

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
        self._loading: threading.Thread | None = None
        self._lock = threading.Lock()
        self._loaded = threading.Event()
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
            self._db = db
        except Exception as exc:
            self.error = f"geo database not loaded: {exc}"
            log.warning("%s", self.error)
        self.load_s = time.perf_counter() - t
        self._loaded.set()
        self.asn.load(here=True)  # then the AS numbers, in this same thread (one loader thread, not two)

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Start the load if needed and wait for it; True when a database is ready."""
        self.load()
        self._loaded.wait(timeout)
        self.asn.wait_loaded(timeout, start=False)  # the geo thread loads it next
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
