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

    def read() -> None:
        try:
            store.sensors()
        except OSError as exc:
            errors.append(exc)

    t0 = time.monotonic()
    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.2)
    store.status()  # takes the store's lock: waits for the hung read
    waited = time.monotonic() - t0
    reader.join(10)
    assert waited < 5, f"the lock was held {waited:.1f} s"
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
    assert took < 12, took


def test_history_cli_over_a_hung_clickhouse_ends_with_a_clear_error(hung):
    """`history --clickhouse` against a hung server exits 1 with the timeout named, in seconds, not 30+."""
    env = {**os.environ, "NTM_CLICKHOUSE_QUERY_TIMEOUT_S": "1"}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, str(ROOT / "packet_processor.py"), "history", "--clickhouse", hung],
                         capture_output=True, text=True, timeout=60, env=env)
    took = time.monotonic() - t0
    assert out.returncode == 1, out.stderr[-2000:]
    assert "did not answer within 1 s" in json.loads(out.stdout)["error"]
    assert took < 15, took
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
