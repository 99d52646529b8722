"""The detector worker's pipe: CPU per million packed records received, Connection.recv_bytes (the
reference, measured in the same run) against analysis.stages._receive (readv into the array).

A forked child reads 64 batches of 65,536 records (a file's BATCH_SIZE) that this process writes with
send_bytes, as DetectorStage's sender thread does; each side's CPU time is its own process_time.

    .venv/bin/python benchmarks/pipe_receive.py
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from targets import machine

from analysis.headers import PACKET_DTYPE
from analysis.stages import _receive

ROWS, BATCHES = 65_536, 64


def reader(way: str, recv, results, unused) -> None:
    """The child: receive every batch, then send back (CPU seconds, records)."""
    unused.close()  # the writer's end inherited by fork: closed, or EOF never comes
    t, n = time.process_time(), 0
    while True:
        try:
            got = np.frombuffer(recv.recv_bytes(), PACKET_DTYPE) if way == "recv_bytes" else _receive(recv)
        except EOFError:
            break
        n += len(got)
    results.send((time.process_time() - t, n))


def measure(way: str) -> tuple[float, float]:
    """(sender, receiver) CPU seconds per million records."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    res_r, res_w = ctx.Pipe(duplex=False)
    child = ctx.Process(target=reader, args=(way, recv, res_w, send))
    child.start()
    recv.close()
    res_w.close()
    arr = np.zeros(ROWS, PACKET_DTYPE)
    t = time.process_time()
    for _ in range(BATCHES):
        send.send_bytes(arr.view(np.uint8))
    send.close()
    sender = time.process_time() - t
    receiver, n = res_r.recv()
    child.join()
    assert n == ROWS * BATCHES
    return sender / (n / 1e6), receiver / (n / 1e6)


def main() -> int:
    print(f"machine: {machine()}")
    for way in ("recv_bytes", "_receive", "recv_bytes", "_receive"):
        sender, receiver = measure(way)
        print(f"  {way:>10}: receiver {receiver:.3f} s CPU per million records, sender {sender:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
