"""The fleet's subcommands; packet_processor's CLI adds them with two lines.

    python packet_processor.py sensor --name NAME --iface IF [--filter BPF] [--seconds N]
        --clickhouse HOST:PORT [--cluster NAME] [--spool DIR] [--metrics-port P [--metrics-addr ADDR]]
    python packet_processor.py history --clickhouse HOST:PORT [--cluster NAME] [--sensor NAME] [--since T] [--until T]

`history` is the store's subcommand (store/cli.py) with --clickhouse and --cluster added: the same JSON.
"""

from __future__ import annotations

import argparse

from store import cli as store_cli

COMMANDS = ("sensor", "history", "import")


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Add `sensor`, and the store's `import`/`history` (unless present) with --clickhouse/--cluster on history."""
    if "history" not in sub.choices:
        store_cli.add_subcommands(sub)
    h = sub.choices["history"]
    h.add_argument("--clickhouse", default=None, metavar="HOST:PORT", help="read the fleet's ClickHouse store")
    h.add_argument("--cluster", default=None, help="ClickHouse cluster (queries through its Distributed tables)")
    s = sub.add_parser("sensor", help="capture headless and ship history rows to ClickHouse every FLEET_FLUSH_S")
    s.add_argument("--name", required=True, help="sensor name tagging every row")
    s.add_argument("--iface", required=True, help="interface to capture on")
    s.add_argument("--filter", default="", help="BPF capture filter")
    s.add_argument("--seconds", type=float, default=None, help="stop after N seconds (default: run until SIGTERM)")
    s.add_argument("--clickhouse", required=True, metavar="HOST:PORT", help="ClickHouse server (native protocol)")
    s.add_argument("--cluster", default=None, help="ClickHouse cluster name (Distributed tables over its shards)")
    s.add_argument("--spool", default=None, help="spool folder (default: FLEET_SPOOL_DIR or a per-sensor folder)")
    s.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on port P (checked before the capture starts)")
    s.add_argument("--metrics-addr", default=None, metavar="ADDR",
                   help="address the metrics listen on (default FLEET_METRICS_ADDR, 127.0.0.1)")


def run(args: argparse.Namespace) -> int:
    """Run a subcommand added here; the exit code."""
    if args.cmd == "sensor":
        from fleet import sensor

        return sensor.run(args)
    if args.cmd == "history" and getattr(args, "clickhouse", None):
        return history(args)
    return store_cli.run(args)


def history(args: argparse.Namespace) -> int:
    """`history --clickhouse`: the summary JSON of a range from the fleet's store, one sensor or all."""
    from store.clickhouse import ClickHouseStore

    return store_cli.print_history(ClickHouseStore(args.clickhouse, cluster=args.cluster), args)
