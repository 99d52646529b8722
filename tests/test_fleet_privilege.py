"""A fleet sensor started as root gives up root as `capture` does: the running sensor's every thread is
the unprivileged user without capabilities (read from /proc/<pid>/status), the broker child keeps
CAP_NET_RAW only, and the sensor still captures every packet, ships it with a password only root could
read (read before the drop), and writes its spool."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import test_fleet_sensor
from conftest import wait_for
from fleethelp import cluster  # noqa: F401  (the module's cluster fixture)
from test_fleet_sensor import ENV, SensorProc, history, ports
from test_privilege import NOBODY_UID, assert_unprivileged, root_env, the_broker, venv  # noqa: F401

from capture import broker


def test_a_root_sensor_gives_up_root_and_still_captures_ships_and_spools(root_only, cluster, tmp_path,  # noqa: F811
                                                                         venv, monkeypatch):  # noqa: F811
    pw = tmp_path / "pw"
    pw.write_text("fleet-test-password\n")
    os.chmod(pw, 0o600)  # root's only: the sensor must read it before it gives up root
    monkeypatch.setattr(test_fleet_sensor, "PYTHON", str(venv / "bin" / "python3"))  # a venv nobody can run
    env = root_env(NTM_FLEET_FLUSH_S="0.5", NTM_LOG_LEVEL="INFO")
    env.update(CLICKHOUSE_USER="fleet", CLICKHOUSE_PASSWORD_FILE=str(pw))
    spool = tmp_path / "spool"  # created by root: the sensor hands it to the user it becomes
    port, _ = ports()
    s = SensorProc("privdrop", port, cluster.address(), spool, tmp_path / "s.log", env)
    try:
        pid = s.proc.pid
        assert wait_for(lambda: broker.read_creds(f"/proc/{pid}/status").uids[0] == NOBODY_UID, 20)
        status = Path(f"/proc/{pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        cap_line = next(line for line in status.splitlines() if line.startswith("CapEff:"))
        assert uid_line.split()[1:] == [str(NOBODY_UID)] * 4 and int(cap_line.split()[1], 16) == 0, status
        assert_unprivileged(pid, NOBODY_UID)
        the_broker(pid, NOBODY_UID)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for _ in range(200):
                tx.sendto(b"p" * 64, ("127.0.0.1", port))
                time.sleep(0.002)
        cluster.stop_shard(1)  # the server it writes through goes away: batches go to the spool (as nobody)
        assert wait_for(lambda: (s.metrics() or {}).get("ntm_sensor_spool_batches", 0) >= 1, 30), \
            (tmp_path / "s.log").read_text()[-2000:]
        assert os.stat(spool).st_uid == NOBODY_UID
        cluster.start_shard(1)
        assert wait_for(lambda: (s.metrics() or {}).get("ntm_sensor_spool_batches", 1) == 0, 60), \
            (tmp_path / "s.log").read_text()[-2000:]
        report = s.finish()
    finally:
        if s.proc.poll() is None:
            s.kill()
    assert report["packets"] == 200 and report["packets_sent"] == 200, report
    assert report["spool_damaged_packets"] == 0 and report["shipper_errors"] == 0, report
    assert history(cluster.address(2), "privdrop", ENV)["packets"] == 200
    log = (tmp_path / "s.log").read_text()
    assert "running as nobody" in log and "fleet-test-password" not in log
