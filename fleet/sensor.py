"""A fleet sensor: headless capture whose history rows go to ClickHouse every FLEET_FLUSH_S.

    python packet_processor.py sensor --name NAME --iface IF [--filter BPF] [--seconds N]
        --clickhouse HOST:PORT [--cluster CLUSTER] [--spool DIR] [--metrics-port P]

The fleet writer is a consumer stage of the pipeline, like the history writer (FleetStage is a
store.stage.StoreStage): the capture thread offers each parsed batch to its bounded queue and never
waits (a full queue skips the batch and counts it, shown in the metrics and the snapshot's stages);
its thread runs the rollup and hands a StoreBatch every FLEET_FLUSH_S to the shipper, a second
thread that sends it to ClickHouse or, when ClickHouse is unreachable or refuses it, to the disk
spool, which it drains in order once ClickHouse is back. So capture never waits for ClickHouse.
Batch ids make a re-send harmless (store/clickhouse.py). SIGTERM (or --seconds) stops the capture,
flushes the rollup, tries the spool once more, and exits; what could not be sent stays spooled.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

import config
from fleet.spool import Spool
from packet_processor import CaptureEngine, Source
from store.base import StoreBatch
from store.clickhouse import LOSS_COUNTERS, ClickHouseStore, with_id
from store.rollup import Rollup
from store.stage import StoreStage

log = logging.getLogger(__name__)


class FleetEngine(CaptureEngine):
    """The capture engine whose history writer is the fleet stage (ClickHouse through the shipper)."""

    stage_factory = None  # set by the Sensor: Source -> FleetStage, called when a live capture starts

    def _new_store_stage(self, source: Source) -> StoreStage | None:
        """The fleet stage takes the place of the history writer: the same queue, skips and lifecycle."""
        return self.stage_factory(source) if self.stage_factory is not None else None


class _FleetRecorder:
    """What StoreStage drives (Recorder's methods) for a sensor: the rollup hands batches to the shipper."""

    def __init__(self, rollup: Rollup) -> None:
        self.rollup = rollup
        self.skipped = 0

    def on_batch(self, arr: np.ndarray) -> None:
        """Count one parsed batch, and flush when FLEET_FLUSH_S has passed."""
        self.rollup.add(arr)
        self.tick()

    def on_alerts(self, alerts: list[dict[str, Any]]) -> None:
        """New or changed alerts, shipped with the next flush."""
        self.rollup.add_alerts(alerts)

    def note_skipped(self, packets: int) -> None:
        """Packets the stage skipped (its queue was full): ClickHouse lacks them, the metrics say so."""
        self.skipped += packets

    def tick(self) -> None:
        """Flush when due; with nothing to flush, a heartbeat (an empty batch: its commit row says the sensor
        is alive, so the fleet page tells a quiet sensor from a stale one). No pruning: retention is the fleet's."""
        if self.rollup.due() and not self.rollup.flush():
            self.rollup.store.write(StoreBatch())


class FleetStage(StoreStage):
    """The history writer of a sensor: StoreStage's thread, queue and skip counting, shipping to ClickHouse."""

    name = "fleet"

    def __init__(self, rollup: Rollup, store: ClickHouseStore, max_packets: int, mirror) -> None:
        super().__init__(store, max_packets, iface=rollup.iface, sensor=rollup.sensor, mirror=mirror)
        self.rollup = rollup

    def start(self) -> FleetStage:
        """Start the writer thread (the store was opened by the sensor; its errors are state)."""
        self.recorder = _FleetRecorder(self.rollup)  # type: ignore[assignment]
        self._thread = threading.Thread(target=self._loop, name="fleet-writer", daemon=True)
        self._thread.start()
        return self


class _Outbox:
    """What the Rollup sees as its store: segment ids, and write() handing the batch to the shipper with
    the sensor's loss counters of that moment (`losses`: a callable, () when there are none)."""

    def __init__(self, store: ClickHouseStore, shipper: Shipper, losses=lambda: ()) -> None:
        self.store = store
        self.shipper = shipper
        self.losses = losses

    def allocate_segment(self) -> int:
        return self.store.allocate_segment()

    def write(self, batch: StoreBatch) -> bool:
        b = with_id(batch)
        b.losses = self.losses()
        self.shipper.submit(b)
        return True


class Shipper:
    """Sends batches in order: straight to ClickHouse while the spool is empty, else through the spool.

    One thread sends (never two: stop() asks that thread to do the last round). While a backlog is in
    the spool, new batches join it on disk (bounded by FLEET_SPOOL_MB) instead of waiting in memory, so
    a kill -9 loses nothing that was handed over. An unexpected error is logged, counted and retried
    with back-off; it never ends the thread."""

    def __init__(self, store: ClickHouseStore, spool: Spool, retry_s: float = 1.0, max_retry_s: float = 60.0) -> None:
        self.store = store
        self.spool = spool
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self._in: deque = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._next_retry = 0.0
        self.sent_packets = 0  # packets ClickHouse has from this process: each segment's newest version counted
        self._seg_sent: dict[int, int] = {}
        self.failures = 0
        self.errors = 0  # unexpected exceptions in the shipper (a damaged disk, a bug): each logged and retried
        self.last_error: str | None = None
        self.last_success: float | None = None
        self._backoff = retry_s
        self._thread = threading.Thread(target=self._run, name="fleet-shipper", daemon=True)

    def start(self) -> None:
        """Start the shipper thread."""
        self._thread.start()

    def submit(self, batch) -> None:
        """Queue a batch (from the rollup stage); never blocks on the network."""
        self._in.append(batch)
        self._wake.set()

    @property
    def alive(self) -> bool:
        """Whether the shipper thread runs."""
        return self._thread.is_alive()

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            if stopping:
                self._next_retry = 0.0  # the last round tries the spool once more, whatever the back-off
            try:
                self._turn()
                self._backoff = self.retry_s
            except Exception as exc:  # the shipper must outlive any error: logged, counted, retried later
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("fleet: shipper error (retry in %.0f s): %s", self._backoff, self.last_error)
                self._next_retry = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, self.max_retry_s)
            if stopping:
                return
            self._wake.wait(0.5)
            self._wake.clear()

    def _turn(self) -> None:
        while self._in:
            batch = self._in[0]
            sent = not len(self.spool) and time.monotonic() >= self._next_retry and self._send(batch)
            if not sent and not is_heartbeat(batch):  # a heartbeat says "alive now": worthless later, never spooled
                self.spool.put(batch)  # raises (disk full...): the batch stays first in memory, retried
            self._in.popleft()
        if len(self.spool) and time.monotonic() >= self._next_retry:
            self._drain()

    def _spool_incoming(self) -> None:
        """While a backlog drains, new batches go behind it on disk (in order), not into memory."""
        while self._in:
            batch = self._in[0]
            if not is_heartbeat(batch):
                self.spool.put(batch)
            self._in.popleft()

    def _drain(self) -> None:
        while True:
            self._spool_incoming()
            batch = self.spool.head()
            if batch is None:
                return
            if not self._send(batch):
                return
            self.spool.pop(batch.batch_id)

    def _send(self, batch) -> bool:
        if self.store.send(batch):
            self._count_sent(batch)
            self.last_success = time.time()
            self._next_retry = 0.0
            return True
        self.failures += 1
        self._next_retry = time.monotonic() + self.retry_s
        return False

    def _count_sent(self, batch) -> None:
        sec = batch.frames.get("seconds")
        shipped = set() if sec is None or not len(sec) else set(sec["seg"].astype(int).tolist())
        for seg in batch.replaces:  # a minute's close replaces its delta segments: their packets no longer count
            if int(seg) not in shipped:
                self.sent_packets -= self._seg_sent.pop(int(seg), 0)
        if sec is None or not len(sec):
            return
        for seg, packets in sec.groupby("seg")["packets"].sum().items():
            self.sent_packets += int(packets) - self._seg_sent.get(int(seg), 0)
            self._seg_sent[int(seg)] = int(packets)
        while len(self._seg_sent) > 10_000:  # bounded: old minutes are never written again
            self._seg_sent.pop(next(iter(self._seg_sent)))

    def stop(self, join_s: float = 30.0) -> bool:
        """Ask the thread for a last round (send what is queued, try the spool once) and wait for it.

        False when it is still busy after join_s (a send that hangs): nothing else sends meanwhile (one
        drainer only); what is still queued in memory then is logged as not spooled."""
        self._stop.set()
        self._wake.set()
        if self._thread.ident is None:  # never started: this thread is the only sender
            self._thread.start()
        self._thread.join(timeout=join_s)
        if self._thread.is_alive():
            log.error("fleet: the shipper is still busy after %.0f s (a send hangs?); %d batches still in memory",
                      join_s, len(self._in))
            return False
        return True


def is_heartbeat(batch: StoreBatch) -> bool:
    """An empty batch: no rows, nothing replaced or closed (only its commit row is written)."""
    return not batch.rows() and not batch.replaces and not batch.hours_done and not batch.origins


class Sensor:
    """A named sensor: capture on one interface, the fleet stage (rollup), shipping to ClickHouse, metrics."""

    def __init__(self, name: str, iface: str, bpf: str, address: str, cluster: str | None = None,
                 spool_dir: str | None = None, flush_s: float | None = None) -> None:
        self.name, self.iface, self.bpf = name, iface, bpf
        self.store = ClickHouseStore(address, cluster=cluster, sensor=name)
        folder = spool_dir or config.get("FLEET_SPOOL_DIR") or default_spool(name)
        self.spool = Spool(folder, int(config.get("FLEET_SPOOL_MB") * 1024 * 1024))
        self.shipper = Shipper(self.store, self.spool)
        self.run_id = uuid.uuid4().hex  # this process's loss counters start at 0: ClickHouse keeps them per run
        self._prev_losses = (0,) * len(LOSS_COUNTERS)  # the counters shipped with the previous flush
        # FLEET_DELTAS: each flush ships only what changed in the open minute (its close ships the minute whole
        # once). Off by default: ingest keeps up either way, and every delta segment's commit rows stay for the
        # page to look through, so a delta-written day reads ~2 s against ~0.5 s (benchmarks/RESULTS.md).
        self.rollup = Rollup(_Outbox(self.store, self.shipper, self.loss_row), sensor=name, iface=iface,
                             flush_s=config.get("FLEET_FLUSH_S") if flush_s is None else flush_s,
                             deltas=bool(config.get("FLEET_DELTAS")))
        self.engine = FleetEngine()
        self.engine.stage_factory = self._new_stage
        self.stage: FleetStage | None = None

    def _new_stage(self, source: Source) -> FleetStage:
        self.stage = FleetStage(self.rollup, self.store, config.get("STAGE_QUEUE_PACKETS"), self.engine.alerts)
        return self.stage.start()

    def losses(self) -> dict[str, int]:
        """Every loss counter of this sensor since it started: ring, NIC, detector and history skips."""
        return {**self.engine.losses(), "history_skipped_packets": self.skipped}

    def loss_row(self) -> tuple:
        """(iface, run, ts, *counters, *previous counters) as store.clickhouse.LOSS_COUNTERS: shipped with
        each flush. The previous counters are those of the run's previous flush: they let ClickHouse
        tell a range's losses when retention dropped the row before it, and a batch whose counters did
        not grow write no row. `ts` is the sensor's clock, for reference only (ClickHouse stamps the row)."""
        d = self.losses()
        now = tuple(int(d[c]) for c in LOSS_COUNTERS)
        prev, self._prev_losses = self._prev_losses, now  # one caller: the rollup's flush (one thread)
        return (self.iface, self.run_id, int(time.time()), *now, *prev)

    @property
    def skipped(self) -> int:
        """Packets the fleet stage skipped because its queue was full (ClickHouse lacks them)."""
        return self.stage.stats.packets_skipped if self.stage is not None else 0

    def start(self) -> bool:
        """Open the store (an error is logged and batches spool), start the shipper and the capture."""
        if self.store.open():
            self.engine.controls.use_store(self.store)  # the fleet's exclusion rules and settings (documents)
        self.shipper.start()
        return self.engine.start(Source("live", iface=self.iface, bpf=self.bpf))

    def stop(self) -> dict[str, Any]:
        """Stop the capture; the stage writes what is queued and flushes; send or spool it; the final report."""
        self.engine.stop(drain_s=60)
        self.engine.notifier.close(drain_s=config.get("NOTIFY_TIMEOUT_S") + 1)
        self.shipper.stop()
        self.store.close()
        return self.report()

    def report(self) -> dict[str, Any]:
        """What the sensor counted and what became of it (JSON-ready)."""
        summary = self.engine.summary()
        st = self.store.status()
        stage = self.stage.as_dict() if self.stage is not None else {}
        return {"sensor": self.name, "iface": self.iface, "filter": self.bpf,
                "packets": summary["packets"], "bytes_wire": summary["bytes_wire"],
                "transport_counts": summary["transport_counts"], "dropped": summary["dropped"],
                "first_ts": summary["first_ts"], "last_ts": summary["last_ts"], "error": summary["error"],
                "skipped": self.skipped, "stage_error": stage.get("error"), "losses": self.losses(),
                "packets_sent": self.shipper.sent_packets,
                "spool_batches": len(self.spool), "spool_packets": self.spool.packets(),
                "spool_dropped_batches": self.spool.dropped_batches,
                "spool_dropped_packets": self.spool.dropped_packets,
                "spool_damaged_batches": self.spool.damaged_batches,
                "spool_damaged_packets": self.spool.damaged_packets,
                "shipper_errors": self.shipper.errors, "shipper_last_error": self.shipper.last_error,
                "send_failures": self.shipper.failures, "last_flush_wall": self.shipper.last_success,
                "store": {"state": st.state, "path": st.path, "message": st.message}}


def default_spool(name: str) -> str:
    """$XDG_STATE_HOME (or ~/.local/state)/network-traffic-monitor/spool-<name>."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return str(Path(base) / "network-traffic-monitor" / f"spool-{safe}")


def nic_dropped(iface: str) -> int | None:
    """The interface's receive drops as the kernel counts them (rx_dropped), when it can be read."""
    try:
        return int(Path(f"/sys/class/net/{iface}/statistics/rx_dropped").read_text())
    except (OSError, ValueError):
        return None


def serve_metrics(sensor: Sensor, port: int, addr: str = "127.0.0.1"):
    """Prometheus metrics on addr:port, read from the sensor at each scrape; the server object."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class Collector:
        def collect(self):
            labels = ["sensor", "iface"]
            lv = [sensor.name, sensor.iface]
            t = sensor.engine.snapshot().totals

            def metric(kind, name, text, value):
                m = kind(name, text, labels=labels)
                m.add_metric(lv, value)
                return m

            yield metric(CounterMetricFamily, "ntm_sensor_packets", "Packets captured", t["packets"])
            yield metric(CounterMetricFamily, "ntm_sensor_bytes", "Bytes on the wire captured", t["bytes"])
            yield metric(CounterMetricFamily, "ntm_sensor_ring_drops", "Packets the kernel capture ring dropped",
                         t["dropped"])
            nic = nic_dropped(sensor.iface)
            if nic is not None:
                yield metric(CounterMetricFamily, "ntm_sensor_nic_drops", "Interface rx_dropped (kernel)", nic)
            yield metric(CounterMetricFamily, "ntm_sensor_skipped", "Packets the history stage skipped (queue full)",
                         sensor.skipped)
            detect = (t.get("stages") or {}).get("detectors") or {}
            yield metric(CounterMetricFamily, "ntm_sensor_detect_skipped_packets",
                         "Packets the detectors did not analyse (their stage's queue was full)",
                         detect.get("packets_skipped", 0))
            yield metric(CounterMetricFamily, "ntm_sensor_detect_skipped_batches",
                         "Batches the detectors did not analyse (their stage's queue was full)",
                         detect.get("batches_skipped", 0))
            yield metric(CounterMetricFamily, "ntm_sensor_sent_packets", "Packets in batches ClickHouse has",
                         sensor.shipper.sent_packets)
            yield metric(GaugeMetricFamily, "ntm_sensor_spool_bytes", "Bytes in the disk spool",
                         sensor.spool.size_bytes())
            yield metric(GaugeMetricFamily, "ntm_sensor_spool_batches", "Batches in the disk spool", len(sensor.spool))
            yield metric(CounterMetricFamily, "ntm_sensor_spool_dropped_packets",
                         "Packets lost from history when the full spool dropped its oldest batches",
                         sensor.spool.dropped_packets)
            yield metric(CounterMetricFamily, "ntm_sensor_spool_damaged_packets",
                         "Packets lost from history in spool entries that could not be read back (moved aside)",
                         sensor.spool.damaged_packets)
            yield metric(CounterMetricFamily, "ntm_sensor_shipper_errors",
                         "Unexpected errors in the shipper thread (logged, retried with back-off)",
                         sensor.shipper.errors)
            yield metric(GaugeMetricFamily, "ntm_sensor_shipper_alive", "1 while the shipper thread runs",
                         int(sensor.shipper.alive))
            yield metric(CounterMetricFamily, "ntm_sensor_send_failures", "Failed sends to ClickHouse",
                         sensor.shipper.failures)
            notify = t.get("notify") or {}
            yield metric(CounterMetricFamily, "ntm_sensor_notify_sent", "Alert notifications delivered",
                         notify.get("sent", 0))
            yield metric(CounterMetricFamily, "ntm_sensor_notify_given_up",
                         "Alert notifications given up after the retry budget (or a full queue)",
                         notify.get("given_up", 0))
            yield metric(GaugeMetricFamily, "ntm_sensor_last_flush_timestamp_seconds",
                         "Wall time of the last batch ClickHouse took (0: none yet)", sensor.shipper.last_success or 0)

    registry = CollectorRegistry()
    registry.register(Collector())
    return start_http_server(port, addr=addr, registry=registry)


def give_up_root(sensor: Sensor) -> bool:
    """As root: prepare what the sensor needs afterwards, then give up root as `capture` does (the broker
    keeps CAP_NET_RAW and opens the capture socket). The password is read now (the file may be root's
    only); the spool folder is handed to the user the process becomes; a CA file that user cannot read
    is an error said now. False when the drop failed (the sensor must not run half-privileged)."""
    from capture import broker
    from store.clickhouse import remember_credentials

    try:
        remember_credentials()
    except OSError as exc:
        log.error("sensor %s: cannot read CLICKHOUSE_PASSWORD_FILE: %s", sensor.name, exc)
        return False
    if os.geteuid() == 0:
        uid, gid, name = broker.target_user(config.get("RUN_AS_USER"))
        for folder, _, files in os.walk(sensor.spool.folder):
            os.chown(folder, uid, gid)
            for f in files:
                os.chown(os.path.join(folder, f), uid, gid)
        if sensor.store.ca_certs and broker.unreadable([sensor.store.ca_certs], uid, gid):
            log.error("sensor %s: user %s cannot read the CA file %s (CLICKHOUSE_CA_CERTS): TLS connections "
                      "will fail after the sensor gives up root", sensor.name, name, sensor.store.ca_certs)
    try:
        outcome = broker.separate()
    except broker.PrivilegeError as exc:
        log.error("sensor %s: %s", sensor.name, exc)
        return False
    if outcome.still_root:
        log.warning("sensor %s runs as root: the parsers run with every privilege", sensor.name)
    return True


def metrics_bind_error(addr: str, port: int) -> str | None:
    """Why the metrics cannot listen on addr:port (in use, bad address, privileged port), or None.

    Checked before the capture starts: a busy port is a clear error then, not a traceback after
    packets were already being captured. (The server binds the same way, with SO_REUSEADDR.)"""
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"metrics address {addr!r}: {exc}"
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
            s.listen(1)
        except OSError as exc:
            return f"cannot serve metrics on {addr}:{port} (--metrics-port): {exc.strerror or exc}"
    return None


def run(args) -> int:
    """The `sensor` subcommand: run until --seconds pass or SIGTERM; print the final report as JSON."""
    addr = getattr(args, "metrics_addr", None) or config.get("FLEET_METRICS_ADDR")
    if args.metrics_port:
        problem = metrics_bind_error(addr, args.metrics_port)
        if problem:
            log.error("sensor %s: %s; nothing was captured", args.name, problem)
            return 2
    sensor = Sensor(args.name, args.iface, args.filter or "", args.clickhouse, args.cluster, args.spool)
    if not give_up_root(sensor):
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    started, metrics_failed = sensor.start(), False
    if args.metrics_port:  # after the capture ring is open: a scrape that answers means packets are counted
        try:
            serve_metrics(sensor, args.metrics_port, addr)
        except OSError as exc:  # taken in between by another program: said, and the sensor stops cleanly
            log.error("sensor %s: cannot serve metrics on %s:%d: %s", args.name, addr, args.metrics_port, exc)
            metrics_failed = True
            stop.set()
    if not started:
        log.error("sensor %s: capture did not start: %s", args.name, sensor.engine.status().error)
    else:
        log.info("sensor %s capturing on %s (filter %r), shipping to %s", args.name, args.iface, args.filter,
                 sensor.store.path)
    stop.wait(args.seconds if args.seconds else None)
    report = sensor.stop()
    json.dump(report, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
    return 2 if metrics_failed else 0 if not report["error"] else 1
