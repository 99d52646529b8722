"""Named JSON documents in the stores (exclusion rules, baselines): put, list, replace, delete, survive
a reopen; a schema-version-1 store (DuckDB and ClickHouse) opens and migrates with its history intact."""

from __future__ import annotations

import duckdb
import pytest
from fleethelp import cluster  # noqa: F401  (the module's cluster fixture)
from storehelp import udp_burst

from store.base import SCHEMA_VERSION, TimeRange
from store.clickhouse import ClickHouseStore, create_sql
from store.embedded import MIGRATIONS, EmbeddedStore
from store.rollup import Rollup

RULE = {"detector": "port_scan", "source": "127.0.0.0/8", "comment": "our own scanner"}


def check_documents(s) -> None:
    """The document API on an open store, whatever the backend."""
    assert s.docs("exclusion") == []
    s.put_doc("exclusion", "r1", RULE)
    s.put_doc("exclusion", "r0", {"detector": "spike"})
    s.put_doc("baseline", "monday", {"hosts": ["127.0.0.1"]})
    got = s.docs("exclusion")
    assert [d["name"] for d in got] == ["r0", "r1"]
    assert got[1]["body"] == RULE and got[1]["updated"] > 0
    s.put_doc("exclusion", "r1", {**RULE, "comment": "changed"})  # a replace, not a second row
    got = s.docs("exclusion")
    assert len(got) == 2 and got[1]["body"]["comment"] == "changed"
    assert s.delete_doc("exclusion", "r0") is True
    assert s.delete_doc("exclusion", "r0") is False
    assert [d["name"] for d in s.docs("exclusion")] == ["r1"]
    assert [d["body"] for d in s.docs("baseline")] == [{"hosts": ["127.0.0.1"]}]
    with pytest.raises(ValueError, match="kind and a name"):
        s.put_doc("exclusion", "", RULE)
    with pytest.raises(ValueError, match="JSON object"):
        s.put_doc("exclusion", "x", ["not", "a", "dict"])  # type: ignore[arg-type]


def test_embedded_documents_survive_a_reopen(tmp_path):
    path = str(tmp_path / "h.duckdb")
    s = EmbeddedStore(path)
    assert s.open()
    check_documents(s)
    s.close()
    again = EmbeddedStore(path)
    assert again.open()
    assert [(d["name"], d["body"]["comment"]) for d in again.docs("exclusion")] == [("r1", "changed")]
    again.close()
    ro = EmbeddedStore(path, read_only=True)
    assert ro.open()
    assert len(ro.docs("exclusion")) == 1
    with pytest.raises(OSError, match="read-only"):
        ro.put_doc("exclusion", "r2", RULE)
    ro.close()


def test_a_version_1_embedded_store_migrates_and_keeps_its_history(tmp_path):
    """A store written before documents existed (schema 1, with traffic) opens, migrates to the current
    version, keeps every packet, and takes documents."""
    path = str(tmp_path / "v1.duckdb")
    con = duckdb.connect(path)
    for stmt in MIGRATIONS[1]:
        con.execute(stmt)
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.close()
    # Fill it through the version-1 tables only (the rollup writes no documents).
    s = EmbeddedStore(path)
    s._connect_and_migrate = lambda: duckdb.connect(path)  # open without migrating: a v1 program
    assert s.open()
    r = Rollup(s, origin="live", flush_s=3600)
    r.add(udp_burst(1_700_000_040, 25))
    r.flush(final=True)
    s.close()
    tables = {row[0] for row in duckdb.connect(path, read_only=True).execute(
        "SELECT table_name FROM information_schema.tables").fetchall()}
    assert "documents" not in tables

    s = EmbeddedStore(path)
    assert s.open(), s.status()
    assert s.status().moved_aside is None
    assert s.totals(TimeRange())["packets"] == 25
    s.put_doc("exclusion", "r1", RULE)
    s.close()
    con = duckdb.connect(path, read_only=True)
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    assert con.execute("SELECT count(*) FROM documents").fetchone()[0] == 1
    con.close()


def test_clickhouse_documents_and_migration_from_version_1(cluster):  # noqa: F811
    """On ClickHouse 18.16 (a 2-shard cluster): the same API through the Distributed table, and a
    database created at version 1 migrates on open, on every shard."""
    s = ClickHouseStore(cluster.address(), cluster="fleet", database="t_docs", sensor="s1")
    assert s.open(), s.status()
    check_documents(s)
    s.close()
    again = ClickHouseStore(cluster.address(), cluster="fleet", database="t_docs")
    assert again.open()
    assert [(d["name"], d["body"]["comment"]) for d in again.docs("exclusion")] == [("r1", "changed")]
    again.close()

    for shard in (1, 2):
        for stmt in create_sql("t_v1"):
            cluster.query(stmt, shard=shard)
        cluster.query("INSERT INTO t_v1.meta (key, value) VALUES", [("schema_version", "1")], shard=shard)
    one = ClickHouseStore(cluster.address(), cluster="fleet", database="t_v1")
    assert one.open(), one.status()
    one.put_doc("exclusion", "r1", RULE)
    assert [d["body"] for d in one.docs("exclusion")] == [RULE]
    one.close()
    for shard in (1, 2):
        versions = cluster.query("SELECT max(toInt64(value)) FROM t_v1.meta WHERE key = 'schema_version'",
                                 shard=shard)
        assert versions[0][0] == SCHEMA_VERSION
        assert cluster.query("SELECT count() FROM system.tables WHERE database = 't_v1' AND name = 'documents'",
                             shard=shard)[0][0] == 1
