"""A fleet sensor: headless capture whose history rows go to ClickHouse every FLEET_FLUSH_S.

    python packet_processor.py sensor --name NAME --iface IF [--filter BPF] [--seconds N]
        --clickhouse HOST:PORT [--cluster CLUSTER] [--spool DIR] [--metrics-port P]

Three threads besides the capture: the engine's capture thread hands each parsed batch to a bounded
queue (never waiting: a full queue skips the batch and counts it); the rollup stage turns batches
into StoreBatches every FLEET_FLUSH_S; the shipper sends them to ClickHouse, or, when ClickHouse is
unreachable or refuses them, to the disk spool, which it drains in order once ClickHouse is back.
Batch ids make a re-send harmless (store/clickhouse.py). SIGTERM (or --seconds) stops the capture,
flushes the rollup, tries the spool once more, and exits; what could not be sent stays spooled.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

import config
from fleet.spool import Spool
from packet_processor import CaptureEngine, Source
from store.base import StoreBatch
from store.clickhouse import ClickHouseStore, with_id
from store.rollup import Rollup

log = logging.getLogger(__name__)


class FleetEngine(CaptureEngine):
    """The capture engine as it is, with one hook that also hands each parsed batch to the sensor."""

    sink = None  # set by the Sensor: a callable taking a parsed batch, which must never block

    # --- THE HOOK (the one place the sensor takes batches from the engine). When the engine has its
    # --- consumer-stage interface, register Sensor.offer as a stage there and delete this override.
    def _ingest(self, arr: np.ndarray, gen: int) -> None:
        super()._ingest(arr, gen)
        if self.sink is not None and len(arr) and gen == self._gen:
            self.sink(arr)


class _Outbox:
    """What the Rollup sees as its store: segment ids, and write() handing the batch to the shipper."""

    def __init__(self, store: ClickHouseStore, shipper: Shipper) -> None:
        self.store = store
        self.shipper = shipper

    def allocate_segment(self) -> int:
        return self.store.allocate_segment()

    def write(self, batch: StoreBatch) -> bool:
        self.shipper.submit(with_id(batch))
        return True


class Shipper:
    """Sends batches in order: straight to ClickHouse while the spool is empty, else through the spool."""

    def __init__(self, store: ClickHouseStore, spool: Spool, retry_s: float = 1.0) -> None:
        self.store = store
        self.spool = spool
        self.retry_s = retry_s
        self._in: deque = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._next_retry = 0.0
        self.sent_packets = 0  # packets ClickHouse has from this process: each segment's newest version counted
        self._seg_sent: dict[int, int] = {}
        self.failures = 0
        self.last_success: float | None = None
        self._thread = threading.Thread(target=self._run, name="fleet-shipper", daemon=True)

    def start(self) -> None:
        """Start the shipper thread."""
        self._thread.start()

    def submit(self, batch) -> None:
        """Queue a batch (from the rollup stage); never blocks on the network."""
        self._in.append(batch)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            self._turn()

    def _turn(self) -> None:
        while self._in:
            batch = self._in.popleft()
            if len(self.spool) or time.monotonic() < self._next_retry or not self._send(batch):
                self.spool.put(batch)
        if len(self.spool) and time.monotonic() >= self._next_retry:
            self._drain()

    def _drain(self) -> None:
        while True:
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
        if sec is None or not len(sec):
            return
        for seg, packets in sec.groupby("seg")["packets"].sum().items():
            self.sent_packets += int(packets) - self._seg_sent.get(int(seg), 0)
            self._seg_sent[int(seg)] = int(packets)
        while len(self._seg_sent) > 10_000:  # bounded: old minutes are never written again
            self._seg_sent.pop(next(iter(self._seg_sent)))

    def stop(self) -> None:
        """Stop the thread, then send what is queued and try the spool once; the rest stays spooled."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self._next_retry = 0.0
        self._turn()


class Sensor:
    """A named sensor: capture on one interface, rollup, shipping to ClickHouse, metrics."""

    def __init__(self, name: str, iface: str, bpf: str, address: str, cluster: str | None = None,
                 spool_dir: str | None = None, flush_s: float | None = None) -> None:
        self.name, self.iface, self.bpf = name, iface, bpf
        self.store = ClickHouseStore(address, cluster=cluster, sensor=name)
        folder = spool_dir or config.get("FLEET_SPOOL_DIR") or default_spool(name)
        self.spool = Spool(folder, int(config.get("FLEET_SPOOL_MB") * 1024 * 1024))
        self.shipper = Shipper(self.store, self.spool)
        self.rollup = Rollup(_Outbox(self.store, self.shipper), sensor=name, iface=iface,
                             flush_s=config.get("FLEET_FLUSH_S") if flush_s is None else flush_s)
        self.engine = FleetEngine()
        self.engine.sink = self.offer
        self._queue: queue.Queue = queue.Queue(maxsize=int(config.get("FLEET_QUEUE_BATCHES")))
        self.skipped = 0
        self._alert_seen: dict[tuple, tuple] = {}
        self._stop = threading.Event()
        self._stage = threading.Thread(target=self._run_stage, name="fleet-rollup", daemon=True)

    def offer(self, arr: np.ndarray) -> None:
        """From the capture thread: queue a parsed batch, or skip and count it when the stage is behind."""
        try:
            self._queue.put_nowait(arr)
        except queue.Full:
            self.skipped += len(arr)

    def start(self) -> bool:
        """Open the store (an error is logged and batches spool), start the threads and the capture."""
        if self.store.open():
            self.engine.controls.use_store(self.store)  # the fleet's exclusion rules and settings (documents)
        self.shipper.start()
        self._stage.start()
        return self.engine.start(Source("live", iface=self.iface, bpf=self.bpf))

    def _run_stage(self) -> None:
        while True:
            try:
                arr = self._queue.get(timeout=0.2)
            except queue.Empty:
                arr = None
            if arr is not None:
                self.rollup.add(arr)
            elif self._stop.is_set():
                return
            if self.rollup.due():
                self._take_alerts()
                self.rollup.flush()

    def _take_alerts(self) -> None:
        """Alerts new or changed since the last flush (the rollup writes them with the batch)."""
        changed = []
        for a in self.engine.alerts.alerts():
            d = a.as_dict()
            key = (d["detector"], d["source"], d["target"], float(d["first_ts"]))
            state = (d["last_ts"], d["count"])
            if self._alert_seen.get(key) != state:
                self._alert_seen[key] = state
                changed.append(d)
        if changed:
            self.rollup.add_alerts(changed)

    def stop(self) -> dict[str, Any]:
        """Stop the capture, flush everything, send or spool it; the sensor's final report."""
        self.engine.stop()
        self.engine.notifier.close(drain_s=config.get("NOTIFY_TIMEOUT_S") + 1)
        self._stop.set()
        self._stage.join(timeout=60)
        self._take_alerts()
        self.rollup.flush(final=True)
        self.shipper.stop()
        self.store.close()
        return self.report()

    def report(self) -> dict[str, Any]:
        """What the sensor counted and what became of it (JSON-ready)."""
        summary = self.engine.summary()
        st = self.store.status()
        return {"sensor": self.name, "iface": self.iface, "filter": self.bpf,
                "packets": summary["packets"], "bytes_wire": summary["bytes_wire"],
                "transport_counts": summary["transport_counts"], "dropped": summary["dropped"],
                "first_ts": summary["first_ts"], "last_ts": summary["last_ts"], "error": summary["error"],
                "skipped": self.skipped, "packets_sent": self.shipper.sent_packets,
                "spool_batches": len(self.spool), "spool_packets": self.spool.packets(),
                "spool_dropped_batches": self.spool.dropped_batches,
                "spool_dropped_packets": self.spool.dropped_packets,
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
            yield metric(CounterMetricFamily, "ntm_sensor_sent_packets", "Packets in batches ClickHouse has",
                         sensor.shipper.sent_packets)
            yield metric(GaugeMetricFamily, "ntm_sensor_spool_bytes", "Bytes in the disk spool",
                         sensor.spool.size_bytes())
            yield metric(GaugeMetricFamily, "ntm_sensor_spool_batches", "Batches in the disk spool", len(sensor.spool))
            yield metric(CounterMetricFamily, "ntm_sensor_spool_dropped_packets",
                         "Packets lost from history when the full spool dropped its oldest batches",
                         sensor.spool.dropped_packets)
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


def run(args) -> int:
    """The `sensor` subcommand: run until --seconds pass or SIGTERM; print the final report as JSON."""
    sensor = Sensor(args.name, args.iface, args.filter or "", args.clickhouse, args.cluster, args.spool)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    started = sensor.start()
    if args.metrics_port:  # after the capture ring is open: a scrape that answers means packets are counted
        serve_metrics(sensor, args.metrics_port)
    if not started:
        log.error("sensor %s: capture did not start: %s", args.name, sensor.engine.status().error)
    else:
        log.info("sensor %s capturing on %s (filter %r), shipping to %s", args.name, args.iface, args.filter,
                 sensor.store.path)
    stop.wait(args.seconds if args.seconds else None)
    report = sensor.stop()
    json.dump(report, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
    return 0 if not report["error"] else 1
