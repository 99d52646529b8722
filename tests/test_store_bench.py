"""The store benchmark runs once in its short mode (1 hour of traffic), so it cannot rot; speed is not asserted."""

from __future__ import annotations

import subprocess

from conftest import PYTHON, ROOT


def test_store_query_short():
    out = subprocess.run([PYTHON, str(ROOT / "benchmarks" / "store_query.py"), "--short"], cwd=ROOT / "benchmarks",
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "history_summary over 1 h" in out.stdout and "MB per day" in out.stdout and "rollup:" in out.stdout
