"""The `import` and `history` subcommands: packet_processor's CLI adds them with two lines.

    python packet_processor.py import FILE... [--store PATH]
    python packet_processor.py history [--store PATH] [--since T] [--until T] [--sensor NAME]

(also runnable as ``python -m store.cli import ...``). Both print JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from typing import TYPE_CHECKING, Any

import config
from analysis.headers import LocalMatcher, parse_batch, parse_nets
from capture.sources import FileReader

if TYPE_CHECKING:  # DuckDB and pandas load in the commands that use them: `summary` never does
    from store.base import Store

log = logging.getLogger(__name__)


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Add `import` and `history` to an argparse subparsers object (dest must be `cmd`)."""
    i = sub.add_parser("import", help="load capture files into the history store; prints {files, packets, errors}")
    i.add_argument("files", nargs="*", metavar="FILE")
    i.add_argument("--list", action="store_true", help="list the imported files (origin id, label, import time)")
    i.add_argument("--remove", default=None, metavar="ID", help="remove one imported file's rows (its origin id)")
    i.add_argument("--store", default=None, help="store file (default: config STORE or the per-user data folder)")
    i.add_argument("--local-nets", default=None, help="networks counted as local (default: config LOCAL_NETS)")
    i.add_argument("--sensor", default=None, help="name tagging the rows (default: STORE_SENSOR or the host name)")
    h = sub.add_parser("history", help="print the summary JSON of a time range, from the store alone")
    h.add_argument("--store", default=None, help="store file (default: config STORE or the per-user data folder)")
    h.add_argument("--since", default=None, help="first second (epoch seconds or ISO 8601, UTC unless a zone is given)")
    h.add_argument("--until", default=None, help="last second, inclusive (epoch seconds or ISO 8601)")
    h.add_argument("--sensor", default=None, help="only rows of this sensor")


def run(args: argparse.Namespace) -> int:
    """Run `import` or `history` as parsed by add_subcommands; the exit code."""
    if args.cmd == "import" and (args.list or args.remove):
        return _manage_imports(args)
    if args.cmd == "import":
        if not args.files:
            _print({"error": "give capture files to import, or --list / --remove ID"})
            return 2
        from store.embedded import EmbeddedStore

        store = EmbeddedStore(args.store)
        store.open()
        try:
            out = import_files(args.files, store, args.local_nets, args.sensor)
        finally:
            store.close()
        _print(out)
        return 0 if not out["errors"] else 1
    if args.cmd == "history":
        return _history(args)
    raise ValueError(f"not a store subcommand: {args.cmd}")


def _manage_imports(args: argparse.Namespace) -> int:
    """`import --list` prints the imported files; `import --remove ID` deletes one file's rows (imports are
    kept, whatever their age, until removed this way)."""
    from store.embedded import EmbeddedStore

    store = EmbeddedStore(args.store)
    if not store.open():
        _print({"error": store.status().message})
        return 1
    try:
        origins = store.origins()
        imports = origins[origins["origin"].astype(str).str.startswith("import:")]
        if args.remove:
            if args.remove not in set(imports["origin"].astype(str)):
                _print({"error": f"no imported file with origin {args.remove!r} (see import --list)"})
                return 1
            _print({"removed": args.remove, "rows": store.remove_origin(args.remove)})
        else:
            _print({"imports": [{str(k): (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                                for row in imports.to_dict("records")]})
    finally:
        store.close()
    return 0


def _history(args: argparse.Namespace) -> int:
    from store.embedded import EmbeddedStore

    return print_history(EmbeddedStore(args.store, read_only=True), args)


def print_history(store: Store, args: argparse.Namespace) -> int:
    """Open `store`, print the summary JSON of args' range (or the error) and close it; the exit code:
    0, 1 when the store cannot be read, 2 for a bad time bound."""
    if not store.open():
        _print({"error": store.status().message})
        return 1
    try:
        from store.history import history_summary

        out = history_summary(store, args.since, args.until, args.sensor)
    except ValueError as exc:
        _print({"error": str(exc)})
        return 2
    except OSError as exc:
        _print({"error": str(exc)})
        return 1
    finally:
        store.close()
    _print(out)
    return 0


def import_files(paths: list[str], store: Store, local_nets: str | None = None,
                 sensor: str | None = None, labels: list[str] | None = None) -> dict[str, Any]:
    """Load capture files into the store through the engine's parser and detectors; {files, packets, errors}.

    Each file gets its own origin ("import:<id>"), kept by import time until removed. A damaged
    file keeps every packet before the damage and its error is reported. `labels` name the files in the
    store (default: their absolute paths; the page gives an upload's own file name)."""
    matcher = LocalMatcher(nets=parse_nets(local_nets if local_nets is not None else config.get("LOCAL_NETS")))
    out: dict[str, Any] = {"files": 0, "packets": 0, "errors": [], "imports": []}
    for i, path in enumerate(paths):
        label = labels[i] if labels else os.path.abspath(path)
        packets, error, origin = _import_one(path, store, matcher, sensor, label)
        out["files"] += 1
        out["packets"] += packets
        out["imports"].append({"file": path, "origin": origin, "packets": packets})
        if error:
            out["errors"].append({"file": path, "error": error})
    st = store.status()
    if st.pending or st.batches_dropped or st.state != "ok":
        out["errors"].append({"file": None, "error": f"store {st.state}: {st.message}; {st.pending} batches not "
                                                    f"written, {st.packets_dropped} packets dropped"})
    return out


def _import_one(path: str, store: Store, matcher: LocalMatcher, sensor: str | None,
                label: str) -> tuple[int, str | None, str]:
    origin = f"import:{uuid.uuid4().hex[:12]}"
    from analysis.detect import AlertBook, Detectors
    from store.rollup import Rollup

    rollup = Rollup(store, sensor=sensor, iface="", origin=origin)
    rollup.note_origin("import", label)
    reader = FileReader(path)
    detectors, book = Detectors(), AlertBook()
    packets = 0
    try:
        for raw in reader.batches(config.get("BATCH_SIZE")):
            arr = parse_batch(raw, matcher)
            rollup.add(arr)
            detectors.observe(arr, book)
            packets += len(arr)
            rollup.maybe_flush()
    except Exception as exc:  # a parser failure loses nothing already read: it is reported with the file
        log.exception("import of %s failed", path)
        reader.error = reader.error or f"{type(exc).__name__}: {exc}"
    rollup.add_alerts([a.as_dict() for a in book.alerts()])
    rollup.flush(final=True)
    return packets, reader.error, origin


def _print(obj: dict[str, Any]) -> None:
    json.dump(obj, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    """`python -m store.cli import|history ...` (the same as packet_processor's subcommands)."""
    ap = argparse.ArgumentParser(description="Network Traffic Monitor history store")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_subcommands(sub)
    args = ap.parse_args(argv)
    logging.basicConfig(level=config.get("LOG_LEVEL"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
