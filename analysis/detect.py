"""Anomaly detectors run on every parsed batch inside the capture thread, and the bounded alert book.

Detectors read the packed rows of one batch (never the rolling buffer) and keep per-source state
with a time window, bounded in size: port scans (vertical and horizontal, counting only failed or
unanswered attempts, plus NULL/FIN/Xmas probes), SYN/ICMP/UDP floods against one host, traffic
spikes against an EWMA band, new local hosts after a learning period, and ARP spoofing.
Thresholds live in config.py with where their defaults come from.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from itertools import islice
from typing import Any

import numpy as np
import pandas as pd

import config
import native
from analysis.headers import NON_IP, PACKET_DTYPE, TCP, UDP, LocalMatcher, addr_text, group_rows, parse_nets

SYN, ACK, RST = 0x02, 0x10, 0x04
ETH_ARP = 0x0806
assert PACKET_DTYPE.fields["dst"][1] == PACKET_DTYPE.fields["src"][1] + 16  # _per_second reads both at once


@dataclass(frozen=True)
class Alert:
    """One finding: who, what, the evidence in numbers, and what it means."""

    detector: str  # port_scan, syn_flood, icmp_flood, udp_flood, spike, new_host, arp_spoof
    severity: str  # high, medium, low
    source: str
    target: str
    first_ts: float
    last_ts: float
    count: int
    evidence: str
    meaning: str
    acknowledged: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of the summary's `alerts` list."""
        d = asdict(self)
        d.pop("meaning")
        d.pop("acknowledged")
        return d


class AlertBook:
    """Alerts keyed by (detector, source, target): a repeat updates its row (count, last seen, evidence)."""

    def __init__(self, max_alerts: int | None = None) -> None:
        self.max_alerts = max_alerts or config.get("ALERTS_MAX")
        self._alerts: OrderedDict[tuple[str, str, str], Alert] = OrderedDict()
        self._lock = threading.Lock()

    def raise_alert(self, detector: str, severity: str, source: str, target: str, ts: float, evidence: str,
                    meaning: str, key: tuple[str, str, str] | None = None) -> None:
        """Record a finding, or refresh the row of the same finding (same key: detector, source, target)."""
        key = key or (detector, source, target)
        with self._lock:
            old = self._alerts.pop(key, None)
            if old is None:
                alert = Alert(detector, severity, source, target, ts, ts, 1, evidence, meaning)
            else:
                alert = replace(old, source=source, last_ts=max(old.last_ts, ts), count=old.count + 1,
                                evidence=evidence, severity=severity, acknowledged=False)
            self._alerts[key] = alert
            while len(self._alerts) > self.max_alerts:
                self._alerts.popitem(last=False)

    def alerts(self) -> list[Alert]:
        """All alerts, newest (by last seen) first."""
        with self._lock:
            return sorted(self._alerts.values(), key=lambda a: a.last_ts, reverse=True)

    def acknowledge(self, alert: Alert) -> None:
        """Mark one alert as seen; a new repeat makes it unacknowledged again."""
        with self._lock:
            for key, current in self._alerts.items():
                if current.detector == alert.detector and current.target == alert.target and \
                        current.first_ts == alert.first_ts:
                    self._alerts[key] = replace(current, acknowledged=True)
                    return

    def clear(self) -> None:
        """Forget every alert."""
        with self._lock:
            self._alerts.clear()


class _Bounded(OrderedDict):
    """An insertion-ordered dict that forgets its oldest entries beyond `cap` (LRU when keys are touched)."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap

    def put(self, key: Any, value: Any) -> None:
        """Set key to value at the newest end."""
        self[key] = value
        self.move_to_end(key)  # O(1); one call per flow per batch, so it matters
        self._trim()

    def keep(self, key: Any, value: Any) -> None:
        """Move key to the newest end, keeping its value; set it to `value` if it is new."""
        # A membership test, not try/except KeyError: most keys of a scan are new, and raising costs more.
        if key in self:
            self.move_to_end(key)
        else:
            self[key] = value
            self._trim()

    def touch(self, key: Any, default_factory) -> Any:
        """The value for key (created if missing), moved to the newest end."""
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = default_factory()
        self._trim()
        return value

    def _trim(self) -> None:
        while len(self) > self.cap:
            self.popitem(last=False)


class Detectors:
    """Per-source detector state for one capture; observe() is called with each parsed batch."""

    def __init__(self) -> None:
        cap = config.get("DETECTOR_STATE_MAX")
        self.window = config.get("SCAN_WINDOW_S")
        self.vports = config.get("SCAN_PORTS")
        self.vhosts = config.get("SCAN_HOSTS")
        self.stealth_ports = config.get("SCAN_STEALTH_PORTS")
        self.timeout = config.get("SCAN_UNANSWERED_S")
        self.pending = _Bounded(cap)  # (scanner, target, proto, port) -> probe time
        self.failed_ports = _Bounded(cap)  # (scanner, target) -> {port: last failure time}
        self.failed_hosts = _Bounded(cap)  # (scanner, proto, port) -> {target: last failure time}
        self.answered = _Bounded(cap)  # (scanner, target) -> attempts that were answered
        self.stealth = _Bounded(cap)  # (scanner, target) -> {port: time} of NULL/FIN/Xmas probes
        self.arp = _Bounded(cap)  # IPv4 address -> (MAC, time)
        self.served = _Bounded(cap)  # (address, proto, port) that received probes -> time: its replies are no probes
        self.rates = _Bounded(cap)  # (kind, address) -> [second, packets that second, distinct sources]
        self.flood_pps = {"syn": config.get("SYN_FLOOD_PPS"), "icmp": config.get("ICMP_FLOOD_PPS"),
                          "udp": config.get("UDP_FLOOD_PPS")}
        self.spike_k = config.get("SPIKE_SIGMAS")
        self.spike_min = config.get("SPIKE_MIN_PPS")
        self.spike_warmup = config.get("SPIKE_WARMUP_S")
        self.spike_state: list[float] | None = None  # [second, packets, bytes] being counted
        self.baseline = {"pk": [0.0, 0.0], "by": [0.0, 0.0]}  # EWMA mean and variance per metric
        self.seconds_seen = 0
        self.active_seconds = 0  # seconds that had traffic: the new-host learning clock
        self.learn_end = float("inf")  # capture time when NEW_HOST_LEARN_S seconds of traffic were learned
        self.hosts = _Bounded(cap)  # address -> first seen
        self.local_nets = LocalMatcher(nets=parse_nets(config.get("LOCAL_NETS")))
        self.learn = config.get("NEW_HOST_LEARN_S")

    def observe(self, arr: np.ndarray, book: AlertBook) -> None:
        """Update the state with one batch and raise what it shows."""
        if not len(arr):
            return
        # Multicast and broadcast are one-way by nature: never probes.
        unicast = ~_group(arr["dst"])
        # Per flow, not per packet: a flood of one flow costs one step, whatever its rate.
        flags = arr["tcp_flags"]
        # Only packets that open, answer or refuse a connection matter; skip the data flow.
        opening = ((flags & (SYN | ACK)) != ACK) | ((flags & RST) != 0)
        cls = arr["cls"]
        tcp = _distinct(arr, (cls == TCP) & unicast & opening, PROBE_PORT)
        if len(tcp):
            self._tcp(tcp, book)
        udp_or_icmp = _distinct(arr, ((cls == UDP) & unicast) | ((arr["icmp_type"] == 3) & (arr["proto"] == 1)),
                                SERVICE_PORT)
        if len(udp_or_icmp):
            self._udp(udp_or_icmp, book)
        arp = arr.take(np.flatnonzero((cls == NON_IP) & (arr["ethertype"] == ETH_ARP) & (arr["arp_op"] > 0)))
        if len(arp):
            self._arp(arp, book)
        self._expire(float(arr["ts"].max()), book)
        sec = np.floor(arr["ts"]).astype(np.int64)  # each packet's second, for both
        self._floods(arr, unicast, sec, book)
        self._spike(arr, sec, book)
        self._new_hosts(arr, book)

    # -- port scans ---------------------------------------------------------------------

    def _tcp(self, rows: np.ndarray, book: AlertBook) -> None:
        pending = self.pending
        pop = pending.pop
        for ts, src, dst, sport, dport, fl in zip(rows["ts"].tolist(), rows["src"].tolist(), rows["dst"].tolist(),
                                                  rows["sport"].tolist(), rows["dport"].tolist(),
                                                  rows["tcp_flags"].tolist()):
            if fl & RST:
                if pop((dst, src, "tcp", sport), None) is not None:
                    self._failed(dst, src, "tcp", sport, ts, book)
                continue
            if fl & ACK:  # with SYN (the rows are SYN, SYN-ACK, RST or no SYN and no ACK)
                if pop((dst, src, "tcp", sport), None) is not None:
                    self._answered(dst, src)
                continue
            pending.keep((src, dst, "tcp", dport), ts)
            if not fl & SYN:  # NULL, FIN or Xmas: no client sends these, scanners do (nmap -sN/-sF/-sX)
                probes = self.stealth.touch((src, dst), dict)
                probes[dport] = ts
                if len(probes) >= self.stealth_ports:
                    kinds = len(probes)
                    book.raise_alert("port_scan", "high", addr_text(src), addr_text(dst), ts,
                                     f"{kinds} NULL/FIN/Xmas probes to {kinds} ports on {addr_text(dst)}",
                                     "TCP packets with no SYN and no ACK are only sent by port scanners "
                                     "(nmap -sN/-sF/-sX): find the program on the source host.")

    def _udp(self, rows: np.ndarray, book: AlertBook) -> None:
        # One step per UDP service flow of the batch, the detectors' hottest loop, so keep() and put()
        # are written out inline: a method call per flow costs as much as the dict operation itself.
        pending, served = self.pending, self.served
        pop, move, evict, cap = pending.pop, pending.move_to_end, pending.popitem, pending.cap
        served_move, served_evict, served_cap = served.move_to_end, served.popitem, served.cap
        for ts, src, dst, sport, dport, cls in zip(rows["ts"].tolist(), rows["src"].tolist(), rows["dst"].tolist(),
                                                   rows["sport"].tolist(), rows["dport"].tolist(),
                                                   rows["cls"].tolist()):
            if cls != UDP:  # ICMP unreachable from the target: its probe failed (the quote's port is not
                # parsed, so take the oldest of the pair's recent open probes)
                probe = None
                for k in islice(reversed(pending), 512):
                    if k[0] == dst and k[1] == src and k[2] == "udp":
                        probe = k
                if probe is not None:
                    del pending[probe]
                    self._failed(dst, src, "udp", probe[3], ts, book)
                continue
            if dport < 0:
                continue
            if pop((dst, src, "udp", sport), None) is not None:
                self._answered(dst, src)  # a reply from the probed port
            elif (src, "udp", sport) not in served:  # a server's late or duplicate reply is no probe
                key = (src, dst, "udp", dport)
                if key in pending:  # pending.keep(key, ts)
                    move(key)
                else:
                    pending[key] = ts
                    if len(pending) > cap:
                        evict(last=False)
                key = (dst, "udp", dport)  # served.put(key, ts)
                served[key] = ts
                served_move(key)
                if len(served) > served_cap:
                    served_evict(last=False)

    def _answered(self, scanner: bytes, target: bytes) -> None:
        key = (scanner, target)
        self.answered[key] = self.answered.get(key, 0) + 1

    def _failed(self, scanner: bytes, target: bytes, proto: str, port: int, ts: float, book: AlertBook) -> None:
        ports = self.failed_ports.touch((scanner, target), dict)
        ports[(proto, port)] = ts
        hosts = self.failed_hosts.touch((scanner, proto, port), dict)
        hosts[target] = ts
        for table in (ports, hosts):
            for k in [k for k, t in table.items() if t < ts - self.window]:
                del table[k]
        if len(ports) >= self.vports:
            first = min(ports.values())
            answered = self.answered.get((scanner, target), 0)
            book.raise_alert(
                "port_scan", "medium", addr_text(scanner), addr_text(target), ts,
                f"{len(ports)} ports on {addr_text(target)} failed or went unanswered in {ts - first:.0f} s, "
                f"{answered} answered",
                "One host probing many ports of another is a vertical port scan: check whether the source "
                "is an authorised scanner, else what runs on it.")
        if len(hosts) >= self.vhosts:
            first = min(hosts.values())
            book.raise_alert(
                "port_scan", "medium", addr_text(scanner), f"{proto}/{port}", ts,
                f"{len(hosts)} hosts refused or ignored {proto}/{port} in {ts - first:.0f} s",
                "One host trying the same port on many hosts is a horizontal scan (a sweep or a worm): "
                "check the source host.")

    def _expire(self, now: float, book: AlertBook) -> None:
        """Probes with no answer after SCAN_UNANSWERED_S count as failed attempts."""
        stale = []
        for key, ts in self.pending.items():
            if ts > now - self.timeout:
                break  # insertion order is time order (touch moves to the end)
            stale.append((key, ts))
        for key, ts in stale:
            del self.pending[key]
            scanner, target, proto, port = key
            self._failed(scanner, target, proto, port, ts, book)

    # -- floods -------------------------------------------------------------------------

    def _floods(self, arr: np.ndarray, unicast: np.ndarray, sec: np.ndarray, book: AlertBook) -> None:
        """SYN, ICMP echo and UDP packets per second to one destination, with their distinct sources."""
        flags = arr["tcp_flags"]
        syn = (arr["cls"] == TCP) & ((flags & (SYN | ACK)) == SYN)
        synack = (arr["cls"] == TCP) & ((flags & (SYN | ACK)) == (SYN | ACK))
        echo = ((arr["proto"] == 1) & (arr["icmp_type"] == 8)) | ((arr["proto"] == 58) & (arr["icmp_type"] == 128))
        udp = (arr["cls"] == UDP) & unicast
        answered = _per_second(arr, synack, sec, by="src")
        for kind, mask in (("syn", syn & unicast), ("icmp", echo & unicast), ("udp", udp)):
            if not mask.any():
                continue
            for (dst, second), (n, sources) in _per_second(arr, mask, sec).items():
                state = self.rates.touch((kind, dst), lambda s=second: [s, 0, 0, 0])
                if state[0] != second:
                    state[:] = [second, 0, 0, 0]
                state[1] += n
                state[2] = max(state[2], sources)
                if kind == "syn":
                    state[3] += answered.get((dst, second), (0, 0))[0]
                self._check_flood(kind, dst, state, book)

    def _check_flood(self, kind: str, dst: bytes, state: list, book: AlertBook) -> None:
        second, n, sources, completed = state
        if n < self.flood_pps[kind]:
            return
        if kind == "syn" and completed > n * 0.1:
            return  # a busy server that answers is not flooded
        target = addr_text(dst)
        what = {"syn": "SYNs", "icmp": "ICMP echo requests", "udp": "UDP packets"}[kind]
        extra = f", {completed / n:.0%} answered with SYN-ACK" if kind == "syn" else ""
        spoofed = " (many sources: likely spoofed)" if sources >= 100 else ""
        meaning = {"syn": "A SYN flood exhausts the target's half-open connections: check SYN cookies and "
                          "rate limits upstream.",
                   "icmp": "An ICMP flood saturates the target's link or CPU: rate-limit ICMP upstream.",
                   "udp": "A UDP flood saturates the target's link or service: find the sources and filter them."}
        book.raise_alert(f"{kind}_flood", "high", f"{sources} source(s)", target, float(second),
                         f"{n:,} {what} to {target} in 1 s from {sources} source(s){extra}{spoofed}",
                         meaning[kind], key=(f"{kind}_flood", "", target))

    # -- traffic spike --------------------------------------------------------------------

    def _spike(self, arr: np.ndarray, sec: np.ndarray, book: AlertBook) -> None:
        """Packets/s and bits/s against an EWMA band learned per second, after a warm-up."""
        # A hash of the seconds (pd.factorize), then the few distinct seconds sorted: np.unique sorts them all.
        inv, secs = pd.factorize(sec)
        pk = np.bincount(inv, minlength=len(secs))
        by = np.bincount(inv, arr["wire_len"].astype(np.float64), len(secs))
        order = np.argsort(secs)
        for second, p, b in zip(secs[order].tolist(), pk[order].tolist(), by[order].tolist()):
            cur = self.spike_state
            if cur is None:
                self.spike_state = [second, p, b]
            elif second == cur[0]:
                cur[1] += p
                cur[2] += b
            elif second > cur[0]:
                self._close_second(cur, book)
                # Silent seconds between count as zeros, up to an hour (a file may jump by years).
                for _ in range(min(second - cur[0] - 1, 3600)):
                    self._learn(0.0, 0.0)
                self.spike_state = [second, p, b]

    def _close_second(self, cur: list, book: AlertBook) -> None:
        second, p, b = cur
        self.active_seconds += 1
        if self.active_seconds == self.learn:
            self.learn_end = second + 1.0
        mean_p, var_p = self.baseline["pk"]
        mean_b, var_b = self.baseline["by"]
        if self.seconds_seen >= self.spike_warmup:
            for name, value, mean, var in (("packets/s", p, mean_p, var_p), ("bit/s", b * 8, mean_b * 8, var_b * 64)):
                band = mean + self.spike_k * var ** 0.5
                if value > band and value > 3 * mean and p >= self.spike_min:
                    book.raise_alert("spike", "medium", "all traffic", name, float(second),
                                     f"{value:,.0f} {name} against a usual {mean:,.0f} (band up to {band:,.0f})",
                                     "Traffic left its learned band: look at the top talkers and conversations "
                                     "of that second.", key=("spike", "", name))
        self._learn(float(p), float(b))

    def _learn(self, p: float, b: float) -> None:
        alpha = 2 / (min(self.spike_warmup, 300) + 1)
        for name, value in (("pk", p), ("by", b)):
            mean, var = self.baseline[name]
            if self.seconds_seen == 0:
                self.baseline[name] = [value, 0.0]
                continue
            diff = value - mean
            mean += alpha * diff
            var = (1 - alpha) * (var + alpha * diff * diff)
            self.baseline[name] = [mean, var]
        self.seconds_seen += 1

    # -- new hosts ------------------------------------------------------------------------

    def _new_hosts(self, arr: np.ndarray, book: AlertBook) -> None:
        """An IP address that starts talking after the learning period."""
        ip = np.flatnonzero(arr["cls"] != NON_IP)  # row numbers: copying whole rows costs more than the rest
        if not len(ip):
            return
        first, _ = group_rows(np.ascontiguousarray(arr["src"][ip]).view(np.uint8).reshape(-1, 16))
        rows = ip[first]
        srcs = np.ascontiguousarray(arr["src"][rows]).view("V16").ravel()
        # Devices of the local networks (LOCAL_NETS) only: on the Internet side every new peer is "new".
        local = self.local_nets.kinds(srcs) == LocalMatcher.OURS
        for src, i in zip(srcs[local].tolist(), rows[local].tolist()):
            src = bytes(src)
            if src in self.hosts or src in _UNSPECIFIED:
                continue
            ts = float(arr["ts"][i])
            self.hosts.put(src, ts)
            # The clock is seconds that had traffic, so a file's jump in time teaches nothing.
            if ts >= self.learn_end:
                book.raise_alert("new_host", "low", addr_text(src), addr_text(arr["dst"][i]), ts,
                                 f"{addr_text(src)} sent its first packet after {self.active_seconds:,} seconds "
                                 f"of traffic (learning period {self.learn:g} s)",
                                 "A device or address not seen before: check that it belongs on this network.")

    # -- ARP ----------------------------------------------------------------------------

    def _arp(self, rows: np.ndarray, book: AlertBook) -> None:
        """ARP rows in time order: a MAC that differs from the address's last known one may be spoofing.

        Only rows whose MAC differs from their address's previous row (or, for an address's first row
        of the batch, from the state) can raise, so only those are stepped through; an ARP storm of one
        address costs one step, not one per packet."""
        src = np.ascontiguousarray(rows["src"]).view(np.uint8).reshape(-1, 16)
        mac = np.ascontiguousarray(rows["hw_src"]).view(np.uint8).reshape(-1, 6)
        named = np.flatnonzero(src.any(axis=1) & mac.any(axis=1))  # rows that give an address and a MAC
        if not len(named):
            return
        rows, src, mac = rows.take(named), src[named], mac[named]
        _, codes = group_rows(src)
        order = np.argsort(codes, kind="stable")  # by address, then time
        same = np.zeros(len(order), bool)  # the previous row (in that order) is of the same address
        same[1:] = codes[order[1:]] == codes[order[:-1]]
        changed = np.ones(len(order), bool)
        changed[1:] = (mac[order[1:]] != mac[order[:-1]]).any(axis=1)
        step = ~same | changed
        prev = np.where(same, np.concatenate(([-1], order[:-1])), -1)[step]
        cand = order[step]
        by_time = np.argsort(cand, kind="stable")
        cand, prev = cand[by_time], prev[by_time]
        ts, ops = rows["ts"], rows["arp_op"]
        dst = rows["dst"]
        ips = rows["src"][cand].tolist()
        for i, p, ip in zip(cand.tolist(), prev.tolist(), ips):
            now = bytes(mac[i])
            known = self.arp.get(ip) if p < 0 else (bytes(mac[p]), float(ts[p]))
            op = int(ops[i])
            if known is not None and known[0] != now and op in (1, 2):
                t = float(ts[i])
                kind = "gratuitous ARP" if ip == dst[i] else ("ARP reply" if op == 2 else "ARP request")
                # One row per address however many MACs claim it (a fuzzer or a flood cycles through many).
                book.raise_alert(
                    "arp_spoof", "high", _mac(now), addr_text(ip), t,
                    f"{kind} says {addr_text(ip)} is at {_mac(now)}; it was at {_mac(known[0])} "
                    f"{t - known[1]:.0f} s before",
                    "An address whose MAC changes may be ARP spoofing (a man in the middle): check which "
                    "device owns that MAC; a replaced NIC or a failover also does this.",
                    key=("arp_spoof", "", addr_text(ip)))
        # The state: each address's last row, put in the order of those rows, as one put per row would leave it.
        last = np.ones(len(order), bool)
        last[:-1] = ~same[1:]
        lasts = np.sort(order[last])
        for i, ip in zip(lasts.tolist(), rows["src"][lasts].tolist()):
            self.arp.put(ip, (bytes(mac[i]), float(ts[i])))


_UNSPECIFIED = (bytes(16), bytes(10) + b"\xff\xff" + bytes(4))  # :: and 0.0.0.0 (DHCP, DAD)


BOTH_PORTS, SERVICE_PORT, PROBE_PORT = 0, 1, 2  # which ports a flow key keeps (flow_keys_numpy)


def _distinct(arr: np.ndarray, mask: np.ndarray, ports: int = BOTH_PORTS) -> np.ndarray:
    """The first packet of each (addresses, ports, protocol, TCP flags, ICMP type) among arr[mask], in time order.

    Only the ports the detector keys its state on count (see flow_keys_numpy), so a scan or a
    flood from random source ports costs one step per probed port, not one per packet."""
    idx = np.flatnonzero(mask)
    if len(idx) < 2:
        return arr.take(idx)
    key = native.flow_keys(arr, ports, idx)
    first, _ = group_rows(key if key is not None else flow_keys_numpy(arr.take(idx), ports))
    # take(), never arr[idx]: fancy indexing of structured rows is 30x slower than take.
    return arr.take(idx[first])


def flow_keys_numpy(rows: np.ndarray, ports: int = BOTH_PORTS) -> np.ndarray:
    """_distinct's keys without the compiled helper (its reference).

    ports: BOTH_PORTS as they are; SERVICE_PORT both the lower of the two (the service's, for UDP:
    clients that pick a new source port for every query are one flow); PROBE_PORT only the port a
    TCP probe is keyed on (the destination port, or the source port of a RST or an ACK, which
    answer a probe), the other 0."""
    sport, dport = rows["sport"], rows["dport"]
    if ports == SERVICE_PORT:
        sport = dport = np.minimum(sport, dport)
    elif ports == PROBE_PORT:
        answer = (rows["tcp_flags"] & (RST | ACK)) != 0
        sport, dport = np.where(answer, sport, 0), np.where(answer, 0, dport)
    key = np.empty((len(rows), 44), np.uint8)
    key[:, :16] = np.ascontiguousarray(rows["src"]).view(np.uint8).reshape(-1, 16)
    key[:, 16:32] = np.ascontiguousarray(rows["dst"]).view(np.uint8).reshape(-1, 16)
    key[:, 32:36] = sport.astype("<i4").view(np.uint8).reshape(-1, 4)
    key[:, 36:40] = dport.astype("<i4").view(np.uint8).reshape(-1, 4)
    key[:, 40:42] = rows["tcp_flags"].astype("<u2").view(np.uint8).reshape(-1, 2)
    key[:, 42] = rows["cls"]
    key[:, 43] = rows["icmp_type"].astype(np.uint8)
    return key


def _per_second(arr: np.ndarray, mask: np.ndarray, secs: np.ndarray, by: str = "dst") -> dict:
    """{(address `by`, second): (packets, distinct peers)} over the packets arr[mask] (secs: their seconds).

    The peers are the other end: sources when `by` is "dst", destinations when it is "src"."""
    idx = np.flatnonzero(mask)
    if not len(idx):
        return {}
    # (src, dst, second) rows: src and dst are adjacent in the record, so one gather takes both.
    arr = np.ascontiguousarray(arr)
    ends = np.ndarray((len(arr),), "V32", arr, PACKET_DTYPE.fields["src"][1], (PACKET_DTYPE.itemsize,))
    rows = np.empty((len(idx), 40), np.uint8)
    rows[:, :32] = ends[idx].view(np.uint8).reshape(-1, 32)
    rows[:, 32:] = secs[idx].astype("<i8").view(np.uint8).reshape(-1, 8)
    # Group the distinct (source, address, second) first, then those into (address, second):
    # a flood of one flow is one row at the second step.
    first, inv = group_rows(rows)
    triples = rows[first]
    pairs = triples[:, 16:] if by == "dst" else np.concatenate((triples[:, :16], triples[:, 32:]), axis=1)
    pair_first, pair_inv = group_rows(np.ascontiguousarray(pairs))
    counts = np.bincount(pair_inv, np.bincount(inv, minlength=len(first)), len(pair_first)).astype(np.int64)
    distinct = np.bincount(pair_inv, minlength=len(pair_first))
    out = {}
    for u, n, d in zip(pairs[pair_first].view("V24").ravel(), counts.tolist(), distinct.tolist()):
        b = bytes(u)
        out[(b[:16].rstrip(b"\x00"), int.from_bytes(b[16:], "little", signed=True))] = (n, d)
    return out


def _group(dst: np.ndarray) -> np.ndarray:
    """Multicast or broadcast destinations (IPv4 224.0.0.0 and up, IPv6 ff00::/8)."""
    # As two big-endian 64-bit words: whole-word tests, not per-byte reductions over a 2-D array.
    words = np.ascontiguousarray(dst).view(">u8").reshape(-1, 2)
    hi, lo = words[:, 0], words[:, 1]
    v4 = (hi == 0) & ((lo >> np.uint64(32)) == 0xFFFF)  # ::ffff:a.b.c.d
    return np.where(v4, ((lo >> np.uint64(24)) & np.uint64(0xFF)) >= 224, (hi >> np.uint64(56)) == 0xFF)


def _mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac.ljust(6, b"\x00"))
