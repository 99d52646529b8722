"""A fleet sensor delivers alerts too: exclusion rules stored in ClickHouse (documents) apply to every
sensor, notifications go out from the sensor process, and its Prometheus metrics count what was sent and
what was given up."""

from __future__ import annotations

import os
import time

import pytest
from conftest import PYTHON, ROOT, wait_for
from fleethelp import cluster  # noqa: F401  (the module's cluster fixture)
from notifyhelp import SyslogReceiver, free_port, nmap_scan, scan_port
from test_fleet_sensor import SensorProc

from store.clickhouse import ClickHouseStore


class ScanSensor(SensorProc):
    """A `sensor` process capturing one test's scans (tcp port SPORT) with its metrics endpoint."""

    def __init__(self, name: str, sport: int, address: str, folder, env: dict) -> None:
        import subprocess

        from test_fleet_sensor import metrics_port

        self.name, self.mport, self.log = name, metrics_port(), folder / "sensor.log"
        cmd = [PYTHON, str(ROOT / "packet_processor.py"), "sensor", "--name", name, "--iface", "lo", "--filter",
               f"tcp port {sport}", "--clickhouse", address, "--cluster", "fleet", "--spool",
               str(folder / "spool"), "--metrics-port", str(self.mport)]
        self.err = open(self.log, "w")  # noqa: SIM115  (closed in finish)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.err, text=True, env=env)
        assert wait_for(lambda: self.metrics() is not None, timeout=30), self.log.read_text()
        time.sleep(0.5)


@pytest.fixture(autouse=True)
def _root(root_only):
    """Live capture on lo needs root."""


def test_a_sensor_applies_fleet_rules_delivers_and_counts_give_ups(cluster, tmp_path):  # noqa: F811
    admin = ClickHouseStore(cluster.address(), cluster="fleet")
    assert admin.open(), admin.status()
    admin.put_doc("exclusion", "scanner five", {"name": "scanner five", "source": "127.0.0.5",
                                                "comment": "the fleet's audit scanner"})
    admin.close()
    syslog = SyslogReceiver("tcp")
    sport = scan_port()
    env = {**os.environ, "NTM_FLEET_FLUSH_S": "0.5", "NTM_NOTIFY_SYSLOG": syslog.url(),
           "NTM_NOTIFY_WEBHOOK": f"http://127.0.0.1:{free_port()}/down", "NTM_NOTIFY_RETRIES": "1",
           "NTM_NOTIFY_BACKOFF_S": "0.1", "NTM_NOTIFY_TIMEOUT_S": "1"}
    sensor = ScanSensor("charlie", sport, cluster.address(), tmp_path, env)
    try:
        nmap_scan(sport, "49000-49299", source="127.0.0.5")
        nmap_scan(sport, "49000-49299", source="127.0.0.6")
        assert wait_for(lambda: (sensor.metrics() or {}).get("ntm_sensor_notify_given_up_total", 0) >= 1, 30), \
            sensor.log.read_text()[-2000:]
        time.sleep(1.0)
        m = sensor.metrics()
    finally:
        report = sensor.finish()
        syslog.close()
    assert report["error"] is None
    got = [(x["sd"]["ntm@32473"]["detector"], x["sd"]["ntm@32473"]["source"]) for x in syslog.messages()]
    assert got == [("port_scan", "127.0.0.6")]
    assert m["ntm_sensor_notify_sent_total"] == 1 and m["ntm_sensor_notify_given_up_total"] == 1
