#!/usr/bin/env bash
# The compiled helpers (native/*.c) under AddressSanitizer, fed by the long fuzzer's mutated frames.
# Usage: fuzz/asan_native.sh [INPUTS]      (default 300000; needs gcc with libasan)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for name in fastparse pcapwalk grouprows; do
  gcc -fsanitize=address -fno-omit-frame-pointer -O1 -shared -fPIC -o "$out/$name.so" "native/$name.c"
done
LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 .venv/bin/python - "$out" "${1:-300000}" <<'PY'
import ctypes, sys
sys.path[:0] = [".", "fuzz"]
import native
for name in ("fastparse", "pcapwalk", "grouprows"):
    native._libraries[name] = ctypes.CDLL(f"{sys.argv[1]}/{name}.so")  # the instrumented builds
assert native.available()
from long_fuzz import run
print(f"fuzzed {run(int(sys.argv[2]), 11, batch=1000):,} inputs with the helpers under AddressSanitizer: no error")
PY
