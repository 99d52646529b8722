"""Fleet review gaps: a hung ClickHouse, a read-only account, sensor losses in ClickHouse, stale marking by the
server's clock, and the small ones (metrics address and busy port, the driver's log lines, quoted cluster
names, every replica). On the real local cluster (scripts/clickhouse_cluster.sh, Debian's 18.16)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import ROOT
from fleethelp import cluster  # noqa: F401  (the module's cluster fixture)
from streamlit.testing.v1 import AppTest

from store.base import TimeRange
from store.clickhouse import ClickHouseStore

APP = "../dashboard.py"


@pytest.fixture
def hung() -> Iterator[str]:
    """HOST:PORT of a TCP listener on 127.0.0.1 that completes every connection (the kernel's backlog)
    and never reads or answers: a hung server."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    try:
        yield f"127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()


# -- 1. a hung server ------------------------------------------------------------------------------------


def test_hung_clickhouse_read_fails_within_the_query_timeout_and_frees_the_lock(hung, monkeypatch):
    """A read from a server that never answers fails after CLICKHOUSE_QUERY_TIMEOUT_S with that text, and
    the store's lock is free again by then (another caller is not held for the 30 s write timeout)."""
    monkeypatch.setenv("NTM_CLICKHOUSE_QUERY_TIMEOUT_S", "1")
    store = ClickHouseStore(hung, cluster="fleet")
    errors: list[BaseException] = []
    connecting = threading.Event()
    real_connect = store._connect

    def connect(host: str, port: int):
        client = real_connect(host, port)
        connecting.set()  # the reader holds the store's lock from here to the end of its hung handshake
        return client

    store._connect = connect

    def read() -> None:
        try:
            store.sensors()
        except OSError as exc:
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    assert connecting.wait(10)
    t0 = time.monotonic()
    store.status()  # takes the store's lock: waits for the hung read
    waited = time.monotonic() - t0
    reader.join(10)
    assert 0.5 < waited < 5, f"status() waited {waited:.1f} s for the lock"
    assert errors and "ClickHouse did not answer within 1 s" in str(errors[0]), errors
    assert "did not answer within 1 s" in (store.status().message or "")


def test_fleet_page_shows_a_hung_clickhouse_quickly(hung, monkeypatch):
    """The fleet page over a hung server: within a few seconds an error saying it did not answer in N s."""
    monkeypatch.setenv("NTM_CLICKHOUSE_QUERY_TIMEOUT_S", "1")
    monkeypatch.setattr(sys, "argv", ["dashboard.py", "--clickhouse", hung, "--cluster", "fleet"])
    t0 = time.monotonic()
    at = AppTest.from_file(APP, default_timeout=20).run()
    took = time.monotonic() - t0
    assert not at.exception, at.exception
    assert any("did not answer within 1 s" in e.value for e in at.error), [e.value for e in at.error]
    assert took < 25, took  # seconds, not the 30 s write timeout; the message tells 1 s from 30 s


def test_history_cli_over_a_hung_clickhouse_ends_with_a_clear_error(hung):
    """`history --clickhouse` against a hung server exits 1 with the timeout named, in seconds, not 30+."""
    env = {**os.environ, "NTM_CLICKHOUSE_QUERY_TIMEOUT_S": "1"}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, str(ROOT / "packet_processor.py"), "history", "--clickhouse", hung],
                         capture_output=True, text=True, timeout=60, env=env)
    took = time.monotonic() - t0
    assert out.returncode == 1, out.stderr[-2000:]
    assert "did not answer within 1 s" in json.loads(out.stdout)["error"]
    assert took < 25, took  # seconds, not the 30 s write timeout; the message tells 1 s from 30 s
    assert "Traceback" not in out.stderr  # point 5: the driver's retry warnings are one line each


# -- 5. small ones ---------------------------------------------------------------------------------------


def test_driver_connection_warnings_are_one_line(caplog):
    """clickhouse_driver logs each failed connection at WARNING with a whole traceback; with the store's
    filter each is one line naming the error."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = ClickHouseStore(f"127.0.0.1:{port}")
    with caplog.at_level(logging.WARNING, logger="clickhouse_driver"):
        assert not store.open()
    driver = [r for r in caplog.records if r.name.startswith("clickhouse_driver")]
    assert driver, caplog.text
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in driver), caplog.text
    assert any("Connection refused" in r.getMessage() or "NetworkError" in r.getMessage() for r in driver)
    assert "Traceback" not in caplog.text


# -- 2. a read-only account ------------------------------------------------------------------------------

READER = {"CLICKHOUSE_USER": "reader", "CLICKHOUSE_PASSWORD": "reader-test-password"}


def _fill(cluster, db: str, sensor: str = "ro1", packets: int = 70) -> int:  # noqa: F811
    """Open `db` with the default (writing) account and write one sensor's minute of UDP; the packets."""
    from storehelp import udp_burst

    from store.rollup import Rollup

    ch = ClickHouseStore(cluster.address(), cluster=cluster.name, database=db, sensor=sensor)
    assert ch.open(), ch.status().message
    r = Rollup(ch, sensor=sensor, iface="lo", flush_s=3600)
    r.add(udp_burst(int(time.time()) - 90, packets, dport=4242))  # recent: inside the page's Live range
    r.flush(final=True)
    ch.close()
    return packets


def test_read_only_account_reads_a_current_schema(cluster, monkeypatch):  # noqa: F811
    """A `readonly` profile account opens a current database (no DDL, no settings sent) and reads it,
    in the store and through `history --clickhouse`."""
    from store.history import history_summary

    want = _fill(cluster, "t_ro")
    for k, v in READER.items():
        monkeypatch.setenv(k, v)
    ro = ClickHouseStore(cluster.address(2), cluster=cluster.name, database="t_ro")
    assert ro.open(), ro.status().message
    assert history_summary(ro)["packets"] == want
    assert list(ro.sensors()["sensor"]) == ["ro1"]
    ro.close()
    out = subprocess.run([sys.executable, str(ROOT / "packet_processor.py"), "history", "--clickhouse",
                          cluster.address(), "--cluster", cluster.name],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, **READER, "NTM_CLICKHOUSE_DATABASE": "t_ro"})
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert json.loads(out.stdout)["packets"] == want


def test_read_only_account_fleet_page(cluster, monkeypatch):  # noqa: F811
    """The fleet page with a read-only account: the sensor's card and its exact packets, no error."""
    want = _fill(cluster, "t_ro_page", sensor="ro2", packets=33)
    for k, v in {**READER, "NTM_CLICKHOUSE_DATABASE": "t_ro_page"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", ["dashboard.py", "--clickhouse", cluster.address(), "--cluster", cluster.name])
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert "**ro2** ·" in "\n".join(m.value for m in at.markdown), [m.value for m in at.markdown]
    assert int(next(m for m in at.metric if m.label == "Packets").value.replace(",", "")) == want


def test_read_only_account_on_an_older_schema_is_a_clear_error(cluster, monkeypatch):  # noqa: F811
    """An older schema (here version 4) needs a migration a read-only account may not run: open() fails
    with a message saying so, and the database is unchanged."""
    import store.clickhouse as chmod

    monkeypatch.setattr(chmod, "CH_SCHEMA_VERSION", 4)
    _fill(cluster, "t_ro_old")
    monkeypatch.undo()
    for k, v in READER.items():
        monkeypatch.setenv(k, v)
    ro = ClickHouseStore(cluster.address(), cluster=cluster.name, database="t_ro_old")
    assert not ro.open()
    msg = ro.status().message or ""
    assert "schema version 4" in msg and f"needs version {chmod.CH_SCHEMA_VERSION}" in msg and "read-only" in msg, msg
    assert cluster.query("SELECT max(toInt64(value)) FROM t_ro_old.meta")[0][0] == 4
    none = ClickHouseStore(cluster.address(), cluster=cluster.name, database="t_ro_none")
    assert not none.open() and "no schema yet" in (none.status().message or "")


# -- 5. quoted cluster names, every replica --------------------------------------------------------------


def test_cluster_name_that_sql_reads_only_quoted(cluster):  # noqa: F811
    """Cluster `dc-2a` (unquoted, `2a` is a syntax error): the Distributed DDL quotes its name, and what is
    written through it reads back exactly. (18.16 refuses cluster names with dots whatever the quoting.)"""
    from store.history import history_summary

    assert _fill_in(cluster, "dc-2a", "t_quoted", 21) == 21
    reader = ClickHouseStore(cluster.address(2), cluster="dc-2a", database="t_quoted")
    assert history_summary(reader)["packets"] == 21
    reader.close()


def test_every_replica_of_a_shard_gets_the_local_tables(cluster):  # noqa: F811
    """Cluster `replicas` (one shard whose two replicas are the two servers): shards() lists both and the
    local and Distributed tables are created on both (no ZooKeeper: nothing else would), so either replica
    answers; what is written reads back exactly from the other server."""
    from store.history import history_summary

    ch = ClickHouseStore(cluster.address(), cluster="replicas", database="t_rep")
    assert ch.open(), ch.status().message
    assert ch.shards() == [("127.0.0.1", cluster.port), ("127.0.0.1", cluster.port + 1)]
    ch.close()
    for shard in (1, 2):
        tables = {r[0] for r in cluster.query("SELECT name FROM system.tables WHERE database = 't_rep'", shard=shard)}
        assert {"seconds", "commits", "seconds_d", "commits_max_d"} <= tables, (shard, tables)
    assert _fill_in(cluster, "replicas", "t_rep", 17) == 17
    # README: a Distributed insert writes every replica itself (no ReplicatedMergeTree, no ZooKeeper).
    for shard in (1, 2):
        rows, packets = cluster.query("SELECT count(), sum(packets) FROM t_rep.seconds", shard=shard)[0]
        assert rows > 0 and packets == 17, (shard, rows, packets)
    reader = ClickHouseStore(cluster.address(2), cluster="replicas", database="t_rep")
    assert history_summary(reader)["packets"] == 17
    reader.close()


def _fill_in(cluster, name: str, db: str, packets: int) -> int:  # noqa: F811
    """Write one sensor's UDP burst through cluster `name`; the packets written."""
    from storehelp import udp_burst

    from store.rollup import Rollup

    ch = ClickHouseStore(cluster.address(), cluster=name, database=db, sensor="q1")
    assert ch.open(), ch.status().message
    r = Rollup(ch, sensor="q1", iface="lo", flush_s=3600)
    r.add(udp_burst(int(time.time()) - 90, packets, dport=4243))
    r.flush(final=True)
    ch.close()
    return packets


# -- 3. sensor losses in ClickHouse, on the page and in the metrics --------------------------------------


def _loss_batch(sensor: str, run: str, ts: int, ring: int, nic: int, dpk: int, dbt: int, hist: int = 0,
                prev: tuple | None = None):
    """A heartbeat batch (no rows) carrying one loss sample, as a sensor's _Outbox makes it (`prev`: the
    run's previous counters; without them, as an older sensor's spooled batch)."""
    from store.base import StoreBatch
    from store.clickhouse import with_id

    b = with_id(StoreBatch())
    b.losses = ("lo", run, ts, ring, nic, dpk, dbt, hist, *(prev or ()))
    return b


def test_losses_are_shipped_per_run_and_a_resend_counts_once(cluster):  # noqa: F811
    """Cumulative loss samples of two sensor runs, stamped by the server on receipt: a range's losses are each
    run's growth within it. A flush with unchanged counters writes no row; the same batch sent again (a lost
    acknowledgement) and the same sample in a new batch (a new store, as after a restart) write the same
    row again, which changes no total. Once merged exactly the three distinct rows are stored."""
    t0 = int(time.time())
    ch = ClickHouseStore(cluster.address(), cluster=cluster.name, database="t_loss", sensor="lossy")
    assert ch.open(), ch.status().message
    assert ch.send(_loss_batch("lossy", "r1", t0, 5, 1, 100, 2, prev=(0, 0, 0, 0, 0)))
    t1 = int(time.time()) + 1
    time.sleep(t1 - time.time() + 0.05)  # the next samples are received a second later
    second = _loss_batch("lossy", "r1", t1, 9, 1, 300, 5, prev=(5, 1, 100, 2, 0))
    assert ch.send(second)
    assert ch.send(_loss_batch("lossy", "r2", t1, 4, 0, 50, 1, prev=(0, 0, 0, 0, 0)))
    assert ch.send(_loss_batch("lossy", "r1", t1, 9, 1, 300, 5, prev=(9, 1, 300, 5, 0)))  # unchanged: no row
    ch.close()
    again = ClickHouseStore(cluster.address(2), cluster=cluster.name, database="t_loss", sensor="lossy")
    assert again.open() and again.send(second)  # a heartbeat is not looked up by id: its row again
    assert again.send(_loss_batch("lossy", "r1", t1, 9, 1, 300, 5, prev=(5, 1, 100, 2, 0)))
    got = again.losses(TimeRange(t0 - 60, t1 + 60)).set_index("sensor")
    assert got.loc["lossy"].to_dict() == {"ring_dropped": 13, "nic_dropped": 1, "detect_skipped_packets": 350,
                                          "detect_skipped_batches": 6, "history_skipped_packets": 0}
    later = again.losses(TimeRange(t1, t1 + 60, sensor="lossy")).set_index("sensor").loc["lossy"]
    assert (later["ring_dropped"], later["detect_skipped_packets"]) == (4 + 4, 200 + 50)  # r1's growth, r2's
    for s in (1, 2):
        cluster.query("OPTIMIZE TABLE t_loss.run_losses FINAL", shard=s)
    raw = sum(cluster.query("SELECT count() FROM t_loss.run_losses", shard=s)[0][0] for s in (1, 2))
    assert raw == 3  # r1 at 5, r1 at 9 (its second copy merged away), r2 at 4
    assert again.losses(TimeRange(t0 - 60, t1 + 60)).set_index("sensor").loc["lossy", "ring_dropped"] == 13
    again.close()


def test_fleet_page_shows_each_sensors_losses(cluster, monkeypatch):  # noqa: F811
    """The grid's card and the chosen sensor's view say what it lost: ring, NIC, detectors."""
    t0 = int(time.time()) - 100
    ch = ClickHouseStore(cluster.address(), cluster=cluster.name, database="t_loss_page", sensor="lossy")
    assert ch.open(), ch.status().message
    assert ch.send(_loss_batch("lossy", "r1", t0, 0, 0, 0, 0))
    assert ch.send(_loss_batch("lossy", "r1", t0 + 30, 7, 3, 1234, 12))
    ch.close()
    monkeypatch.setenv("NTM_CLICKHOUSE_DATABASE", "t_loss_page")
    monkeypatch.setattr(sys, "argv", ["dashboard.py", "--clickhouse", cluster.address(), "--cluster", cluster.name])
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    want = "ring dropped 7, NIC dropped 3, detectors skipped 1,234 (12 batches)"
    captions = [c.value for c in at.caption]
    assert sum(want in c for c in captions) == 2, captions  # the card, and the "All sensors" view
    at.selectbox(key="fleet_sensor").set_value("lossy").run()
    assert sum(want in c.value for c in at.caption) == 2


def test_sensor_ships_detector_skips_and_exports_them_in_metrics(cluster, tmp_path):  # noqa: F811
    """A real sensor whose detectors fall behind (test hook: 0.1 s per batch, a 4-packet stage queue):
    the metrics show the skipped analysis, and ClickHouse holds exactly the sensor's final loss counters."""
    from conftest import need
    from test_fleet_sensor import SensorProc, ports, send_udp, wait_metric

    need(os.geteuid() == 0, "live capture tests need root: run them with sudo")
    env = {**os.environ, "NTM_FLEET_FLUSH_S": "0.5", "NTM_CLICKHOUSE_DATABASE": "t_loss_live",
           "NTM_TEST_DETECTOR_DELAY_S": "0.1", "NTM_STAGE_QUEUE_PACKETS": "4"}
    port = ports()[0]
    proc = SensorProc("lossy-live", port, cluster.address(), tmp_path / "spool", tmp_path / "s.log", env)
    try:
        send_udp(port, 3000, gap=0.001)  # more than the pipe to the worker holds, in many batches
        assert wait_metric(proc, "ntm_sensor_detect_skipped_packets_total", lambda v: v > 0), \
            proc.log.read_text()[-2000:]
        assert "ntm_sensor_detect_skipped_batches_total" in proc.metrics()
        report = proc.finish()
    finally:
        if proc.proc.poll() is None:
            proc.kill()
    want = report["losses"]
    assert want["detect_skipped_packets"] > 0 and want["detect_skipped_batches"] > 0, report
    ch = ClickHouseStore(cluster.address(2), cluster=cluster.name, database="t_loss_live")
    got = ch.losses(TimeRange(int(time.time()) - 600, int(time.time()) + 5, sensor="lossy-live"))
    assert len(got) == 1, got
    assert {k: int(v) for k, v in got.iloc[0].items() if k != "sensor"} == want
    ch.close()


# -- 4. stale by the servers' clock ----------------------------------------------------------------------


class _ShiftedTime:
    """The `time` module as a host whose clock is `shift` seconds off sees it."""

    def __init__(self, shift: float) -> None:
        self.shift = shift

    def time(self) -> float:
        return time.time() + self.shift

    def time_ns(self) -> int:
        return time.time_ns() + int(self.shift * 1e9)

    def __getattr__(self, name: str):
        return getattr(time, name)


def _write_shifted(cluster, monkeypatch, sensor: str, shift: float) -> None:  # noqa: F811
    """A sensor whose clock is `shift` s off writes a minute of traffic (its batch times shifted too)."""
    from storehelp import udp_burst

    import store.base as base_mod
    import store.clickhouse as chmod
    from store.rollup import Rollup

    fake = _ShiftedTime(shift)
    with monkeypatch.context() as m:
        m.setattr(chmod, "time", fake)
        m.setattr(base_mod, "time", fake)
        ch = ClickHouseStore(cluster.address(), cluster=cluster.name, database="t_clock", sensor=sensor)
        assert ch.open(), ch.status().message
        r = Rollup(ch, sensor=sensor, iface="lo", flush_s=3600)
        r.add(udp_burst(int(fake.time()) - 30, 10, dport=4244))
        r.flush(final=True)
        ch.close()


def test_stale_marking_uses_the_servers_receive_time_not_the_sensors_clock(cluster, monkeypatch):  # noqa: F811
    """A sensor whose clock is 10 minutes behind, just flushed: fresh. One whose clock is 10 minutes ahead,
    silent for more than 3 flush intervals: stale. (By the sensor's clock against the page's it was the
    other way round for both.)"""
    from fleet_page import sensor_table

    monkeypatch.setenv("NTM_FLEET_FLUSH_S", "1")  # stale after 3 s without a flush (received: whole seconds)
    _write_shifted(cluster, monkeypatch, "ahead", +600)
    time.sleep(4.5)
    _write_shifted(cluster, monkeypatch, "behind", -600)
    ch = ClickHouseStore(cluster.address(2), cluster=cluster.name, database="t_clock")
    table = sensor_table(ch, time.time()).set_index("sensor")
    ch.close()
    assert not table.loc["behind", "stale"], table
    assert table.loc["ahead", "stale"], table
    assert 3 < table.loc["ahead", "age_s"] < 30, table


# -- 5. metrics address and a busy metrics port ----------------------------------------------------------


@pytest.mark.parametrize("how", ["default", "flag", "setting"])
def test_busy_metrics_port_is_a_clear_error_before_the_capture_starts(tmp_path, how):
    """--metrics-port on a port another program listens on, at the address asked for (default 127.0.0.1,
    --metrics-addr, FLEET_METRICS_ADDR): exit 2 at once naming that address, and no capture was started
    (before: the capture ran, then a traceback; and only 127.0.0.1 could be asked for)."""
    from conftest import need

    need(os.geteuid() == 0, "live capture tests need root: run them with sudo")
    addr = {"default": "127.0.0.1", "flag": "127.0.0.2", "setting": "127.0.0.3"}[how]
    env = {**os.environ, **({"NTM_FLEET_METRICS_ADDR": addr} if how == "setting" else {})}
    with socket.socket() as busy:
        busy.bind((addr, 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cmd = [sys.executable, str(ROOT / "packet_processor.py"), "sensor", "--name", "busy", "--iface", "lo",
               "--filter", "udp and dst port 9", "--clickhouse", "127.0.0.1:9", "--spool", str(tmp_path / "spool"),
               "--metrics-port", str(port), "--seconds", "5"]
        cmd += ["--metrics-addr", addr] if how == "flag" else []
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"cannot serve metrics on {addr}:{port}" in out.stderr and "in use" in out.stderr, out.stderr
    assert "capturing on" not in out.stderr and "Traceback" not in out.stderr, out.stderr
