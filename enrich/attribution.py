"""Per-process totals over packet rows: each end whose address is this machine's is looked up by port."""

from __future__ import annotations

from typing import Any

import numpy as np

from analysis.headers import TCP, UDP, addr_text
from enrich.processes import UNKNOWN, ProcessTable

_PROTO = {TCP: "tcp", UDP: "udp"}


def _owner_ids(cls: np.ndarray, addrs: np.ndarray, ports: np.ndarray, table: ProcessTable,
               owners: dict[tuple[int, str], int]) -> np.ndarray:
    """Per row: the index of the owning process in `owners`, -2 for a local end with no owner, -1 not local."""
    out = np.full(len(cls), -1, dtype=np.int64)
    if not len(cls):
        return out
    keys = np.empty(len(cls), dtype=[("c", "u1"), ("a", "S16"), ("p", "<i4")])
    keys["c"], keys["a"], keys["p"] = cls, addrs, ports
    uniq, inv = np.unique(keys, return_inverse=True)
    ids = np.full(len(uniq), -1, dtype=np.int64)
    for i, (c, a, p) in enumerate(uniq.tolist()):
        if not table.is_local(addr_text(a)):
            continue
        o = table.owner(_PROTO[int(c)], int(p))
        if o is None:
            ids[i] = -2
            continue
        ids[i] = owners.setdefault((o[0], o[1]), len(owners))
    return ids[inv]


def by_process(packets: np.ndarray, table: ProcessTable) -> list[dict[str, Any]]:
    """[{process, pid, packets, bytes, connections}] for local TCP/UDP packets, largest bytes first."""
    p = packets[np.isin(packets["cls"], (TCP, UDP))]
    owners: dict[tuple[int, str], int] = {}
    a = _owner_ids(p["cls"], p["src"], p["sport"], table, owners)
    b = _owner_ids(p["cls"], p["dst"], p["dport"], table, owners)
    rows = []
    conv = _conversation_ids(p)
    for (pid, name), i in [*owners.items(), ((None, UNKNOWN), -2)]:
        mask = (a == i) | (b == i)
        if i == -2:  # unknown: a local end with no owner, and no known owner at the other end
            mask &= (a < 0) & (b < 0)
        if not mask.any():
            continue
        rows.append({"process": name, "pid": pid, "packets": int(mask.sum()),
                     "bytes": int(p["wire_len"][mask].sum()), "connections": len(np.unique(conv[mask]))})
    rows.sort(key=lambda r: (-r["bytes"], r["process"]))
    return rows


def _conversation_ids(p: np.ndarray) -> np.ndarray:
    """One id per conversation (both directions together: the smaller end first)."""
    if not len(p):
        return np.zeros(0, dtype=np.int64)
    ends = np.empty(len(p), dtype=[("a", "S16"), ("ap", "<i4"), ("b", "S16"), ("bp", "<i4"), ("c", "u1")])
    swap = (p["src"] > p["dst"]) | ((p["src"] == p["dst"]) & (p["sport"] > p["dport"]))
    ends["a"] = np.where(swap, p["dst"], p["src"])
    ends["b"] = np.where(swap, p["src"], p["dst"])
    ends["ap"] = np.where(swap, p["dport"], p["sport"])
    ends["bp"] = np.where(swap, p["sport"], p["dport"])
    ends["c"] = p["cls"]
    return np.unique(ends, return_inverse=True)[1]
