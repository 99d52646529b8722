"""benchmarks/store_cost.py runs once in its short mode, so it cannot rot; speed is reported, never asserted."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from conftest import PYTHON, ROOT, need


@pytest.mark.live
def test_store_cost_short(root_only):
    need(shutil.which("cc") is not None, "needs a C compiler for the sender")
    out = subprocess.run([PYTHON, str(ROOT / "benchmarks" / "store_cost.py"), "--short"], cwd=ROOT / "benchmarks",
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "store off" in out.stdout and "cost of writing the store" in out.stdout
    # With the store on, history read back from the child's own store holds every packet it counted.
    for counted, stored in re.findall(r"counted ([\d,]+) stored ([\d,]+)", out.stdout):
        assert counted == stored, out.stdout
    assert re.search(r"counted [\d,]+ stored", out.stdout), out.stdout
