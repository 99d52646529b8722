"""Baselines: the hosts, services and protocol mix seen so far, saved by name; what is new since one."""

from __future__ import annotations

from typing import Any

import numpy as np

from analysis.headers import CLASSES, NON_IP, TCP, UDP, addr_text

KIND = "baseline"  # the store's document kind
MAX_KEYS = 50_000  # hosts (and services) kept per baseline: a document stays small


def _first_seen(keys: np.ndarray, ts: np.ndarray) -> dict[Any, float]:
    """Each distinct key's earliest time."""
    if not len(keys):
        return {}
    uniq, inv = np.unique(keys, return_inverse=True)
    first = np.full(len(uniq), np.inf)
    np.minimum.at(first, inv.reshape(-1), ts)
    return dict(zip(uniq.tolist(), first.tolist()))


def hosts(rows: np.ndarray) -> dict[str, float]:
    """Every IP address seen at either end, with its first-seen capture time."""
    ip = rows[rows["cls"] != NON_IP]
    keys = np.concatenate((np.ascontiguousarray(ip["src"]).view("V16").ravel(),
                           np.ascontiguousarray(ip["dst"]).view("V16").ravel()))
    seen = _first_seen(keys, np.concatenate((ip["ts"], ip["ts"])))
    return {addr_text(bytes(k)): t for k, t in seen.items()}


def services(rows: np.ndarray) -> dict[str, float]:
    """Every TCP/UDP service port ('tcp/443', the lower port of the two ends) with its first-seen time."""
    tu = rows[((rows["cls"] == TCP) | (rows["cls"] == UDP)) & (rows["sport"] >= 0) & (rows["dport"] >= 0)]
    port = np.minimum(tu["sport"], tu["dport"]).astype(np.int64)
    seen = _first_seen(tu["cls"].astype(np.int64) * 65536 + port, tu["ts"])
    return {f"{CLASSES[k // 65536]}/{k % 65536}": t for k, t in seen.items()}


def protocols(rows: np.ndarray) -> dict[str, int]:
    """Packets per protocol class."""
    counts = np.bincount(rows["cls"], minlength=len(CLASSES))[:len(CLASSES)]
    return {c: int(n) for c, n in zip(CLASSES, counts)}


def _capped(seen: dict[str, float]) -> dict[str, float]:
    return dict(sorted(seen.items(), key=lambda kv: kv[1])[:MAX_KEYS])


def make(rows: np.ndarray, whole: bool) -> dict[str, Any]:
    """A baseline document of the rows (`whole`: the rows are the whole capture, not its last part)."""
    h, s = hosts(rows), services(rows)
    return {"hosts": _capped(h), "services": _capped(s), "protocols": protocols(rows),
            "packets": len(rows), "until_ts": float(rows["ts"].max()) if len(rows) else None,
            "whole_capture": bool(whole), "truncated": len(h) > MAX_KEYS or len(s) > MAX_KEYS}


def diff(base: dict[str, Any], rows: np.ndarray) -> dict[str, Any]:
    """What the rows hold that the baseline does not: new hosts and services with first-seen times, and
    the protocol mix then and now (shares in %)."""
    now_hosts, now_services = hosts(rows), services(rows)
    new_hosts = sorted(((a, t) for a, t in now_hosts.items() if a not in base["hosts"]), key=lambda x: x[1])
    new_services = sorted(((k, t) for k, t in now_services.items() if k not in base["services"]), key=lambda x: x[1])
    then, now = base["protocols"], protocols(rows)
    t_all, n_all = max(sum(then.values()), 1), max(sum(now.values()), 1)
    mix = [{"protocol": c, "baseline %": round(100 * then.get(c, 0) / t_all, 1),
            "now %": round(100 * now.get(c, 0) / n_all, 1)} for c in CLASSES if then.get(c) or now.get(c)]
    return {"hosts": new_hosts, "services": new_services, "mix": mix}


def generation(snap) -> tuple:
    """What identifies the buffer a diff was computed over: it changes when packets come or go."""
    t = snap.totals
    return int(t.get("packets") or 0), t.get("first_ts"), t.get("last_ts"), len(snap.packets)


class DiffCache:
    """One viewer's last diff, keyed by (baseline, its content, buffer generation): a diff over a 1M-packet
    buffer costs seconds, so it runs when the viewer asks, never at every refresh."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.result: dict[str, Any] | None = None

    @staticmethod
    def key_of(name: str, base: dict[str, Any], snap) -> tuple:
        """The cache key of a diff of baseline `name` against `snap`'s buffer."""
        return name, base.get("until_ts"), base.get("packets"), generation(snap)

    def last(self, name: str, base: dict[str, Any]) -> tuple[dict[str, Any] | None, tuple | None]:
        """(the last diff of this baseline, the generation it covers), whatever the buffer now holds."""
        if self.key is None or self.key[:3] != (name, base.get("until_ts"), base.get("packets")):
            return None, None
        return self.result, self.key[3]

    def compute(self, name: str, base: dict[str, Any], snap) -> dict[str, Any]:
        """The diff for the current buffer: computed once per generation."""
        key = self.key_of(name, base, snap)
        if key != self.key:
            self.result, self.key = diff(base, snap.packets), key
        return self.result
