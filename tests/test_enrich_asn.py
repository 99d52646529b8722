"""AS lookups checked against the database's own CSV rows, parsed here independently of enrich/asn.py."""

from __future__ import annotations

import csv
import ipaddress
import random
from pathlib import Path

import pytest
from conftest import need

from enrich.asn import DEFAULT_DIR, AsnDB
from enrich.geo import GeoDB

SAMPLE = 3000


@pytest.fixture(scope="module")
def db() -> AsnDB:
    """The installed AS database, loaded once for the module."""
    need((DEFAULT_DIR / "asn-ipv6-num.csv").exists(), "the AS database is missing: run scripts/setup.sh")
    d = AsnDB()
    d.load(here=True)
    assert d.ready, d.error
    return d


def _rows(name: str) -> list[tuple[int, int, int]]:
    """(start, end, asn) per CSV line; addresses converted with `ipaddress` so a bad integer parse would show."""
    out = []
    with (Path(DEFAULT_DIR) / name).open(newline="") as f:
        for start, end, asn, _org in csv.reader(f):
            out.append((int(ipaddress.ip_address(int(start))), int(ipaddress.ip_address(int(end))), int(asn)))
    return out


def _expected(rows: list[tuple[int, int, int]], i: int, key: int) -> int | None:
    """The AS of `key` near row i: that row, a touching neighbour, or none (a gap)."""
    for j in (i - 1, i, i + 1):
        if 0 <= j < len(rows) and rows[j][0] <= key <= rows[j][1]:
            return rows[j][2] or None
    return None


@pytest.mark.parametrize("name,width", [("asn-ipv4-num.csv", 4), ("asn-ipv6-num.csv", 16)])
def test_asn_lookup_matches_csv_at_range_edges(db: AsnDB, name: str, width: int) -> None:
    """Start, end, start-1, end+1 and an inside address of sampled rows get the AS the CSV row says."""
    rows = _rows(name)
    rng = random.Random(14)
    picks = [*rng.sample(range(len(rows)), SAMPLE), 0, len(rows) - 1]
    wrong = []
    for i in picks:
        s, e, _ = rows[i]
        for key in (s, e, s - 1, e + 1, rng.randint(s, e)):
            if not 0 <= key < 1 << (8 * width):
                continue
            hit = db.lookup(key.to_bytes(width, "big"))
            got, want = (hit.asn if hit else None), _expected(rows, i, key)
            if got != want:
                wrong.append((str(ipaddress.ip_address(key)), got, want))
    assert not wrong, f"{len(wrong)} wrong, e.g. {wrong[:5]}"


def test_asn_ipv6_known_address(db: AsnDB) -> None:
    """The reviewer's example: a /64-inner address whose float64 comparison picked the neighbouring range."""
    rows = _rows("asn-ipv6-num.csv")
    key = int(ipaddress.ip_address("2a10:f781:10:6a3e:9462:c554:fb7:7e65"))
    want = [a for s, e, a in rows if s <= key <= e]
    hit = db.lookup(key.to_bytes(16, "big"))
    assert want and hit is not None and hit.asn == want[0]


def test_ipv4_mapped_address_is_its_ipv4() -> None:
    """::ffff:8.8.8.8 gets 8.8.8.8's country and AS, not 'reserved'."""
    need((DEFAULT_DIR / "asn-ipv4-num.csv").exists(), "the AS database is missing: run scripts/setup.sh")
    g = GeoDB()
    assert g.wait_loaded(120)
    plain, mapped = g.lookup("8.8.8.8"), g.lookup("::ffff:8.8.8.8")
    assert plain.country == "US" and plain.asn == 15169
    assert mapped == plain


def test_asn_folder_is_readable_by_the_user_the_dashboard_drops_to():
    """After the drop to `nobody` the database must still load: every folder on the way and every CSV readable
    (scripts/setup.sh makes the folders 0755, whatever the umask of whoever ran it)."""
    from capture.broker import unreadable
    need((DEFAULT_DIR / "asn-ipv4-num.csv").exists(), "the AS database is missing: run scripts/setup.sh")
    files = [str(DEFAULT_DIR / f) for f in ("asn-ipv4-num.csv", "asn-ipv6-num.csv", "package.json")]
    assert unreadable(files, 65534, 65534) == []
