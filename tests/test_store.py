"""The history store: rollup arithmetic, import of the shared corpus against tshark's oracle figures,
history against the engine's own summary, retention, schema versions, exports."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from conftest import PYTHON, ROOT
from storehelp import records, udp_burst

from analysis.headers import PACKET_DTYPE
from store.base import SCHEMA_VERSION, TimeRange
from store.cli import import_files
from store.embedded import EmbeddedStore
from store.history import bin_width, history_summary, parse_time, series
from store.rollup import Rollup

# Files of the corpus in strict time order whose capture times do not overlap one another.
FILES = ("dns_mixed.pcap", "http_three_streams.pcap", "tcp_scan_arp.pcapng", "vlan_double_tagged_icmp.pcap",
         "ipv4_fragments_nfs.pcap", "sll_linux_cooked.pcap")
T0 = 1_700_000_000  # a minute boundary (1_700_000_000 % 60 == 20, so offsets below say where minutes start)
M0 = T0 - T0 % 60 + 60  # the start of a minute


@pytest.fixture
def store(tmp_path):
    s = EmbeddedStore(str(tmp_path / "h.duckdb"))
    assert s.open(), s.status()
    yield s
    s.close()


def oracle(pcaps, name: str) -> dict:
    return json.loads((pcaps / "oracle" / f"{name}.json").read_text())


def cli(*args: str) -> dict:
    out = subprocess.run([PYTHON, "-m", "store.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout)


# -- the rollup ------------------------------------------------------------------------


def test_open_minute_written_again_is_not_double_counted(store):
    """A minute flushed three times while open, then closed: totals and rows equal what was fed, once."""
    r = Rollup(store, sensor="s1", flush_s=3600)
    fed = 0
    for k in range(3):  # three flushes inside the same minute
        r.add(udp_burst(M0 + 10 * k, 100, dport=2000 + k))
        fed += 100
        r.flush()
        assert store.totals(TimeRange())["packets"] == fed
    r.add(udp_burst(M0 + 61, 7))  # the next minute closes the first
    r.flush()
    r.add(udp_burst(M0 + 30, 5, dport=2000))  # a late packet for the closed minute adds to it
    r.flush(final=True)
    t = store.totals(TimeRange())
    assert t["packets"] == 312 and t["bytes"] == 31200
    conv = store.rows("conversations", TimeRange(M0, M0 + 59))
    assert sorted(conv.groupby("b_port")["packets"].sum().tolist()) == [100, 100, 105]
    ports = store.top_ports(TimeRange(M0, M0 + 59), "udp")
    assert dict(zip(ports["port"], ports["packets"])) == {2000: 105, 2001: 100, 2002: 100}
    secs = store.series(TimeRange(M0, M0 + 59))
    assert secs["packets"].sum() == 305 and secs["t"].is_unique


def test_per_second_classes_and_directions(store):
    rows = [{"ts": M0 + 0.5, "cls": 0, "wire_len": 60, "direction": 0},
            {"ts": M0 + 0.7, "cls": 1, "wire_len": 70, "direction": 1},
            {"ts": M0 + 1.2, "cls": 2, "wire_len": 80, "direction": 2},
            {"ts": M0 + 1.3, "cls": 3, "src": "fd00::1", "dst": "fd00::2", "wire_len": 90, "direction": 3},
            {"ts": M0 + 1.4, "cls": 5, "wire_len": 42, "ethertype": 0x0806, "direction": 2}]
    r = Rollup(store, flush_s=3600)
    r.add(records(rows))
    r.flush(final=True)
    s = history_summary(store, M0, M0 + 1)
    assert s["transport_counts"] == {"tcp": 1, "udp": 1, "icmp": 1, "icmpv6": 1, "other_ip": 0, "non_ip": 1}
    assert s["transport_bytes"]["icmpv6"] == 90 and s["bytes_wire"] == 342
    assert s["direction_counts"] == {"in": 1, "out": 1, "local": 2, "transit": 1}
    assert history_summary(store, M0 + 1, M0 + 1)["packets"] == 3  # bounds inclusive of the second named
    assert history_summary(store, M0, M0)["packets"] == 2
    assert s["first_ts"] == pytest.approx(M0 + 0.5) and s["last_ts"] == pytest.approx(M0 + 1.4)
    # Conversations hold IP packets only (as the engine's table); the ARP frame is only in the totals.
    assert store.rows("conversations", TimeRange())["packets"].sum() == 4


def test_vlan_field_is_kept_when_the_parser_has_it(store):
    dtype = PACKET_DTYPE  # the record carries the outer VLAN id
    arr = records([{"ts": M0 + 1, "vlan": 10}, {"ts": M0 + 2, "vlan": 20}, {"ts": M0 + 3, "vlan": 20}], dtype)
    r = Rollup(store, flush_s=3600)
    r.add(arr)
    r.flush(final=True)
    conv = store.top_conversations(TimeRange(), "packets")
    assert dict(zip(conv["vlan"], conv["packets"])) == {20: 2, 10: 1}


def test_capped_minute_keeps_the_top_and_states_the_error_bound(store):
    """50 sources, source i sending i packets; a cap of 10 keeps 41..50 and says what it left out."""
    parts = [udp_burst(M0 + 1, i, src=f"10.9.0.{i}", spacing=0.0001) for i in range(1, 51)]
    arr = np.concatenate(parts)
    r = Rollup(store, flush_s=3600, top_max=10)
    r.add(arr[::2])
    r.tables["src"].merge()  # a cut mid-minute, then more packets of the same minute
    r.add(arr[1::2])
    r.flush(final=True)
    s = history_summary(store, M0, M0 + 59)
    top = [(d["addr"], d["packets"]) for d in s["top10_src_by_packets"]]
    assert top == [(f"10.9.0.{i}", i) for i in range(50, 40, -1)]
    approx = s["approximate"]["src"]
    assert approx["keys_left_out"] > 0 and approx["minutes_capped"] == 1
    # The bound covers the largest true count of any key not in the top 10 (source 40: 40 packets).
    assert approx["error_bound_packets"] >= 40
    assert s["packets"] == sum(range(1, 51))  # totals are never capped
    assert "dst" not in s["approximate"]  # one destination: nothing left out


def test_flush_follows_wall_time_not_capture_time(store):
    now = [0.0]
    r = Rollup(store, flush_s=5, clock=lambda: now[0])
    r.add(udp_burst(M0, 10))
    assert not r.maybe_flush()
    now[0] = 5.1
    assert r.maybe_flush()
    assert store.totals(TimeRange())["packets"] == 10


# -- import, history, summary ------------------------------------------------------------


def test_import_corpus_history_equals_the_oracle(shared_pcaps, tmp_path):
    """history over all time is the sum of the files' tshark figures; a window around one file is that file's."""
    path = str(tmp_path / "h.duckdb")
    out = cli("import", *[str(shared_pcaps / "files" / f) for f in FILES], "--store", path)
    assert out["files"] == len(FILES) and out["errors"] == []
    figures = [oracle(shared_pcaps, f) for f in FILES]
    assert out["packets"] == sum(o["packets"] for o in figures)
    total = cli("history", "--store", path)
    assert total["packets"] == sum(o["packets"] for o in figures)
    assert total["bytes_wire"] == sum(o["bytes_wire"] for o in figures)
    for c in ("tcp", "udp", "icmp", "icmpv6", "other_ip", "non_ip"):
        assert total["transport_counts"][c] == sum(o["transport_counts"][c] for o in figures), c
    for name, o in zip(FILES, figures):
        lo, hi = float(o["first_ts"]), float(o["last_ts"])
        others = [(float(p["first_ts"]), float(p["last_ts"])) for p in figures if p is not o]
        assert all(b < int(lo) or a >= int(hi) + 1 for a, b in others), "files must not share seconds"
        one = cli("history", "--store", path, "--since", str(int(lo)), "--until", str(int(hi)))
        assert (one["packets"], one["bytes_wire"]) == (o["packets"], o["bytes_wire"]), name
        assert one["transport_counts"] == o["transport_counts"], name
        assert one["first_ts"] == pytest.approx(lo, abs=1e-6) and one["last_ts"] == pytest.approx(hi, abs=1e-6)


SUMMARY_KEYS = ("packets", "bytes_wire", "bytes_captured", "transport_counts", "transport_bytes", "direction_counts",
                "direction_bytes", "top10_src_by_packets", "top10_src_by_bytes", "top10_dst_by_packets",
                "top10_tcp_dst_ports", "top10_udp_dst_ports", "first_ts", "last_ts", "min_ts", "max_ts",
                "duration_s", "malformed", "alerts")


@pytest.mark.parametrize("name", ["tcp_scan_arp.pcapng", "dns_mixed.pcap", "sll_linux_cooked.pcap"])
def test_history_equals_the_engine_summary(shared_pcaps, tmp_path, name):
    f = str(shared_pcaps / "files" / name)
    path = str(tmp_path / "h.duckdb")
    assert cli("import", f, "--store", path)["errors"] == []
    hist = cli("history", "--store", path, "--since", "2000-01-01T00:00:00Z", "--until", "2100-01-01")
    summ = json.loads(subprocess.run([PYTHON, "packet_processor.py", "summary", f], cwd=ROOT, capture_output=True,
                                     text=True, timeout=120).stdout)
    for key in SUMMARY_KEYS:
        if isinstance(summ[key], float):
            assert hist[key] == pytest.approx(summ[key], abs=1e-6), key
        else:
            assert hist[key] == summ[key], key


def test_scan_alerts_are_stored_with_their_evidence(shared_pcaps, store):
    out = import_files([str(shared_pcaps / "files" / "tcp_scan_arp.pcapng")], store)
    assert out["errors"] == []
    alerts = history_summary(store)["alerts"]
    assert alerts and all(a["evidence"] for a in alerts)
    assert {a["detector"] for a in alerts} >= {"port_scan"}


def test_damaged_file_keeps_what_was_readable(shared_pcaps, tmp_path):
    good = (shared_pcaps / "files" / "dns_mixed.pcap").read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(good[: len(good) // 2])
    s = EmbeddedStore(str(tmp_path / "h.duckdb"))
    s.open()
    out = import_files([str(cut)], s)
    assert out["files"] == 1 and len(out["errors"]) == 1 and "cut short" in out["errors"][0]["error"]
    summ = json.loads(subprocess.run([PYTHON, "packet_processor.py", "summary", str(cut)], cwd=ROOT,
                                     capture_output=True, text=True, timeout=60).stdout)
    assert 0 < out["packets"] == summ["packets"] == history_summary(s)["packets"] < 464
    s.close()


def test_time_bounds_epoch_and_iso():
    assert parse_time("1700000000", 0) == parse_time("2023-11-14T22:13:20Z", 0) == 1_700_000_000
    assert parse_time("2023-11-14T23:13:20+01:00", 0) == 1_700_000_000
    assert parse_time("2023-11-14T22:13:20.9", 0) == 1_700_000_000  # no zone: UTC; the second it names
    assert parse_time("1700000000.75", 0) == 1_700_000_000
    with pytest.raises(ValueError):
        parse_time("yesterday", 0)


def test_downsampled_series_has_at_most_1500_points(store):
    # One packet every 10 s for a day, written as 24 hourly flushes.
    r = Rollup(store, flush_s=3600)
    for h in range(24):
        arr = udp_burst(M0 + h * 3600, 360, spacing=10.0)
        r.add(arr)
        r.flush()
    r.flush(final=True)
    df, width = series(store, M0, M0 + 86399)
    assert width == 60 == bin_width(M0, M0 + 86399) and len(df) <= 1500
    assert df["packets"].sum() == 24 * 360 and set(df["packets"]) == {6}


# -- retention and schema ---------------------------------------------------------------


def test_retention_prunes_old_live_rows_and_keeps_imports(tmp_path):
    now = 1_800_000_000.0
    s = EmbeddedStore(str(tmp_path / "h.duckdb"), clock=lambda: now)
    s.open()
    live = Rollup(s, origin="live", flush_s=3600)
    old, recent = now - 10 * 86400, now - 86400
    live.add(udp_burst(old - old % 60, 10))
    live.add(udp_burst(recent - recent % 60, 20))
    live.add_alerts([{"detector": "spike", "severity": "low", "source": "a", "target": "b", "first_ts": old,
                      "last_ts": old + 1, "count": 1, "evidence": "x"}])
    live.flush(final=True)
    imp = Rollup(s, origin="import:abc", flush_s=3600)
    imp.note_origin("import", "/tmp/x.pcap")
    imp.add(udp_burst(1_300_000_020, 30))  # packets years old: kept by import time
    imp.flush(final=True)
    assert s.totals(TimeRange())["packets"] == 60
    deleted = s.prune(retention_days=7)
    assert deleted > 0
    assert s.totals(TimeRange())["packets"] == 50
    assert s.totals(TimeRange(int(recent) - 60, int(recent) + 60))["packets"] == 20
    assert s.rows("conversations", TimeRange(0, int(old) + 60)).query("origin == 'live'").empty
    assert s.alerts(TimeRange()).empty
    assert list(s.origins()["origin"]) == ["import:abc"]
    assert s.remove_origin("import:abc") > 0
    assert s.totals(TimeRange())["packets"] == 20
    s.close()


def test_newer_schema_is_moved_aside_and_kept(tmp_path):
    path = str(tmp_path / "h.duckdb")
    s = EmbeddedStore(path)
    s.open()
    s.close()
    con = duckdb.connect(path)
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    s = EmbeddedStore(path)
    assert s.open()
    st = s.status()
    assert st.state == "ok" and st.moved_aside and "newer" in st.message
    s.close()
    kept = duckdb.connect(st.moved_aside, read_only=True)
    assert kept.execute("SELECT value FROM meta").fetchone()[0] == "99"
    kept.close()
    fresh = duckdb.connect(path, read_only=True)
    assert fresh.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION)
    fresh.close()


def test_corrupt_store_is_moved_aside_and_kept(tmp_path):
    path = tmp_path / "h.duckdb"
    junk = bytes(range(256)) * 64
    path.write_bytes(junk)
    s = EmbeddedStore(str(path))
    assert s.open()
    st = s.status()
    assert st.state == "ok" and st.moved_aside and "moved to" in st.message
    assert Path(st.moved_aside).read_bytes() == junk  # never deleted
    r = Rollup(s, flush_s=3600)
    r.add(udp_burst(M0, 3))
    r.flush(final=True)
    assert s.totals(TimeRange())["packets"] == 3
    s.close()


def test_a_foreign_duckdb_file_is_moved_aside(tmp_path):
    path = str(tmp_path / "h.duckdb")
    con = duckdb.connect(path)
    con.execute("CREATE TABLE something_else (x INT)")
    con.close()
    s = EmbeddedStore(path)
    assert s.open() and s.status().moved_aside
    s.close()


def test_second_writer_gets_in_use(store):
    code = ("import json,sys; sys.path.insert(0, '.'); from store.embedded import EmbeddedStore\n"
            f"s = EmbeddedStore({store.path!r}); s.open(); st = s.status()\n"
            "print(json.dumps([st.state, st.message]))")
    out = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    state, message = json.loads(out.stdout)
    assert state == "in_use" and "in use by another process" in message and "PID" in message
    hist = subprocess.run([PYTHON, "-m", "store.cli", "history", "--store", store.path], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert hist.returncode == 1 and "in use by another process" in json.loads(hist.stdout)["error"]


# -- exports -----------------------------------------------------------------------------


def test_exports_read_back_equal_the_store(shared_pcaps, store, tmp_path):
    from store.export import export_range

    import_files([str(shared_pcaps / "files" / "tcp_scan_arp.pcapng"),
                  str(shared_pcaps / "files" / "dns_mixed.pcap")], store)
    s = history_summary(store)
    for fmt in ("csv", "parquet"):
        paths = export_range(store, str(tmp_path / fmt), fmt=fmt)
        read = pd.read_csv if fmt == "csv" else pd.read_parquet
        sec, conv, al = (read(paths[k]) for k in ("seconds", "conversations", "alerts"))
        assert sec["packets"].sum() == s["packets"] and sec["bytes"].sum() == s["bytes_wire"]
        for c in ("tcp", "udp", "non_ip"):
            assert sec[f"pk_{c}"].sum() == s["transport_counts"][c]
        ip_packets = s["packets"] - s["transport_counts"]["non_ip"]
        assert conv["packets"].sum() == ip_packets and s["approximate"] == {}
        assert len(al) == len(s["alerts"]) and set(al["detector"]) == {a["detector"] for a in s["alerts"]}


def test_recorder_flushes_on_idle_ticks_and_prunes(tmp_path):
    from store.recorder import Recorder

    mono = [0.0]
    wall = 1_800_000_000.0
    s = EmbeddedStore(str(tmp_path / "h.duckdb"), clock=lambda: wall)
    rec = Recorder(s, sensor="r", iface="lo", clock=lambda: mono[0])
    old = wall - 30 * 86400
    rec.on_batch(udp_burst(old - old % 60, 4))  # a month old by capture time: pruned on the first due prune
    rec.on_batch(udp_burst(wall - wall % 60, 6))
    assert s.totals(TimeRange())["packets"] == 0  # nothing due yet
    mono[0] = 5.5
    rec.tick()  # no new batch: the flush still comes
    assert s.totals(TimeRange())["packets"] == 10
    mono[0] = 700.0
    rec.tick()
    assert s.totals(TimeRange())["packets"] == 6
    rec.note_skipped(3)
    assert rec.status()[1] == 3 and rec.status()[0].state == "ok"
    rec.close()
    rec.close()


def test_whole_hours_come_from_hourly_rows_equal_to_their_minutes(store):
    """Three hours with the last minute of each hour still open at some flushes: the hourly tables
    (which answer whole hours) hold exactly the sum of the per-minute rows."""
    h0 = 1_700_002_800  # an hour boundary
    r = Rollup(store, flush_s=3600)
    rng = np.random.default_rng(1)
    for k in range(3 * 6):  # every 10 minutes, a burst from one of 7 sources to one of 5 ports
        t = h0 + k * 600 + int(rng.integers(0, 590))
        r.add(udp_burst(t, int(rng.integers(1, 50)), src=f"10.7.0.{k % 7}", dport=1000 + k % 5))
        if k % 4 == 0:
            r.flush()
    r.flush(final=True)
    whole = TimeRange(h0, h0 + 3 * 3600 - 1)
    assert whole.full_hours() == (h0, h0 + 3 * 3600)
    minutes = store.rows("top_addrs", whole)
    expect = minutes[minutes.kind == "src"].groupby("addr")["packets"].sum().sort_values(ascending=False)
    got = store.top_addrs(whole, "src", n=10)
    assert dict(zip(got["addr"], got["packets"])) == expect.to_dict()
    ports = store.rows("top_ports", whole).groupby("port")["packets"].sum().to_dict()
    got = store.top_ports(whole, "udp", n=10)
    assert dict(zip(got["port"], got["packets"])) == ports
    hourly = store._query("SELECT count(*) AS n, sum(packets) AS p FROM conversations_1h", {})
    assert int(hourly["p"][0]) == store.totals(whole)["packets"] and int(hourly["n"][0]) <= 3 * 35


def test_an_hour_left_open_by_a_killed_writer_is_answered_from_its_minutes(store):
    h0 = 1_700_002_800
    whole = TimeRange(h0, h0 + 3599)
    first = Rollup(store, flush_s=3600)
    first.add(udp_burst(h0 + 60, 30, src="10.8.0.1"))
    first.add(udp_burst(h0 + 600, 20, src="10.8.0.2"))
    first.flush()  # the hour stays open; then the process dies (no final flush)
    assert list(store._query("SELECT hour FROM open_hours", {})["hour"]) == [h0]
    got = store.top_addrs(whole, "src")
    assert dict(zip(got["addr"], got["packets"])) == {"10.8.0.1": 30, "10.8.0.2": 20}
    second = Rollup(store, flush_s=3600)  # the restarted process, same hour
    second.add(udp_burst(h0 + 1200, 5, src="10.8.0.1"))
    second.add(udp_burst(h0 + 3600 + 5, 1, src="10.8.0.3"))  # the next hour: closes this one for `second`
    second.flush(final=True)
    got = store.top_addrs(whole, "src")
    assert dict(zip(got["addr"], got["packets"])) == {"10.8.0.1": 35, "10.8.0.2": 20}
    assert list(store._query("SELECT hour FROM open_hours", {})["hour"]) == [h0]  # the killed writer's
    both = store.top_addrs(TimeRange(h0, h0 + 7199), "src")
    assert dict(zip(both["addr"], both["packets"])) == {"10.8.0.1": 35, "10.8.0.2": 20, "10.8.0.3": 1}


def test_history_conversations_equal_the_engine_snapshot(shared_pcaps, store):
    from packet_processor import CaptureEngine
    from store.history import conversations

    f = str(shared_pcaps / "files" / "sll_linux_cooked.pcap")
    import_files([f], store)
    engine = CaptureEngine()
    engine.load_file(f)
    want = engine.snapshot().top_conversations(30, "bytes")
    got = conversations(store, n=30, by="bytes")
    assert len(got) == len(want) == 16  # every conversation of the file
    for g, w in zip(got, want):
        for k in ("a", "a_port", "b", "b_port", "proto", "packets", "bytes"):
            assert g[k] == w[k], (k, g, w)
        assert g["first_ts"] == pytest.approx(w["first_ts"], abs=1e-6)
        assert g["last_ts"] == pytest.approx(w["last_ts"], abs=1e-6)


def test_failed_writes_wait_in_order_and_losses_are_counted_exactly(tmp_path):
    """A store whose folder cannot be made (a file is in the way): batches wait, the oldest beyond
    STORE_PENDING_MAX are dropped and their packets counted, except a minute a later batch has whole."""
    blocker = tmp_path / "notadir"
    blocker.write_text("x")
    s = EmbeddedStore(str(blocker / "h.duckdb"), pending_max=2)
    assert not s.open() and s.status().state == "error"
    r = Rollup(s, flush_s=3600)
    fed = 0
    for t, n in ((M0, 10), (M0 + 5, 10)):  # minute M0 written twice while open: 10, then 20
        r.add(udp_burst(t, n))
        fed += n
        r.flush()
    r.add(udp_burst(M0 + 60, 7))
    fed += 7
    r.flush()  # M0 closes (unchanged: not in this batch); M0+60 open at 7
    st = s.status()
    # The first batch is dropped, but the second has M0 whole: nothing is lost yet.
    assert st.pending == 2 and st.batches_dropped == 1 and st.packets_dropped == 0, st
    for t, n in ((M0 + 120, 3), (M0 + 180, 1)):
        r.add(udp_burst(t, n))
        fed += n
        r.flush()
    st = s.status()
    # Now M0's last version (20) and M0+60's (7) were dropped with no later batch holding them.
    assert st.batches_dropped == 3 and st.packets_dropped == 27, st
    blocker.unlink()
    blocker.mkdir()
    r.flush(final=True)
    st = s.status()
    assert st.state == "ok" and st.pending == 0
    assert s.totals(TimeRange())["packets"] == fed - st.packets_dropped == 4
    s.close()


def test_sensor_filter_applies_to_every_figure(store):
    h0 = 1_700_002_800
    for name, src, n in (("s1", "10.6.0.1", 11), ("s2", "10.6.0.2", 22)):
        r = Rollup(store, sensor=name, iface="eth0", flush_s=3600)
        r.add(udp_burst(h0 + 30, n, src=src))
        r.add_alerts([{"detector": "spike", "severity": "low", "source": src, "target": "x", "first_ts": h0 + 30.0,
                       "last_ts": h0 + 31.0, "count": 1, "evidence": name}])
        r.flush(final=True)
    one = history_summary(store, h0, h0 + 3599, sensor="s1")  # a whole hour: the hourly tables
    assert one["packets"] == 11 and [a["addr"] for a in one["top10_src_by_packets"]] == ["10.6.0.1"]
    assert [a["evidence"] for a in one["alerts"]] == ["s1"]
    part = history_summary(store, h0 + 10, h0 + 100, sensor="s2")  # minutes only
    assert part["packets"] == 22 and part["top10_udp_dst_ports"] == [[2000, 22]]
    assert history_summary(store, h0, h0 + 3599)["packets"] == 33


def test_a_range_that_cuts_a_minute_marks_its_top_lists_with_bounds_that_hold(store):
    """Top tables are kept per minute: a range that cuts a minute says so, and its bounds contain the truth."""
    arr = np.concatenate([udp_burst(M0 + 1, 5, src="10.0.0.1", dport=1111),
                          udp_burst(M0 + 30, 50, src="10.0.0.2", dport=2222)])
    r = Rollup(store, flush_s=3600)
    r.add(arr)
    r.flush(final=True)
    cut = history_summary(store, M0, M0 + 1)
    assert cut["packets"] == 5  # totals come from the seconds named
    truth = {"10.0.0.1": 5, "10.0.0.2": 0}
    tops = cut["top10_src_by_packets"]
    assert {e["addr"] for e in tops} == {"10.0.0.1", "10.0.0.2"}
    for e in tops:
        assert e["approx"] is True and e["packets"] - e["error"] <= truth[e["addr"]] <= e["packets"]
    assert cut["approximate"]["edges"]["packets"] == 50 and cut["approximate"]["edges"]["udp"] == 50
    whole = history_summary(store, M0, M0 + 59)  # whole minutes: exact, no marks
    assert [(e["addr"], e["packets"]) for e in whole["top10_src_by_packets"]] == [("10.0.0.2", 50), ("10.0.0.1", 5)]
    assert not any("approx" in e for e in whole["top10_src_by_packets"]) and "edges" not in whole["approximate"]


def test_an_imported_file_is_listed_and_removed_by_its_id(shared_pcaps, tmp_path):
    """Imports are kept, whatever their age, until removed: `import --list` names them, `--remove ID`
    takes exactly that file's packets out (history then equals the other file's tshark figures)."""
    path = str(tmp_path / "h.duckdb")
    keep, drop = FILES[0], FILES[1]
    cli("import", str(shared_pcaps / "files" / keep), str(shared_pcaps / "files" / drop), "--store", path)
    listed = cli("import", "--list", "--store", path)["imports"]
    by_label = {Path(i["label"]).name: i["origin"] for i in listed}
    assert set(by_label) == {keep, drop}
    out = cli("import", "--remove", by_label[drop], "--store", path)
    assert out["removed"] == by_label[drop] and out["rows"] > 0
    left = cli("history", "--store", path)
    o = oracle(shared_pcaps, keep)
    assert (left["packets"], left["bytes_wire"]) == (o["packets"], o["bytes_wire"])
    assert [Path(i["label"]).name for i in cli("import", "--list", "--store", path)["imports"]] == [keep]
