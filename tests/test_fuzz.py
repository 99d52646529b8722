"""Fuzzing the parsers in CI: 30 s of hypothesis-driven mutated frames (fuzz/long_fuzz.py runs 1 M+)."""

from __future__ import annotations

import sys
import time

from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(ROOT / "fuzz"))
from long_fuzz import run

BUDGET_S = 30.0
_spent = {"start": None, "inputs": 0}


@settings(max_examples=2_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_thirty_seconds_of_mutated_frames(seed):
    """Each example fuzzes 1,000 frames from its seed until the time budget is spent; any raise or any
    disagreement between the vectorised and the scalar parser fails (and hypothesis reports the seed)."""
    if _spent["start"] is None:
        _spent["start"] = time.monotonic()
    if time.monotonic() - _spent["start"] > BUDGET_S:
        return
    _spent["inputs"] += run(1000, seed, batch=1000)


def test_fuzzing_really_ran():
    # Runs after the test above (file order): the budget was spent on real inputs.
    assert _spent["inputs"] >= 10_000, _spent
    print(f"fuzzed {_spent['inputs']:,} inputs in {BUDGET_S:g} s")
