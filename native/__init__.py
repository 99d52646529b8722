"""Optional compiled helpers: built from native/*.c with the system's C compiler at first use.

Nothing depends on them for correctness: every helper has a Python twin that is the reference
(tests keep the two identical), used when there is no compiler or the build fails. They exist
for the steps numpy cannot vectorise, such as following pcap record lengths one by one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np

import config

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent  # the C sources sit beside this loader
BUILD_DIR = Path(__file__).resolve().parent.parent / ".build"  # inside the project: never a shared /tmp
_lock = threading.Lock()
RECORD_SIZE = 86  # bytes per packed PACKET_DTYPE record, as fastparse.c and grouprows.c read it
_loaded: dict[str, Any] = {}  # function name -> the function with its signature, or None


def _build(name: str) -> ctypes.CDLL | None:
    """Compile native/<name>.c into .build/ (once per source version) and load it; None if impossible."""
    if not config.get("NATIVE"):
        return None
    src = SOURCE_DIR / f"{name}.c"
    cc = shutil.which("cc") or shutil.which("gcc")
    if not src.exists() or cc is None:
        return None
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    lib = BUILD_DIR / f"{name}-{digest}.so"
    try:
        if not lib.exists():
            BUILD_DIR.mkdir(exist_ok=True)
            tmp = lib.with_suffix(f".{os.getpid()}.tmp")
            subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src)], check=True,
                           capture_output=True, timeout=60)
            os.replace(tmp, lib)  # atomic: a concurrent process never loads a half-written library
        return ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("native/%s.c not used (%s); the Python version runs instead", name, exc)
        return None


# The functions of the libraries: name -> (library, return type, argument types).
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "ntm_pcap_walk": ("pcapwalk", _I64, [_P, _I64, _I64, _I64, _INT, _I64, _INT, _P, ctypes.POINTER(_I64),
                                         ctypes.POINTER(_INT)]),
    "ntm_block_walk": ("pcapwalk", _I64, [_P, _I64, _I64, _I64, _P]),
    "ntm_pcap_heads": ("pcapwalk", None, [_P, _P, _I64, _INT, _P]),
    "ntm_group_rows": ("grouprows", _I64, [_P, _I64, _I64, _P, _P]),
    "ntm_minmax_at": ("grouprows", None, [_P, _P, _P, _I64, _P, _P]),
    "ntm_conv_keys": ("grouprows", None, [_P, _I64, _P]),
    "ntm_flow_keys": ("grouprows", None, [_P, _I64, _INT, _P, _P]),
    "ntm_top_merge": ("grouprows", _I64, [_P, _P, _P, _I64, _P, _P, _P, _I64, _I64, _P, _P, _P]),
    "ntm_addr_kinds": ("grouprows", None, [_P, _I64, _I64, _P, _I64, _P, _I64, _P]),
    "ntm_conv_tally": ("grouprows", _I64, [_P, _I64, _I64, _I64, _P, _P, _P, _P]),
    "ntm_parse_fast": ("fastparse", None, [_P, _I64, _P, _P, _P, _P, _P, _P, _P]),
    # detect.c: the detectors' tables (analysis/detect.py builds the structures it takes)
    "ntm_hset_reindex": ("detect", None, [_P]),
    "ntm_hset_add": ("detect", None, [_P, _P, _I64]),
    "ntm_hset_has": ("detect", None, [_P, _P, _I64, _P]),
    "ntm_hset_find": ("detect", _I64, [_P, ctypes.c_uint64]),
    "ntm_unique_gather": ("detect", _I64, [_P, _P, _P, _P, _I64, _P, _P, _P, _P, _P, _P]),
    "ntm_unique_commit": ("detect", _I64, [_P, _P, _I64, _P, _P, _P, _P, _I64, _P, _P]),
    "ntm_unique_lookup": ("detect", None, [_P, _P, _I64, _P, _P]),
    "ntm_new_hosts": ("detect", _I64, [_P, _P, _P, _P, _I64, _P]),
    "ntm_pending_add": ("detect", _I64, [_P, _I64, _I64, _I64, ctypes.c_uint64, _P, _I64, _P]),
    "ntm_pending_answer": ("detect", None, [_P, _I64, _I64, ctypes.c_uint64, _P, _I64, _P, _INT, _P]),
    "ntm_hset_clear": ("detect", None, [_P]),
    "ntm_hset_values": ("detect", None, [_P, _P, _P, _I64, _P]),
    "ntm_pairs_add": ("detect", _I64, [_P, _P, ctypes.c_uint64, _P, _I64, _I64, _P]),
    "ntm_second_add": ("detect", _I64, [_P, _P, _P, _I64, _P, _I64, _P]),
    "ntm_earlier": ("detect", _I64, [_P, _P, _I64, _P, _P, _I64, _INT, _P]),
    "ntm_second_hot": ("detect", _I64, [_P, _P, _P, _I64, _I64, _P]),
    "ntm_hset_count": ("detect", None, [_P, _P, _P, _I64]),
    "ntm_isin": ("detect", _I64, [_P, _I64, _P, _I64, _P]),
    "ntm_recent_add": ("detect", _I64, [_P, _P, _P, ctypes.c_uint64, _P, _P, _P, _I64]),
    "ntm_recent_find": ("detect", None, [_P, _P, _P, ctypes.c_uint64, _P, _I64, ctypes.c_double, _INT, _P, _P]),
}
_libraries: dict[str, ctypes.CDLL | None] = {}


def function(name: str):
    """A function of the compiled helpers with its signature set, or None when its library cannot be built."""
    with _lock:
        if name not in _loaded:
            library, restype, argtypes = _SIGNATURES[name]
            if library not in _libraries:
                _libraries[library] = _build(library)
            fn = None
            if _libraries[library] is not None:
                fn = getattr(_libraries[library], name)
                fn.restype, fn.argtypes = restype, argtypes
            _loaded[name] = fn
        return _loaded[name]


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_malloc_tuned = False


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def keep_freed_memory(keep_mb: int) -> bool:
    """Let glibc reuse freed memory instead of returning it to the kernel (once per process).

    Every batch allocates arrays of a few MB. By default glibc gives each one fresh pages from the
    kernel (mmap above 128 KiB) and hands them back on free, so every batch page-faults its memory
    anew: 2,000 faults for one top-table merge, at ~2.5 us each in a VM, 4x the merge itself.
    Arrays under 32 MB now come from the heap, and up to keep_mb MB of free heap is kept.
    False when not glibc or keep_mb is 0; release_memory() hands the free memory back."""
    global _malloc_tuned
    with _lock:
        if _malloc_tuned:
            return True
        libc = _libc() if keep_mb > 0 else None
        if libc is None:
            return False
        _malloc_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, int(keep_mb) << 20))
        return _malloc_tuned


def release_memory() -> None:
    """Return the free memory glibc keeps to the kernel (after a file load, whose batches are large)."""
    if _malloc_tuned:
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)


def available() -> bool:
    """True when every compiled helper is built and loaded."""
    return all(function(name) is not None for name in _SIGNATURES)


def pcap_walk(data: np.ndarray, off: int, size: int, big_endian: bool, limit: int,
              maybe_swapped: bool) -> tuple[np.ndarray, int, bool] | None:
    """native/pcapwalk.c: (record offsets, offset after them, stopped at a bad length), or None."""
    fn = function("ntm_pcap_walk")
    if fn is None:
        return None
    starts = np.empty(size, np.int64)
    end, bad = ctypes.c_int64(), ctypes.c_int()
    n = fn(data.ctypes.data, len(data), off, size, int(big_endian), limit, int(maybe_swapped),
           starts.ctypes.data, ctypes.byref(end), ctypes.byref(bad))
    return starts[:n], end.value, bool(bad.value)


def group_rows(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """native/grouprows.c: (first row of each group, group of each row) for a 2-D uint8 array,
    groups in order of first appearance; None when the library is not available."""
    fn = function("ntm_group_rows")
    if fn is None:
        return None
    raw = np.ascontiguousarray(raw, np.uint8)
    n, width = raw.shape
    codes = np.empty(n, np.int64)
    first = np.empty(n, np.int64)
    groups = fn(raw.ctypes.data, n, width, codes.ctypes.data, first.ctypes.data)
    if groups < 0:
        return None
    return first[:groups], codes


def conv_tally(recs: np.ndarray, tcp: int, udp: int) -> tuple[np.ndarray, ...] | None:
    """native/grouprows.c: (conversation ids sorted, first record, packets, wire bytes) of the tcp/udp records
    of a 1-D PACKET_DTYPE array (enrich.attribution's numpy grouping is the reference); None when the library
    is not available."""
    fn = function("ntm_conv_tally")
    if fn is None or recs.ndim != 1 or recs.dtype.itemsize != RECORD_SIZE:
        return None
    recs = np.ascontiguousarray(recs)
    n = len(recs)
    ids, first = np.empty(n, np.uint64), np.empty(n, np.int64)
    packets, nbytes = np.empty(n, np.int64), np.empty(n, np.int64)
    groups = fn(recs.ctypes.data, n, tcp, udp, ids.ctypes.data, first.ctypes.data, packets.ctypes.data,
                nbytes.ctypes.data) if n else 0
    if groups < 0:
        return None
    order = np.argsort(ids[:groups])  # the reference's order (np.unique's): the same tallies, capped alike
    return ids[order], first[order], packets[order], nbytes[order]


def addr_kinds(keys: np.ndarray, addrs: np.ndarray, nets: np.ndarray) -> np.ndarray | None:
    """native/grouprows.c: analysis.headers.LocalMatcher.kinds over a 1-D array of 16-byte keys (a
    field of packed records is read in place), addrs as (n, 2) and nets as (n, 4) uint64; None when
    the library is not available."""
    fn = function("ntm_addr_kinds")
    if fn is None or keys.ndim != 1 or keys.dtype.itemsize != 16:
        return None
    if keys.strides[0] < 16:  # negative or overlapping steps: read a copy
        keys = np.ascontiguousarray(keys)
    addrs = np.ascontiguousarray(addrs, np.uint64).reshape(-1, 2)
    nets = np.ascontiguousarray(nets, np.uint64).reshape(-1, 4)
    out = np.empty(len(keys), np.int64)
    if len(keys):
        fn(keys.ctypes.data, keys.strides[0], len(keys), addrs.ctypes.data, len(addrs), nets.ctypes.data,
           len(nets), out.ctypes.data)
    return out


def parse_fast(batch, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray] | None:
    """native/fastparse.c on a RawBatch: (records of `dtype` without their direction, which rows
    it completed), or None when the library is not available."""
    fn = function("ntm_parse_fast")
    if fn is None or dtype.itemsize != RECORD_SIZE:
        return None
    n = len(batch)
    cols = [np.ascontiguousarray(getattr(batch, name), dt) for name, dt in
            (("off", np.int64), ("cap", np.int64), ("wire", np.int64), ("ts", np.float64), ("linktype", np.int64))]
    out = np.empty(n, dtype)
    done = np.empty(n, np.uint8)
    fn(batch.buf.ctypes.data, n, *(c.ctypes.data for c in cols), out.ctypes.data, done.ctypes.data)
    return out, done.view(bool)


def block_walk(ring: np.ndarray, first: int, num: int, limit: int) -> np.ndarray | None:
    """native/pcapwalk.c: the offsets of the `num` packets of a TPACKET_V3 block, following each
    header's tp_next_offset from `first`; None when unavailable or when a link points outside
    [0, limit) (the caller's Python loop then reports it)."""
    fn = function("ntm_block_walk")
    if fn is None:
        return None
    offs = np.empty(num, np.int64)
    if fn(ring.ctypes.data, first, num, limit, offs.ctypes.data) != num:
        return None
    return offs


def pcap_heads(data: np.ndarray, starts: np.ndarray, big_endian: bool) -> np.ndarray | None:
    """native/pcapwalk.c: the (n, 4) uint32 record-header fields at `starts`, or None."""
    fn = function("ntm_pcap_heads")
    if fn is None:
        return None
    starts = np.ascontiguousarray(starts, np.int64)
    out = np.empty((len(starts), 4), np.uint32)
    fn(data.ctypes.data, starts.ctypes.data, len(starts), int(big_endian), out.ctypes.data)
    return out


def minmax_at(idx: np.ndarray, lows: np.ndarray, highs: np.ndarray, mins: np.ndarray, maxs: np.ndarray) -> bool:
    """native/grouprows.c: np.minimum.at(mins, idx, lows) and np.maximum.at(maxs, idx, highs) in one
    pass, in place on float64 arrays; False (nothing done) when the library is not available."""
    fn = function("ntm_minmax_at")
    if fn is None or not (mins.flags.c_contiguous and maxs.flags.c_contiguous):
        return False
    idx = np.ascontiguousarray(idx, np.int64)
    lows = np.ascontiguousarray(lows, np.float64)
    highs = np.ascontiguousarray(highs, np.float64)
    fn(idx.ctypes.data, lows.ctypes.data, highs.ctypes.data, len(idx), mins.ctypes.data, maxs.ctypes.data)
    return True


def conv_keys(records: np.ndarray) -> np.ndarray | None:
    """native/grouprows.c: the (n, 42) uint8 conversation keys of contiguous 86-byte packed records, or None."""
    fn = function("ntm_conv_keys")
    if fn is None or records.dtype.itemsize != RECORD_SIZE:
        return None
    records = np.ascontiguousarray(records)
    out = np.empty((len(records), 42), np.uint8)
    fn(records.ctypes.data, len(records), out.ctypes.data)
    return out


def flow_keys(records: np.ndarray, ports: int, idx: np.ndarray | None = None) -> np.ndarray | None:
    """native/grouprows.c: the (n, 44) uint8 flow keys of 86-byte packed records (of records[idx]
    when idx is given; ports as analysis.detect.flow_keys_numpy takes it), or None."""
    fn = function("ntm_flow_keys")
    if fn is None or records.dtype.itemsize != RECORD_SIZE:
        return None
    records = np.ascontiguousarray(records)
    n = len(records)
    if idx is not None:
        idx = np.ascontiguousarray(idx, np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IndexError("flow_keys: index out of range")
        n = len(idx)
    out = np.empty((n, 44), np.uint8)
    fn(records.ctypes.data, n, int(ports), None if idx is None else idx.ctypes.data, out.ctypes.data)
    return out


def top_merge(old: tuple, keys: np.ndarray, wire: np.ndarray, ts: np.ndarray | None) -> tuple | None:
    """native/grouprows.c: a top table's (keys, values, times) after counting one packet per key of
    the batch, before pruning (old rows first, new keys in order of first appearance); None when
    the library is not available or the keys are not fixed-width bytes. The arrays are views of
    buffers with room for every key of the batch."""
    fn = function("ntm_top_merge")
    old_keys, old_vals, old_times = old
    if fn is None or keys.dtype.kind != "V" or (old_times is None) != (ts is None):
        return None
    m, n, width = len(old_keys), len(keys), keys.dtype.itemsize
    old_keys, old_vals = np.ascontiguousarray(old_keys), np.ascontiguousarray(old_vals, np.int64)
    keys, wire = np.ascontiguousarray(keys), np.ascontiguousarray(wire, np.int64)
    out_keys, out_vals = np.empty(m + n, keys.dtype), np.empty((m + n, 2), np.int64)
    out_times = times_ptr = old_ptr = ts_ptr = None
    if ts is not None:
        old_times, ts = np.ascontiguousarray(old_times, np.float64), np.ascontiguousarray(ts, np.float64)
        out_times = np.empty((m + n, 2), np.float64)
        times_ptr, old_ptr, ts_ptr = out_times.ctypes.data, old_times.ctypes.data, ts.ctypes.data
    rows = fn(old_keys.ctypes.data, old_vals.ctypes.data, old_ptr, m, keys.ctypes.data, wire.ctypes.data, ts_ptr,
              n, width, out_keys.ctypes.data, out_vals.ctypes.data, times_ptr)
    if rows < 0:
        return None
    return out_keys[:rows], out_vals[:rows], None if out_times is None else out_times[:rows]
