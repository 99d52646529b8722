"""Explain a change: which hosts, networks, ports, protocols and directions make up a rise (or fall)
in packets/s or bit/s over a span, against the preceding window of the same length."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from analysis.headers import CLASSES, DIRECTIONS, NON_IP, TCP, UDP, addr_text
from capture.sources import V4_PREFIX

DIMENSIONS = ("source host", "destination host", "source network", "destination network", "port", "protocol",
              "direction")
ENOUGH = 0.8  # the headline names the fewest keys that explain at least this share of the change


@dataclass
class Row:
    """One key's part in the change."""

    key: str
    before: float  # per second in the baseline window (packets/s or bit/s)
    during: float  # per second in the span
    share: float  # of the whole change (0.87 = 87 %); negative: it moved against the change


@dataclass
class Explanation:
    """The change over a span and what explains it, per dimension."""

    start: float
    end: float
    measure: str  # packets/s or bit/s
    before: float
    during: float
    baseline_s: float  # seconds of baseline the buffer holds (less than the span: approximate)
    dims: dict[str, list[Row]] = field(default_factory=dict)
    headline: str = ""
    best: tuple[str, list[Row]] | None = None


def _net_keys(addrs: np.ndarray) -> np.ndarray:
    """(n, 16) uint8 addresses cut to their /24 (IPv4) or /48 (IPv6) network."""
    nets = addrs.copy()
    v4 = (addrs[:, :12] == np.frombuffer(V4_PREFIX, np.uint8)).all(axis=1)
    nets[v4, 15] = 0
    nets[~v4, 6:] = 0
    return nets


def keys(rows: np.ndarray, dim: str) -> tuple[np.ndarray, np.ndarray]:
    """(a key per row as a sortable array, which rows have one) for a dimension."""
    ip = rows["cls"] != NON_IP
    if dim in ("source host", "destination host", "source network", "destination network"):
        field_ = "src" if dim.startswith("source") else "dst"
        addrs = np.ascontiguousarray(rows[field_]).view(np.uint8).reshape(len(rows), 16)
        if dim.endswith("network"):
            addrs = _net_keys(addrs)
        return np.ascontiguousarray(addrs).view("V16").ravel(), ip
    if dim == "port":  # the service side: the lower of the two ports
        ports = np.where(rows["sport"] < rows["dport"], rows["sport"], rows["dport"]).astype(np.int64)
        has = ((rows["cls"] == TCP) | (rows["cls"] == UDP)) & (ports >= 0)
        return rows["cls"].astype(np.int64) * 65536 + ports, has
    if dim == "protocol":
        return rows["cls"].astype(np.int64), np.ones(len(rows), bool)
    if dim == "direction":
        return rows["direction"].astype(np.int64), np.ones(len(rows), bool)
    raise ValueError(f"unknown dimension {dim!r}")


def label(dim: str, key) -> str:
    """A key as text."""
    if dim.endswith("host"):
        return addr_text(bytes(key))
    if dim.endswith("network"):
        raw = bytes(key)
        return addr_text(raw) + ("/24" if raw[:12] == V4_PREFIX else "/48")
    if dim == "port":
        return f"{CLASSES[int(key) // 65536]}/{int(key) % 65536}"
    if dim == "protocol":
        return CLASSES[int(key)]
    return DIRECTIONS[int(key)]


def explain(rows: np.ndarray, start: float, end: float, measure: str = "packets/s",
            as_of: Callable[[str], str | None] | None = None) -> Explanation:
    """What explains the change from [start - (end - start), start) to [start, end) in the given rows;
    `as_of` (an address's AS organisation) adds the source and destination AS."""
    length = end - start
    if length <= 0:
        raise ValueError("the span must end after it starts")
    ts = rows["ts"]
    held_from = float(ts.min()) if len(ts) else start
    base_start = max(start - length, held_from)
    baseline_s = max(start - base_start, 0.0)
    during = (ts >= start) & (ts < end)
    before = (ts >= base_start) & (ts < start)
    weight = np.ones(len(rows)) if measure == "packets/s" else rows["wire_len"].astype(np.float64) * 8
    per_base = 1.0 / baseline_s if baseline_s > 0 else 0.0
    tot_before = float(weight[before].sum()) * per_base
    tot_during = float(weight[during].sum()) / length
    ex = Explanation(start, end, measure, tot_before, tot_during, baseline_s)
    change = tot_during - tot_before
    sel = during | before
    # On a tie the headline keeps the earlier dimension: the more specific ones come first.
    dims = DIMENSIONS[:4] + (("source AS", "destination AS") if as_of is not None else ()) + DIMENSIONS[4:]
    for dim in dims:
        host_dim = dim.replace(" AS", " host")
        k, has = keys(rows, host_dim if dim.endswith(" AS") else dim)
        use = sel & has
        if not use.any():
            ex.dims[dim] = []
            continue
        uniq, inv = np.unique(k[use], return_inverse=True)
        names = [label(host_dim if dim.endswith(" AS") else dim, u) for u in uniq]
        if dim.endswith(" AS"):  # hosts grouped by their AS (the enrichment's offline database)
            orgs = np.array([as_of(n) or "no AS (private or unknown)" for n in names], dtype=object)
            names_arr, by_org = np.unique(orgs, return_inverse=True)
            names, inv = names_arr.tolist(), by_org.reshape(-1)[inv.reshape(-1)]
        w, d = weight[use], during[use]
        n = len(names)
        dur = np.bincount(inv, w * d, n) / length
        bef = np.bincount(inv, w * ~d, n) * per_base
        share = (dur - bef) / change if change else np.zeros(n)
        order = np.argsort(-share, kind="stable")
        ex.dims[dim] = [Row(names[i], float(bef[i]), float(dur[i]), float(share[i])) for i in order]
    _headline(ex, change)
    return ex


Union = Callable[[list[str]], tuple[float, float]]  # keys -> (their share of the change, of the baseline), once each
PICK_MAX = 50  # keys a union-counted dimension tries for its headline


def _pick(rows: list[Row], total_before: float, union: Union | None = None) -> tuple[list[Row], float, float]:
    """(the leading keys that reach ENOUGH of the change, their share of it, their share of the baseline).

    `union` recounts a set of keys whose rows overlap (a stored conversation belongs to both its hosts): the
    keys' shares are then not added; a key that adds nothing to the keys before it is passed over."""
    cum = usual = 0.0
    chosen: list[Row] = []
    for i, r in enumerate(rows):
        if r.share <= 0 or (union is not None and i >= PICK_MAX):
            break
        if union is None:
            cum, usual = cum + r.share, usual + (r.before / total_before if total_before else 0.0)
        else:
            got, base = union([c.key for c in chosen] + [r.key])
            if got <= cum + 1e-12:
                continue
            cum, usual = got, base
        chosen.append(r)
        if cum >= ENOUGH:
            break
    return chosen, cum, usual


def _headline(ex: Explanation, change: float, unions: dict[str, Union] | None = None) -> None:
    """The fewest keys of one dimension that explain ENOUGH of the change, as a sentence.

    A key that always carries everything (the one direction of a capture, its one server) explains
    every change and says nothing: dimensions are ranked by how much more of the change their keys
    carry than of the usual traffic, then by fewer keys. `unions` count overlapping keys once."""
    word = "rise" if change > 0 else "fall"
    if not change:
        ex.headline = f"No change in {ex.measure}: {ex.during:,.1f} against {ex.before:,.1f} before."
        return
    best, best_score = None, None
    for dim, rows in ex.dims.items():
        chosen, cum, usual = _pick(rows, ex.before, (unions or {}).get(dim))
        score = (cum >= ENOUGH, round(cum - usual, 6), -len(chosen))
        if chosen and (best_score is None or score > best_score):
            best, best_score = (dim, chosen, cum), score
    if best is None:
        ex.headline = f"The {word} in {ex.measure} is spread over many keys: none stands out."
        return
    dim, chosen, cum = best
    n = len(chosen)
    ex.best = (dim, chosen)
    names = ", ".join(f"{r.key} ({100 * r.share:.0f} %)" for r in chosen)
    both = " (counted once where they share conversations)" if dim in (unions or {}) and n > 1 else ""
    ex.headline = (f"{n} {'key explains' if n == 1 else 'keys explain'} {100 * cum:.0f} % of the {word} in "
                   f"{ex.measure} ({ex.before:,.1f} → {ex.during:,.1f}), by {dim}{both}: {names}.")


def leaders(ex: Explanation) -> list[dict]:
    """The leading key of each dimension with its share, for the summary table."""
    out = []
    for dim, rows in ex.dims.items():
        if rows:
            r = rows[0]
            out.append({"by": dim, "key": r.key, "share of the change %": round(100 * r.share, 1),
                        f"before ({ex.measure})": round(r.before, 1), f"during ({ex.measure})": round(r.during, 1)})
    return out
