"""The NIC's own drop counters through a live capture: read from a sysfs-like tree the test owns,
shown as their rise since the capture started, and re-based by Clear (README: 'Clear starts the drop
count afresh (the ring's, and the NIC's own counters shown apart)')."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import wait_for

from capture import nic
from packet_processor import CaptureEngine, Source

pytestmark = pytest.mark.live


class FakeSysfs:
    """/sys/class/net/IF/statistics for one interface, with counters the test sets."""

    def __init__(self, root: Path, iface: str) -> None:
        self.dir = root / iface / "statistics"
        self.dir.mkdir(parents=True)
        self.set(rx_dropped=0, rx_missed_errors=0, rx_fifo_errors=0)

    def set(self, **values: int) -> None:
        for name, value in values.items():
            (self.dir / name).write_text(f"{value}\n")

    def get(self, name: str) -> int:
        return int((self.dir / name).read_text())

    def rise(self, **by: int) -> None:
        self.set(**{name: self.get(name) + n for name, n in by.items()})


@pytest.fixture
def fake_lo(tmp_path, monkeypatch) -> FakeSysfs:
    """lo's NIC counters as the engine reads them, from a tree under tmp_path."""
    monkeypatch.setattr(nic, "SYSFS", str(tmp_path))
    tree = FakeSysfs(tmp_path, "lo")
    tree.set(rx_dropped=1000, rx_missed_errors=40, rx_fifo_errors=7)  # before the capture: not its loss
    return tree


def nic_dropped(engine: CaptureEngine):
    return engine.snapshot().totals["nic_dropped"]


def test_nic_drops_are_the_rise_since_start_and_clear_starts_them_afresh(root_only, fake_lo):
    engine = CaptureEngine()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.79", 0))
        port = rx.getsockname()[1]
        try:
            assert engine.start(Source("live", iface="lo", bpf=f"udp and dst port {port}")), engine.status().error
            assert nic_dropped(engine) == 0  # what the card lost before the start is not this capture's
            fake_lo.rise(rx_dropped=25, rx_missed_errors=3, rx_fifo_errors=2)
            assert wait_for(lambda: nic_dropped(engine) == 30, timeout=5), nic_dropped(engine)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
                tx.sendto(b"x", ("127.0.0.79", port))  # the capture goes on counting packets as well
            assert wait_for(lambda: engine.snapshot().totals["packets"] == 1, timeout=5)
            engine.clear()
            assert nic_dropped(engine) == 0 and engine.snapshot().totals["packets"] == 0
            fake_lo.rise(rx_missed_errors=4)
            assert wait_for(lambda: nic_dropped(engine) == 4, timeout=5), nic_dropped(engine)
            fake_lo.rise(rx_dropped=6)
            assert wait_for(lambda: nic_dropped(engine) == 10, timeout=5), nic_dropped(engine)
        finally:
            engine.stop()
