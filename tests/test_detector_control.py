"""Detector thresholds and switches changed at run time: Detectors(overrides, disabled) and
reconfigured(), on crafted scan frames (the live path through the worker is in test_notify_live.py)."""

from __future__ import annotations

import numpy as np
from storehelp import records

from analysis.detect import STRUCTURAL, AlertBook, Detectors


def scan(ports, src: str = "10.0.0.1", dst: str = "10.0.0.2", t0: float = 1000.0) -> np.ndarray:
    """A SYN to each port, each refused by RST-ACK: a vertical scan of len(ports) failed attempts."""
    rows = []
    for i, p in enumerate(ports):
        rows.append({"ts": t0 + i * 0.001, "cls": 0, "src": src, "dst": dst, "sport": 40000, "dport": p,
                     "tcp_flags": 0x02})
        rows.append({"ts": t0 + i * 0.001 + 0.0005, "cls": 0, "src": dst, "dst": src, "sport": p, "dport": 40000,
                     "tcp_flags": 0x14})
    return records(rows)


def raised(detectors: Detectors, *batches: np.ndarray) -> list[tuple[str, str, str]]:
    book = AlertBook()
    for b in batches:
        detectors.observe(b, book)
    return [(a.detector, a.source, a.target) for a in book.alerts()]


def test_overrides_come_before_config_and_switches_silence_a_detector(monkeypatch):
    monkeypatch.setenv("NTM_SCAN_PORTS", "15")
    assert raised(Detectors(), scan(range(1, 31))) == [("port_scan", "10.0.0.1", "10.0.0.2")]
    assert raised(Detectors(overrides={"SCAN_PORTS": 50}), scan(range(1, 31))) == []
    assert raised(Detectors(overrides={"SCAN_PORTS": 50}), scan(range(1, 61))) != []
    assert raised(Detectors(disabled=frozenset({"port_scan"})), scan(range(1, 31))) == []
    assert raised(Detectors(disabled=frozenset({"spike"})), scan(range(1, 31))) != []
    monkeypatch.setenv("NTM_SCAN_PORTS", "40")
    assert raised(Detectors(), scan(range(1, 31))) == []  # config is read when no override is given


def test_a_threshold_change_keeps_the_state_built_so_far():
    d = Detectors(overrides={"SCAN_PORTS": 50})
    book = AlertBook()
    d.observe(scan(range(1, 31)), book)
    assert book.alerts() == []
    same = d.reconfigured({"SCAN_PORTS": 35}, frozenset())
    assert same is d  # 30 ports counted before the change + 10 after reach the new threshold of 35
    same.observe(scan(range(31, 41), t0=1001.0), book)
    assert [a.evidence.split(" ports")[0] for a in book.alerts()] == ["40"]
    off = same.reconfigured({"SCAN_PORTS": 35}, frozenset({"port_scan"}))
    book.clear()
    off.observe(scan(range(41, 61), t0=1002.0), book)
    assert book.alerts() == []


def test_a_structural_change_starts_afresh():
    d = Detectors()
    d.observe(scan(range(1, 10)), AlertBook())
    assert "SCAN_WINDOW_S" in STRUCTURAL
    fresh = d.reconfigured({"SCAN_WINDOW_S": 60}, frozenset())
    assert fresh is not d and fresh.window == 60 and len(fresh.pending) == 0


def test_a_learning_period_shortened_below_what_was_learned_ends_now():
    d = Detectors(overrides={"NEW_HOST_LEARN_S": 300})
    book = AlertBook()
    for sec in range(5):  # five seconds of traffic from a known local host
        d.observe(records([{"ts": 1000.0 + sec, "src": "10.0.0.1", "dst": "10.0.0.2", "cls": 1}]), book)
    assert d.learn_end == float("inf")
    d = d.reconfigured({"NEW_HOST_LEARN_S": 2}, frozenset())
    assert d.learn_end == 1004.0
    d.observe(records([{"ts": 1006.0, "src": "10.0.0.77", "dst": "10.0.0.2", "cls": 1}]), book)
    assert [(a.detector, a.source) for a in book.alerts()] == [("new_host", "10.0.0.77")]
