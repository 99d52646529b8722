"""TLS between the fleet and ClickHouse: a server with tcp_port_secure and an openSSL section whose
certificate is signed by a CA made here with the openssl CLI. The store, a sensor process and the fleet
page talk TLS with that CA (CLICKHOUSE_SECURE, CLICKHOUSE_CA_CERTS); with another CA the sensor logs a
clear TLS error, keeps capturing into its spool, and the next run with the right CA sends it all."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need
from fleethelp import SCRIPT, Cluster
from storehelp import udp_burst
from streamlit.testing.v1 import AppTest
from test_fleet_sensor import ON_SHARD_1, SensorProc, ports, send_udp, wait_metric

from store.base import TimeRange
from store.clickhouse import ClickHouseStore
from store.rollup import Rollup

APP = "../dashboard.py"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> Path:
    """A self-signed CA (key and certificate) in folder; the certificate's path."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=folder)
    return folder / f"{name}.crt"


def make_server_cert(folder: Path, ca: str) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 (subjectAltName IP and DNS localhost) signed by the CA `ca`."""
    (folder / "san.ext").write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
            "-out", "server.csr", cwd=folder)
    openssl("x509", "-req", "-in", "server.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-days", "2", "-extfile", "san.ext", "-out", "server.crt", cwd=folder)
    return folder / "server.crt", folder / "server.key"


def free_tls_base() -> int:
    """A base port whose plain, HTTP, interserver and TLS ports (+0/1, +100/101, +200/201, +300/301) are free."""
    for base in range(24500, 29000, 11):
        ok = True
        for p in (base, base + 1, base + 100, base + 101, base + 200, base + 201, base + 300, base + 301):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free ports for a TLS ClickHouse cluster")


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> Iterator[dict]:
    """The 2-shard cluster with TLS on both shards; the trusted CA and another CA."""
    need(shutil.which("openssl") is not None, "the openssl CLI is not installed")
    need(Path("/usr/sbin/clickhouse-server").exists(), "Debian's clickhouse-server is not installed")
    pki = tmp_path_factory.mktemp("pki")
    os.chmod(pki, 0o755)  # the page may drop to `nobody`: the CA must stay readable
    ca = make_ca(pki, "ntm-test-ca")
    other = make_ca(pki, "some-other-ca")
    cert, key = make_server_cert(pki, "ntm-test-ca")
    for f in pki.iterdir():
        os.chmod(f, 0o644)
    folder = str(tmp_path_factory.mktemp("clickhouse-tls"))
    base = free_tls_base()
    try:
        subprocess.run([str(SCRIPT), "start", folder, str(base), "--tls", str(cert), str(key)], check=True,
                       timeout=90, capture_output=True)
        yield {"cluster": Cluster(folder, base), "secure": f"127.0.0.1:{base + 300}", "ca": str(ca),
               "other": str(other)}
    finally:
        subprocess.run([str(SCRIPT), "stop", folder], timeout=60)


def test_store_over_tls_with_the_ca_and_a_clear_error_with_another(tls):
    """Writes and reads over TLS verified by the CA; another CA: an error state that says TLS, no crash."""
    good = ClickHouseStore(tls["secure"], database="t_tls", secure=True, ca_certs=tls["ca"])
    assert good.open(), good.status().message
    r = Rollup(good, sensor="tls-a", flush_s=3600)
    r.add(udp_burst(1_700_000_000, 33))
    r.flush(final=True)
    assert good.totals(TimeRange())["packets"] == 33
    good.close()
    bad = ClickHouseStore(tls["secure"], database="t_tls", secure=True, ca_certs=tls["other"], connect_timeout=3)
    assert not bad.open()
    msg = bad.status().message
    assert "TLS failed" in msg and "CERTIFICATE_VERIFY_FAILED" in msg.upper().replace(" ", "_"), msg
    plain = ClickHouseStore(tls["secure"], database="t_tls", secure=False, connect_timeout=3, timeout=5)
    assert not plain.open()  # plain text to the TLS port is refused, never half-open


def test_sensor_over_tls_and_a_wrong_ca_spools_then_drains(tls, tmp_path, root_only):
    """A sensor process with the wrong CA logs a TLS error and spools; restarted with the right CA it sends
    the spool and its new traffic over TLS: exact totals, read back over TLS."""
    port, _ = ports()
    env = {**os.environ, "NTM_FLEET_FLUSH_S": "0.5", "NTM_LOG_LEVEL": "INFO", "NTM_CLICKHOUSE_DATABASE": "t_tls_s",
           "NTM_CLICKHOUSE_SECURE": "1", "NTM_CLICKHOUSE_CA_CERTS": tls["other"]}
    spool = tmp_path / "spool"
    bad = SensorProc(ON_SHARD_1, port, tls["secure"], spool, tmp_path / "bad.log", env, cluster_name=None)
    try:
        send_udp(port, 70)
        assert wait_metric(bad, "ntm_sensor_spool_batches", lambda v: v > 0)
        rep = bad.finish()
    finally:
        if bad.proc.poll() is None:
            bad.kill()
    assert "TLS failed" in (tmp_path / "bad.log").read_text()
    assert rep["packets"] == 70 and rep["packets_sent"] == 0 and rep["spool_packets"] == 70
    env["NTM_CLICKHOUSE_CA_CERTS"] = tls["ca"]
    good = SensorProc(ON_SHARD_1, port, tls["secure"], spool, tmp_path / "good.log", env, cluster_name=None)
    try:
        assert wait_metric(good, "ntm_sensor_spool_batches", lambda v: v == 0)
        send_udp(port, 30)
        assert wait_metric(good, "ntm_sensor_sent_packets_total", lambda v: v == 100)  # the spool too
        good.finish()
    finally:
        if good.proc.poll() is None:
            good.kill()
    check = ClickHouseStore(tls["secure"], database="t_tls_s", secure=True, ca_certs=tls["ca"])
    assert check.totals(TimeRange(sensor=ON_SHARD_1))["packets"] == 100
    check.close()


def test_fleet_page_over_tls(tls, monkeypatch):
    """The fleet page reads over TLS with the CA from the settings: the sensor and its exact total."""
    s = ClickHouseStore(tls["secure"], database="t_tls_p", secure=True, ca_certs=tls["ca"], sensor="tls-page")
    assert s.open(), s.status().message
    r = Rollup(s, sensor="tls-page", flush_s=3600)
    r.add(udp_burst(time.time() - 30, 41))
    r.flush(final=True)
    s.close()
    monkeypatch.setattr(sys, "argv", ["dashboard.py", "--clickhouse", tls["secure"]])
    monkeypatch.setenv("NTM_CLICKHOUSE_DATABASE", "t_tls_p")
    monkeypatch.setenv("NTM_CLICKHOUSE_SECURE", "1")
    monkeypatch.setenv("NTM_CLICKHOUSE_CA_CERTS", tls["ca"])
    at = AppTest.from_file(APP, default_timeout=90).run()
    assert not at.exception, at.exception
    assert int(next(m for m in at.metric if m.label == "Packets").value.replace(",", "")) == 41
    assert any("**tls\\-page**" in m.value for m in at.markdown)
    monkeypatch.setenv("NTM_CLICKHOUSE_CA_CERTS", tls["other"])
    at = AppTest.from_file(APP, default_timeout=90).run()
    assert not at.exception
    assert any("TLS failed" in e.value for e in at.error), [e.value for e in at.error]
