"""Fleet sensors as real processes on `lo`, shipping to a real local 2-shard ClickHouse cluster.

Each sensor's filter isolates our own UDP traffic (distinctive ports), so exact counts are known:
what we sent = what the sensor counted = what `history --clickhouse` answers, per sensor and in
total, also across a ClickHouse outage and a sensor killed while its spool held batches.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import PYTHON, ROOT, wait_for
from fleethelp import cluster, free_base_port  # noqa: F401  (the module's cluster fixture)

ENV = {**os.environ, "NTM_FLEET_FLUSH_S": "0.5", "NTM_LOG_LEVEL": "INFO"}
# cityHash64(name) % 2: "charlie" lives on shard 1 (the server the sensors write through), "alpha" on shard 2.
ON_SHARD_1, ON_SHARD_2 = "charlie", "alpha"


@pytest.fixture(autouse=True)
def _root(root_only):
    """Live capture on lo needs root."""


def metrics_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SensorProc:
    """A `packet_processor.py sensor` process with its metrics endpoint."""

    def __init__(self, name: str, port: int, address: str, spool: Path, log: Path, env: dict,
                 cluster_name: str | None = "fleet") -> None:
        self.name, self.mport, self.log = name, metrics_port(), log
        cmd = [PYTHON, str(ROOT / "packet_processor.py"), "sensor", "--name", name, "--iface", "lo",
               "--filter", f"udp and dst port {port}", "--clickhouse", address,
               "--spool", str(spool), "--metrics-port", str(self.mport)]
        cmd += ["--cluster", cluster_name] if cluster_name else []
        self.err = open(log, "w")  # noqa: SIM115  (closed in finish/kill)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.err, text=True, env=env)
        assert wait_for(lambda: self.metrics() is not None, timeout=30), self.log.read_text()
        time.sleep(0.5)  # the capture ring is open once metrics answer; give the first poll a moment

    def metrics(self) -> dict[str, float] | None:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.mport}/metrics", timeout=2).read().decode()
        except OSError:
            return None
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(ntm_sensor_\w+)\{[^}]*\} (\S+)$", text, re.M)}

    def finish(self) -> dict:
        """SIGTERM, then the final report it prints."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        self.err.close()
        assert self.proc.returncode == 0, self.log.read_text()[-3000:]
        return json.loads(out)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.err.close()


def send_udp(port: int, n: int, gap: float = 0.002) -> None:
    """n datagrams of 64 bytes payload to 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(n):
            s.sendto(b"f" * 64, ("127.0.0.1", port))
            time.sleep(gap)


def history(address: str, sensor: str | None, env: dict) -> dict:
    cmd = [PYTHON, str(ROOT / "packet_processor.py"), "history", "--clickhouse", address, "--cluster", "fleet"]
    if sensor:
        cmd += ["--sensor", sensor]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def ports() -> tuple[int, int]:
    """Two UDP ports below the ephemeral range (32768-60999): no other program's replies land there."""
    p = random.randrange(31000, 32700, 2)
    return p, p + 1


def test_two_sensors_history_per_sensor_and_in_total(cluster, tmp_path):  # noqa: F811
    """Two sensors, two filters: history per sensor equals what each counted (and what was sent)."""
    env = {**ENV, "NTM_CLICKHOUSE_DATABASE": "t_two"}
    p1, p2 = ports()
    procs = []
    try:
        for name, port in ((ON_SHARD_1, p1), (ON_SHARD_2, p2)):
            procs.append(SensorProc(name, port, cluster.address(1), tmp_path / f"spool-{name}",
                                    tmp_path / f"{name}.log", env))
        send_udp(p1, 300)
        send_udp(p2, 170)
        send_udp(p1, 30)
        reports = {p.name: p.finish() for p in procs}
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.kill()
    assert reports[ON_SHARD_1]["packets"] == 330 and reports[ON_SHARD_2]["packets"] == 170
    for name, rep in reports.items():
        h = history(cluster.address(2), name, env)  # asked through the other server: the Distributed tables
        assert (h["packets"], h["bytes_wire"], h["transport_counts"]) == (rep["packets"], rep["bytes_wire"],
                                                                        rep["transport_counts"])
        assert rep["spool_batches"] == 0 and rep["skipped"] == 0 and rep["packets_sent"] == rep["packets"]
    total = history(cluster.address(1), None, env)
    assert total["packets"] == 500
    assert total["top10_udp_dst_ports"] == [[p1, 330], [p2, 170]]


def wait_metric(proc: SensorProc, name: str, pred, timeout: float = 30) -> bool:
    """Poll the sensor's metrics until `name` satisfies pred; on failure say what the metrics were."""
    ok = wait_for(lambda: (m := proc.metrics()) is not None and pred(m.get(name, 0.0)), timeout=timeout, step=0.2)
    if not ok:
        print("metrics:", proc.metrics(), "log:", proc.log.read_text()[-2000:])
    return ok


def test_outage_of_the_server_written_through_loses_nothing_and_counts_once(cluster, tmp_path):  # noqa: F811
    """Shard 1 (the server the sensor writes through, and its sensor's shard) is stopped for several
    seconds while traffic flows, then started again: history totals are exact, nothing twice."""
    env = {**ENV, "NTM_CLICKHOUSE_DATABASE": "t_outage"}
    port, _ = ports()
    proc = SensorProc(ON_SHARD_1, port, cluster.address(1), tmp_path / "spool", tmp_path / "s.log", env)
    try:
        send_udp(port, 200)
        assert wait_metric(proc, "ntm_sensor_sent_packets_total", lambda v: v == 200)
        cluster.stop_shard(1)
        try:
            for _ in range(4):  # four seconds of traffic while the server is down
                send_udp(port, 100, gap=0.01)
            assert wait_metric(proc, "ntm_sensor_spool_batches", lambda v: v > 0)
            assert proc.metrics()["ntm_sensor_send_failures_total"] > 0
        finally:
            cluster.start_shard(1)
        send_udp(port, 150)
        assert wait_metric(proc, "ntm_sensor_spool_batches", lambda v: v == 0)
        rep = proc.finish()
    finally:
        if proc.proc.poll() is None:
            proc.kill()
    assert rep["packets"] == 750 and rep["packets_sent"] == 750 and rep["spool_batches"] == 0
    h = history(cluster.address(2), ON_SHARD_1, env)
    assert (h["packets"], h["bytes_wire"]) == (750, rep["bytes_wire"])
    assert "unreachable" in proc.log.read_text()  # the outage was a logged error, not a crash


def test_sensor_killed_while_spooled_and_restarted_counts_once(cluster, tmp_path):  # noqa: F811
    """The sensor is SIGKILLed while its batches wait in the spool (server down), restarted with the same
    name and spool, and the server comes back: every packet counted before the kill and after, once."""
    env = {**ENV, "NTM_CLICKHOUSE_DATABASE": "t_restart"}
    port, _ = ports()
    spool = tmp_path / "spool"
    first = SensorProc(ON_SHARD_1, port, cluster.address(1), spool, tmp_path / "s1.log", env)
    second = None
    try:
        send_udp(port, 120)
        assert wait_metric(first, "ntm_sensor_sent_packets_total", lambda v: v == 120)
        cluster.stop_shard(1)
        try:
            send_udp(port, 300)
            assert wait_metric(first, "ntm_sensor_packets_total", lambda v: v == 420)
            assert wait_metric(first, "ntm_sensor_spool_batches", lambda v: v > 0)
            time.sleep(2.0)  # several flush intervals: the last packets are in the spool too
            first.kill()
            assert any(p.is_dir() for p in spool.iterdir())  # killed mid-spool
            second = SensorProc(ON_SHARD_1, port, cluster.address(1), spool, tmp_path / "s2.log", env)
            send_udp(port, 80)
            assert wait_metric(second, "ntm_sensor_packets_total", lambda v: v == 80), second.metrics()
        finally:
            cluster.start_shard(1)
        assert wait_metric(second, "ntm_sensor_spool_batches", lambda v: v == 0)
        rep = second.finish()
    finally:
        for p in (first, second):
            if p is not None and p.proc.poll() is None:
                p.kill()
    assert rep["packets"] == 80 and rep["spool_batches"] == 0 and rep["spool_dropped_packets"] == 0
    h = history(cluster.address(1), ON_SHARD_1, env)
    assert h["packets"] == 500 and h["top10_udp_dst_ports"] == [[port, 500]]


def test_wrong_password_spools_without_crashing_and_the_spool_drains_later(cluster, tmp_path):  # noqa: F811
    """A sensor with a wrong password logs a clear error (never the password), keeps capturing into its
    spool and exits cleanly; the next run with the right credentials sends the spool: exact totals."""
    secret = "not-the-password-42"
    env = {**ENV, "NTM_CLICKHOUSE_DATABASE": "t_auth", "CLICKHOUSE_PASSWORD": secret}
    port, _ = ports()
    spool = tmp_path / "spool"
    bad = SensorProc(ON_SHARD_1, port, cluster.address(1), spool, tmp_path / "bad.log", env)
    try:
        send_udp(port, 90)
        assert wait_metric(bad, "ntm_sensor_spool_batches", lambda v: v > 0)
        rep = bad.finish()
    finally:
        if bad.proc.poll() is None:
            bad.kill()
    log = (tmp_path / "bad.log").read_text()
    assert "authentication failed" in log and secret not in log
    assert rep["packets"] == 90 and rep["packets_sent"] == 0 and rep["spool_packets"] == 90
    good_env = {k: v for k, v in env.items() if k != "CLICKHOUSE_PASSWORD"}
    good = SensorProc(ON_SHARD_1, port, cluster.address(1), spool, tmp_path / "good.log", good_env)
    try:
        assert wait_metric(good, "ntm_sensor_spool_batches", lambda v: v == 0)
        good.finish()
    finally:
        if good.proc.poll() is None:
            good.kill()
    assert history(cluster.address(1), ON_SHARD_1, good_env)["packets"] == 90
