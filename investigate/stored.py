"""Explain and baselines over a stored range (any store: the host's history, a fleet sensor's view), from
what the store keeps: per-minute conversations (both directions together, IP only, whole minutes)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from analysis.headers import CLASSES
from investigate.baseline import MAX_KEYS
from investigate.explain import Explanation, Row, _headline

STORED_DIMENSIONS = ("host (either end)", "port", "protocol")
CLASS_OF = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
CONV_ROWS = 1_000_000  # stored conversation rows read per window (each minute's up to STORE_CONV_MAX)


def read(store, since: int, until: int) -> tuple[pd.DataFrame, bool]:
    """(the stored conversations of since..until, whether CONV_ROWS cut the read)."""
    from store.history import time_range

    df = store.rows("conversations", time_range(since, until), CONV_ROWS)
    return df, len(df) >= CONV_ROWS


def _classes(df: pd.DataFrame) -> pd.Series:
    return df["proto"].map(lambda p: CLASS_OF.get(int(p), "other_ip")).astype(object)


def _service(df: pd.DataFrame) -> pd.Series:
    """The service side of each TCP/UDP conversation ('udp/53': the lower port of the two ends), else None."""
    if not len(df):
        return pd.Series([], dtype=object, index=df.index)
    low = np.minimum(df["a_port"].fillna(-1).astype(np.int64), df["b_port"].fillna(-1).astype(np.int64))
    tu = df["proto"].isin([6, 17]) & df["a_port"].notna() & df["b_port"].notna()
    return pd.Series(np.where(tu, _classes(df) + "/" + low.astype(str), None), index=df.index)


def _keyed(df: pd.DataFrame, dim: str) -> pd.DataFrame:
    """(key, packets, bytes) rows of a dimension: a conversation counts for each of its two hosts."""
    vals = ["packets", "bytes"]
    if dim == "host (either end)":
        return pd.concat([df[["a", *vals]].rename(columns={"a": "key"}),
                          df.loc[df["a"] != df["b"], ["b", *vals]].rename(columns={"b": "key"})])
    key = _service(df) if dim == "port" else _classes(df)
    return df[vals].assign(key=key).dropna(subset=["key"])


def explain(before: pd.DataFrame, during: pd.DataFrame, start: int, end: int, base_start: int,
            measure: str = "packets/s") -> Explanation:
    """What explains the change from the conversations of [base_start, start) to those of [start, end)
    (epoch seconds, whole minutes), per host (either end), service port and protocol."""
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
        ex.dims[dim] = [Row(str(k), float(r.before), float(r.during), float(r.share)) for k, r in both.iterrows()]
    _headline(ex, change)
    return ex


def _first_seen(keys: pd.Series, first_us: pd.Series) -> dict[str, float]:
    got = pd.DataFrame({"k": keys, "t": first_us}).dropna(subset=["k"]).groupby("k")["t"].min() / 1e6
    return {str(k): float(t) for k, t in got.items()}


def hosts(df: pd.DataFrame) -> dict[str, float]:
    """Every address at either end of the conversations, with its first-seen time."""
    return _first_seen(pd.concat([df["a"], df["b"]]), pd.concat([df["first_us"], df["first_us"]]))


def services(df: pd.DataFrame) -> dict[str, float]:
    """Every TCP/UDP service ('tcp/443', the lower port of the two ends) with its first-seen time."""
    return _first_seen(_service(df), df["first_us"])


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
