"""Who is on the other end: host names, services, countries and networks, local processes, device makers.

One `Enricher` holds the five look-ups. None of its methods waits on the network: reverse DNS runs in its
own bounded pool (names.py), the geo database loads in a background thread (geo.py), the process table is
re-read by its own thread (processes.py). Every cache is bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np

import config
from capture.heap import release_gc
from enrich.geo import LICENCE, GeoDB, GeoInfo
from enrich.names import ReverseDNS
from enrich.oui import OUI
from enrich.processes import UNKNOWN, ProcessTable, shared_table
from enrich.ranges import range_label
from enrich.services import Services

log = logging.getLogger(__name__)

__all__ = ["LICENCE", "UNKNOWN", "Enricher", "GeoInfo", "range_label"]


def _addr_of(entry: dict[str, Any]) -> str:
    # The engine's top tables have said both "addr" and "address"; accept either.
    return str(entry.get("address", entry.get("addr", "")))


class Enricher:
    """The facade the page and the CLI use."""

    def __init__(self, reverse_dns: bool | None = None, dns_server: str | None = None,
                 rdns_timeout_s: float | None = None, processes: bool = True) -> None:
        on = config.get("REVERSE_DNS") if reverse_dns is None else reverse_dns
        self.names = ReverseDNS(
            enabled=bool(on), server=config.get("DNS_SERVER") if dns_server is None else dns_server,
            timeout_s=config.get("RDNS_TIMEOUT_S") if rdns_timeout_s is None else rdns_timeout_s,
            ttl_s=config.get("RDNS_TTL_S"), workers=config.get("RDNS_WORKERS"),
            cache_max=config.get("ENRICH_CACHE_MAX"), queue_max=config.get("RDNS_QUEUE_MAX"))
        self.geo = GeoDB(cache_max=config.get("ENRICH_CACHE_MAX"))
        self.services = Services()
        self.oui = OUI()
        self.processes = shared_table() if processes else ProcessTable(refresh_s=config.get("PROCESS_REFRESH_S"))
        self._want_processes = processes

    def start(self) -> None:
        """Start the background parts: the geo load and the process table refresh."""
        self.geo.load()
        if self._want_processes:
            self.processes.start()

    def stop(self) -> None:
        """Stop every background thread (safe to call twice); its databases go back to the garbage collector
        (with every other frozen object of the process: capture.heap.release_gc)."""
        self.names.stop()
        self.processes.stop()
        release_gc()

    # ---- one address ----
    def address(self, addr: str) -> dict[str, Any]:
        """{country, asn, as_org} and, with reverse DNS on, name (None while queued, '' after a failure)."""
        g = self.geo.lookup(addr)
        out: dict[str, Any] = {"country": g.country, "asn": g.asn, "as_org": g.as_org}
        if self.names.enabled:
            out["name"] = self.names.lookup_nowait(addr)
        return out

    def name_text(self, addr: str) -> str:
        """The host name for display ('' when unknown, '…' while the lookup is queued)."""
        if not self.names.enabled or not addr:
            return ""
        n = self.names.lookup_nowait(addr)
        return "…" if n is None else n

    # ---- the CLI's summary ----
    def enrich_summary(self, summary: dict[str, Any], wait_s: float = 10.0) -> dict[str, Any]:
        """Add country/asn/as_org (and name) to the top address lists and a service to each port pair."""
        self.geo.wait_loaded(60)
        lists = [k for k in ("top10_src_by_packets", "top10_dst_by_packets", "top10_src_by_bytes") if k in summary]
        addrs = sorted({_addr_of(e) for k in lists for e in summary[k]})
        names = self.names.resolve_all(addrs, wait_s) if self.names.enabled else {}
        for k in lists:
            for e in summary[k]:
                a = _addr_of(e)
                g = self.geo.lookup(a)
                e.update(country=g.country, asn=g.asn, as_org=g.as_org)
                if self.names.enabled:
                    e["name"] = names.get(a) or None
        for key, proto in (("top10_tcp_dst_ports", "tcp"), ("top10_udp_dst_ports", "udp")):
            for pair in summary.get(key, []):
                pair.append(self.services.name(pair[0], proto))
        summary["enrichment"] = self.about()
        return summary

    def about(self) -> dict[str, Any]:
        """Where the answers come from (database, its date, licence) and the pools' counters."""
        s = self.names.stats
        asn = self.geo.asn
        return {"geo_database": self.geo.source, "geo_date": self.geo.date, "geo_licence": LICENCE,
                "geo_error": self.geo.error, "asn_database": f"{asn.folder.name} {asn.version}".strip(),
                "asn_date": asn.date, "asn_error": asn.error, "services": self.services.origin,
                "reverse_dns": self.names.enabled,
                "rdns": {"queued": s.queued, "sent": s.sent, "answered": s.answered, "failed": s.failed,
                         "timed_out": s.timed_out, "dropped_queue_full": s.dropped_queue_full},
                "process_error": self.processes.error, "oui_error": self.oui.error}

    # ---- aggregate views ----
    def by_country(self, src: Iterable[dict[str, Any]], dst: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per country (or range label): what its addresses sent (as sources) and received (as destinations)."""
        return self._group(src, dst, self.country_of)

    def by_network(self, src: Iterable[dict[str, Any]], dst: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per AS (number and organisation, or range label): what its addresses sent and received."""
        return self._group(src, dst, self.network_of)

    def country_of(self, addr: str) -> str:
        """An address's key in the countries view (its bar, and a country= filter)."""
        return self.geo.lookup(addr).country or "not in database"

    def network_of(self, addr: str) -> str:
        """An address's key in the networks (AS) view (its bar, and an asn= filter)."""
        g = self.geo.lookup(addr)
        if g.asn is not None:
            return f"AS{g.asn} {g.as_org or ''}".strip()
        return g.as_org or (g.country if g.country in ("private", "loopback", "link-local", "multicast",
                                                       "reserved") else "not in database")

    @staticmethod
    def _group(src: Iterable[dict[str, Any]], dst: Iterable[dict[str, Any]], key) -> list[dict[str, Any]]:
        """Sums per key, each end apart: a packet between two keys is sent by one and received by the other,
        so adding 'sent' and 'received' would count it twice. `approx` when a row's count is a bound."""
        acc: dict[str, dict[str, Any]] = {}
        for end, rows in (("sent", src), ("received", dst)):
            for r in rows:
                addr = _addr_of(r)
                v = acc.setdefault(key(addr), {"sent_packets": 0, "sent_bytes": 0, "received_packets": 0,
                                               "received_bytes": 0, "addrs": set(), "approx": False})
                v[f"{end}_packets"] += int(r.get("packets", 0))
                v[f"{end}_bytes"] += int(r.get("bytes", 0))
                v["addrs"].add(addr)
                v["approx"] |= bool(r.get("approx"))
        out = [{"key": k, **{f: v[f] for f in ("sent_packets", "sent_bytes", "received_packets", "received_bytes",
                                                "approx")}, "addresses": len(v["addrs"])} for k, v in acc.items()]
        out.sort(key=lambda r: (-max(r["sent_packets"], r["received_packets"]), r["key"]))
        return out

    def by_process(self, packets: np.ndarray) -> list[dict[str, Any]]:
        """Packets, bytes and connections per local process over packet rows (PACKET_DTYPE), largest first.

        A packet counts once for each local process at either end (a process talking to another on
        the same machine counts for both); local TCP/UDP traffic whose port has no owner is 'unknown'.
        """
        from enrich.attribution import by_process
        return by_process(packets, self.processes)


_SHARED: list[Enricher] = []


def shared() -> Enricher:
    """The process-wide Enricher (one per process, like the capture engine), started on first use."""
    if not _SHARED:
        e = Enricher()
        e.start()
        _SHARED.append(e)
    return _SHARED[0]


def stop_shared() -> None:
    """Stop and forget the process-wide Enricher (tests, and a change of settings)."""
    while _SHARED:
        _SHARED.pop().stop()
