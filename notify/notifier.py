"""The delivery stage: alerts from the engine's AlertMirror to every configured destination, never
blocking the capture or the page.

The mirror hands over each report (the whole alert book) with offer(), which only keeps the list and
wakes the dispatcher thread. The dispatcher compares it with what it saw before, keyed by detector,
source and target: a new alert is sent; a repeat within NOTIFY_REPEAT_S of its last notification
updates the row it tracks and sends nothing; a repeat after that is sent again, marked as a repeat.
Each destination is a Channel: its own bounded queue (the oldest waiting notification is given up,
counted, when it is full), its own rate limit (NOTIFY_RATE_MAX per NOTIFY_RATE_WINDOW_S; what is
over it is counted and one "N more alerts suppressed" notice follows when the window has room again)
and its own thread, which tries each delivery 1 + NOTIFY_RETRIES times with a doubling back-off and
then gives it up, counted. A slow or dead receiver therefore holds up only its own thread.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import config
from notify.destinations import Destination, Email, Syslog, Webhook
from notify.message import alert_doc, suppressed_doc

log = logging.getLogger(__name__)

SEEN_MAX = 10_000  # alert keys remembered for repeat suppression (the book itself holds at most ALERTS_MAX)
BACKOFF_MAX_S = 300.0
# Destination fields a signed-in viewer may set on the page. Secrets are the operator's (config, the
# environment, files it names) and go only to the destinations the operator configured: a page-set webhook
# gets no bearer token, a page-set SMTP server no login (see destinations()).
PAGE_FIELDS = ("NOTIFY_WEBHOOK", "NOTIFY_SYSLOG", "NOTIFY_EMAIL_TO", "SMTP_HOST", "SMTP_PORT", "SMTP_USER",
               "NOTIFY_DIGEST_MIN")
SECRET_FIELDS = ("NOTIFY_WEBHOOK",)  # shown masked, never echoed back


@dataclass(frozen=True)
class NotifySettings:
    """The delivery settings (config, with a page's changes on top)."""

    repeat_s: float = 300.0
    rate_max: int = 10
    rate_window_s: float = 60.0
    retries: int = 3
    backoff_s: float = 2.0
    timeout_s: float = 5.0
    queue_max: int = 1000
    dashboard_url: str = ""
    values: dict[str, Any] = field(default_factory=dict)  # the destinations' settings (PAGE_FIELDS and more)
    operator: dict[str, Any] = field(default_factory=dict)  # the same settings from config alone

    @classmethod
    def from_config(cls, overrides: dict[str, Any] | None = None) -> NotifySettings:
        """From config.get, with `overrides` (the page's saved destination settings, PAGE_FIELDS only) first."""
        o = {k: v for k, v in (overrides or {}).items() if k in PAGE_FIELDS}

        def get(name: str) -> Any:
            return o[name] if name in o else config.get(name)

        names = (*PAGE_FIELDS, "NOTIFY_WEBHOOK_TOKEN_FILE", "SMTP_PASSWORD_FILE", "NOTIFY_EMAIL_FROM", "SMTP_CA_FILE")
        return cls(repeat_s=get("NOTIFY_REPEAT_S"), rate_max=get("NOTIFY_RATE_MAX"),
                   rate_window_s=get("NOTIFY_RATE_WINDOW_S"), retries=get("NOTIFY_RETRIES"),
                   backoff_s=get("NOTIFY_BACKOFF_S"), timeout_s=get("NOTIFY_TIMEOUT_S"),
                   queue_max=get("NOTIFY_QUEUE_MAX"), dashboard_url=get("DASHBOARD_URL"),
                   values={n: get(n) for n in names}, operator={n: config.get(n) for n in names})


def destinations(s: NotifySettings, hostname: str) -> tuple[list[Destination], list[str]]:
    """The destinations the settings describe, and a clear error per one that is misconfigured.

    The operator's secrets go only where the operator sent them: the bearer token to the webhooks of
    config's NOTIFY_WEBHOOK, the SMTP login to config's SMTP_HOST and SMTP_PORT; a page can add
    destinations, never redirect a secret."""
    v, op, out, errors = s.values, s.operator, [], []
    op_hooks = set(str(op.get("NOTIFY_WEBHOOK") or "").split())
    token = v["NOTIFY_WEBHOOK_TOKEN_FILE"]
    builders = [(f"NOTIFY_WEBHOOK {i + 1}", lambda u=u: Webhook(u, token if u in op_hooks else "", s.timeout_s))
                for i, u in enumerate(str(v.get("NOTIFY_WEBHOOK") or "").split())]
    builders += [(f"NOTIFY_SYSLOG {u}", lambda u=u: Syslog(u, hostname, s.timeout_s))
                 for u in str(v.get("NOTIFY_SYSLOG") or "").split()]
    if v.get("NOTIFY_EMAIL_TO"):
        own = (v["SMTP_HOST"], int(v["SMTP_PORT"] or 0)) == (op["SMTP_HOST"], int(op["SMTP_PORT"] or 0))
        builders.append(("NOTIFY_EMAIL_TO", lambda: Email(v["NOTIFY_EMAIL_TO"], v["SMTP_HOST"], v["SMTP_PORT"],
                                                          v["SMTP_USER"] if own else "", op["SMTP_PASSWORD_FILE"],
                                                          v["NOTIFY_EMAIL_FROM"], v["SMTP_CA_FILE"],
                                                          v["NOTIFY_DIGEST_MIN"], s.timeout_s, hostname,
                                                          login_refused=not own and bool(v["SMTP_USER"]))))
    for name, build in builders:
        try:
            out.append(build())
        except (ValueError, TypeError) as exc:  # the message names the setting, never a secret's value
            errors.append(f"{name}: {exc}")
    return out, errors


def alert_key(alert: Any) -> tuple[str, str, str]:
    """(detector, source, target), with a source that is a count ("12 source(s)") left out: it changes
    as a flood grows, and the alert is the same one."""
    try:
        ipaddress.ip_address(alert.source)
        source = alert.source
    except ValueError:
        source = alert.source if ":" in alert.source else ""  # a MAC address (ARP) stays
    return alert.detector, source, alert.target


class Channel:
    """One destination: a bounded queue, a rate limit, a delivery thread with retries; counted."""

    def __init__(self, dest: Destination, s: NotifySettings, sensor: str, clock=time.monotonic) -> None:
        self.dest, self.s, self.sensor, self.clock = dest, s, sensor, clock
        self.name = dest.describe()
        self._cond = threading.Condition()
        self._queue: deque[dict[str, Any]] = deque()
        self._times: deque[float] = deque()  # when the alerts of the current rate window were accepted
        self._notice = 0  # alerts over the rate limit not yet reported by a notice
        self._digest_due = clock() + dest.digest_s
        self._inflight = 0
        self._stop = threading.Event()
        self._draining = False
        self.counts = {"queued": 0, "sent": 0, "notices_sent": 0, "attempts": 0, "failures": 0, "given_up": 0,
                       "rate_suppressed": 0, "queue_dropped": 0}
        self.last_error: str | None = None
        self.last_sent_wall: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"notify-{dest.kind}", daemon=True)

    def start(self) -> Channel:
        """Start the delivery thread."""
        self._thread.start()
        return self

    def offer(self, doc: dict[str, Any]) -> None:
        """Queue one alert's document (from the dispatcher): never waits."""
        with self._cond:
            now = self.clock()
            while self._times and self._times[0] <= now - self.s.rate_window_s:
                self._times.popleft()
            if len(self._times) >= self.s.rate_max:
                self.counts["rate_suppressed"] += 1
                self._notice += 1
                self._cond.notify()
                return
            self._times.append(now)
            if len(self._queue) >= self.s.queue_max:
                self._queue.popleft()
                self.counts["queue_dropped"] += 1
                self.counts["given_up"] += 1
            self._queue.append(doc)
            self.counts["queued"] += 1
            self._cond.notify()

    def _notice_due(self, now: float) -> bool:
        if not self._notice:
            return False
        return self._draining or not self._times or self._times[0] <= now - self.s.rate_window_s

    def _next(self) -> list[dict[str, Any]] | None:
        """The next delivery (a rate notice, a digest, or one alert), waiting for it; None to stop."""
        with self._cond:
            while not self._stop.is_set():
                now = self.clock()
                if self._notice_due(now):
                    n, self._notice = self._notice, 0
                    self._times.clear()  # the notice opens a fresh window
                    return [suppressed_doc(n, self.s.rate_window_s, self.name, self.sensor)]
                if self._queue and (not self.dest.digest_s or self._draining or now >= self._digest_due):
                    docs = list(self._queue) if self.dest.digest_s else [self._queue.popleft()]
                    if self.dest.digest_s:
                        self._queue.clear()
                        self._digest_due = now + self.dest.digest_s
                    self._inflight = len(docs)
                    return docs
                waits = [0.5]
                if self._notice and self._times:
                    waits.append(self._times[0] + self.s.rate_window_s - now)
                if self._queue and self.dest.digest_s:
                    waits.append(self._digest_due - now)
                self._cond.wait(max(0.01, min(waits)))
        return None

    def _run(self) -> None:
        while True:
            docs = self._next()
            if docs is None:
                return
            self._deliver(docs)
            with self._cond:
                self._inflight = 0
                self._cond.notify_all()

    def _deliver(self, docs: list[dict[str, Any]]) -> None:
        """Try 1 + NOTIFY_RETRIES times, waiting NOTIFY_BACKOFF_S and doubling; then give up, counted."""
        alerts = sum(1 for d in docs if d.get("kind") == "alert")
        for attempt in range(self.s.retries + 1):
            self._count(attempts=1)
            try:
                self.dest.send(docs)
            except (OSError, ValueError) as exc:  # every network, TLS, SMTP and HTTP failure
                self._count(failures=1)
                self.last_error = self.dest.error_text(exc)
                log.warning("notify: %s failed (attempt %d of %d): %s", self.name, attempt + 1,
                            self.s.retries + 1, self.last_error)
                if attempt < self.s.retries and not self._stop.wait(min(self.s.backoff_s * 2 ** attempt,
                                                                         BACKOFF_MAX_S)):
                    continue
                break
            self._count(sent=alerts, notices_sent=len(docs) - alerts)
            self.last_sent_wall = time.time()
            return
        self._count(given_up=len(docs))
        log.error("notify: %s: gave up %d notification(s) after %d attempt(s): %s", self.name, len(docs),
                  self.counts["attempts"], self.last_error)

    def _count(self, **deltas: int) -> None:
        with self._cond:  # offer() counts too, from the dispatcher thread
            for k, v in deltas.items():
                self.counts[k] += v

    def drain(self, timeout: float) -> bool:
        """Send what waits (digests and notices at once) for up to `timeout` seconds; True when all went."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._draining = True
            self._cond.notify_all()
            while self._queue or self._inflight or self._notice:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def stop(self) -> None:
        """Ask the thread to stop after the delivery in progress (never waits)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def close(self, drain_s: float = 0.0) -> None:
        """Stop the thread (after up to drain_s s of delivering); what is left is counted as given up."""
        if drain_s > 0:
            self.drain(drain_s)
        self.stop()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.s.timeout_s + 1)
        with self._cond:
            left = len(self._queue) + self._notice
            self._queue.clear()
            self._notice = 0
            self.counts["given_up"] += left

    def status(self) -> dict[str, Any]:
        """Counters and health for the page and the metrics (no secret)."""
        with self._cond:
            return {"destination": self.name, "kind": self.dest.kind, **self.counts, "waiting": len(self._queue),
                    "suppressed_pending": self._notice, "last_error": self.last_error,
                    "last_sent_wall": self.last_sent_wall}


class Notifier:
    """The engine's delivery stage: one dispatcher thread and one Channel per destination."""

    def __init__(self, sensor: str | None = None, iface: str = "", clock=time.monotonic) -> None:
        self.sensor = sensor or config.get("STORE_SENSOR") or socket.gethostname()
        self.iface = iface
        self.clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._latest: list | None = None
        self._busy = False  # the dispatcher is handing a report to the channels
        self._seen: OrderedDict[tuple[str, str, str], list] = OrderedDict()  # key -> [first_ts, count, sent at]
        self._channels: list[Channel] = []
        self._retiring: list[Channel] = []  # replaced by configure(), being closed by the closer thread
        self._closer: threading.Thread | None = None
        self._retired: dict[str, int] = {"sent": 0, "given_up": 0}  # counts of channels replaced by configure()
        self.settings = NotifySettings.from_config()
        self.errors: list[str] = []
        self.updated = 0  # repeats within NOTIFY_REPEAT_S that updated a tracked alert instead of sending
        self._thread: threading.Thread | None = None

    def configure(self, overrides: dict[str, Any] | None = None) -> list[str]:
        """(Re)build the destinations from config and the page's settings; the errors (also kept in .errors)."""
        s = NotifySettings.from_config(overrides)
        dests, errors = destinations(s, self.sensor)
        new = [Channel(d, s, self.sensor, self.clock).start() for d in dests]
        with self._lock:
            old, self._channels = self._channels, new
            self.settings, self.errors = s, errors
        self._retire(old)
        for e in errors:
            log.error("notify: %s", e)
        for ch in new:
            log.info("notify: alerts go to %s", ch.name)
        if new and self._thread is None:
            self._thread = threading.Thread(target=self._dispatch, name="notify-dispatch", daemon=True)
            self._thread.start()
        return errors

    def _retire(self, old: list[Channel]) -> None:
        """Stop replaced channels now and close them in the background: a delivery in progress can take up
        to NOTIFY_TIMEOUT_S, and configure() runs on the page's script thread. One closer thread at most."""
        for ch in old:
            ch.stop()
        with self._lock:
            self._retiring.extend(old)
            if old and (self._closer is None or not self._closer.is_alive()):
                self._closer = threading.Thread(target=self._close_retiring, name="notify-closer", daemon=True)
                self._closer.start()

    def _close_retiring(self) -> None:
        while True:
            with self._lock:
                if not self._retiring:
                    self._closer = None
                    return
                ch = self._retiring[0]
            ch.close(drain_s=0.0)
            with self._lock:
                self._retiring.remove(ch)
                self._retired["sent"] += ch.counts["sent"]
                self._retired["given_up"] += ch.counts["given_up"]

    def offer(self, gen: int, alerts: list) -> None:
        """The mirror's listener: keep the latest alert list and wake the dispatcher (never waits)."""
        if self._channels:
            with self._lock:  # held only for the assignment: the mirror's thread never waits on delivery
                self._latest = alerts
            self._wake.set()

    def _dispatch(self) -> None:
        while not self._stop.is_set():
            if not self._wake.wait(0.5):
                continue
            self._wake.clear()
            with self._lock:
                alerts, self._latest = self._latest, None
                self._busy = True
            try:
                if alerts:
                    self._diff(alerts)
            except Exception:  # a bug here must not end delivery for good; it is logged
                log.exception("notify: dispatch failed")
            finally:
                with self._lock:
                    self._busy = False

    def _diff(self, alerts: list) -> None:
        """Send what is new, and repeats last sent more than NOTIFY_REPEAT_S ago; track the rest."""
        now = self.clock()
        s = self.settings
        for a in reversed(alerts):  # oldest first, so a burst is sent in the order it was raised
            key = alert_key(a)
            seen = self._seen.get(key)
            if seen is not None and (seen[0], seen[1]) == (a.first_ts, a.count):
                continue
            if seen is not None and now - seen[2] < s.repeat_s:
                seen[0], seen[1] = a.first_ts, a.count
                self.updated += 1
                continue
            self._seen[key] = [a.first_ts, a.count, now]
            self._seen.move_to_end(key)
            while len(self._seen) > SEEN_MAX:
                self._seen.popitem(last=False)
            doc = alert_doc(a, self.sensor, self.iface, s.dashboard_url, repeat=seen is not None)
            for ch in list(self._channels):
                ch.offer(doc)

    def _dispatching(self) -> bool:
        """A report waits for the dispatcher, or it is handing one to the channels."""
        with self._lock:
            return self._latest is not None or self._busy

    def flush(self, timeout: float) -> bool:
        """Deliver what the latest report holds and what waits, for up to `timeout` s (the headless CLI)."""
        deadline = time.monotonic() + timeout
        while self._dispatching() and time.monotonic() < deadline:
            time.sleep(0.02)
        return all(ch.drain(max(0.0, deadline - time.monotonic())) for ch in list(self._channels))

    def close(self, drain_s: float = 0.0) -> None:
        """Stop delivering (after up to drain_s s of it); safe to call twice."""
        if drain_s > 0:
            self.flush(drain_s)
        self._stop.set()
        self._wake.set()
        with self._lock:
            channels, closer = list(self._channels), self._closer
        for ch in channels:
            ch.close()
        if closer is not None:  # channels replaced just before: their counts are final once it ends
            closer.join(timeout=self.settings.timeout_s + 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)

    def status(self) -> dict[str, Any]:
        """Per destination its counters, with the totals (given_up is what the page and metrics show)."""
        with self._lock:
            channels, retiring, retired = list(self._channels), list(self._retiring), dict(self._retired)
        dests = [ch.status() for ch in channels]
        old = [ch.status() for ch in retiring]  # replaced, still closing: their counts still count
        return {"destinations": dests, "errors": list(self.errors), "updated": self.updated,
                "sent": retired["sent"] + sum(d["sent"] for d in dests + old),
                "given_up": retired["given_up"] + sum(d["given_up"] for d in dests + old)}
