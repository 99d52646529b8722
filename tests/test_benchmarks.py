"""Every benchmark runs once in its short mode, so none can rot; speed is reported, never asserted here."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from conftest import PYTHON, ROOT, need

BENCH = ROOT / "benchmarks"


def run_short(script: str, timeout: int = 300) -> str:
    out = subprocess.run([PYTHON, str(BENCH / script), "--short"], cwd=BENCH, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_file_ingest_short():
    need(shutil.which("tshark") is not None, "the file benchmark compares with tshark")
    out = run_short("file_ingest.py")
    assert "counts equal tshark's: True" in out and "packets/s" in out


def test_refresh_short():
    out = run_short("refresh.py")
    assert "20,000" in out and "x" in out.splitlines()[-1]


@pytest.mark.live
def test_live_capture_short(root_only):
    need(shutil.which("tcpdump") is not None and shutil.which("cc") is not None, "needs tcpdump and a C compiler")
    out = run_short("live_capture.py", timeout=600)
    assert "highest loss-free rate" in out and "engine / tcpdump" in out and "engine / seed" in out


@pytest.mark.live
def test_memory_short(root_only):
    need(shutil.which("cc") is not None, "needs a C compiler for the sender")
    out = run_short("memory.py")
    assert "full    20,000-packet buffer" in out and "RSS after warm-up" in out
    assert os.geteuid() == 0


@pytest.mark.live
def test_soak_short(root_only):
    need(shutil.which("cc") is not None, "needs a C compiler for the sender")
    out = run_short("soak.py")  # exits 1 unless sent = counted + dropped and the page raised nothing
    assert ": exact" in out and "page exceptions 0" in out and "greatest thread count" in out
