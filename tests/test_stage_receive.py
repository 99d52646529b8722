"""The detector worker reads its pipe with its own reader (analysis.stages._receive, issue 11): every
message multiprocessing's send_bytes wrote arrives whole and in order, batches as the same records,
commands as the same bytes, and a closed pipe ends the worker (EOFError), even in mid-message."""

from __future__ import annotations

import multiprocessing
import os
import struct
import threading
from multiprocessing.connection import Connection

import numpy as np
import pytest

from analysis.headers import PACKET_DTYPE
from analysis.stages import _receive, config_message


def batch(n: int, seed: int) -> np.ndarray:
    """n records of random bytes (every field and every byte of padding differs from zero somewhere)."""
    raw = np.random.default_rng(seed).integers(0, 256, n * PACKET_DTYPE.itemsize, dtype=np.uint8)
    return raw.view(PACKET_DTYPE)


def test_batches_and_commands_arrive_whole_and_in_order_through_a_full_pipe():
    recv, send = multiprocessing.Pipe(duplex=False)
    # 65,536 records are 5.6 MB, far beyond the pipe's 64 KiB: the writer blocks while the reader reads.
    sent = [batch(65_536, 1), b"reset", batch(1, 2), config_message({"SCAN_PORTS": 7}, set(), [], []),
            batch(3, 3), b"stop"]

    def write() -> None:
        for item in sent:
            send.send_bytes(item if isinstance(item, bytes) else item.view(np.uint8))
        send.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        got = [_receive(recv) for _ in sent]
        with pytest.raises(EOFError):
            _receive(recv)  # the engine closed its end: the worker's end
    finally:
        writer.join(5)
        recv.close()
    for want, have in zip(sent, got):
        if isinstance(want, bytes):
            assert have == want
        else:
            assert isinstance(have, np.ndarray) and have.dtype == PACKET_DTYPE
            assert have.view(np.uint8).tobytes() == want.view(np.uint8).tobytes()
            have["ts"][:1] = 1.0  # the worker owns what it received: a writable array


def test_a_pipe_closed_in_mid_batch_is_the_end_not_a_short_batch():
    r, w = os.pipe()
    recv = Connection(r, writable=False)
    try:
        whole = batch(4, 5).view(np.uint8).tobytes()
        os.write(w, struct.pack("!i", len(whole)) + whole[:100])  # the writer died 100 bytes in
        os.close(w)
        with pytest.raises(EOFError):
            _receive(recv)
    finally:
        recv.close()
