"""Helpers for the fleet tests: a real local 2-shard ClickHouse cluster (scripts/clickhouse_cluster.sh)."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, need

SCRIPT = ROOT / "scripts" / "clickhouse_cluster.sh"


@dataclass
class Cluster:
    """Two ClickHouse servers on 127.0.0.1 (shard 1 on `port`, shard 2 on `port + 1`), cluster name `fleet`."""

    folder: str
    port: int
    name: str = "fleet"

    def address(self, shard: int = 1) -> str:
        """HOST:PORT of a shard's native protocol."""
        return f"127.0.0.1:{self.port + shard - 1}"

    def stop_shard(self, shard: int) -> None:
        """SIGTERM one server (by its PID) and wait until it is gone."""
        subprocess.run([str(SCRIPT), "stop-shard", self.folder, str(shard)], check=True, timeout=30)

    def start_shard(self, shard: int) -> None:
        """Start one server again on its data; returns once it answers."""
        subprocess.run([str(SCRIPT), "start-shard", self.folder, str(shard)], check=True, timeout=60)

    def query(self, sql: str, data: list | None = None, shard: int = 1) -> list[tuple]:
        """Rows of one query on one shard (its local tables)."""
        from clickhouse_driver import Client

        c = Client("127.0.0.1", port=self.port + shard - 1, connect_timeout=3, send_receive_timeout=20)
        try:
            return c.execute(sql, data) if data is not None else c.execute(sql)
        finally:
            c.disconnect()


def free_base_port() -> int:
    """A port P with P, P+1, P+100, P+101, P+200, P+201 free on 127.0.0.1."""
    for base in range(19500, 29000, 7):
        ports = (base, base + 1, base + 100, base + 101, base + 200, base + 201)
        ok = True
        for p in ports:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free ports for a ClickHouse cluster")


def cluster_fixture(tmp_path_factory) -> Iterator[Cluster]:
    """Start the 2-shard cluster in a temporary folder; always stopped (by PID) afterwards."""
    need(shutil.which("clickhouse-server") is not None or Path("/usr/sbin/clickhouse-server").exists(),
         "Debian's clickhouse-server is not installed (scripts/setup.sh --test installs it)")
    folder = str(tmp_path_factory.mktemp("clickhouse"))
    base = free_base_port()
    try:
        subprocess.run([str(SCRIPT), "start", folder, str(base)], check=True, timeout=90, capture_output=True)
        yield Cluster(folder, base)
    finally:
        subprocess.run([str(SCRIPT), "stop", folder], timeout=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    """A running local 2-shard ClickHouse cluster for this test module."""
    yield from cluster_fixture(tmp_path_factory)
