"""AS number and organisation of an address from an offline database installed with the project.

No PyPI package ships IP-to-AS *numbers* (geoip2fast's files name the AS organisation only), so the
numbers come from the `@ip-location-db/asn` package of the npm registry (RouteViews prefix-to-AS, the
five RIRs' delegations and DB-IP's IP-to-ASN Lite, CC BY 4.0). scripts/setup.sh fetches that package's
tarball from the npm registry at install time (no npm needed), checks it against a pinned SHA-256 and
unpacks it into data/ip-location-db-asn/. Nothing is downloaded at run time: without the
folder, AS numbers stay null and the page says why.

The CSV ranges (inclusive, sorted, not overlapping) load once in a background thread into numpy
arrays; a lookup is a binary search. IPv6 keys are two 64-bit halves (a few ranges end inside a /64).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PACKAGE = "@ip-location-db/asn"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "data" / "ip-location-db-asn"
LICENCE = ("AS numbers: ip-location-db 'asn' (RouteViews, NRO and DB-IP IP to ASN Lite data, CC BY 4.0; "
           "IP Geolocation by DB-IP, https://db-ip.com)")
_M64 = (1 << 64) - 1


@dataclass(frozen=True)
class AsInfo:
    """One address's autonomous system."""

    asn: int | None
    org: str | None


def le128(a_hi: np.ndarray, a_lo: np.ndarray, b_hi: np.ndarray, b_lo: np.ndarray) -> np.ndarray:
    """a <= b for 128-bit numbers kept as two uint64 halves."""
    return (a_hi < b_hi) | ((a_hi == b_hi) & (a_lo <= b_lo))


def floor_index(t_hi: np.ndarray, t_lo: np.ndarray, q_hi: np.ndarray, q_lo: np.ndarray) -> np.ndarray:
    """For each 128-bit query (q_hi, q_lo), the index of the last table key <= it (-1: none): bisect_right - 1
    over keys kept as two uint64 columns sorted together, for all queries at once."""
    q_hi, q_lo = np.asarray(q_hi, np.uint64), np.asarray(q_lo, np.uint64)
    lo_b = np.searchsorted(t_hi, q_hi, side="left").astype(np.int64)
    hi_b = np.searchsorted(t_hi, q_hi, side="right").astype(np.int64)
    zero = q_hi == 0
    n0 = int(np.searchsorted(t_hi, np.uint64(0), side="right"))
    if n0 and zero.any():
        # Every IPv4 key shares the upper half 0: one search over that run, not a long binary search each.
        lo_b[zero] = np.searchsorted(t_lo[:n0], q_lo[zero], side="right")
        hi_b[zero] = lo_b[zero]
    # Within each run of equal upper halves (a few keys), a binary search on the lower halves, all at once.
    active = np.nonzero(lo_b < hi_b)[0]
    while len(active):
        mid = (lo_b[active] + hi_b[active]) // 2
        le = t_lo[mid] <= q_lo[active]
        lo_b[active] = np.where(le, mid + 1, lo_b[active])
        hi_b[active] = np.where(le, hi_b[active], mid)
        active = active[lo_b[active] < hi_b[active]]
    return lo_b - 1


class _Table:
    """Sorted inclusive ranges keyed by integers (IPv4) or (hi, lo) 64-bit halves (IPv6)."""

    def __init__(self, start: np.ndarray, end: np.ndarray, asn: np.ndarray, org: np.ndarray,
                 names: list[str], start_lo: np.ndarray | None = None, end_lo: np.ndarray | None = None) -> None:
        self.start, self.end, self.asn, self.org, self.names = start, end, asn, org, names
        self.start_lo, self.end_lo = start_lo, end_lo
        self._named: np.ndarray | None = None  # which organisation names are not empty (find_many)

    def find(self, key: int) -> AsInfo | None:
        """The range holding `key`, or None."""
        if self.start_lo is None:
            # A numpy scalar of the array's own type: a Python int would be compared as float64.
            i = int(np.searchsorted(self.start, self.start.dtype.type(key), side="right")) - 1
            if i < 0 or key > int(self.end[i]):
                return None
        else:
            hi, lo = key >> 64, key & _M64
            # np.uint64, not a Python int: numpy would compare an int with uint64 as float64 and lose the
            # low bits of the upper half (28 % of range ends answered the neighbouring range).
            i = int(np.searchsorted(self.start, np.uint64(hi), side="right")) - 1
            while i >= 0 and int(self.start[i]) == hi and int(self.start_lo[i]) > lo:
                i -= 1  # same upper half, the range starts after the address inside its /64
            if i < 0 or (hi, lo) > (int(self.end[i]), int(self.end_lo[i])):
                return None
        return AsInfo(int(self.asn[i]) or None, self.names[int(self.org[i])] or None)

    def find_many(self, q_hi: np.ndarray, q_lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """find() for many keys at once: (AS number, 0 for none; organisation index into names, -1 for
        none). IPv4 keys are q_lo (q_hi ignored); IPv6 keys are (q_hi, q_lo)."""
        if self.start_lo is None:
            q = q_lo.astype(np.uint64)
            i = np.searchsorted(self.start.astype(np.uint64), q, side="right") - 1
            j = np.maximum(i, 0)
            hit = (i >= 0) & (q <= self.end[j].astype(np.uint64))
        else:
            i = floor_index(self.start, self.start_lo, q_hi, q_lo)
            j = np.maximum(i, 0)
            hit = (i >= 0) & le128(q_hi, q_lo, self.end[j], self.end_lo[j])
        asn = np.where(hit, self.asn[j], 0).astype(np.int64)
        if self._named is None:
            self._named = np.array([bool(n) for n in self.names], bool)
        org = self.org[j].astype(np.int64)
        org = np.where(hit & self._named[org], org, -1)
        return asn, org

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays (names excluded)."""
        arrays = (self.start, self.end, self.asn, self.org, self.start_lo, self.end_lo)
        return sum(a.nbytes for a in arrays if a is not None)


def _read(path: Path, v6: bool) -> _Table:
    """One '-num.csv' file: start,end,asn,"organisation" per line."""
    import pandas as pd
    cols = ["s", "e", "asn", "org"]
    if not v6:
        d = pd.read_csv(path, header=None, names=cols, keep_default_na=False,
                        dtype={"s": np.uint32, "e": np.uint32, "asn": np.uint32, "org": str})
        codes, names = pd.factorize(d["org"])
        return _Table(d["s"].to_numpy(), d["e"].to_numpy(), d["asn"].to_numpy(), codes.astype(np.int32),
                      list(names))
    d = pd.read_csv(path, header=None, names=cols, keep_default_na=False, dtype=str)
    s = [int(x) for x in d["s"]]
    e = [int(x) for x in d["e"]]
    codes, names = pd.factorize(d["org"])
    return _Table(np.array([x >> 64 for x in s], np.uint64), np.array([x >> 64 for x in e], np.uint64),
                  d["asn"].astype(np.uint32).to_numpy(), codes.astype(np.int32), list(names),
                  np.array([x & _M64 for x in s], np.uint64), np.array([x & _M64 for x in e], np.uint64))


class AsnDB:
    """Offline address -> AS lookups; load() starts the one background load, lookup() never waits."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder else DEFAULT_DIR
        self._v4: _Table | None = None
        self._v6: _Table | None = None
        self._lock = threading.Lock()
        self._loading: threading.Thread | None = None
        self._loaded = threading.Event()
        self.error: str | None = None
        self.load_s: float | None = None
        self._names: list[str] | None = None  # both tables' organisation names (lookup_many)
        self.version = ""  # the package's version, e.g. 2.3.2026061719 (its date is the last part)

    def load(self, here: bool = False) -> None:
        """Start loading the database in a background thread, or with `here` in this one (once)."""
        with self._lock:
            if self._loading is not None:
                return
            self._loading = threading.current_thread() if here else \
                threading.Thread(target=self._load, name="asn-load", daemon=True)
        if here:
            self._load()
        else:
            self._loading.start()

    def _load(self) -> None:
        t = time.perf_counter()
        try:
            meta = json.loads((self.folder / "package.json").read_text())
            self.version = str(meta.get("version", ""))
            self._v4 = _read(self.folder / "asn-ipv4-num.csv", v6=False)
            self._v6 = _read(self.folder / "asn-ipv6-num.csv", v6=True)
        except (OSError, ValueError, KeyError) as exc:
            self.error = (f"AS numbers not available: {exc} (scripts/setup.sh installs {PACKAGE} into "
                          f"{self.folder})")
            log.warning("%s", self.error)
        self.load_s = time.perf_counter() - t
        self._loaded.set()

    def wait_loaded(self, timeout: float | None = None, start: bool = True) -> bool:
        """Start the load if needed (`start`) and wait for it; True when the database is ready."""
        if start:
            self.load()
        self._loaded.wait(timeout)
        return self._v4 is not None

    @property
    def ready(self) -> bool:
        """Whether lookups answer (the load finished without an error)."""
        return self._v4 is not None and self._v6 is not None

    @property
    def date(self) -> str:
        """The database's date (YYYY-MM-DD) from the package version (2.3.YYYYMMDDHH), '' if unknown."""
        tail = self.version.rsplit(".", 1)[-1]
        return f"{tail[:4]}-{tail[4:6]}-{tail[6:8]}" if len(tail) >= 8 and tail[:8].isdigit() else ""

    @property
    def nbytes(self) -> int:
        """Memory held by the loaded arrays."""
        return sum(t.nbytes for t in (self._v4, self._v6) if t is not None)

    def lookup(self, packed: bytes) -> AsInfo | None:
        """The AS of a packed address (4 or 16 bytes); None when not loaded or not in the database."""
        if not self.ready:
            self.load()
            return None
        if len(packed) == 4:
            return self._v4.find(int.from_bytes(packed, "big"))
        return self._v6.find(int.from_bytes(packed, "big"))

    def lookup_many(self, v4: np.ndarray, q_hi: np.ndarray, q_lo: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """lookup() for many addresses at once: where `v4`, the IPv4 address is q_lo; else (q_hi, q_lo) is
        the IPv6 address. (AS number, 0 for none; organisation index, -1 for none; the names it indexes):
        the IPv6 indexes follow the IPv4 names. Zeros and -1 throughout when not loaded."""
        n = len(q_lo)
        asn, org = np.zeros(n, np.int64), np.full(n, -1, np.int64)
        if not self.ready:
            return asn, org, []
        for sel, table, shift in ((v4, self._v4, 0), (~v4, self._v6, len(self._v4.names))):
            if sel.any():
                a, o = table.find_many(q_hi[sel], q_lo[sel])
                asn[sel], org[sel] = a, np.where(o >= 0, o + shift, -1)
        if self._names is None or len(self._names) != len(self._v4.names) + len(self._v6.names):
            self._names = self._v4.names + self._v6.names
        return asn, org, self._names

