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
