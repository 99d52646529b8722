"""Fleet review 7: loss totals across retention and by the servers' clock, the write timeout and its message,
history's exact grouping under the long timeout, the metrics address, the "history skipped" caption.
On the real local cluster (scripts/clickhouse_cluster.sh, Debian's 18.16) where ClickHouse is involved."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
import types
import urllib.request
from collections.abc import Iterator

import pandas as pd
import pytest
from fleethelp import cluster  # noqa: F401  (the module's cluster fixture)

from store.base import TimeRange
from store.clickhouse import LOSS_COUNTERS, ClickHouseStore, with_id

DAY = 86400


def _batch(run: str, ts: int, now: tuple, prev: tuple):
    """A heartbeat batch carrying one loss sample as Sensor.loss_row makes it: (iface, run, ts, *now, *prev)."""
    from store.base import StoreBatch

    b = with_id(StoreBatch())
    b.losses = ("lo", run, ts, *now, *prev)
    return b


def _ring(ring: int) -> tuple:
    return (ring, 0, 0, 0, 0)


def _ring_lost(ch: ClickHouseStore, r: TimeRange, sensor: str) -> int:
    got = ch.losses(r).set_index("sensor")
    return int(got.loc[sensor, "ring_dropped"]) if sensor in got.index else 0


# -- 1. retention -----------------------------------------------------------------------------------------


def test_loss_totals_are_unchanged_when_retention_drops_the_row_before_the_range(cluster):  # noqa: F811
    """One long run: 100 ring drops received 10 days ago, 150 (cumulative) yesterday, 160 now. The last two
    days lost 60, before and after prune(7) dropped the 10-day-old row (before the fix: 50, then 150, every
    drop since the run began, because the subtracted value became 0)."""
    now = int(time.time())
    ch = ClickHouseStore(cluster.address(), cluster=cluster.name, database="t_fix_ret", sensor="old")
    assert ch.open(), ch.status().message
    for ago, ring, prev in ((10 * DAY, 100, 0), (DAY, 150, 100), (0, 160, 150)):
        ch._now_sql = f"toInt64(now()) - {ago}"  # the server received it `ago` seconds back
        assert ch.send(_batch("r1", now - ago, _ring(ring), _ring(prev))), ch.status().message
    ch._now_sql = "toInt64(now())"
    last2 = TimeRange(now - 2 * DAY, now + 5)
    assert _ring_lost(ch, last2, "old") == 60
    assert ch.prune(retention_days=7) > 0
    assert _ring_lost(ch, last2, "old") == 60
    # A range reaching back past the retention: what is left (the 100 of 10 days ago went with its day).
    assert _ring_lost(ch, TimeRange(now - 30 * DAY, now + 5), "old") == 60
    assert _ring_lost(ch, TimeRange(now - 3600, now + 5), "old") == 10
    ch.close()


# -- 4. the server's clock --------------------------------------------------------------------------------


def test_loss_rows_are_stamped_by_the_server_not_the_sensors_clock(cluster, monkeypatch):  # noqa: F811
    """A sensor whose clock is 10 minutes fast (and one 10 minutes slow) ships its losses: they are in the
    last 5 minutes' range (the page's Live), by the servers' clock; before, both were outside it."""
    from fleet.sensor import Sensor
    from store.base import StoreBatch

    now = int(time.time())
    ch = ClickHouseStore(cluster.address(), cluster=cluster.name, database="t_fix_clock", sensor="fast")
    assert ch.open(), ch.status().message
    for sensor, shift in (("fast", 600), ("slow", -600)):
        ch.sensor = sensor
        fake = Sensor.__new__(Sensor)  # only loss_row's state: a sensor whose clock is `shift` s off
        fake.iface, fake.run_id, fake._prev_losses = "lo", f"run-{sensor}", (0,) * len(LOSS_COUNTERS)
        counts = dict.fromkeys(LOSS_COUNTERS, 0) | {"ring_dropped": 7, "nic_dropped": 2}
        fake.losses = lambda counts=counts: counts
        with monkeypatch.context() as m:
            m.setattr("fleet.sensor.time", types.SimpleNamespace(time=lambda shift=shift: now + shift))
            row = fake.loss_row()
        assert row[2] == now + shift
        b = with_id(StoreBatch())
        b.losses = row
        assert ch.send(b), ch.status().message
    got = ch.losses(TimeRange(now - 300, now + 5)).set_index("sensor")
    ch.close()
    for sensor in ("fast", "slow"):
        assert (got.loc[sensor, "ring_dropped"], got.loc[sensor, "nic_dropped"]) == (7, 2), got


# -- 2. the write timeout -----------------------------------------------------------------------------------


class Proxy:
    """A TCP relay on 127.0.0.1 to a ClickHouse server. `hold()`: from then on nothing more is relayed
    either way (a server that hangs mid-session); `delay_s`: each answer to a request is held that long."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.held = threading.Event()
        self.delay_s = 0.0
        self.stop = threading.Event()
        self.socks: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        self.held.set()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=5)
            self.socks += [client, upstream]
            threading.Thread(target=self._relay, args=(client, upstream), daemon=True).start()

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            self._pump(client, upstream)
        except (OSError, ValueError):  # closed by close(): the relay ends
            return

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        answered = True
        while not self.stop.is_set():
            ready, _, _ = select.select([client, upstream], [], [], 0.1)
            if self.held.is_set():
                continue  # swallow nothing, relay nothing: the peer's bytes wait in the kernel
            for s in ready:
                data = s.recv(65536)
                if not data:
                    return
                if s is client:
                    answered = False
                    upstream.sendall(data)
                else:
                    if not answered and self.delay_s:
                        time.sleep(self.delay_s)  # the answer to a request: late once, then the rest of it
                    answered = True
                    client.sendall(data)

    def close(self) -> None:
        self.stop.set()
        for s in self.socks:
            s.close()


@pytest.fixture
def proxy(cluster) -> Iterator[Proxy]:  # noqa: F811
    p = Proxy(cluster.address())
    try:
        yield p
    finally:
        p.close()


def _udp_batch(sensor: str, packets: int):
    """One rollup flush of `packets` UDP packets, as the store gets it (captured by a Rollup)."""
    from storehelp import udp_burst

    from store.rollup import Rollup

    got = []

    class Keep:
        def allocate_segment(self) -> int:
            return int(time.time_ns() // 1000)

        def write(self, batch) -> bool:
            got.append(batch)
            return True

    r = Rollup(Keep(), sensor=sensor, iface="lo", flush_s=3600)
    r.add(udp_burst(int(time.time()) - 90, packets, dport=4250))
    r.flush(final=True)
    return got


@pytest.mark.parametrize("how", ["send", "write"])
def test_a_write_that_times_out_waits_and_names_the_write_timeout(proxy, cluster, how):  # noqa: F811
    """A server that stops answering after the store opened: a write (send(), or write() through the
    in-memory queue) waits the write timeout (2 s here), not the reads' 1 s, and the error names 2 s and
    the write timeout (before: write() gave up after 1 s, and both said 1 s and CLICKHOUSE_QUERY_TIMEOUT_S)."""
    ch = ClickHouseStore(proxy.address, cluster=cluster.name, database="t_fix_wait", sensor="w1",
                         query_timeout=1, timeout=2)
    assert ch.open(), ch.status().message
    batches = _udp_batch("w1", 12)
    proxy.hold()
    t0 = time.monotonic()
    ok = ch.send(batches[0]) if how == "send" else ch.write(batches[0])
    took = time.monotonic() - t0
    assert not ok
    msg = ch.status().message or ""
    assert "did not answer within 2 s" in msg and "the write timeout" in msg, msg
    assert "CLICKHOUSE_QUERY_TIMEOUT_S" not in msg, msg
    assert took >= 1.9, took  # the write waited its own timeout
    proxy.close()
    ch.close()


def test_exact_top_conversations_wait_the_long_timeout_other_reads_the_query_timeout(proxy, cluster):  # noqa: F811
    """Answers 1.5 s late: history's exact top conversations (which may group every conversation) wait the
    long timeout (3 s) and get them; a plain read still fails after CLICKHOUSE_QUERY_TIMEOUT_S (1 s)."""
    ch = ClickHouseStore(proxy.address, cluster=cluster.name, database="t_fix_slow", sensor="s1",
                         query_timeout=1, timeout=3)
    assert ch.open(), ch.status().message
    for b in _udp_batch("s1", 9):
        assert ch.send(b), ch.status().message
    r = TimeRange(int(time.time()) - 600, int(time.time()) + 5)
    proxy.delay_s = 1.5
    top = ch.top_conversations(r, "bytes", 5, exact=True)
    assert int(top["packets"].sum()) == 9, top
    with pytest.raises(OSError, match="did not answer within 1 s"):
        ch.totals(r)
    ch.close()


# -- 5. the skip of unchanged counters, a failed commit, exact row counts --------------------------------------


def test_unchanged_counters_write_no_row_and_a_failed_commit_is_resent_once(cluster, monkeypatch):  # noqa: F811
    """A run's flushes: 5 drops, then unchanged (no row), then 9 whose commit fails after its loss row was
    written (send() False), re-sent (its row again: the same row), then unchanged again. The range says 9,
    and once merged exactly two rows are stored."""
    import store.clickhouse as chmod

    ch = ClickHouseStore(cluster.address(), cluster=cluster.name, database="t_fix_skip", sensor="sk")
    assert ch.open(), ch.status().message
    t = int(time.time())
    assert ch.send(_batch("r1", t, _ring(5), _ring(0)))
    assert ch.send(_batch("r1", t, _ring(5), _ring(5)))  # nothing lost since: a commit, no loss row
    failing = _batch("r1", t, _ring(9), _ring(5))
    real = chmod.ClickHouseStore._exec

    def fail_commit(self, client, sql, data=None, **kw):
        if "commits_max" in sql:
            raise OSError("connection reset by test")
        return real(self, client, sql, data, **kw)

    monkeypatch.setattr(chmod.ClickHouseStore, "_exec", fail_commit)
    assert not ch.send(failing)
    monkeypatch.undo()
    assert ch.send(failing), ch.status().message  # the shipper's retry: same batch, same id
    assert ch.send(_batch("r1", t, _ring(9), _ring(9)))
    r = TimeRange(t - 60, t + 60)
    assert _ring_lost(ch, r, "sk") == 9
    written = sum(cluster.query("SELECT count() FROM t_fix_skip.run_losses", shard=s)[0][0] for s in (1, 2))
    assert written == 3  # 5, and 9 twice (the failed attempt's row and the retry's)
    for s in (1, 2):
        cluster.query("OPTIMIZE TABLE t_fix_skip.run_losses FINAL", shard=s)
    merged = sum(cluster.query("SELECT count() FROM t_fix_skip.run_losses", shard=s)[0][0] for s in (1, 2))
    assert merged == 2
    assert _ring_lost(ch, r, "sk") == 9
    ch.close()


# -- 6. the metrics address, the "history skipped" caption ------------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "setting"])
def test_metrics_answer_on_a_non_default_address(tmp_path, how):
    """--metrics-addr 127.0.0.2 (or FLEET_METRICS_ADDR=127.0.0.3): the sensor's metrics answer there, and not
    on 127.0.0.1."""
    import subprocess
    import sys

    from conftest import ROOT, need
    from test_fleet_sensor import metrics_port

    need(os.geteuid() == 0, "live capture tests need root: run them with sudo")
    addr = {"flag": "127.0.0.2", "setting": "127.0.0.3"}[how]
    port = metrics_port()
    env = {**os.environ, **({"NTM_FLEET_METRICS_ADDR": addr} if how == "setting" else {})}
    cmd = [sys.executable, str(ROOT / "packet_processor.py"), "sensor", "--name", "addr", "--iface", "lo",
           "--filter", "udp and dst port 9", "--clickhouse", "127.0.0.1:9", "--spool", str(tmp_path / "spool"),
           "--metrics-port", str(port), "--seconds", "20"]
    cmd += ["--metrics-addr", addr] if how == "flag" else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        text = None
        deadline = time.monotonic() + 20
        while text is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                text = urllib.request.urlopen(f"http://{addr}:{port}/metrics", timeout=2).read().decode()
            except OSError:
                time.sleep(0.2)
        assert text is not None, proc.stderr.read() if proc.poll() is not None else "no answer"
        assert "ntm_sensor_packets_total" in text
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_fleet_caption_says_what_history_skipped():
    """The fleet page's loss caption names the history stage's skipped packets when there are any (each
    sensor, and the sum for all), and says nothing of them when there are none."""
    from fleet_page import loss_text

    cols = {c: [0, 0] for c in LOSS_COUNTERS}
    df = pd.DataFrame({"sensor": ["a", "b"], **cols}).assign(history_skipped_packets=[1200, 34],
                                                           ring_dropped=[1, 0])
    assert loss_text(df, "a") == ("ring dropped 1, NIC dropped 0, detectors skipped 0 (0 batches), "
                                  "history skipped 1,200 (not in these totals)")
    assert loss_text(df, None).endswith("history skipped 1,234 (not in these totals)")
    none = df.assign(history_skipped_packets=[0, 0])
    assert "history" not in loss_text(none, "a") and "history" not in loss_text(none, None)
    # NIC drops are the interface's: summed over several sensors the caption says sharing ones each count them.
    nic = df.assign(nic_dropped=[5, 5])
    assert "NIC dropped 5," in loss_text(nic, "a")
    assert "NIC dropped 10 (summed over sensors: sensors sharing an interface each count its drops)" in \
        loss_text(nic, None)


def test_version_6_loss_rows_are_migrated_to_version_7(cluster, monkeypatch):  # noqa: F811
    """A database at schema version 6 with loss rows (stamped by the sensor's clock, no previous counters):
    opened by this program, it is migrated to version 7, the rows are copied once (received = their time)
    and a range reads what version 6 read; a second open copies nothing again."""
    import store.clickhouse as chmod

    monkeypatch.setattr(chmod, "CH_SCHEMA_VERSION", 6)
    old = ClickHouseStore(cluster.address(), cluster=cluster.name, database="t_fix_v6", sensor="v6")
    assert old.open(), old.status().message
    old.close()
    monkeypatch.undo()
    t = int(time.time()) - 100
    cols = "sensor, iface, run, ts, " + ", ".join(LOSS_COUNTERS)
    cluster.query(f"INSERT INTO t_fix_v6.losses ({cols}) VALUES",
                  [("v6", "lo", "r1", t - 7200, 3, 0, 0, 0, 0), ("v6", "lo", "r1", t, 8, 1, 0, 0, 0)])
    for _ in range(2):
        ch = ClickHouseStore(cluster.address(2), cluster=cluster.name, database="t_fix_v6")
        assert ch.open(), ch.status().message
        got = ch.losses(TimeRange(t - 60, t + 60)).set_index("sensor").loc["v6"]
        assert (got["ring_dropped"], got["nic_dropped"]) == (5, 1)
        ch.close()
    assert cluster.query("SELECT count() FROM t_fix_v6.run_losses")[0][0] == 2
    assert int(cluster.query("SELECT max(toInt64(value)) FROM t_fix_v6.meta")[0][0]) == chmod.CH_SCHEMA_VERSION


def test_fleet_page_says_so_when_clickhouse_fails_after_the_sensor_table(cluster, monkeypatch):  # noqa: F811
    """A server that goes away between the page's first read (the sensor table) and the loss counters: the
    page shows the error as its state, never an exception."""
    import sys

    from streamlit.testing.v1 import AppTest

    db = "t_fix_lossfail"
    first = ClickHouseStore(cluster.address(), cluster=cluster.name, database=db, sensor="s1")
    assert first.open(), first.status().message
    first.close()

    def gone(self, r):
        raise OSError("Connection reset by peer")

    monkeypatch.setattr(ClickHouseStore, "losses", gone)
    monkeypatch.setenv("NTM_CLICKHOUSE_DATABASE", db)
    monkeypatch.setattr(sys, "argv", ["dashboard.py", "--clickhouse", cluster.address(), "--cluster", cluster.name])
    at = AppTest.from_file("../dashboard.py", default_timeout=60).run()
    assert not at.exception, at.exception
    assert any("ClickHouse cannot be read" in e.value and "Connection reset" in e.value for e in at.error), \
        [e.value for e in at.error]
