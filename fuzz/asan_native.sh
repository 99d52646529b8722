#!/usr/bin/env bash
# The compiled helpers (native/*.c) under AddressSanitizer, fed by the long fuzzer's mutated frames
# (through the parsers and an engine's counters and detectors), then the helper-vs-twin tests
# (tests/test_native.py, and tests/test_detect_native.py for the detectors' tables of detect.c).
# Usage: fuzz/asan_native.sh [INPUTS]      (default 300000; needs gcc with libasan)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for name in fastparse pcapwalk grouprows detect; do
  gcc -fsanitize=address -fno-omit-frame-pointer -O1 -shared -fPIC -o "$out/$name.so" "native/$name.c"
done
LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 .venv/bin/python - "$out" "${1:-300000}" <<'PY'
import ctypes, sys
sys.path[:0] = [".", "fuzz"]
import native
for name in ("fastparse", "pcapwalk", "grouprows", "detect"):
    native._libraries[name] = ctypes.CDLL(f"{sys.argv[1]}/{name}.so")  # the instrumented builds
assert native.available()
from analysis import detect
assert detect._native_tables()  # the detectors below run on the instrumented detect.c
from long_fuzz import run
from packet_processor import CaptureEngine
engine = CaptureEngine(buffer_size=5000)  # the merges, flow keys and grouping of the counters and detectors too
n = run(int(sys.argv[2]), 11, batch=1000, engine=engine)
assert engine.snapshot().totals["packets"] == n
print(f"fuzzed {n:,} inputs with the helpers under AddressSanitizer: no error")
import pytest  # and the tests that compare each helper with its twin, on the instrumented builds
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_native.py", "tests/test_detect_native.py"]))
PY
