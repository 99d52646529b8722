"""The ClickHouse store's top conversations over long ranges (the fleet page's 24 h question), on a real
local 2-shard cluster: the exact top-N shortcut (each closed hour's largest conversations as candidates,
the largest left-out value as the bound) gives exactly the conversations and totals of the traffic fed
when it applies, and when it cannot prove its answer (many near-equal conversations) it falls back to
the full grouping, or, asked for speed, says it is approximate with bounds that hold the true values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fleethelp import cluster  # noqa: F401  (the module's cluster fixture)
from storehelp import records

from fleet_page import SensorView
from store.base import Store, TimeRange
from store.clickhouse import CONV_TOP_K, ClickHouseStore
from store.history import conversations
from store.rollup import Rollup

H0 = 1_700_002_800  # an hour boundary
HOURS = 4
# Minute-aligned bounds cutting the first and the last hour: minute rows at both ends, whole hours between.
SINCE, UNTIL = H0 + 600, H0 + 3 * 3600 + 1200 - 1


def heavy_hitters(salt: int, hour: int) -> list[dict]:
    """Six conversations with many packets every hour (distinct totals), and 250 one-packet ones."""
    rows = []
    t = H0 + 3600 * hour
    for i in range(6):
        for k in range(30 + 7 * i + hour):
            rows.append({"ts": t + 5 + k * 97.3 % 3500, "src": f"10.{salt}.0.{i + 1}", "sport": 5000 + i,
                         "dst": "10.200.0.1", "dport": 7000 + i, "wire_len": 200 + 13 * i + salt})
    for j in range(250):
        rows.append({"ts": t + 3 + j * 14.1, "src": f"10.{salt}.1.{j % 200}", "sport": 20000 + hour * 1000 + j,
                     "dst": f"10.201.0.{j % 50}", "dport": 53, "wire_len": 60 + (j * 37) % 1000})
    return rows


def near_equal(salt: int, hour: int) -> list[dict]:
    """300 conversations an hour, each one or two packets of 500..520 bytes: nothing stands out."""
    t = H0 + 3600 * hour
    rows = []
    for j in range(300):
        for k in range(1 + (j + hour) % 2):
            rows.append({"ts": t + 2 + j * 11.7 + k, "src": f"10.{salt}.2.{j % 100}", "sport": 30000 + j % 7,
                         "dst": f"10.202.{hour}.{j % 90}", "dport": 443, "wire_len": 500 + (j * 7 + k) % 21})
    return rows


def feed(store: ClickHouseStore, sensor: str, hours: list[list[dict]]) -> None:
    """Hour by hour through the real rollup (an hour's rows are written when the next hour starts)."""
    r = Rollup(store, sensor=sensor, iface="lo", flush_s=3600)
    for rows in hours:
        r.add(records(sorted(rows, key=lambda x: x["ts"])))
        r.flush()
    r.flush(final=True)


def expected(rows: list[dict], by: str, n: int) -> list[tuple]:
    """The true top n of the range from the packets fed (sources sort below destinations: no swap)."""
    df = pd.DataFrame(rows)
    minute = (df["ts"] // 60 * 60).astype(np.int64)
    df = df[(minute >= SINCE - SINCE % 60) & (minute <= UNTIL)]
    g = df.groupby(["src", "sport", "dst", "dport"], as_index=False).agg(
        packets=("ts", "size"), bytes=("wire_len", "sum"))
    g = g.sort_values([by, "src", "dst", "sport", "dport"], ascending=[False, True, True, True, True])
    return [(r.src, int(r.sport), r.dst, int(r.dport), int(r.packets), int(r.bytes))
            for r in g.head(n).itertuples(index=False)]


def totals_of(rows: list[dict]) -> dict[tuple, tuple[int, int]]:
    """Every conversation of the range: (packets, bytes)."""
    got = expected(rows, "bytes", 10 ** 9)
    return {k[:4]: k[4:] for k in got}


def as_tuples(df: pd.DataFrame) -> list[tuple]:
    return [(r.a, int(r.a_port), r.b, int(r.b_port), int(r.packets), int(r.bytes)) for r in df.itertuples(index=False)]


@pytest.fixture(scope="module")
def stores(cluster):  # noqa: F811
    """Two databases on the cluster: heavy hitters (the shortcut applies) and near-equal conversations."""
    fed: dict[str, list[dict]] = {"heavy": [], "flat": []}
    out = {}
    for name, make in (("heavy", heavy_hitters), ("flat", near_equal)):
        ch = ClickHouseStore(cluster.address(), cluster=cluster.name, database=f"t_topconv_{name}")
        assert ch.open(), ch.status().message
        for salt, sensor in ((1, "alpha"), (2, "bravo")):
            hours = [make(salt, h) for h in range(HOURS)]
            feed(ch, sensor, hours)
            fed[name] += [row for h in hours for row in h]
        out[name] = ch
    yield out, fed
    for ch in out.values():
        ch.close()


@pytest.mark.parametrize("by", ["bytes", "packets"])
def test_shortcut_gives_the_exact_top_conversations_of_the_traffic(stores, by):
    """Heavy hitters over 2 sensors, whole hours and cut ones: the shortcut answers (not the fallback), with
    exactly the conversations, order and totals of the packets fed, equal to the full grouping."""
    (chs, fed) = stores
    ch = chs["heavy"]
    r = TimeRange(SINCE, UNTIL)
    got = ch.top_conversations(r, by, 10, exact=True)
    assert got.attrs["method"] == "shortcut"
    want = expected(fed["heavy"], by, 10)
    assert as_tuples(got) == want
    assert as_tuples(Store.top_conversations(ch, r, by, 10)) == want  # the full grouping agrees
    assert want[0][4] > 30  # the data really has heavy hitters...
    assert ch.rows("conversations", TimeRange(H0, H0 + 599), 10 ** 6)["minute"].nunique() == 10  # ...and cut hours
    one = ch.top_conversations(TimeRange(SINCE, UNTIL, "bravo"), by, 5, exact=True)
    assert one.attrs["method"] == "shortcut"
    assert as_tuples(one) == expected([x for x in fed["heavy"] if x["src"].startswith("10.2.")], by, 5)


def test_near_equal_conversations_fall_back_to_the_exact_grouping(stores):
    """300 near-equal conversations per hour: the bound cannot be met, so exact=True groups everything
    and equals the traffic fed."""
    (chs, fed) = stores
    got = chs["flat"].top_conversations(TimeRange(SINCE, UNTIL), "bytes", 10, exact=True)
    assert got.attrs["method"] == "full"
    assert as_tuples(got) == expected(fed["flat"], "bytes", 10)


@pytest.mark.parametrize("by", ["bytes", "packets"])
def test_near_equal_conversations_asked_fast_are_marked_approximate_with_true_bounds(stores, by):
    """exact=False: the answer says it is approximate; each listed conversation's true packets and bytes
    lie in [figure - error, figure], and no conversation left out has more than `unlisted_max` (checked
    against every conversation fed)."""
    (chs, fed) = stores
    got = chs["flat"].top_conversations(TimeRange(SINCE, UNTIL), by, 10, exact=False)
    assert got.attrs["method"] == "approximate"
    assert len(got) == 10
    truth = totals_of(fed["flat"])
    col = 0 if by == "packets" else 1
    listed = set()
    for row in got.itertuples(index=False):
        key = (row.a, int(row.a_port), row.b, int(row.b_port))
        listed.add(key)
        for i, count in enumerate(("packets", "bytes")):  # both counts: bounds that hold the true totals
            fig, err = int(getattr(row, count)), int(getattr(row, f"{count}_error"))
            assert err >= 0 and fig - err <= truth[key][i] <= fig, (key, count, fig, err, truth[key][i])
    assert max(v[col] for k, v in truth.items() if k not in listed) <= got.attrs["unlisted_max"]
    # The fleet page asks through its SensorView (fast: never the full grouping); its rows say "approximate".
    rows = conversations(SensorView(chs["flat"], None), SINCE, UNTIL, n=10, by=by)
    assert [(x["a"], x["a_port"], x[by]) for x in rows] == [(r.a, r.a_port, getattr(r, by)) for r in got.itertuples()]
    assert all(x.get("approx") and x["error"] == x[f"{by}_error"] for x in rows)
    assert not any(x.get("approx") for x in conversations(chs["flat"], SINCE, UNTIL, n=10, by=by))  # exact


def test_hour_candidates_are_capped_and_bounded(cluster):  # noqa: F811
    """An hour with more conversations than CONV_TOP_K keeps K per `top_by` and the largest left out as
    `rest`: read from the table itself, against the values fed."""
    ch = ClickHouseStore(cluster.address(2), cluster=cluster.name, database="t_topconv_cap")
    assert ch.open(), ch.status().message
    rows = heavy_hitters(3, 0)
    feed(ch, "charlie", [rows])
    got = cluster.query("SELECT top_by, count(), any(rest), min(bytes) FROM t_topconv_cap.conv_top_1h_d "
                        "GROUP BY top_by ORDER BY top_by")
    sizes = sorted((v[1] for v in totals_of_all(rows).values()), reverse=True)
    assert got[0][0] == "bytes" and got[0][1] == CONV_TOP_K
    assert got[0][2] == sizes[CONV_TOP_K] and got[0][3] == sizes[CONV_TOP_K - 1]
    ch.close()


def totals_of_all(rows: list[dict]) -> dict[tuple, tuple[int, int]]:
    """Every conversation fed: (packets, bytes)."""
    g = pd.DataFrame(rows).groupby(["src", "sport", "dst", "dport"]).agg(p=("ts", "size"), b=("wire_len", "sum"))
    return {k: (int(v.p), int(v.b)) for k, v in g.iterrows()}


def test_a_version_3_database_gets_its_hour_candidates_when_migrated(cluster):  # noqa: F811
    """A database written before `conv_top_1h` existed (schema 3) is filled from its hour rows when opened
    (as many rows as the writes made; run again, it adds none): the shortcut then answers, exactly."""
    db = "t_topconv_migrate"
    ch = ClickHouseStore(cluster.address(), cluster=cluster.name, database=db)
    assert ch.open(), ch.status().message
    fed = []
    for salt, sensor in ((1, "alpha"), (2, "bravo")):
        hours = [heavy_hitters(salt, h) for h in range(HOURS)]
        feed(ch, sensor, hours)
        fed += [row for h in hours for row in h]
    ch.close()
    written = cluster.query(f"SELECT count() FROM {db}.conv_top_1h_d")[0][0]
    for drop in (True, False):  # back to schema 3 (no candidates table), then a migration run a second time
        for shard in (1, 2):
            drops = (f"DROP TABLE {db}.conv_top_1h_d", f"DROP TABLE {db}.conv_top_1h") if drop else ()
            for stmt in (*drops, f"DROP TABLE {db}.meta",
                         f"CREATE TABLE {db}.meta (key String, value String) ENGINE = TinyLog"):
                cluster.query(stmt, shard=shard)
            cluster.query(f"INSERT INTO {db}.meta (key, value) VALUES", [("schema_version", "3")], shard=shard)
        ch = ClickHouseStore(cluster.address(2), cluster=cluster.name, database=db)
        assert ch.open(), ch.status().message
        assert cluster.query(f"SELECT count() FROM {db}.conv_top_1h_d")[0][0] == written  # filled, and once
        got = ch.top_conversations(TimeRange(SINCE, UNTIL), "bytes", 10)
        assert got.attrs["method"] == "shortcut"
        assert as_tuples(got) == expected(fed, "bytes", 10)
        ch.close()


def test_an_hour_built_at_once_has_one_row_per_conversation():
    """A whole hour added and closed in one build (a sensor's hour-long batch, an import's last flush): its
    hour rows hold each conversation once, with its whole counts. Before the fix a conversation came once
    per minute, which the hour candidates took as separate conversations and ReplacingMergeTree (keyed by
    the conversation) collapsed to one minute's counts."""
    rows = heavy_hitters(4, 0)
    r = Rollup(None, sensor="s", iface="lo", flush_s=3600)
    r.add(records(sorted(rows, key=lambda x: x["ts"])))
    hour = r.build(final=True).frames["conversations_1h"]
    keys = ["seg", "minute", "a", "b", "a_port", "b_port", "proto", "vlan"]
    assert not hour.duplicated(keys).any()
    got = {(x.a, int(x.a_port), x.b, int(x.b_port)): (int(x.packets), int(x.bytes)) for x in hour.itertuples()}
    assert got == totals_of_all(rows)
