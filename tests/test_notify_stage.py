"""The detector stage keeps the page's settings across the page's Clear: a configuration queued behind a
backlog is not lost when Clear drops the backlog, and the detectors rebuilt by Clear use it."""

from __future__ import annotations

import numpy as np
from conftest import wait_for
from scapy.layers.inet import IP, TCP
from test_detect_linear import ETH, T0, rows

from analysis import stages
from analysis.headers import PACKET_DTYPE


def scan() -> np.ndarray:
    """300 SYNs from 10.9.0.5 to as many ports of 10.9.0.7, none answered, then time moves on."""
    frames = [(T0 + i / 1000, ETH / IP(src="10.9.0.5", dst="10.9.0.7") / TCP(sport=4000, dport=100 + i, flags="S"))
              for i in range(300)]
    frames.append((T0 + 10, ETH / IP(src="10.9.0.1", dst="10.9.0.2") / TCP(sport=5000, dport=80, flags="A")))
    return rows(frames)


def scans_after_clear(monkeypatch, configure: bool) -> list:
    """Port-scan alerts of `scan()` analysed after a Clear that dropped a backlog (and, when `configure`,
    a configuration switching port_scan off, queued behind that backlog)."""
    monkeypatch.setenv(stages.SLOW_HOOK_ENV, "0.3")  # the worker falls behind: a backlog forms
    mirror = stages.AlertMirror()
    stage = stages.DetectorStage(1, mirror, max_packets=100_000, mode="thread").start()
    try:
        for _ in range(3):
            assert stage.offer(np.zeros(5, PACKET_DTYPE))
        if configure:
            stage.configure(stages.config_message({}, {"port_scan"}, [], []))
        assert len(stage.queue) >= 2  # the configuration waits behind batches the worker has not taken
        stage.reset()  # the page's Clear
        assert stage.offer(scan())
        assert stage.drain(20)
        assert wait_for(lambda: stage.stats.as_dict()["packets_analysed"] >= 301, 10)
        wait_for(lambda: [a for a in mirror.alerts() if a.detector == "port_scan"], 2)
        return [(a.source, a.target) for a in mirror.alerts() if a.detector == "port_scan"]
    finally:
        stage.close()


def test_a_configuration_queued_before_clear_reaches_the_rebuilt_detectors(monkeypatch):
    assert scans_after_clear(monkeypatch, configure=False) == [("10.9.0.5", "10.9.0.7")]  # the scan is one
    assert scans_after_clear(monkeypatch, configure=True) == []  # port_scan stays off after the Clear


def test_saving_destinations_never_waits_for_a_slow_receiver(monkeypatch):
    from notifyhelp import SyslogReceiver, WebhookReceiver

    from analysis.detect import Alert
    from notify.notifier import Notifier

    monkeypatch.setenv("NTM_NOTIFY_TIMEOUT_S", "20")
    slow = [WebhookReceiver(hold=3.0), WebhookReceiver(hold=3.0)]
    syslog = SyslogReceiver("udp")
    n = Notifier()
    try:
        n.configure({"NOTIFY_WEBHOOK": " ".join(h.url() for h in slow)})
        n.offer(1, [Alert("port_scan", "medium", "10.0.0.1", "10.0.0.2", T0, T0 + 1, 1, "e", "m")])
        assert wait_for(lambda: all(h.requests == 1 for h in slow), 5)  # both deliveries are in flight
        assert n.configure({"NOTIFY_SYSLOG": syslog.url()}) == []  # the page's "Save destinations"
        answered = [h.answered.is_set() for h in slow]  # what had happened when configure returned
        assert [d["destination"] for d in n.status()["destinations"]] == [f"syslog {syslog.url()}"]
        for h in slow:
            h.release.set()
        # The old channels still end, in the background, and their deliveries are counted.
        assert wait_for(lambda: n.status()["sent"] == 2, 10), n.status()
    finally:
        n.close()
        for x in (*slow, syslog):
            x.close()
    assert answered == [False, False]  # configure returned while both receivers still held their answer
