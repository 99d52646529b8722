"""A sensor's disk spool: batches ClickHouse could not take, kept in order until it can.

One folder per batch (`<seq>-<batch id>/`: meta.json and one Parquet file per table), written into a
temporary name and renamed, so a `kill -9` leaves whole entries only. The total is bounded by
FLEET_SPOOL_MB: beyond it the oldest entries are dropped and counted (batches, and the packets
history loses with them: a segment that a later entry writes again is not lost, that entry has it
whole). The counts survive restarts in `state.json`. No pickle: a spool is data, never code.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

import pandas as pd

from store.clickhouse import IdBatch

log = logging.getLogger(__name__)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


class Spool:
    """Batches on disk, oldest first; thread-safe."""

    def __init__(self, folder: str, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        for tmp in self.folder.glob(".tmp-*"):  # a write cut short by a kill: never a whole entry
            shutil.rmtree(tmp, ignore_errors=True)
        self._entries: list[tuple[Path, int, dict[int, int]]] = []  # path, bytes, packets per segment
        for path in sorted(p for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                meta = json.loads((path / "meta.json").read_text())
                self._entries.append((path, _dir_size(path), {int(k): v for k, v in meta["seg_packets"].items()}))
            except (OSError, ValueError, KeyError) as exc:
                log.error("spool: unreadable entry %s moved aside: %s", path, exc)
                path.rename(path.with_name(".bad-" + path.name))
        self._seq = int(self._entries[-1][0].name.split("-")[0]) if self._entries else 0
        state = self._read_state()
        self.dropped_batches = int(state.get("dropped_batches", 0))
        self.dropped_packets = int(state.get("dropped_packets", 0))
        self.damaged_batches = int(state.get("damaged_batches", 0))  # entries that could not be read back
        self.damaged_packets = int(state.get("damaged_packets", 0))

    def _read_state(self) -> dict:
        try:
            return json.loads((self.folder / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def _write_state(self) -> None:
        tmp = self.folder / ".state.json.tmp"
        tmp.write_text(json.dumps({"dropped_batches": self.dropped_batches, "dropped_packets": self.dropped_packets,
                                   "damaged_batches": self.damaged_batches, "damaged_packets": self.damaged_packets}))
        os.replace(tmp, self.folder / "state.json")

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def size_bytes(self) -> int:
        """Bytes the entries take on disk."""
        with self._lock:
            return sum(e[1] for e in self._entries)

    def packets(self) -> int:
        """Packets waiting in the spool (each segment counted in its newest entry only)."""
        with self._lock:
            seen: dict[int, int] = {}
            for _, _, segs in self._entries:
                seen.update(segs)
            return sum(seen.values())

    def put(self, batch: IdBatch) -> None:
        """Append a batch (fsynced), then drop the oldest entries while the spool is over its bound."""
        with self._lock:
            self._seq += 1
            name = f"{self._seq:012d}-{batch.batch_id}"
            tmp = self.folder / f".tmp-{name}"
            tmp.mkdir()
            # The data files reach the disk before the meta that points at them: after a power cut an
            # entry with a meta.json has its data whole (and a damaged one is moved aside by head()).
            for table, frame in batch.frames.items():
                if frame is not None and len(frame):
                    _write_synced(tmp / f"{table}.parquet", frame.reset_index(drop=True))
            if batch.alerts is not None and len(batch.alerts):
                _write_synced(tmp / "_alerts.parquet", batch.alerts.reset_index(drop=True).astype({"evidence": str}))
            seg_packets = _seg_packets(batch)
            meta = {"batch_id": batch.batch_id, "replaces": list(map(int, batch.replaces)),
                    "hours_done": list(map(int, batch.hours_done)),
                    "periods": [[int(a), int(b)] for a, b in batch.periods],
                    "origins": [list(o) for o in batch.origins],
                    "seg_packets": {str(k): v for k, v in seg_packets.items()},
                    "losses": [v if isinstance(v, str) else int(v) for v in getattr(batch, "losses", ())]}
            with open(tmp / "meta.json", "w") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            os.rename(tmp, self.folder / name)
            _fsync_dir(self.folder)
            self._entries.append((self.folder / name, _dir_size(self.folder / name), seg_packets))
            self._bound()

    def _bound(self) -> None:
        while len(self._entries) > 1 and sum(e[1] for e in self._entries) > self.max_bytes:
            path, _, segs = self._entries.pop(0)
            later = {s for _, _, sg in self._entries for s in sg}
            lost = sum(p for s, p in segs.items() if s not in later)
            self.dropped_batches += 1
            self.dropped_packets += lost
            shutil.rmtree(path, ignore_errors=True)
            self._write_state()
            log.error("spool: over FLEET_SPOOL_MB; the oldest batch was dropped (%d packets lost from history)", lost)

    def head(self) -> IdBatch | None:
        """The oldest batch, read back (None when the spool is empty).

        An entry that cannot be read back (a power cut, a disk error) is moved aside as `.bad-<name>`
        and its packets counted as lost (damaged_batches, damaged_packets); the next entry is tried."""
        while True:
            with self._lock:
                if not self._entries:
                    return None
                path = self._entries[0][0]
            try:
                return _read_entry(path)
            except Exception as exc:  # any damage: never a crash, the loss is counted
                self._set_aside(path, exc)

    def _set_aside(self, path: Path, exc: Exception) -> None:
        with self._lock:
            if not self._entries or self._entries[0][0] != path:
                return
            _, _, segs = self._entries.pop(0)
            later = {s for _, _, sg in self._entries for s in sg}
            lost = sum(p for s, p in segs.items() if s not in later)
            self.damaged_batches += 1
            self.damaged_packets += lost
            try:
                path.rename(path.with_name(".bad-" + path.name))
            except OSError:
                shutil.rmtree(path, ignore_errors=True)
            self._write_state()
        log.error("spool: damaged entry %s moved aside (%d packets lost from history): %s: %s", path.name, lost,
                  type(exc).__name__, exc)

    def pop(self, batch_id: str) -> None:
        """Remove the oldest entry once ClickHouse has it (by id: a dropped head is not removed twice)."""
        with self._lock:
            if self._entries and self._entries[0][0].name.endswith("-" + batch_id):
                path, _, _ = self._entries.pop(0)
                shutil.rmtree(path, ignore_errors=True)


def _read_entry(path: Path) -> IdBatch:
    meta = json.loads((path / "meta.json").read_text())
    frames, alerts = {}, None
    for f in sorted(path.glob("*.parquet")):
        df = pd.read_parquet(f)
        if f.stem == "_alerts":
            alerts = df
        else:
            frames[f.stem] = df
    return IdBatch(frames=frames, replaces=tuple(meta["replaces"]), alerts=alerts,
                   origins=tuple(tuple(o) for o in meta["origins"]), hours_done=tuple(meta["hours_done"]),
                   periods=tuple((int(a), int(b)) for a, b in meta.get("periods", ())),
                   batch_id=meta["batch_id"], losses=tuple(meta.get("losses", ())))


def _write_synced(path: Path, frame: pd.DataFrame) -> None:
    with open(path, "wb") as f:
        frame.to_parquet(f, index=False)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seg_packets(batch: IdBatch) -> dict[int, int]:
    """Packets per segment the batch writes; a segment it replaces without rows (a minute's delta segments,
    replaced by its close) holds none from then on."""
    out = {int(s): 0 for s in batch.replaces}
    sec = batch.frames.get("seconds")
    if sec is not None and len(sec):
        out.update({int(k): int(v) for k, v in sec.groupby("seg")["packets"].sum().items()})
    return out
