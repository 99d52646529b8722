"""The staged pipeline on live traffic on lo: a slowed consumer skips batches while counting stays exact,
Clear's drop baseline, and the worker's lifecycle (the nmap -p- burst is in tests/test_adversarial.py)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import wait_for

from analysis import stages
from packet_processor import CaptureEngine, Source

pytestmark = pytest.mark.live


@pytest.fixture
def engine(root_only) -> Iterator[CaptureEngine]:
    eng = CaptureEngine()
    yield eng
    eng.stop()


def udp_sink(addr: str = "127.0.0.78") -> tuple[socket.socket, int]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    rx.bind((addr, 0))
    return rx, rx.getsockname()[1]


def send_udp(port: int, n: int, bursts: int, gap: float = 0.06, addr: str = "127.0.0.78") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for _ in range(bursts):
            for _ in range(n // bursts):
                tx.sendto(b"x" * 20, (addr, port))
            time.sleep(gap)  # a ring block times out (50 ms): many batches, not one


def test_a_slowed_detector_stage_skips_batches_and_the_totals_stay_exact(engine, monkeypatch):
    """The worker sleeps 0.3 s per batch (test hook) and its queue holds 100 packets: live batches
    that do not fit are skipped by the detectors and counted; the counters miss none."""
    monkeypatch.setenv(stages.SLOW_HOOK_ENV, "0.3")
    monkeypatch.setenv("NTM_STAGE_QUEUE_PACKETS", "100")
    rx, port = udp_sink()
    assert engine.start(Source("live", iface="lo", bpf=f"udp and dst port {port}")), engine.status().error
    time.sleep(0.3)
    send_udp(port, 4000, 40)
    assert wait_for(lambda: engine.snapshot().totals["packets"] >= 4000, timeout=10)
    time.sleep(0.3)
    t = engine.snapshot().totals
    rx.close()
    assert t["packets"] == 4000 and t["dropped"] == 0
    st = t["stages"]["detectors"]
    assert st["packets_in"] == 4000
    assert 0 < st["packets_skipped"] < 4000 and st["batches_skipped"] > 0
    assert st["minute_analysed_pct"] == pytest.approx(100 * (4000 - st["packets_skipped"]) / 4000)
    assert st["error"] is None and st["alive"]


def test_the_worker_process_lives_with_the_capture(engine):
    rx, port = udp_sink()
    assert engine.start(Source("live", iface="lo", bpf=f"udp and dst port {port}"))
    pid = engine._stage.pid()
    assert pid and os.path.exists(f"/proc/{pid}")
    with open(f"/proc/{pid}/status") as fh:
        assert re.search(rf"^PPid:\s+{os.getpid()}$", fh.read(), re.M)  # our child, not an orphan
    engine.stop()
    rx.close()
    assert not os.path.exists(f"/proc/{pid}") or _state(pid) == "Z"
    assert not [t for t in threading.enumerate() if t.name.startswith("detectors-")]


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return "gone"


def test_clear_starts_the_drop_count_afresh(monkeypatch, engine):
    """Drops forced with a tiny ring (2 x 64 KiB) while the capture thread waits for the engine lock;
    after Clear the drop count is that of the packets since Clear (none), not the old one."""
    monkeypatch.setenv("NTM_RING_BLOCKS", "2")
    monkeypatch.setenv("NTM_RING_BLOCK_KB", "64")
    rx, port = udp_sink()
    assert engine.start(Source("live", iface="lo", bpf=f"udp and dst port {port}"))
    time.sleep(0.3)
    with engine._lock:  # the capture thread blocks in its next batch; the kernel ring fills up
        send_udp(port, 20_000, 4, gap=0.1)
    assert wait_for(lambda: engine.snapshot().totals["dropped"] > 0, timeout=5)
    assert wait_for(lambda: _settled(engine), timeout=5)
    engine.clear()
    t = engine.snapshot().totals
    assert t["packets"] == 0 and t["dropped"] == 0
    send_udp(port, 200, 4)
    assert wait_for(lambda: engine.snapshot().totals["packets"] == 200, timeout=5)
    time.sleep(1.2)  # the ring's statistics are re-read every second
    t = engine.snapshot().totals
    rx.close()
    assert t["packets"] == 200 and t["dropped"] == 0
    assert t["kernel_received"] == 200


def _settled(engine: CaptureEngine) -> bool:
    a = engine.snapshot().totals
    time.sleep(1.2)
    b = engine.snapshot().totals
    return (a["packets"], a["dropped"]) == (b["packets"], b["dropped"])


def test_the_worker_holds_no_capture_socket(root_only, tmp_path, monkeypatch):
    """The CLI forks its worker (one thread at start-up): the child must not inherit the packet socket,
    or the kernel would go on feeding it (and keep the interface promiscuous) until the child ends. That
    forked worker gives way to the capture too (SCHED_IDLE, 10 steps nicer), and the capture thread does not."""
    from conftest import PYTHON, ROOT

    monkeypatch.delenv("NTM_DETECTORS_IDLE", raising=False)
    monkeypatch.delenv("NTM_DETECTORS_NICE", raising=False)

    script = ("import os, sys, time; sys.path.insert(0, sys.argv[1])\n"
              "from analysis import stages\n"
              "from packet_processor import CaptureEngine, Source\n"
              "e = CaptureEngine(); assert stages.start_method() == 'fork'\n"
              "assert e.start(Source('live', iface='lo', bpf='udp port 9'))\n"
              "pid = e._stage.pid()\n"
              "inodes = {l.split()[-1] for l in open('/proc/net/packet').read().splitlines()[1:]}\n"
              "fds = [os.readlink(f'/proc/{pid}/fd/{fd}') for fd in os.listdir(f'/proc/{pid}/fd')]\n"
              "print(sum(f == f'socket:[{i}]' for f in fds for i in inodes), len(inodes), os.sched_getscheduler(pid), "
              "os.getpriority(os.PRIO_PROCESS, pid), os.sched_getscheduler(e._thread.native_id), "
              "os.getpriority(os.PRIO_PROCESS, 0))\n"
              "e.stop()\n")
    out = subprocess.run([PYTHON, "-c", script, str(ROOT)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    held, sockets, worker_policy, worker_nice, capture_policy, nice = map(int, out.stdout.split())
    assert sockets >= 1 and held == 0
    assert (worker_policy, worker_nice) == (os.SCHED_IDLE, min(19, nice + 10))
    assert capture_policy == os.SCHED_OTHER
