"""Explain and baselines over a stored range (any store: the host's history, a fleet sensor's view), from
what the store keeps: per-minute conversations (both directions together, IP only, whole minutes)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from analysis.headers import CLASSES
from investigate.baseline import MAX_KEYS
from investigate.explain import Explanation, Row, _headline

HOST, NET = "host (either end)", "network (either end)"
STORED_DIMENSIONS = (HOST, NET, "port", "protocol")
# What the live explain ranks that a stored range cannot: a stored conversation keeps no direction (which end
# sent), so neither source/destination nor direction; AS is left to the live view (its look-up per address).
NOT_STORED = "source or destination host/network, direction (a stored conversation keeps no direction) and AS"
CLASS_OF = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
CONV_ROWS = 1_000_000  # stored conversation rows read per window (each minute's up to STORE_CONV_MAX)


def read(store, since: int, until: int, sensor: str | None = None) -> tuple[pd.DataFrame, bool]:
    """(the stored conversations of since..until (of one sensor), whether CONV_ROWS cut the read)."""
    from store.history import time_range

    df = store.rows("conversations", time_range(since, until, sensor), CONV_ROWS)
    return df, len(df) >= CONV_ROWS


def _classes(df: pd.DataFrame) -> pd.Series:
    return df["proto"].map(CLASS_OF).fillna("other_ip").astype(object)


def _service(df: pd.DataFrame) -> pd.Series:
    """The service side of each TCP/UDP conversation ('udp/53': the lower port of the two ends), else None."""
    if not len(df):
        return pd.Series([], dtype=object, index=df.index)
    low = np.minimum(df["a_port"].fillna(-1).astype(np.int64), df["b_port"].fillna(-1).astype(np.int64))
    tu = df["proto"].isin([6, 17]) & df["a_port"].notna() & df["b_port"].notna()
    return pd.Series(np.where(tu, _classes(df) + "/" + low.astype(str), None), index=df.index)


def _net(addrs: pd.Series) -> pd.Series:
    """Each address's /24 (IPv4) or /48 (IPv6) network as text, computed once per distinct address (IPv4 by
    cutting the text: a stored address is in its canonical form)."""
    import ipaddress

    def v6(a: str) -> str:
        try:
            return str(ipaddress.ip_network(f"{a}/48", strict=False))
        except ValueError:
            return a

    uniq = pd.Series(pd.unique(addrs), dtype=object)
    is6 = uniq.str.contains(":", regex=False).fillna(False).astype(bool)
    nets = uniq.str.rsplit(".", n=1).str[0] + ".0/24"
    nets[is6] = uniq[is6].map(v6)
    return addrs.map(dict(zip(uniq, nets)))


def _ends(df: pd.DataFrame, dim: str) -> tuple[pd.Series, pd.Series]:
    """The key of each conversation's two ends (host, or its network)."""
    return (df["a"], df["b"]) if dim == HOST else (_net(df["a"]), _net(df["b"]))


def _keyed(df: pd.DataFrame, dim: str) -> pd.DataFrame:
    """(key, packets, bytes) rows of a dimension: a conversation counts for each of its two ends (once when
    both ends have the same key)."""
    vals = ["packets", "bytes"]
    if dim in (HOST, NET):
        a, b = _ends(df, dim)
        return pd.concat([df[vals].assign(key=a), df.loc[a != b, vals].assign(key=b[a != b])])
    key = _service(df) if dim == "port" else _classes(df)
    return df[vals].assign(key=key).dropna(subset=["key"])


class _Ends:
    """One window's conversations by the keys of their ends, factorized once (one sort): a set of keys'
    conversations are found by each key's row list, and a set that extends the last one asked (the headline
    adds its keys one by one) only visits the added keys' rows: linear in the rows, not keys × rows."""

    def __init__(self, df: pd.DataFrame, dim: str, col: str) -> None:
        a, b = _ends(df, dim)
        codes, uniq = pd.factorize(pd.concat([a, b], ignore_index=True))
        self.n, self.uniq, self.vals = len(df), pd.Index(uniq), df[col].to_numpy(np.float64)
        order = np.argsort(codes, kind="stable")
        self.rows, self.codes = order % max(self.n, 1), codes[order]
        self.keys: list[str] = []
        self.counted, self.total = np.zeros(self.n, dtype=bool), 0.0

    def sum(self, keys: list[str]) -> float:
        """The col total of the conversations with any of `keys` at an end, each conversation once."""
        if keys[:len(self.keys)] != self.keys:  # not an extension of the last set: start again
            self.keys, self.total = [], 0.0
            self.counted[:] = False
        for code in self.uniq.get_indexer(pd.Index(keys[len(self.keys):])):
            if code < 0:
                continue
            lo, hi = np.searchsorted(self.codes, [code, code + 1])
            idx = self.rows[lo:hi]
            new = np.unique(idx[~self.counted[idx]])  # a conversation with the key at both ends: once
            self.total += float(self.vals[new].sum())
            self.counted[new] = True
        self.keys = list(keys)
        return self.total


def _union(before: pd.DataFrame, during: pd.DataFrame, dim: str, col: str, rates: tuple[float, float, float],
           change: float, tot_before: float):
    """For an either-end dimension: a set of keys' share of the change and of the baseline, each conversation
    counted once (a conversation between two of the keys is not counted twice)."""
    ends = {"b": _Ends(before, dim, col), "d": _Ends(during, dim, col)}
    scale, base_s, length = rates

    def share(keys: list[str]) -> tuple[float, float]:
        def rate(which: str, per: float) -> float:
            return ends[which].sum(list(keys)) * scale / per if per > 0 else 0.0

        b, d = rate("b", base_s), rate("d", length)
        return (d - b) / change, (b / tot_before if tot_before else 0.0)

    return share


def explain(before: pd.DataFrame, during: pd.DataFrame, start: int, end: int, base_start: int,
            measure: str = "packets/s") -> Explanation:
    """What explains the change from the conversations of [base_start, start) to those of [start, end)
    (epoch seconds, whole minutes), per host and /24 or /48 network (either end), service port and protocol.
    The headline counts a conversation once even when both its ends are among the keys it names."""
    length, base_s = end - start, start - base_start
    if length <= 0:
        raise ValueError("the range must end after it starts")
    col = "packets" if measure == "packets/s" else "bytes"
    scale = 1.0 if measure == "packets/s" else 8.0
    tot_before = float(before[col].sum()) * scale / base_s if base_s > 0 else 0.0
    tot_during = float(during[col].sum()) * scale / length
    ex = Explanation(float(start), float(end), measure, tot_before, tot_during, float(base_s))
    change = tot_during - tot_before
    for dim in STORED_DIMENSIONS:
        b = _keyed(before, dim).groupby("key")[col].sum() * scale / (base_s or 1) if base_s > 0 else pd.Series(
            dtype=float)
        d = _keyed(during, dim).groupby("key")[col].sum() * scale / length
        both = pd.concat([b.rename("before"), d.rename("during")], axis=1).fillna(0.0)
        if not len(both):
            ex.dims[dim] = []
            continue
        both["share"] = (both["during"] - both["before"]) / change if change else 0.0
        both = both.sort_values(["share"], ascending=False, kind="stable")
        ex.dims[dim] = [Row(str(k), float(b_), float(d_), float(s_)) for k, b_, d_, s_ in
                        zip(both.index, both["before"].to_numpy(), both["during"].to_numpy(), both["share"].to_numpy())]
    unions = {dim: _union(before, during, dim, col, (scale, base_s, length), change, tot_before)
              for dim in (HOST, NET)} if change else {}
    _headline(ex, change, unions)
    return ex


def first_ts(df: pd.DataFrame) -> pd.Series:
    """Each stored conversation's first packet time (epoch s): first_us counts from the row's minute."""
    return df["minute"].astype(np.float64) + df["first_us"].astype(np.float64) / 1e6


def _first_seen(keys: pd.Series, ts: pd.Series) -> dict[str, float]:
    got = pd.DataFrame({"k": keys, "t": ts}).dropna(subset=["k"]).groupby("k")["t"].min()
    return {str(k): float(t) for k, t in got.items()}


def hosts(df: pd.DataFrame) -> dict[str, float]:
    """Every address at either end of the conversations, with its first-seen time."""
    t = first_ts(df)
    return _first_seen(pd.concat([df["a"], df["b"]]), pd.concat([t, t]))


def services(df: pd.DataFrame) -> dict[str, float]:
    """Every TCP/UDP service ('tcp/443', the lower port of the two ends) with its first-seen time."""
    return _first_seen(_service(df), first_ts(df))


def protocols(df: pd.DataFrame) -> dict[str, int]:
    """Packets per protocol class (IP classes: the conversations hold no other traffic)."""
    got = df.groupby(_classes(df))["packets"].sum() if len(df) else pd.Series(dtype=np.int64)
    return {c: int(got.get(c, 0)) for c in CLASSES}


def make(df: pd.DataFrame, until: int) -> dict[str, Any]:
    """A baseline document (investigate.baseline's shape) of a stored range's conversations."""
    h, s = hosts(df), services(df)
    cap = lambda seen: dict(sorted(seen.items(), key=lambda kv: kv[1])[:MAX_KEYS])  # noqa: E731
    return {"hosts": cap(h), "services": cap(s), "protocols": protocols(df), "packets": int(df["packets"].sum()),
            "until_ts": float(until), "whole_capture": False, "truncated": len(h) > MAX_KEYS or len(s) > MAX_KEYS,
            "from_store": True}


def diff(base: dict[str, Any], df: pd.DataFrame) -> dict[str, Any]:
    """What a stored range's conversations hold that the baseline does not (baseline.diff's shape)."""
    now_hosts, now_services = hosts(df), services(df)
    new_hosts = sorted(((a, t) for a, t in now_hosts.items() if a not in base["hosts"]), key=lambda x: x[1])
    new_services = sorted(((k, t) for k, t in now_services.items() if k not in base["services"]), key=lambda x: x[1])
    then, now = base["protocols"], protocols(df)
    t_all, n_all = max(sum(then.values()), 1), max(sum(now.values()), 1)
    mix = [{"protocol": c, "baseline %": round(100 * then.get(c, 0) / t_all, 1),
            "now %": round(100 * now.get(c, 0) / n_all, 1)} for c in CLASSES if then.get(c) or now.get(c)]
    return {"hosts": new_hosts, "services": new_services, "mix": mix}
