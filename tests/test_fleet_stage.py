"""The fleet writer is a consumer stage of the pipeline (like the history writer): capture offers it each
parsed batch and never waits; a stage that falls behind skips whole batches and counts them, and the
capture's own totals stay exact. Here ClickHouse is unreachable (everything goes to the spool) and the
stage's rollup is slowed on purpose, on real traffic on `lo` isolated by its port."""

from __future__ import annotations

import socket
import time

import pytest
from conftest import wait_for

from fleet.sensor import FleetStage, Sensor


@pytest.fixture(autouse=True)
def _root(root_only):
    """Live capture on lo needs root."""


def send_udp(port: int, n: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(n):
            s.sendto(b"s" * 40, ("127.0.0.1", port))
            time.sleep(0.0005)


def test_a_slow_fleet_stage_skips_counted_batches_and_capture_stays_exact(tmp_path, monkeypatch):
    """Stage queue of 64 packets, a rollup that takes 0.2 s per batch: capture counts all 3,000 packets,
    the stage skips some (counted in the snapshot's stages.fleet and the report), and what it did not
    skip is exactly what waits in the spool (ClickHouse is unreachable)."""
    monkeypatch.setenv("NTM_STAGE_QUEUE_PACKETS", "64")
    port = 31777
    sensor = Sensor("stage-test", "lo", f"udp and dst port {port}", "127.0.0.1:9", spool_dir=str(tmp_path / "sp"),
                    flush_s=0.3)
    add = sensor.rollup.add

    def slow_add(arr):
        time.sleep(0.2)
        add(arr)

    monkeypatch.setattr(sensor.rollup, "add", slow_add)
    assert sensor.start(), sensor.engine.status().error
    try:
        assert isinstance(sensor.stage, FleetStage)
        time.sleep(0.5)
        send_udp(port, 3000)
        assert wait_for(lambda: sensor.engine.snapshot().totals["packets"] == 3000, 20)
        stages = sensor.engine.snapshot().totals["stages"]
        assert stages["fleet"]["packets_in"] == 3000 and stages["fleet"]["packets_skipped"] > 0, stages
    finally:
        report = sensor.stop()
    assert report["packets"] == 3000 and report["packets_sent"] == 0
    assert report["skipped"] > 0
    assert report["spool_packets"] + report["skipped"] == 3000, report
    assert "unreachable" in (report["store"]["message"] or "")
