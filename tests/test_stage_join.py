"""The detector worker joins the small batches already waiting in its pipe (issue 11): fewer per-batch
costs when it falls behind a live capture, with every batch counted and commands kept in order."""

from __future__ import annotations

import multiprocessing

import numpy as np

from analysis.headers import PACKET_DTYPE
from analysis.stages import _join_waiting


def batch(n: int, t: float) -> np.ndarray:
    arr = np.zeros(n, PACKET_DTYPE)
    arr["ts"] = t + np.arange(n)
    return arr


def test_waiting_batches_are_joined_up_to_the_limit_and_stop_at_a_command():
    recv, send = multiprocessing.Pipe(duplex=False)
    try:
        for i in range(4):
            send.send_bytes(batch(10, 100 * i).view(np.uint8))
        send.send_bytes(b"reset")
        send.send_bytes(batch(10, 900).view(np.uint8))
        first = np.frombuffer(recv.recv_bytes(), PACKET_DTYPE)
        arrs, cmd = _join_waiting(first, recv, most=25)  # 10 + 10 + 10 >= 25: stops after the third
        assert [float(a["ts"][0]) for a in arrs] == [0.0, 100.0, 200.0] and cmd is None
        arrs, cmd = _join_waiting(np.frombuffer(recv.recv_bytes(), PACKET_DTYPE), recv, most=1000)
        assert [float(a["ts"][0]) for a in arrs] == [300.0] and cmd == b"reset"  # the command ends the run
        arrs, cmd = _join_waiting(np.frombuffer(recv.recv_bytes(), PACKET_DTYPE), recv, most=1000)
        assert [float(a["ts"][0]) for a in arrs] == [900.0] and cmd is None and not recv.poll(0)
    finally:
        recv.close()
        send.close()
