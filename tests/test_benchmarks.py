"""Every benchmark runs once in its short mode, so none can rot; speed is reported, never asserted here."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from conftest import PYTHON, ROOT, need

BENCH = ROOT / "benchmarks"


def run_short(script: str, timeout: int = 300, args: tuple[str, ...] = ("--short",), status: int = 0) -> str:
    out = subprocess.run([PYTHON, str(BENCH / script), *args], cwd=BENCH, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == status, out.stdout + out.stderr
    return out.stdout


def number(text: str) -> float:
    return float(text.replace(",", ""))


def test_file_ingest_short():
    need(shutil.which("tshark") is not None, "the file benchmark compares with tshark")
    out = run_short("file_ingest.py")
    assert "counts equal tshark's: True" in out and "packets/s" in out


def test_refresh_short():
    out = run_short("refresh.py")
    rows = re.findall(r"^\s*([\d,]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x$", out, flags=re.M)
    assert [int(number(r[0])) for r in rows] == [2_000, 20_000], out  # one row per buffer size asked for
    for _, ours, seed, speedup in rows:
        assert float(ours) > 0 and float(seed) > 0
        # The speed-up is the ratio of the two timings it prints (each rounded to 0.1 ms).
        low, high = (float(seed) - 0.05) / (float(ours) + 0.05), (float(seed) + 0.05) / max(float(ours) - 0.05, 1e-9)
        assert low - 0.05 <= float(speedup) <= high + 0.05, (ours, seed, speedup)


@pytest.mark.live
def test_live_capture_short(root_only):
    need(shutil.which("tcpdump") is not None and shutil.which("cc") is not None, "needs tcpdump and a C compiler")
    out = run_short("live_capture.py", timeout=600)
    assert "highest loss-free rate" in out and "engine / tcpdump" in out and "engine / seed" in out


@pytest.mark.live
def test_memory_short(root_only):
    need(shutil.which("cc") is not None, "needs a C compiler for the sender")
    out = run_short("memory.py")
    costs = re.findall(r"^full\s+([\d,]+)-packet buffer: \+\s*(-?[\d.]+) MB$", out, flags=re.M)
    assert [int(number(n)) for n, _ in costs] == [2_000, 20_000], out
    # The live part ran and lost nothing unaccounted: the sender's own count = counted + dropped.
    sent, counted, dropped = map(number, re.search(r"^sent ([\d,]+), counted ([\d,]+), kernel dropped ([\d,]+)$",
                                                   out, flags=re.M).groups())
    assert sent > 0 and sent == counted + dropped, out
    low, high, spread = map(float, re.search(r"RSS after warm-up: min ([\d.]+) MB, max ([\d.]+) MB, "
                                             r"spread ([\d.]+) %", out).groups())
    assert low <= high and abs(spread - (high - low) / low * 100) < 0.1


@pytest.mark.live
def test_soak_short(root_only):
    need(shutil.which("cc") is not None, "needs a C compiler for the sender")
    # exits 1 unless sent = counted + dropped, the page raised nothing, RSS grew at most 5 % after the
    # warm-up and the threads stayed within their bound
    out = run_short("soak.py")
    assert ": exact" in out and "page exceptions 0" in out
    assert re.search(r"growth [+-][\d.]+ % \(bound 5 %\): ok", out) and re.search(r"\(bound 24\): ok", out), out


@pytest.mark.live
def test_soak_fails_when_its_bounds_are_broken(root_only):
    need(shutil.which("cc") is not None, "needs a C compiler for the sender")
    # The bounds cover the whole process tree: the detector worker (a child) is listed and counted.
    # The thread bound is this process's own count at the start: only the children's threads break it.
    probe = run_short("soak.py", args=("--seconds", "4", "--warmup-s", "1"))
    own = int(re.search(r"start: this process \d+ \(.*?\): RSS [\d.]+ MB, (\d+) threads", probe).group(1))
    children = [int(n) for n in re.findall(r"start: child \d+ \(.*?\): RSS [\d.]+ MB, (\d+) threads", probe)]
    assert children and all(n >= 1 for n in children), probe  # the detector worker at least
    out = run_short("soak.py", args=("--seconds", "6", "--warmup-s", "2", "--max-threads", str(own)), status=1)
    assert ": exact" in out and "page exceptions 0" in out and re.search(r"growth .*: ok", out)  # the rest held
    start = [int(n) for n in re.findall(r"start: (?:this process|child) \d+ \(.*?\): RSS [\d.]+ MB, (\d+) threads",
                                        out)]
    greatest = int(re.search(rf"greatest thread count (\d+) \(bound {own}\): FAIL", out).group(1))
    assert len(start) >= 2 and greatest >= sum(start), out  # the children's threads are in the sum
