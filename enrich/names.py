"""Reverse DNS (PTR) for the addresses shown, done by a small bounded worker pool, never by the caller.

The page calls lookup_nowait(addr): it gets the cached name at once, or None while a lookup is queued.
Answers and failures are cached with a TTL; every query has a time-out; with the setting off no query
is ever sent. Names come from outside (a PTR record can hold any text): callers must escape them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from enrich.cache import BoundedCache

log = logging.getLogger(__name__)

FAILED = ""  # cached for an address whose lookup failed or timed out (so it is not asked again at once)


@dataclass
class DnsStats:
    """What the pool did: each loss (queue full) is counted."""

    queued: int = 0
    sent: int = 0
    answered: int = 0
    failed: int = 0
    timed_out: int = 0
    dropped_queue_full: int = 0
    last_error: str = ""
    extra: dict = field(default_factory=dict)


def name_text(labels: tuple[bytes, ...]) -> str:
    """A DNS name's labels as the text they hold (not zone-file escapes); control characters replaced.

    The text is whatever the record's owner put there (markup included): whoever shows it escapes it.
    """
    text = ".".join(lab.decode("utf-8", "replace") for lab in labels if lab)
    return "".join(c if c.isprintable() else "\ufffd" for c in text)[:MAX_NAME]


MAX_NAME = 255  # a DNS name is at most 255 bytes on the wire


class ReverseDNS:
    """PTR lookups in `workers` daemon threads fed by a bounded queue; results in a bounded TTL cache."""

    def __init__(self, enabled: bool = True, server: str = "", timeout_s: float = 2.0, ttl_s: float = 3600.0,
                 workers: int = 2, cache_max: int = 10_000, queue_max: int = 1000) -> None:
        self.enabled = enabled
        self.server = server
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self.workers = max(1, workers)
        self._cache = BoundedCache(cache_max, ttl_s)
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=queue_max)
        self._pending: set[str] = set()
        self._pending_max = queue_max
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.stats = DnsStats()
        self._stats_lock = threading.Lock()  # workers count concurrently: += is not atomic
        self._resolver = None

    # ---- the caller's side: never waits ----
    def lookup_nowait(self, addr: str) -> str | None:
        """The cached name ('' after a failure), or None while a lookup is queued (or the setting is off)."""
        if not self.enabled or not addr:
            return None
        hit = self._cache.get(addr)
        if hit is not None:
            return hit
        self._submit(addr)
        return None

    def cached(self, addr: str) -> str | None:
        """The cached name ('' after a failure), or None; never queues a lookup (the packet filter's use)."""
        return self._cache.get(addr) if self.enabled and addr else None

    def _submit(self, addr: str) -> None:
        with self._lock:
            if addr in self._pending or self._stop.is_set():
                return
            if len(self._pending) >= self._pending_max:
                self.stats.dropped_queue_full += 1
                return
            try:
                self._queue.put_nowait(addr)
            except queue.Full:
                self.stats.dropped_queue_full += 1
                return
            self._pending.add(addr)
            self.stats.queued += 1
            if not self._threads:
                self._start_locked()

    def resolve_all(self, addrs: list[str], wait_s: float) -> dict[str, str | None]:
        """Queue every address, wait up to wait_s in total for the answers (the CLI's use), then what is known."""
        for a in addrs:
            self.lookup_nowait(a)
        end = time.monotonic() + wait_s
        while time.monotonic() < end and any(self._cache.get(a) is None for a in addrs) and self.enabled:
            time.sleep(0.02)
        return {a: self._cache.get(a) for a in addrs}

    # ---- the workers ----
    def _start_locked(self) -> None:
        import dns.resolver
        resolver = dns.resolver.Resolver(configure=not self.server)
        if self.server:
            resolver.nameservers = [self.server]
        resolver.timeout = self.timeout_s
        resolver.lifetime = self.timeout_s
        resolver.cache = None  # our own bounded cache holds the answers
        self._resolver = resolver
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"rdns-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _work(self) -> None:
        while not self._stop.is_set():
            addr = self._queue.get()
            if addr is None:
                return
            try:
                self._cache.put(addr, self._query(addr))
            finally:
                with self._lock:
                    self._pending.discard(addr)

    def _count(self, what: str, error: str = "") -> None:
        with self._stats_lock:
            setattr(self.stats, what, getattr(self.stats, what) + 1)
            if error:
                self.stats.last_error = error[:200]

    def _query(self, addr: str) -> str:
        import dns.exception
        import dns.resolver
        import dns.reversename
        try:
            rev = dns.reversename.from_address(addr)
        except (ValueError, dns.exception.SyntaxError):
            return FAILED
        self._count("sent")
        try:
            answer = self._resolver.resolve(rev, "PTR", lifetime=self.timeout_s)
        except dns.exception.Timeout:
            self._count("timed_out")
            return FAILED
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers,
                dns.exception.DNSException, OSError) as exc:
            self._count("failed", f"{type(exc).__name__}: {exc}")
            return FAILED
        self._count("answered")
        return name_text(answer[0].target.labels)

    def stop(self) -> None:
        """Stop the workers (safe to call twice); queued lookups are dropped."""
        self._stop.set()
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self._queue.put_nowait(None)
                except (queue.Empty, queue.Full):
                    pass
        for t in threads:
            t.join(self.timeout_s + 1)
