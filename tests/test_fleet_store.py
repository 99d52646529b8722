"""The ClickHouse store behind the Store interface, on a real local 2-shard cluster (Debian's 18.16).

History from ClickHouse must equal history from the embedded store fed the same batches, and the
traffic that was fed; a re-sent batch, a half-written attempt and the open-minute rewrite must never
count twice.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from fleethelp import cluster  # noqa: F401  (the module's cluster fixture)
from storehelp import records, udp_burst

from store.base import TimeRange
from store.clickhouse import ClickHouseStore, IdBatch, with_id
from store.embedded import EmbeddedStore
from store.history import history_summary
from store.rollup import Rollup

H0 = 1_700_002_800  # an hour boundary (divisible by 3600)
M0 = H0 - 180  # three minutes before it


def traffic(sensor_salt: int) -> list[np.ndarray]:
    """Batches across three minutes and an hour boundary: UDP, TCP, ICMP, two addresses, a late packet."""
    out = []
    for k in range(8):
        t = M0 + 25 * k + sensor_salt
        out.append(udp_burst(t, 40 + k, src=f"10.{sensor_salt}.0.{1 + k % 3}", dport=5000 + k % 4,
                             wire_len=90 + k))
        out.append(records([{"ts": t + 0.5, "cls": 0, "src": "10.9.0.1", "dst": f"10.9.0.{2 + k % 2}",
                             "dport": 443, "wire_len": 60, "direction": k % 4},
                            {"ts": t + 0.7, "cls": 2, "src": "10.9.0.4", "dst": "10.9.0.5", "wire_len": 98}]))
    out.append(udp_burst(M0 + 5, 3, dport=5999))  # late: a minute already closed gets a new segment
    return out


def feed(store, sensor: str, batches: list[np.ndarray]) -> Rollup:
    """The batches through a Rollup into `store`, a flush after every other batch (open minutes rewritten)."""
    r = Rollup(store, sensor=sensor, iface="lo", flush_s=3600)
    for i, b in enumerate(batches):
        r.add(b)
        if i % 2:
            r.flush()
    r.add_alerts([{"detector": "port_scan", "severity": "warning", "source": "10.9.0.1", "target": "10.9.0.2",
                   "first_ts": float(M0 + 3), "last_ts": float(M0 + 50), "count": 3, "evidence": "ports 1-3"}])
    r.flush()
    r.add_alerts([{"detector": "port_scan", "severity": "warning", "source": "10.9.0.1", "target": "10.9.0.2",
                   "first_ts": float(M0 + 3), "last_ts": float(M0 + 90), "count": 9, "evidence": "ports 1-9"}])
    r.flush(final=True)
    return r


def comparable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("error",)}


@pytest.mark.parametrize("mode", ["single", "cluster"])
def test_history_equals_the_embedded_store_and_the_traffic(cluster, tmp_path, mode):  # noqa: F811
    """Two sensors' rows through the interface come back exactly: per sensor, in total and in windows."""
    db = f"t_equal_{mode}"
    ch = ClickHouseStore(cluster.address(), cluster=cluster.name if mode == "cluster" else None, database=db)
    emb = EmbeddedStore(str(tmp_path / "h.duckdb"))
    assert ch.open(), ch.status().message
    emb.open()
    fed = {}
    for salt, sensor in ((1, "alpha"), (2, "charlie")):
        batches = traffic(salt)
        fed[sensor] = batches
        feed(ch, sensor, batches)
        feed(emb, sensor, batches)
    assert ch.status().batches_written > 10 and ch.status().state == "ok"
    for sensor in (None, "alpha", "charlie"):
        want = np.concatenate(fed[sensor] if sensor else fed["alpha"] + fed["charlie"])
        for since, until in ((None, None), (M0 + 30, M0 + 100), (H0, None), (M0 + 61, M0 + 61)):
            got = history_summary(ch, since, until, sensor)
            assert comparable(got) == comparable(history_summary(emb, since, until, sensor)), (sensor, since, until)
            lo = since if since is not None else -1
            hi = until if until is not None else 2 ** 62
            sel = (np.floor(want["ts"]) >= lo) & (np.floor(want["ts"]) <= hi)
            assert got["packets"] == int(sel.sum())
            assert got["bytes_wire"] == int(want["wire_len"][sel].sum())
    total = history_summary(ch)
    assert total["alerts"] and total["alerts"][0]["count"] == 9 and len(total["alerts"]) == 2  # one per sensor
    conv = ch.top_conversations(TimeRange(), n=100)
    assert int(conv["packets"].sum()) == int(emb.top_conversations(TimeRange(), n=100)["packets"].sum())
    if mode == "cluster":  # alpha and charlie hash to different shards; each shard holds only its sensor
        per_shard = [dict(cluster.query(f"SELECT sensor, count() FROM {db}.seconds GROUP BY sensor", shard=s))
                     for s in (1, 2)]
        assert all(per_shard) and not set(per_shard[0]) & set(per_shard[1]), per_shard
    ch.close()
    emb.close()


def test_open_minute_rewrites_leave_old_versions_that_never_count(cluster):  # noqa: F811
    """Three flushes of one open minute put three versions in ClickHouse; history counts the last one."""
    ch = ClickHouseStore(cluster.address(), cluster=cluster.name, database="t_rewrite")
    assert ch.open()
    r = Rollup(ch, sensor="s1", flush_s=3600)
    fed = 0
    for k in range(3):
        r.add(udp_burst(M0 + 10 * k, 100, dport=2000 + k))
        fed += 100
        r.flush()
        assert ch.totals(TimeRange())["packets"] == fed
    raw = sum(cluster.query("SELECT sum(packets) FROM t_rewrite.seconds", shard=s)[0][0] for s in (1, 2))
    assert raw == 100 + 200 + 300  # every version is still stored (no merge asked for): the filter does the work
    r.add(udp_burst(M0 + 61, 7))
    r.flush(final=True)
    assert ch.totals(TimeRange())["packets"] == 307
    ports = ch.top_ports(TimeRange(M0, M0 + 59), "udp")
    assert dict(zip(ports["port"], ports["packets"])) == {2000: 100, 2001: 100, 2002: 100}
    ch.close()


def test_a_batch_sent_twice_or_half_written_counts_once(cluster):  # noqa: F811
    """Lost acknowledgement: the same batch again (also from a new process) is skipped; a half-written
    attempt (rows inserted, no commit) stays invisible and the retry counts once."""
    addr = cluster.address(2)
    built = Rollup(None, sensor="s2", flush_s=3600)
    built.add(udp_burst(M0, 50))
    batch = with_id(built.build(final=True))
    a = ClickHouseStore(addr, cluster=cluster.name, database="t_twice", sensor="s2")
    assert a.open()
    # An attempt that died after inserting the rows but before its commit:
    a._insert(a._client, "seconds", batch.frames["seconds"], a.next_version())
    assert a.totals(TimeRange())["packets"] == 0
    assert a.send(batch)
    assert a.send(batch)  # the acknowledgement was lost: sent again
    assert a.batches_skipped == 1
    b = ClickHouseStore(addr, cluster=cluster.name, database="t_twice", sensor="s2")  # a restarted sensor
    assert b.send(IdBatch(**{k: getattr(batch, k) for k in ("frames", "replaces", "alerts", "origins",
                                                            "hours_done")}, batch_id=batch.batch_id))
    assert b.batches_skipped == 1
    t = b.totals(TimeRange())
    assert t["packets"] == 50 and t["bytes"] == 5000
    assert history_summary(b)["top10_udp_dst_ports"] == [[2000, 50]]
    a.close()
    b.close()


def test_unreachable_server_and_wrong_password_are_clear_errors(cluster, monkeypatch, caplog):  # noqa: F811
    """No crash: a closed port and a wrong password each give an error state naming the cause; the
    password never appears in the message or the log."""
    caplog.set_level(logging.INFO)
    built = Rollup(None, sensor="s3", flush_s=3600)
    built.add(udp_burst(M0, 5))
    batch = built.build(final=True)
    down = ClickHouseStore("127.0.0.1:9", connect_timeout=1)
    assert not down.open()
    assert "unreachable" in down.status().message and "127.0.0.1:9" in down.status().message
    assert not down.send(batch)
    secret = "s3cr3t-not-the-password"
    monkeypatch.setenv("CLICKHOUSE_PASSWORD", secret)
    wrong = ClickHouseStore(cluster.address(), database="t_auth")
    assert not wrong.open()
    msg = wrong.status().message
    assert "authentication failed" in msg and "'default'" in msg, msg
    assert not wrong.send(batch) and wrong.status().state == "error"
    assert secret not in msg and secret not in caplog.text


def test_password_from_a_file(cluster, tmp_path, monkeypatch, caplog):  # noqa: F811
    """The test cluster's user "fleet" has a non-empty password: the one in CLICKHOUSE_PASSWORD_FILE opens
    the store (CLICKHOUSE_PASSWORD, wrong here, is ignored); a wrong one in the file fails clearly."""
    caplog.set_level(logging.INFO)
    f = tmp_path / "pw"
    f.write_text("fleet-test-password\n")
    monkeypatch.setenv("CLICKHOUSE_USER", "fleet")
    monkeypatch.setenv("CLICKHOUSE_PASSWORD", "wrong")
    without = ClickHouseStore(cluster.address(), database="t_pwfile")
    assert not without.open() and "authentication failed for user 'fleet'" in without.status().message
    monkeypatch.setenv("CLICKHOUSE_PASSWORD_FILE", str(f))
    s = ClickHouseStore(cluster.address(), cluster=cluster.name, database="t_pwfile")
    assert s.open(), s.status().message
    s.close()
    f.write_text("not-the-fleet-password\n")
    bad = ClickHouseStore(cluster.address(), database="t_pwfile")
    assert not bad.open()
    msg = bad.status().message
    assert "authentication failed for user 'fleet'" in msg and "CLICKHOUSE_PASSWORD_FILE" in msg, msg
    assert "not-the-fleet-password" not in msg + caplog.text and "fleet-test-password" not in msg + caplog.text


def test_retention_drops_whole_old_days_on_every_shard(cluster):  # noqa: F811
    """Rows of a day older than the retention go (dropped partitions, both shards); recent rows stay."""
    ch = ClickHouseStore(cluster.address(), cluster=cluster.name, database="t_prune")
    assert ch.open()
    now = H0 + 86400 * 10
    for sensor in ("alpha", "charlie"):  # one on each shard
        r = Rollup(ch, sensor=sensor, flush_s=3600)
        r.add(udp_burst(H0, 10))  # ten days old
        r.add(udp_burst(now - 3600, 4))  # an hour old
        r.flush(final=True)
    assert ch.totals(TimeRange())["packets"] == 28
    assert ch.prune(retention_days=7, now=now) > 0
    assert ch.totals(TimeRange())["packets"] == 8
    assert history_summary(ch, since=now - 7200)["packets"] == 8
    ch.close()


def test_newer_schema_is_refused_and_left_alone(cluster):  # noqa: F811
    """A database written by a newer version is an error state; nothing is dropped or changed."""
    cluster.query("CREATE DATABASE IF NOT EXISTS t_newer")
    cluster.query("CREATE TABLE IF NOT EXISTS t_newer.meta (key String, value String) ENGINE = TinyLog")
    cluster.query("INSERT INTO t_newer.meta (key, value) VALUES", [("schema_version", "99")])
    s = ClickHouseStore(cluster.address(), database="t_newer")
    assert not s.open()
    assert "newer" in s.status().message
    assert cluster.query("SELECT count() FROM system.tables WHERE database = 't_newer'")[0][0] == 1


def test_spool_keeps_order_survives_reopen_and_drops_oldest_counted(tmp_path):
    """The spool reads back what it was given, in order, after a reopen (a restart); over its bound the
    oldest batches go and the packets lost are counted (a segment a later batch rewrites is not lost)."""
    from fleet.spool import Spool

    r = Rollup(None, sensor="s1", flush_s=3600)
    batches = []
    for k in range(4):
        r.add(udp_burst(M0 + 70 * k, 10 + k, dport=3000 + k))  # a new minute each time: k-1 closes
        batches.append(with_id(r.build()))
    r.add(udp_burst(M0 + 215, 5))  # the open (fourth) minute written again
    batches.append(with_id(r.build(final=True)))
    spool = Spool(str(tmp_path / "sp"), 10 ** 9)
    for b in batches:
        spool.put(b)
    again = Spool(str(tmp_path / "sp"), 10 ** 9)
    assert len(again) == 5 and again.packets() == 10 + 11 + 12 + 13 + 5
    head = again.head()
    assert head.batch_id == batches[0].batch_id and head.packets() == 10
    ch_like = head.frames["conversations"]
    assert list(ch_like["b_port"]) == [3000] and int(ch_like["packets"].sum()) == 10
    again.pop(head.batch_id)
    assert again.head().batch_id == batches[1].batch_id
    tiny = Spool(str(tmp_path / "sp"), 1)  # over the bound: all but the newest entry go at the next put
    tiny.put(batches[4])  # sent again: batches 1..4 go; the fourth minute's versions in 3 and 4 are no loss
    assert len(tiny) == 1 and tiny.dropped_batches == 4
    assert tiny.dropped_packets == 11 + 12  # minutes two and three; minute four is in the entry kept
    assert tiny.head().packets() == 18
    assert Spool(str(tmp_path / "sp"), 10 ** 9).dropped_packets == 23  # the count survives restarts
