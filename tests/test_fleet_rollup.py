"""The ClickHouse store's per-minute rollups (`seconds_1m`) and compact visibility (`commits_max`), on a
real local 2-shard cluster: long ranges read whole minutes, ragged edges read seconds, and the answers
equal the embedded store's and the traffic fed, to the packet; a version-1 database is migrated."""

from __future__ import annotations

import time

import numpy as np
from fleethelp import cluster  # noqa: F401  (the module's cluster fixture)
from storehelp import udp_burst

from store.base import TimeRange
from store.clickhouse import CH_SCHEMA_VERSION, ClickHouseStore, with_id
from store.embedded import EmbeddedStore
from store.history import history_summary, series
from store.rollup import Rollup

H0 = 1_700_002_800  # an hour boundary


def hours_of_traffic(salt: int) -> list[np.ndarray]:
    """Three hours of bursts every 50 s (so open minutes are rewritten, and minutes cut at both ends)."""
    return [udp_burst(H0 + 50 * k + salt + 0.25, 3 + k % 5, src=f"10.{salt}.0.{1 + k % 4}", dport=4000 + k % 3,
                      wire_len=80 + k % 7, spacing=0.01) for k in range(3 * 72)]


def feed(store, sensor: str, batches: list[np.ndarray]) -> None:
    r = Rollup(store, sensor=sensor, iface="lo", flush_s=3600)
    for i, b in enumerate(batches):
        r.add(b)
        if i % 3 == 2:
            r.flush()  # the open minute is written again at the next flush: versions that must not add up
    r.flush(final=True)


def expected(batches: list[np.ndarray], since: int, until: int) -> tuple[int, int]:
    arr = np.concatenate(batches)
    sec = np.floor(arr["ts"])
    sel = (sec >= since) & (sec <= until)
    return int(sel.sum()), int(arr["wire_len"][sel].sum())


RANGES = ((H0 + 17, H0 + 3 * 3600 - 9), (H0, H0 + 2 * 3600 - 1), (H0 + 3599, H0 + 7261), (H0 + 30, H0 + 200))


def test_long_ranges_from_minutes_equal_the_embedded_store_and_the_traffic(cluster, tmp_path):  # noqa: F811
    """Totals, per-minute series and extent over ranges with ragged edges: exact, per sensor and in total."""
    ch = ClickHouseStore(cluster.address(2), cluster=cluster.name, database="t_minutes")
    emb = EmbeddedStore(str(tmp_path / "h.duckdb"))
    assert ch.open(), ch.status().message
    emb.open()
    fed = {"alpha": hours_of_traffic(1), "charlie": hours_of_traffic(2)}
    for sensor, batches in fed.items():
        feed(ch, sensor, batches)
        feed(emb, sensor, batches)
    for sensor in (None, "alpha", "charlie"):
        batches = fed[sensor] if sensor else fed["alpha"] + fed["charlie"]
        for since, until in RANGES:
            r = TimeRange(since, until, sensor)
            got, want = ch.totals(r), emb.totals(r)
            assert got == want, (sensor, since, until)
            assert (got["packets"], got["bytes"]) == expected(batches, since, until)
            assert ch.extent(r) == emb.extent(r)
            for width in (60, 300):
                a = ch.series(r, width, ("packets", "bytes")).astype("int64").reset_index(drop=True)
                b = emb.series(r, width, ("packets", "bytes")).astype("int64").reset_index(drop=True)
                assert a.equals(b), (sensor, since, until, width)
        assert history_summary(ch, H0, H0 + 3 * 3600, sensor) == history_summary(emb, H0, H0 + 3 * 3600, sensor)
        frame, _ = series(ch, H0, H0 + 3 * 3600 - 1, sensor)
        assert int(frame["packets"].sum()) == expected(batches, H0, H0 + 3 * 3600 - 1)[0]
    ch.close()
    emb.close()


def test_long_ranges_read_the_minute_rows_and_short_ranges_the_second_rows(cluster):  # noqa: F811
    """With the per-second rows of whole minutes gone, a long minute-aligned range still answers in full
    (from `seconds_1m`), and a short one from the second rows (now empty): which table answers is real."""
    ch = ClickHouseStore(cluster.address(), cluster=cluster.name, database="t_which")
    assert ch.open()
    batches = hours_of_traffic(3)
    feed(ch, "alpha", batches)
    whole = (H0, H0 + 2 * 3600 - 1)
    before = ch.totals(TimeRange(*whole))
    assert (before["packets"], before["bytes"]) == expected(batches, *whole)
    for shard in (1, 2):
        cluster.query("ALTER TABLE t_which.seconds DELETE WHERE ts >= 0", shard=shard)
    ok = False
    for _ in range(100):  # ALTER DELETE is a mutation, applied in the background
        if ch.totals(TimeRange(H0 + 60, H0 + 119))["packets"] == 0:
            ok = True
            break
        time.sleep(0.1)
    assert ok, "the mutation did not apply"
    assert ch.totals(TimeRange(*whole)) == before
    ch.close()


def test_a_version_1_database_is_migrated_with_its_rows(cluster):  # noqa: F811
    """A database written before the per-minute tables existed gets them, filled from its rows: the same
    answers after the migration, and nothing counted twice."""
    db = "t_migrate"
    ch = ClickHouseStore(cluster.address(), cluster=cluster.name, database=db)
    assert ch.open()
    batches = hours_of_traffic(4)
    feed(ch, "alpha", batches)
    want = expected(batches, H0, H0 + 3 * 3600)
    ch.close()
    for shard in (1, 2):  # back to what a version-1 program left
        for table in ("seconds_1m", "seconds_1m_d", "commits_max", "commits_max_d", "documents", "documents_d", "meta"):
            cluster.query(f"DROP TABLE IF EXISTS {db}.{table}", shard=shard)
        cluster.query(f"CREATE TABLE {db}.meta (key String, value String) ENGINE = TinyLog", shard=shard)
        cluster.query(f"INSERT INTO {db}.meta (key, value) VALUES", [("schema_version", "1")], shard=shard)
    again = ClickHouseStore(cluster.address(2), cluster=cluster.name, database=db)
    assert again.open(), again.status().message
    t = again.totals(TimeRange(H0, H0 + 3 * 3600))
    assert (t["packets"], t["bytes"]) == want
    assert int(cluster.query(f"SELECT max(toInt64(value)) FROM {db}.meta")[0][0]) == CH_SCHEMA_VERSION
    again.close()


def answers(store, r: TimeRange) -> tuple:
    """Every per-minute and per-second answer the page reads, for comparing two stores' contents."""
    from store.history import conversations

    t = store.totals(r)
    return (t["packets"], t["bytes"], store.series(r, 60, ("packets", "bytes")).astype("int64").to_dict("list"),
            store.top_addrs(r, "src", "packets", 50).to_dict("list"),
            store.top_ports(r, "udp", "bytes", 50).to_dict("list"),
            [(c["a"], c["b"], c["a_port"], c["b_port"], c["packets"], c["bytes"]) for c in
             conversations(store, r.since, r.until, r.sensor, n=50, by="bytes")],
            store.vlans(r).astype("int64").to_dict("list"))


def test_delta_flushes_ship_only_what_changed_and_answer_as_whole_minutes(cluster):  # noqa: F811
    """A fleet sensor's rollup (deltas): each flush of an open minute ships only the keys and seconds that
    changed since the last one, yet after every flush every answer equals a rollup that rewrites whole
    minutes (the reference) and the traffic fed; a delta batch re-sent (a lost acknowledgement) and the
    minute's close (written whole, its deltas replaced) count nothing twice."""
    db = "t_deltas"
    stores = {k: ClickHouseStore(cluster.address(1 + i), cluster=cluster.name, database=db, sensor=k)
              for i, k in enumerate(("whole", "delta"))}
    for s in stores.values():
        assert s.open(), s.status().message
    shipped: dict[str, list] = {"whole": [], "delta": []}

    class Outbox:
        def __init__(self, name: str) -> None:
            self.name = name

        def allocate_segment(self) -> int:
            return stores[self.name].allocate_segment()

        def write(self, batch) -> bool:
            batch = with_id(batch)  # as the sensor's spool keeps it: its id goes with every re-send
            shipped[self.name].append(batch)
            return stores[self.name].send(batch)

    rolls = {k: Rollup(Outbox(k), sensor=k, iface="lo", flush_s=3600, deltas=k == "delta") for k in stores}
    t0 = H0 + 7200
    bursts = [udp_burst(t0 + 2 * k + 0.1, 4, src=f"10.9.0.{1 + k % 3}", dst=f"10.9.1.{k % 4}", dport=4000 + k % 2,
                        wire_len=90 + k % 5, spacing=0.05) for k in range(50)]  # 100 s: 2 minutes, 2 s flushes
    r = TimeRange(t0, t0 + 119)
    for k, b in enumerate(bursts):
        for roll in rolls.values():
            roll.add(b)
            roll.flush(final=k == len(bursts) - 1)
        if k % 25 == 12 or k == len(bursts) - 1:
            want = expected(bursts[:k + 1], r.since, r.until)
            got = {n: answers(s, TimeRange(r.since, r.until, n)) for n, s in stores.items()}
            assert got["delta"][:2] == want and got["delta"] == got["whole"], k
    assert stores["delta"].send(shipped["delta"][40]) and stores["delta"].batches_skipped == 1  # a re-send
    assert answers(stores["delta"], TimeRange(r.since, r.until, "delta")) == \
        answers(stores["whole"], TimeRange(r.since, r.until, "whole"))
    open_rows = {n: sum(len(b.frames.get("conversations", [])) for b in shipped[n][:-1]) for n in shipped}
    assert open_rows["delta"] < open_rows["whole"] / 2, open_rows  # ~1 conversation changed per flush
    for s in stores.values():
        s.close()


def test_a_minute_closed_with_a_packet_hours_older_counts_once(cluster):  # noqa: F811
    """A flush that closes minute M (its delta segments replaced by its whole rows) and also carries a
    packet two hours older: the replacement is filed at M, not at the batch's oldest time, so a range
    that starts after the old packet still sees M once. Expectations: the packets fed, per range."""
    ch = ClickHouseStore(cluster.address(), cluster=cluster.name, database="t_close_old", sensor="s")
    assert ch.open(), ch.status().message
    m = H0 + 6 * 3600
    roll = Rollup(ch, sensor="s", iface="lo", flush_s=3600, deltas=True)
    fed = []
    for k in range(5):  # minute M, shipped as deltas over five flushes
        fed.append(udp_burst(m + 2 * k + 0.1, 3, src="10.8.0.1", dport=4100 + k % 2, spacing=0.05))
        roll.add(fed[-1])
        roll.flush()
    late = [udp_burst(m + 61.2, 2, src="10.8.0.2", spacing=0.05), udp_burst(m - 7200 + 5.5, 4, src="10.8.0.3",
                                                                              spacing=0.05)]
    fed += late
    roll.add(np.concatenate(late))
    roll.flush()  # closes M (M+61 is newer): its whole rows replace its deltas; the old minute comes along
    for since, until in ((m - 7200, m + 119), (m - 60, m + 119), (m, m + 59), (m - 3000, m + 600), (m + 60, m + 119)):
        t = ch.totals(TimeRange(since, until, "s"))
        assert (t["packets"], t["bytes"]) == expected(fed, since, until), (since, until)
        got = ch.series(TimeRange(since, until, "s"), 60, ("packets",))["packets"].sum()
        assert int(got) == expected(fed, since, until)[0], (since, until)
    roll.flush(final=True)
    t = ch.totals(TimeRange(m, m + 119, "s"))
    assert (t["packets"], t["bytes"]) == expected(fed, m, m + 119)
    ch.close()
