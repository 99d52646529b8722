"""Threshold back-test: fresh detectors run over the buffered packets with each candidate threshold,
to see how many alerts a setting would have raised, and when, before applying it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import config
from analysis.detect import AlertBook, Detectors

log = logging.getLogger(__name__)

# Which detector each threshold belongs to (analysis/detect.py THRESHOLDS).
DETECTOR_OF = {"SCAN_PORTS": "port_scan", "SCAN_HOSTS": "port_scan", "SCAN_STEALTH_PORTS": "port_scan",
               "SYN_FLOOD_PPS": "syn_flood", "ICMP_FLOOD_PPS": "icmp_flood", "UDP_FLOOD_PPS": "udp_flood",
               "REFLECTION_BPS": "reflection", "REFLECTION_SOURCES": "reflection", "SPIKE_SIGMAS": "spike",
               "SPIKE_MIN_PPS": "spike", "SPIKE_WARMUP_S": "spike", "NEW_HOST_LEARN_S": "new_host"}
BATCH = 4096  # packets per observe(): the detectors' results do not depend on where batches end
# The thresholds a stored range can be back-tested with: the spike detector reads only each second's packets
# and wire bytes of all traffic, which the history store keeps per second. The others need what it does not.
HISTORY_SETTINGS = ("SPIKE_SIGMAS", "SPIKE_MIN_PPS", "SPIKE_WARMUP_S")
# The flood thresholds over a stored range: the store keeps each second's packets per protocol class, not
# per destination, so a flood can be bounded from it, not replayed: a destination reaches N packets of the
# class in a second only where the second's whole class did (the detector counts a subset: SYNs of the TCP
# packets, echo requests of the ICMP ones, unicast UDP of the UDP ones).
FLOOD_CLASSES = {"SYN_FLOOD_PPS": ("tcp",), "ICMP_FLOOD_PPS": ("icmp", "icmpv6"), "UDP_FLOOD_PPS": ("udp",)}
NOT_FROM_HISTORY = {
    "port_scan": "each failed or unanswered attempt (TCP flags, whether and how it was answered, per source, "
                 "target and port; the stored per-minute conversations keep neither flags nor direction)",
    "syn_flood": "SYNs and SYN-ACKs per destination per second with their distinct sources",
    "icmp_flood": "ICMP echo requests per destination per second with their distinct sources",
    "udp_flood": "UDP packets per destination per second with their distinct sources",
    "reflection": "UDP answers per victim per second with their reflector ports and sources, and the requests "
                  "they answer (the stored conversations are per minute and keep no direction)",
    "new_host": "each local address's first packet",
}


@dataclass
class Trial:
    """What one threshold value would have raised over the packets."""

    value: float
    alerts: list = field(default_factory=list)  # Alert rows of the setting's detector, first raised first

    @property
    def rows(self) -> int:
        """Distinct alerts (a repeat of the same finding updates its row, as on the page)."""
        return len(self.alerts)

    @property
    def raised(self) -> int:
        """Times raised, repeats included."""
        return sum(a.count for a in self.alerts)


def running(engine) -> tuple[dict[str, Any], frozenset[str]]:
    """The thresholds and switches the running capture's detectors use (the page's AlertControls)."""
    controls = getattr(engine, "controls", None)
    if controls is None:
        return {}, frozenset()
    with controls._lock:  # set_detectors swaps both under it
        return dict(controls.overrides), frozenset(controls.disabled)


def run(rows: np.ndarray, setting: str, value: float, batch: int = BATCH, overrides: dict[str, Any] | None = None,
        disabled: Iterable[str] = ()) -> Trial:
    """Fresh detectors set as the running ones (`overrides`, `disabled`) with one threshold changed, fed the
    rows in capture-time order; the setting's own detector runs even when switched off now."""
    if setting not in DETECTOR_OF:
        raise ValueError(f"{setting} is not a detector threshold (one of {', '.join(DETECTOR_OF)})")
    kind = type(config.get(setting))
    detectors = Detectors(overrides={**(overrides or {}), setting: kind(value)},
                          disabled=frozenset(disabled) - {DETECTOR_OF[setting]})
    book = AlertBook(max_alerts=1 << 30, per_detector=1 << 30)
    ordered = rows[np.argsort(rows["ts"], kind="stable")] if len(rows) else rows
    for i in range(0, len(ordered), batch):
        detectors.observe(ordered[i:i + batch], book)
    mine = [a for a in book.alerts() if a.detector == DETECTOR_OF[setting]]
    return Trial(kind(value), sorted(mine, key=lambda a: (a.first_ts, a.source, a.target)))


def run_seconds(seconds: tuple[np.ndarray, np.ndarray, np.ndarray], setting: str, value: float,
                overrides: dict[str, Any] | None = None, disabled: Iterable[str] = ()) -> Trial:
    """A spike threshold tried over stored per-second totals (seconds ascending, packets, wire bytes): the
    running detector's own per-second code, fed what the store keeps instead of the packets."""
    if setting not in HISTORY_SETTINGS:
        why = NOT_FROM_HISTORY.get(DETECTOR_OF[setting])
        raise ValueError(f"{setting} cannot be replayed over the history: " + (
            f"its detector needs {why}, which the store does not keep" if why else
            "the store keeps its protocol's packets per second, not per destination (flood_bound bounds it)"))
    kind = type(config.get(setting))
    detectors = Detectors(overrides={**(overrides or {}), setting: kind(value)},
                          disabled=frozenset(disabled) - {"spike"})
    book = AlertBook(max_alerts=1 << 30, per_detector=1 << 30)
    detectors.spike_seconds(*seconds, book)
    mine = [a for a in book.alerts() if a.detector == "spike"]
    return Trial(kind(value), sorted(mine, key=lambda a: (a.first_ts, a.source, a.target)))


@dataclass
class Bound:
    """What a flood threshold could at most have raised over a stored range (its per-second class totals)."""

    value: float
    seconds: np.ndarray  # the seconds whose class total reached the value: the only ones a flood could be raised in
    most: int  # sum over those seconds of total // value: the most alerts (distinct destinations reaching it)


# How often a flood is raised is not bounded by the store: the detector raises again for every batch of
# packets in which a destination already at the threshold appears (Alert.count), and batches are the
# capture's, not the store's. What holds: an alert (one row per destination) first reaches the value in some
# second, and at most total // value destinations do so in a second.
FLOOD_CAVEATS = ("how often each alert is raised again is not bounded (the detector raises again for every batch of "
                 "packets in which a destination already at the threshold appears); a late packet counts in the "
                 "detector's current second but in its own stored second, and packets the history writer skipped "
                 "(its queue full: the capture health panel counts them) are in no stored second, so near such "
                 "seconds the bound may be short")


def flood_bound(seconds: tuple[np.ndarray, np.ndarray], setting: str, value: float,
                overrides: dict[str, Any] | None = None, disabled: Iterable[str] = ()) -> Bound:
    """A flood threshold tried over stored per-second class totals (seconds, packets of the setting's
    classes): the seconds that could have raised it and the most alerts (distinct destinations), which the
    detector's alerts do not exceed (see FLOOD_CAVEATS). Exact in seconds when one destination carries the
    class's traffic."""
    if setting not in FLOOD_CLASSES:
        raise ValueError(f"{setting} is not a flood threshold (one of {', '.join(FLOOD_CLASSES)})")
    v = type(config.get(setting))(value)
    if v <= 0:
        raise ValueError(f"{setting} must be above 0: {value!r}")
    t, count = seconds
    hit = count >= v
    return Bound(v, t[hit], int((count[hit] // v).sum()))


# Port-scan thresholds over a stored range, bounded from the stored conversations: every failed attempt the
# detector counts is a packet of a conversation between its source and target (the target's port at the
# target's end), so what the conversations hold over the whole range bounds what any epoch counted.
SCAN_SETTINGS = ("SCAN_PORTS", "SCAN_HOSTS", "SCAN_STEALTH_PORTS")
PROTO = {6: "tcp", 17: "udp"}


@dataclass
class ScanBound(Bound):
    """The keys (source and target, or source and service) whose stored conversations reach a scan threshold
    over the range: the only ones that could raise; `seconds` are their first-seen seconds. `exact_rows`
    False: some minutes' conversations were left out (capped, or the read cut), so it is no bound."""

    keys: list = field(default_factory=list)
    exact_rows: bool = True


def scan_items(df) -> Any:
    """(source, target, protocol, target's port, first seen in epoch µs) of stored conversations, both orientations of
    each row (a stored row does not keep which end sent); TCP and UDP rows with ports only."""
    import pandas as pd

    from investigate.stored import first_ts

    tu = df[df["proto"].isin([6, 17]) & df["a_port"].notna() & df["b_port"].notna()]
    first_us = (first_ts(tu) * 1e6).round().astype(np.int64) if len(tu) else tu["first_us"]
    rows = []
    for s, t, tport in (("a", "b", "b_port"), ("b", "a", "a_port")):
        rows.append(pd.DataFrame({"src": tu[s].to_numpy(), "dst": tu[t].to_numpy(), "proto": tu["proto"].to_numpy(),
                                  "port": tu[tport].astype("int64").to_numpy(), "first_us": first_us.to_numpy()}))
    return pd.concat(rows, ignore_index=True)


def scan_bound(conv: tuple[Any, bool], setting: str, value: float, overrides: dict[str, Any] | None = None,
               disabled: Iterable[str] = ()) -> ScanBound:
    """A scan threshold tried over a stored range's conversations ((rows, whether complete), stored_scan_rows).
    The port scan detector raises vertical scans (SCAN_PORTS), sweeps (SCAN_HOSTS) and stealth scans
    (SCAN_STEALTH_PORTS) alike: with the tried value for its setting and the running ones for the others,
    the keys whose conversations over the range reach them: (source, target) pairs with that many distinct
    ports (stealth: TCP ones), (source, service) keys with that many distinct targets."""
    if setting not in SCAN_SETTINGS:
        raise ValueError(f"{setting} is not a scan threshold (one of {', '.join(SCAN_SETTINGS)})")
    v = type(config.get(setting))(value)
    if v <= 0:
        raise ValueError(f"{setting} must be above 0: {value!r}")
    limits = {s: type(config.get(s))((overrides or {}).get(s, config.get(s))) for s in SCAN_SETTINGS}
    limits[setting] = v
    df, exact = conv
    items = scan_items(df)
    names: list[str] = []
    firsts: list[int] = []
    for kind, limit in limits.items():
        mine = items[items["proto"] == 6] if kind == "SCAN_STEALTH_PORTS" else items
        if not len(mine):
            continue
        by, what = (["src", "dst"], ["proto", "port"]) if kind != "SCAN_HOSTS" else (["src", "proto", "port"], ["dst"])
        distinct = mine.drop_duplicates([*by, *what]).groupby(by).size()
        hit = distinct[distinct >= limit].index
        first = mine.groupby(by)["first_us"].min()
        firsts += (first.loc[hit].to_numpy(np.int64) // 1_000_000).tolist() if len(hit) else []
        names += [f"{k[0]} → {k[1]}" if kind != "SCAN_HOSTS" else f"{k[0]} → {PROTO.get(int(k[1]), k[1])}/{k[2]}"
                  for k in hit]
    return ScanBound(v, np.sort(np.array(firsts, np.int64)), len(names), keys=names, exact_rows=exact)


def stored_scan_rows(store, since: int, until: int, sensor: str | None = None) -> tuple[Any, bool]:
    """(the stored conversations of since..until (of one sensor), whether they are all of its attempts'
    packets: no minute capped, the read not cut)."""
    from investigate.stored import read
    from store.history import approximation, time_range

    df, cut = read(store, since, until, sensor)
    capped = approximation(store, time_range(since, until, sensor)).get("conv")
    return df, not (cut or capped)


SENSORS_CHECKED = 100  # sensors a range is checked for (one cheap extent query each)


def contributing_sensors(store, since: int, until: int, sensor: str | None = None) -> list[str]:
    """The sensors with stored traffic in since..until (of `sensor` alone when given; a fleet SensorView
    asks its own store, as it answers every range for its one sensor or all)."""
    from store.history import time_range

    if type(store).__name__ == "SensorView":
        store, sensor = store.store, sensor or store.sensor
    if sensor:
        return [sensor] if store.extent(time_range(since, until, sensor)) is not None else []
    # A fleet store lists the sensors that wrote; an embedded one the sensors of its origins.
    known = store.sensors() if hasattr(store, "sensors") else store.origins()
    names = sorted({str(s) for s in known["sensor"]}) if "sensor" in known.columns else []
    return [s for s in names[:SENSORS_CHECKED] if store.extent(time_range(since, until, s)) is not None]


# Detectors a stored range bounds rather than replays (the page lists why the others cannot be tried).
BOUNDED = ("syn_flood", "icmp_flood", "udp_flood", "port_scan")


def stored_class_seconds(store, since: int, until: int, setting: str,
                         sensor: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(seconds, packets of the flood setting's protocol classes) of every stored second in since..until (of
    one sensor; None: every sensor's summed)."""
    from store.history import time_range

    cols = tuple(f"pk_{c}" for c in FLOOD_CLASSES[setting])
    df = store.series(time_range(since, until, sensor), 1, cols)
    return df["t"].to_numpy(np.int64), df[list(cols)].sum(axis=1).to_numpy(np.int64)


def stored_seconds(store, since: int, until: int,
                   sensor: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seconds, packets, wire bytes) of every stored second with traffic in since..until (of one sensor;
    None: every sensor's summed), ascending."""
    from store.history import time_range

    df = store.series(time_range(since, until, sensor), 1, ("packets", "bytes"))
    return (df["t"].to_numpy(np.int64), df["packets"].to_numpy(np.int64), df["bytes"].to_numpy(np.float64))


def backtest(rows: np.ndarray, setting: str, values: Iterable[float], overrides: dict[str, Any] | None = None,
             disabled: Iterable[str] = ()) -> list[Trial]:
    """One Trial per candidate value, in the order given, over the running settings."""
    return [run(rows, setting, v, overrides=overrides, disabled=disabled) for v in values]


def candidates(setting: str, n: int = 5, now: float | None = None) -> list[float]:
    """Values around the one in use (`now`, else the config's): ÷4, ÷2, as set, ×2, ×4 (whole numbers for
    whole-number settings)."""
    now = config.get(setting) if now is None else type(config.get(setting))(now)
    factors = (0.25, 0.5, 1.0, 2.0, 4.0)[:n]
    out = []
    for f in factors:
        v = now * f
        v = max(1, round(v)) if isinstance(now, int) else round(v, 3)
        if v not in out:
            out.append(v)
    return out


class Job:
    """One back-test in its own thread (~9 s at 1M packets would block the page's script): the values tried
    so far while it runs, the trials (or the error) when it ends. The rows are a snapshot's read-only copy."""

    def __init__(self, rows: Any, setting: str, values: Iterable[float],
                 overrides: dict[str, Any] | None = None, disabled: Iterable[str] = (), runner=None) -> None:
        """`runner` (run, or run_seconds over a stored range's seconds) tries one value over `rows`; `rows` may
        be a function that reads them (a store's read then runs in the thread too; `self.rows` holds them)."""
        if setting not in DETECTOR_OF:
            raise ValueError(f"{setting} is not a detector threshold (one of {', '.join(DETECTOR_OF)})")
        self.setting, self.values = setting, list(values)
        if not self.values:
            raise ValueError("no value to try")
        self.tried = 0
        self.rows: Any = None
        self._runner = runner or run
        self.trials: list[Trial] | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._work, args=(rows, dict(overrides or {}), frozenset(disabled)),
                                        name=f"backtest-{setting}", daemon=True)
        self._thread.start()

    def _work(self, rows: np.ndarray, overrides: dict[str, Any], disabled: frozenset[str]) -> None:
        out = []
        try:
            self.rows = rows = rows() if callable(rows) else rows
            for v in self.values:
                out.append(self._runner(rows, self.setting, v, overrides=overrides, disabled=disabled))
                self.tried += 1
        except Exception as exc:  # the page shows it; the thread ends
            log.exception("back-test of %s failed", self.setting)
            self.error = f"{type(exc).__name__}: {exc}"
            return
        self.trials = out

    @property
    def running(self) -> bool:
        """Whether the thread is still trying values."""
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end (tests, shutdown)."""
        self._thread.join(timeout)
