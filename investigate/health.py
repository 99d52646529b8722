"""Capture health: can the numbers on the page be trusted right now? Pure functions over a Snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LAG_NOTE_S = 10.0  # a live capture with no packet for this long says so (a quiet link, or a stalled capture)


@dataclass(frozen=True)
class Sample:
    """Loss counters at one wall time: the previous look, for rates per second."""

    wall: float
    ring: int
    nic: int


@dataclass
class Health:
    """The verdict (red when a number on the page may be wrong) with its reasons and readings."""

    red: bool
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    readings: dict[str, str] = field(default_factory=dict)


def total(value: Any) -> int:
    """A loss count given as a number or as {counter: number}."""
    if isinstance(value, dict):
        return sum(int(v or 0) for v in value.values())
    return int(value or 0)


def sample(snap, wall: float) -> Sample:
    """This snapshot's loss counters."""
    t = snap.totals
    return Sample(wall, int(t.get("dropped") or 0), total(t.get("nic_dropped")))


def rates(now: Sample, before: Sample | None) -> tuple[float | None, float | None]:
    """(ring drops/s, NIC drops/s) since the previous look; None at the first look or after a reset."""
    if before is None or now.wall <= before.wall or now.ring < before.ring or now.nic < before.nic:
        return None, None
    dt = now.wall - before.wall
    return (now.ring - before.ring) / dt, (now.nic - before.nic) / dt


def _rate_text(rate: float | None, count: int) -> str:
    return f"{count:,} in all (rate from the next refresh)" if rate is None else f"{rate:,.1f}/s ({count:,} in all)"


def assess(snap, wall: float, before: Sample | None, live: bool) -> Health:
    """The capture's health at wall time `wall`; `before` is this viewer's previous look (for drop rates)."""
    s, t = snap.status, snap.totals
    h = Health(red=False)
    now = sample(snap, wall)
    ring_rate, nic_rate = rates(now, before)
    _stage_state(h, s)
    for name, rate in (("the kernel's capture ring", ring_rate), ("the network card", nic_rate)):
        if rate:
            h.reasons.append(f"{name} is dropping packets now ({rate:,.1f}/s): totals and rates miss them")
    for name, st_ in (t.get("stages") or {}).items():
        pct = st_.get("minute_analysed_pct")
        if pct is not None and pct < 100.0:
            h.reasons.append(f"{name} analysed only {pct:.1f} % of the last minute: its findings miss traffic")
    h.red = bool(h.reasons)
    newest = t.get("max_ts")
    lag = (wall - newest) if (live and newest is not None) else None
    if lag is not None and lag > LAG_NOTE_S and s.state == "running":
        h.notes.append(f"no packet for {lag:,.0f} s: a quiet link, or a capture that stalled")
    buffered = int(t.get("buffer_len") or len(snap.packets))
    ts = snap.packets["ts"] if len(snap.packets) else None
    covers = float(ts.max() - ts.min()) if ts is not None else 0.0
    h.readings = {
        "capture stage": f"{s.state}, thread {'alive' if s.alive else 'not running'}",
        "lag, capture to display": "—" if lag is None else f"{max(lag, 0.0):,.1f} s",
        "ring drops": _rate_text(ring_rate, now.ring),
        "NIC drops": _rate_text(nic_rate, now.nic),
        "skipped analysis": skipped_text(t.get("stages")),
        "buffer": f"{buffered:,} / {snap.buffer_size:,} packets ({100.0 * buffered / max(snap.buffer_size, 1):.0f} % "
                  f"full), covering {covers:,.1f} s of capture time",
    }
    return h


def _stage_state(h: Health, s) -> None:
    if s.state == "error":
        h.reasons.append(f"the capture stage failed: {s.error or 'unknown error'}")
    elif s.state in ("running", "paused") and not s.alive:
        h.reasons.append("the capture thread is no longer running: the numbers have stopped")


def skipped_text(stages: dict | None) -> str:
    """Packets each analysis stage skipped since the start, or that none did."""
    parts = [f"{name} {int(s.get('packets_skipped') or 0):,} of {int(s.get('packets_in') or 0):,}"
             for name, s in (stages or {}).items()]
    return ", ".join(parts) if parts else "no analysis stage"
