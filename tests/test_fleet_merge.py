"""Background merges and schema migrations never change what history counts, on a real 2-shard cluster.

A write attempt cut off after its rows and before its commit leaves rows of a version newer than the
committed one; `OPTIMIZE TABLE ... FINAL` (a merge, forced) on every shard must not let them erase the
committed rows. Migrations run twice (cut off before the version is recorded) or by two programs at
once count nothing twice. Every expectation is the traffic fed, not the store's own earlier answer."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from fleethelp import cluster  # noqa: F401  (the module's cluster fixture)
from storehelp import udp_burst

import store.clickhouse as chmod
from store.base import TimeRange
from store.clickhouse import CH_SCHEMA_VERSION, ClickHouseStore, minute_rows, minute_sql, with_id
from store.rollup import Rollup

M0 = 1_700_002_800 - 180
H0 = 1_700_002_800
MERGED = ("seconds", "seconds_1m", "conversations", "top_addrs", "top_ports", "caps", "alerts", "commits_max")


def optimize_everything(cluster, db: str) -> None:  # noqa: F811
    """Force the merge a background merge would do, on every table of every shard."""
    for shard in (1, 2):
        for table in MERGED:
            cluster.query(f"OPTIMIZE TABLE {db}.{table} FINAL", shard=shard)


def cut_off_write(ch: ClickHouseStore, r: Rollup):
    """The next flush's rows inserted under a new version, its commit never written (a sensor killed)."""
    batch = with_id(r.build())
    ver = ch.next_version()
    for table, frame in batch.frames.items():
        ch._insert(ch._client, table, frame, ver)
    ch._insert(ch._client, "seconds_1m", minute_rows(batch.frames["seconds"]), ver)
    return batch


def test_a_merge_after_a_cut_off_write_keeps_the_committed_rows(cluster):  # noqa: F811
    """100 packets committed, then 50 more written but never committed, then every table merged: 100."""
    ch = ClickHouseStore(cluster.address(), cluster=cluster.name, database="t_merge", sensor="s1")
    assert ch.open(), ch.status().message
    r = Rollup(ch, sensor="s1", flush_s=3600)
    r.add(udp_burst(M0, 100, dport=2000))
    r.flush()
    r.add(udp_burst(M0 + 10, 50, dport=2001))
    batch = cut_off_write(ch, r)
    optimize_everything(cluster, "t_merge")
    for rng in (TimeRange(), TimeRange(M0 - 3600, M0 + 3600), TimeRange(M0, M0 + 59)):
        assert ch.totals(rng)["packets"] == 100, rng
    ports = ch.top_ports(TimeRange(M0, M0 + 59), "udp")
    assert dict(zip(ports["port"], ports["packets"])) == {2000: 100}
    assert ch.send(batch)  # the retry of the cut-off flush (from the spool): now 150, and after another merge
    optimize_everything(cluster, "t_merge")
    assert ch.totals(TimeRange(M0 - 3600, M0 + 3600))["packets"] == 150
    ch.close()


def hours_of_traffic() -> list[np.ndarray]:
    return [udp_burst(H0 + 50 * k + 0.25, 3 + k % 5, dport=4000 + k % 3, spacing=0.01) for k in range(3 * 72)]


def feed(store, sensor: str, batches: list[np.ndarray]) -> None:
    r = Rollup(store, sensor=sensor, iface="lo", flush_s=3600)
    for i, b in enumerate(batches):
        r.add(b)
        if i % 3 == 2:
            r.flush()
    r.flush(final=True)


def fed_packets(batches: list[np.ndarray], since: int, until: int) -> int:
    sec = np.floor(np.concatenate(batches)["ts"])
    return int(((sec >= since) & (sec <= until)).sum())


RANGES = ((H0, H0 + 3 * 3600), (H0 + 30, H0 + 200), (H0 + 17, H0 + 2 * 3600 + 5))


def assert_exact(store: ClickHouseStore, batches: list[np.ndarray]) -> None:
    for since, until in RANGES:
        assert store.totals(TimeRange(since, until))["packets"] == fed_packets(batches, since, until), (since, until)


def fed_at_version(cluster, db: str, version: int) -> list[np.ndarray]:  # noqa: F811
    """Sensor alpha's hours of traffic written at this schema version, then the database as a program of
    `version` left it; the batches fed."""
    ch = ClickHouseStore(cluster.address(), cluster=cluster.name, database=db)
    assert ch.open(), ch.status().message
    batches = hours_of_traffic()
    feed(ch, "alpha", batches)
    ch.close()
    back_to_version(cluster, db, version)
    return batches


def back_to_version(cluster, db: str, version: int) -> None:  # noqa: F811
    """What a program of that schema version left: the later tables gone, meta saying `version`."""
    for shard in (1, 2):
        tables = ("seconds_1m", "seconds_1m_d", "commits_max", "commits_max_d") if version == 1 else ()
        for t in (*tables, "meta"):
            cluster.query(f"DROP TABLE IF EXISTS {db}.{t}", shard=shard)
        cluster.query(f"CREATE TABLE {db}.meta (key String, value String) ENGINE = TinyLog", shard=shard)
        for v in range(1, version + 1):
            cluster.query(f"INSERT INTO {db}.meta (key, value) VALUES", [("schema_version", str(v))], shard=shard)


def test_a_migration_cut_off_before_its_version_is_recorded_runs_again_exactly(cluster):  # noqa: F811
    """Version 3's backfill done, the program killed before writing version 3: the next open repeats it."""
    db = "t_migr_crash"
    batches = fed_at_version(cluster, db, 2)
    for shard in (1, 2):
        for stmt in minute_sql(db):
            if stmt.startswith("INSERT"):
                cluster.query(stmt, shard=shard)
    again = ClickHouseStore(cluster.address(2), cluster=cluster.name, database=db)
    assert again.open(), again.status().message
    assert_exact(again, batches)
    optimize_everything(cluster, db)
    assert_exact(again, batches)
    again.close()


def test_two_programs_migrating_at_once_count_nothing_twice(cluster):  # noqa: F811
    """Two stores (two sensors, or a sensor and the page) open a version-1 database at the same moment."""
    db = "t_migr_two"
    batches = fed_at_version(cluster, db, 1)
    stores = [ClickHouseStore(cluster.address(1 + i % 2), cluster=cluster.name, database=db) for i in range(3)]
    start = threading.Barrier(len(stores))

    def open_it(s: ClickHouseStore) -> None:
        start.wait()
        s.open()

    threads = [threading.Thread(target=open_it, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for s in stores:
        assert s.status().state == "ok", s.status().message
    assert_exact(stores[0], batches)
    for s in stores:
        s.close()


def test_a_version_3_database_moves_to_version_keys_with_its_rows(cluster, monkeypatch):  # noqa: F811
    """A database written by a version-3 program (merges keep one version per row) is migrated: the same
    totals, and from then on a cut-off write followed by a merge erases nothing."""
    db = "t_migr_v3"
    monkeypatch.setattr(chmod, "CH_SCHEMA_VERSION", 3)
    ch = ClickHouseStore(cluster.address(), cluster=cluster.name, database=db, sensor="alpha")
    assert ch.open(), ch.status().message
    batches = hours_of_traffic()
    feed(ch, "alpha", batches)
    ch.close()
    monkeypatch.setattr(chmod, "CH_SCHEMA_VERSION", CH_SCHEMA_VERSION)
    again = ClickHouseStore(cluster.address(2), cluster=cluster.name, database=db, sensor="alpha")
    assert again.open(), again.status().message
    for shard in (1, 2):
        assert int(cluster.query(f"SELECT max(toInt64(value)) FROM {db}.meta", shard=shard)[0][0]) == CH_SCHEMA_VERSION
    assert_exact(again, batches)
    r = Rollup(again, sensor="alpha", iface="lo", flush_s=3600)
    r.add(udp_burst(H0 + 3 * 3600 + 5, 9, dport=4100))
    cut_off_write(again, r)
    optimize_everything(cluster, db)
    assert_exact(again, batches)
    again.close()
    reopened = ClickHouseStore(cluster.address(), cluster=cluster.name, database=db)
    assert reopened.open(), reopened.status().message  # a second open of the version-4 database changes nothing
    assert_exact(reopened, batches)
    reopened.close()


@pytest.mark.parametrize("table", ["seconds", "alerts"])
def test_tables_keep_every_version_apart(cluster, table):  # noqa: F811
    """The schema itself: `ver` is part of every versioned table's sorting key."""
    db = "t_merge"
    ch = ClickHouseStore(cluster.address(), cluster=cluster.name, database=db)
    assert ch.open(), ch.status().message
    ch.close()
    text = cluster.query(f"SHOW CREATE TABLE {db}.{table}")[0][0]
    assert ", ver)" in text.split("ORDER BY")[1], text
