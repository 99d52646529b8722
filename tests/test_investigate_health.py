"""The capture health panel (issue 15): red the moment the page's numbers stop being trustworthy."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from invhelp import write_mixed
from test_dashboard import app, metric, rendered, run_until
from test_dashboard import fresh as fresh  # the fixture: a new engine per test

from analysis.headers import PACKET_DTYPE
from investigate import health
from packet_processor import Snapshot, Status


def snapshot(**totals) -> Snapshot:
    rows = np.zeros(4, PACKET_DTYPE)
    rows["ts"] = [100.0, 101.0, 102.5, 103.0]
    base = {"packets": 4, "dropped": 0, "nic_dropped": None, "stages": {}, "buffer_len": 4, "max_ts": 103.0}
    status = Status(state="running", source="interface lo", alive=True, last_batch_wall=200.0)
    return Snapshot(rows, {**base, **totals}, np.zeros((0, 15), np.int64), *([None] * 6), status=status,
                    buffer_size=10)


def test_a_healthy_capture_is_green_with_its_readings():
    snap = snapshot()
    h = health.assess(snap, 104.0, health.sample(snap, 102.0), live=True)
    assert not h.red and h.reasons == []
    assert h.readings["buffer"] == "4 / 10 packets (40 % full), covering 3.0 s of capture time"
    assert h.readings["lag, capture to display"] == "1.0 s"
    assert h.readings["ring drops"] == "0.0/s (0 in all)"


def test_drops_since_the_last_look_turn_it_red_and_old_drops_do_not():
    before = health.sample(snapshot(dropped=50, nic_dropped={"rx_dropped": 5}), 100.0)
    now = snapshot(dropped=70, nic_dropped={"rx_dropped": 5, "rx_missed_errors": 4})
    h = health.assess(now, 102.0, before, live=True)
    assert h.red
    assert "the kernel's capture ring is dropping packets now (10.0/s): totals and rates miss them" in h.reasons
    assert "the network card is dropping packets now (2.0/s): totals and rates miss them" in h.reasons
    calm = health.assess(now, 104.0, health.sample(now, 102.0), live=True)
    assert not calm.red and calm.readings["ring drops"] == "0.0/s (70 in all)"


def test_a_skipping_stage_or_a_dead_thread_turns_it_red():
    behind = snapshot(stages={"detectors": {"packets_in": 100, "packets_skipped": 30, "minute_analysed_pct": 70.0}})
    h = health.assess(behind, 104.0, None, live=True)
    assert h.red and h.reasons == ["detectors analysed only 70.0 % of the last minute: its findings miss traffic"]
    assert h.readings["skipped analysis"] == "detectors 30 of 100"
    dead = replace(snapshot(), status=Status(state="running", source="interface lo", alive=False))
    assert health.assess(dead, 104.0, None, live=True).reasons == [
        "the capture thread is no longer running: the numbers have stopped"]


def test_the_panel_goes_red_when_the_capture_stage_is_killed(fresh, tmp_path):
    import packet_processor

    # A minute of traffic replayed at its own pace: the capture is still running when the fault comes.
    fresh.setenv("NTM_PCAP", write_mixed(tmp_path / "mixed.pcap"))
    fresh.setenv("NTM_REPLAY_SPEED", "1")
    at = run_until(app(), lambda a: int(metric(a, "Packets").value.replace(",", "")) > 0, 30)
    assert metric(at, "Status").value == "running"
    assert any(e.label == "Capture health: OK" for e in at.expander)
    assert not any("Capture health" in e.value for e in at.error)

    def boom(*args, **kwargs):
        raise RuntimeError("injected fault")

    # The capture thread counts every paced batch: a fault there kills the capture stage mid-file.
    fresh.setattr(packet_processor.Counters, "prepare", boom)
    at = run_until(at, lambda a: any("Capture health" in e.value for e in a.error), 30)
    red = [rendered(e.value) for e in at.error if "Capture health" in e.value]
    assert red and "the capture stage failed: capture stopped: RuntimeError: injected fault" in red[0]
    assert any(e.label == "Capture health: NOT TRUSTWORTHY" for e in at.expander)
