"""The 'by process' view: curl fetching from a local web server, captured live on lo, named per process."""

from __future__ import annotations

import random
import socket
import subprocess
import time

import psutil
import pytest
from conftest import PYTHON, need, wait_for

from enrich.attribution import by_process
from enrich.processes import ProcessTable
from packet_processor import CaptureEngine, Source

SIZE = 20_000_000  # large enough that the socket buffers cannot hold it: curl's --limit-rate paces it


def _free_port() -> int:
    for _ in range(50):
        port = random.randint(42000, 48000)
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise RuntimeError("no free port")


@pytest.fixture
def web(tmp_path):
    """python -m http.server on 127.0.0.1 with one file of SIZE bytes."""
    (tmp_path / "blob").write_bytes(b"x" * SIZE)
    port = _free_port()
    proc = subprocess.Popen([PYTHON, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 10)
        yield proc, port
    finally:
        proc.kill()
        proc.wait(5)


def test_by_process_names_client_and_server_with_their_bytes(root_only, web):
    need(subprocess.run(["which", "curl"], capture_output=True).returncode == 0, "curl is not installed")
    server, port = web
    table = ProcessTable(refresh_s=0.2)
    table.start()
    engine = CaptureEngine()
    try:
        assert engine.start(Source("live", iface="lo", bpf=f"tcp port {port}")), engine.status().error
        time.sleep(0.5)
        # --limit-rate keeps the connection open ~4 s, so many 0.2 s socket-table reads see it.
        client = subprocess.Popen(["curl", "-s", "-o", "/dev/null", "--limit-rate", "5M", "-w", "%{size_download}",
                                   f"http://127.0.0.1:{port}/blob"], stdout=subprocess.PIPE, text=True)
        out, _ = client.communicate(timeout=60)
        assert out == str(SIZE)
        time.sleep(1.0)
        snap = engine.snapshot()
    finally:
        engine.stop()
        table.stop()
    p = snap.packets
    assert len(p) == snap.totals["packets"] > 0
    rows = {r["process"]: r for r in by_process(p, table)}
    server_name = psutil.Process(server.pid).name()
    assert set(rows) == {"curl", server_name}, rows
    assert rows[server_name]["pid"] == server.pid
    # Both ends are this machine: every packet of the one connection belongs to both processes.
    for r in rows.values():
        assert r["packets"] == len(p) and r["bytes"] == int(p["wire_len"].sum()) == snap.totals["bytes"]
        assert r["connections"] == 1
    assert snap.totals["bytes"] > SIZE  # the file plus headers went through the capture
