"""The detector stage's queue and its one-minute share: control commands and lost batches."""

from __future__ import annotations

import numpy as np

from analysis import stages
from analysis.headers import PACKET_DTYPE


def test_clear_alerts_is_queued_even_behind_a_batch_larger_than_the_queue():
    # An empty queue admits one batch larger than its bound (else that batch could never pass);
    # the page's Clear alerts (a 0-packet command) must still get through after it, never be dropped.
    stage = stages.DetectorStage(1, stages.AlertMirror(), max_packets=10, mode="thread")  # not started: nothing drains
    assert stage.offer(np.zeros(100, PACKET_DTYPE))
    assert not stage.offer(np.zeros(5, PACKET_DTYPE))  # a further batch is skipped, as it must be
    stage.reset_alerts()
    items = [stage.queue.get(0) for _ in range(len(stage.queue))]
    assert [p for _, p in items] == [100, 0] and items[1][0] == stages._RESET
    stage.close()


def test_a_closed_queue_refuses_commands_too():
    q = stages.BatchQueue(10)
    q.close()
    assert not q.put(b"cmd", 0, wait=False)


def test_lost_packets_count_against_the_second_they_were_offered():
    s = stages.StageStats()
    s.offered(100, skipped=False, now=1000)  # queued at t=1000, lost later when the worker dies
    s.offered(10, skipped=False, now=1030)
    s.lost(1, 100, offered_at=1000)
    assert s.minute_pct(now=1030) == 100.0 * 10 / 110  # not (110 - 100 charged to t=1030's 10) ...
    assert s.minute_pct(now=1065) == 100.0  # ... and when t=1000 leaves the minute, so does its loss
    assert s.as_dict()["packets_skipped"] == 100  # the total keeps it


def test_a_stage_closed_with_batches_queued_never_reports_a_negative_share():
    stage = stages.DetectorStage(1, stages.AlertMirror(), max_packets=1000, mode="thread")  # never drains
    for _ in range(3):
        assert stage.offer(np.zeros(100, PACKET_DTYPE))
    stage.close()
    d = stage.stats.as_dict()
    assert d["packets_skipped"] == 300 and d["minute_analysed_pct"] == 0.0


def test_the_batch_pipe_holds_a_mebibyte_so_a_batch_crosses_in_few_wakeups():
    import fcntl
    import os
    from pathlib import Path

    stage = stages.DetectorStage(1, stages.AlertMirror(), max_packets=1000).start()  # the worker process
    try:
        size = fcntl.fcntl(stage._conn.fileno(), fcntl.F_GETPIPE_SZ)
        limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
        # Beyond pipe-max-size only root may go; otherwise the pipe keeps Linux's default 64 KiB.
        assert size == (stages.PIPE_BYTES if os.geteuid() == 0 or limit >= stages.PIPE_BYTES else 65536)
        arr = np.zeros(20_000, PACKET_DTYPE)  # 1.7 MB: more than the pipe holds, arrives whole
        arr["ts"] = 1.0
        assert stage.offer(arr, wait=True)
        assert stage.drain(30)
        assert stage.stats.packets_done == 20_000
    finally:
        stage.close()
