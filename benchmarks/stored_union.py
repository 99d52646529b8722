"""The history view's stored Explain (investigate.stored) over 1,000,000 stored conversation rows a
window: the headline's either-end unions (share() of 1..50 leading keys per dimension), now (factorized
once, each key's rows visited once) against the per-key string match over the whole frames (the code
before, kept here as the reference), in the same run.
    python benchmarks/stored_union.py [--rows N] [--repeat K]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from investigate import stored


def old_union(before, during, dim, col, rates, change, tot_before):
    """The reference: each share() filters both whole frames with isin (the code before this change)."""
    ends = {"b": stored._ends(before, dim), "d": stored._ends(during, dim)}
    scale, base_s, length = rates

    def share(keys):
        def rate(df, which, per):
            a, b = ends[which]
            return float(df.loc[a.isin(keys) | b.isin(keys), col].sum()) * scale / per if per > 0 else 0.0

        b, d = rate(before, "b", base_s), rate(during, "d", length)
        return (d - b) / change, (b / tot_before if tot_before else 0.0)

    return share


def frame(rows: int, hosts: int, rng: np.random.Generator, heavy: int) -> pd.DataFrame:
    """Stored conversations between `hosts` addresses; `heavy` of them carry many packets (the rise)."""
    names = np.array([f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(hosts)], dtype=object)
    a, b = names[rng.integers(0, hosts, rows)], names[rng.integers(0, hosts, rows)]
    pk = rng.integers(1, 20, rows)
    pk[:heavy] *= 200
    return pd.DataFrame({"minute": 0, "a": a, "b": b, "a_port": rng.integers(1024, 65535, rows),
                         "b_port": rng.integers(1, 1024, rows), "proto": 6, "packets": pk, "bytes": pk * 100,
                         "first_us": 0})


def timed(before, during, union, keys: dict) -> tuple[float, float, list]:
    """The headline's union work: each either-end dimension's share() of 1..50 of its leading keys."""
    w, c = time.perf_counter(), time.process_time()
    out = []
    for dim in (stored.HOST, stored.NET):
        share = union(before, during, dim, "packets", (1.0, 60.0, 60.0), 1000.0, 100.0)
        out += [share(keys[dim][:n])[0] for n in range(1, 51)]
    return time.perf_counter() - w, time.process_time() - c, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(15)
    before = frame(args.rows, 50_000, rng, 0)
    during = frame(args.rows, 50_000, rng, args.rows // 20)
    new = stored._union
    keys = {dim: stored._keyed(during, dim).groupby("key")["packets"].sum().sort_values(ascending=False)
            .index[:50].tolist() for dim in (stored.HOST, stored.NET)}
    got: dict[str, list] = {"new": [], "old": []}
    for _ in range(args.repeat):  # alternated: the load weighs on both alike
        for name, fn in (("new", new), ("old", old_union)):
            got[name].append(timed(before, during, fn, keys))
    assert np.allclose(got["new"][0][2], got["old"][0][2], rtol=1e-9, atol=0), "the shares differ"
    for name in ("new", "old"):
        w = statistics.median(x[0] for x in got[name])
        c = statistics.median(x[1] for x in got[name])
        print(f"{name}: {w * 1000:,.0f} ms wall, {c * 1000:,.0f} ms CPU (median of {args.repeat})")
    cpu = {k: statistics.median(x[1] for x in v) for k, v in got.items()}
    print(f"ratio (CPU): x {cpu['old'] / cpu['new']:.1f}")


if __name__ == "__main__":
    main()
