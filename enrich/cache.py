"""A small bounded LRU map with optional expiry, safe to share between threads."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

_MISSING = object()


class BoundedCache:
    """At most `maxsize` entries; the least recently used goes first; entries may expire after `ttl` seconds."""

    def __init__(self, maxsize: int, ttl: float | None = None) -> None:
        self.maxsize = max(1, int(maxsize))
        self.ttl = ttl
        self._data: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted = 0

    def get(self, key: Any, default: Any = None) -> Any:
        """The value for key, or default when absent or expired."""
        with self._lock:
            item = self._data.get(key, _MISSING)
            if item is _MISSING:
                return default
            expires, value = item
            if expires and expires < time.monotonic():
                del self._data[key]
                return default
            self._data.move_to_end(key)
            return value

    def put(self, key: Any, value: Any, ttl: float | None = None) -> None:
        """Store value; evicts the least recently used entry when full."""
        ttl = self.ttl if ttl is None else ttl
        expires = time.monotonic() + ttl if ttl else 0.0
        with self._lock:
            self._data[key] = (expires, value)
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)
                self.evicted += 1

    def __contains__(self, key: Any) -> bool:
        return self.get(key, _MISSING) is not _MISSING

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._data.clear()
