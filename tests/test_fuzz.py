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


def test_thirty_seconds_of_mutated_frames():
    """Each example fuzzes 1,000 frames from its seed until the time budget is spent; any raise or any
    disagreement between the vectorised and the scalar parser fails (and hypothesis reports the seed).
    The test counts its own inputs, so it checks that the budget went to real inputs whatever runs before."""
    spent = {"start": time.monotonic(), "inputs": 0}

    @settings(max_examples=2_000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.integers(min_value=0, max_value=2**32 - 1))
    def fuzz(seed: int) -> None:
        if time.monotonic() - spent["start"] <= BUDGET_S:
            spent["inputs"] += run(1000, seed, batch=1000)

    fuzz()
    assert spent["inputs"] >= 10_000, spent
    print(f"fuzzed {spent['inputs']:,} inputs in {BUDGET_S:g} s")
