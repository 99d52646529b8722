"""Soak: the dashboard's capture on lo at 50,000 packets/s for an hour, with the page rerun every 2 s.

The page runs in this process through Streamlit's AppTest (the same script a browser gets, with the
same st.cache_resource engine), rerun every 2 s like the auto-refresh. A C sender (udp_sender.c)
sends 60-byte UDP frames to a bound port on 127.0.0.1, pinned to the second core. At the end the
capture is stopped and the script checks, exactly, that sent = counted + dropped. It reports RSS
at the start and the end, RSS growth after the warm-up, the greatest OS thread count, the reruns and
any page exceptions.

    python benchmarks/soak.py                  # 1 hour (root)
    python benchmarks/soak.py --short          # 40 s (CI)
    python benchmarks/soak.py --seconds 600 --rss-growth-pct 5 --max-threads 24

Exit status 1 when a check fails: packets unaccounted for, a page exception, a page that stopped
showing new packets, RSS that grew more than --rss-growth-pct (5 %) from its value at the end of the
warm-up (a quarter of the run, at most 300 s) to its greatest after it, or more OS threads than
--max-threads (24, over the tree: a thread per rerun or per capture would pass it).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

from common import ROOT, process_tree
from live_capture import PAYLOAD, build_sender

RATE = 50_000


def tree_usage(label: str | None = None, exclude: int | None = None) -> tuple[float, int]:
    """RSS in MB and OS threads summed over this process and its children (but `exclude`, the sender);
    with a label, each process is printed."""
    rows = [r for r in process_tree() if r["pid"] != exclude]
    if label is not None:
        for r in rows:
            role = "this process" if r["self"] else "child"
            print(f"  {label}: {role} {r['pid']} ({r['name']}): RSS {r['rss_mb']:.1f} MB, {r['threads']} threads",
                  flush=True)
    return sum(r["rss_mb"] for r in rows), sum(r["threads"] for r in rows)


def page_packets(at) -> int:
    """The 'Packets' number the page shows."""
    return int(next(m for m in at.metric if m.label == "Packets").value.replace(",", ""))


def soak(seconds: float, warmup_s: float | None = None, rss_growth_pct: float = 5.0, max_threads: int = 24) -> bool:
    """Run the soak; True when every check holds."""
    warmup_s = min(300.0, seconds / 4) if warmup_s is None else warmup_s
    from streamlit.testing.v1 import AppTest

    from packet_processor import engines, stop_all

    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a bound port: no ICMP errors come back
    sink.bind(("127.0.0.1", 0))
    port = sink.getsockname()[1]
    os.environ.update({"NTM_INTERFACE": "lo", "NTM_BPF_FILTER": f"udp dst port {port}",
                       "NTM_EXCLUDE_OWN_TRAFFIC": "0", "NTM_PCAP": ""})
    os.sched_setaffinity(0, {0})
    at = AppTest.from_file(str(ROOT / "dashboard.py"), default_timeout=60)
    at.run()
    import config

    if config.get("ENRICHMENT"):  # the geo and AS databases load once, in the background: start-up, not growth
        import enrich

        enrich.shared().geo.wait_loaded(120)
    engine = next(iter(engines()))
    status = engine.status()
    if status.state != "running":
        print(f"capture did not start: {status.error}")
        return False
    rss_start, threads_max = tree_usage("start")
    print(f"start: RSS {rss_start:.1f} MB, {threads_max} threads; sending {RATE:,} packets/s for {seconds:g} s",
          flush=True)
    reruns, errors, stale, last_shown = 0, [], 0, -1
    rss_base, rss_max = None, 0.0  # RSS at the end of the warm-up, and the greatest after it
    with tempfile.TemporaryDirectory() as tmp:
        sender = subprocess.Popen([build_sender(tmp), str(port), str(RATE), str(seconds), str(PAYLOAD), "1"],
                                  stdout=subprocess.PIPE, text=True)
        start = next_report = time.monotonic()
        while sender.poll() is None:
            time.sleep(2.0)
            at.run()
            reruns += 1
            errors += [e.message for e in at.exception]
            shown = page_packets(at)
            stale = stale + 1 if shown == last_shown and sender.poll() is None else 0
            last_shown = shown
            rss_now, threads_now = tree_usage(exclude=sender.pid)
            threads_max = max(threads_max, threads_now)
            if time.monotonic() - start >= warmup_s:
                rss_base = rss_now if rss_base is None else rss_base
                rss_max = max(rss_max, rss_now)
            if time.monotonic() >= next_report:
                next_report += max(10.0, seconds / 20)
                print(f"  t={time.monotonic() - start:6.0f} s  RSS {rss_now:7.1f} MB  threads {threads_now}  "
                      f"page shows {shown:,} packets", flush=True)
            if stale >= 5:
                errors.append(f"the page showed {shown:,} packets for 5 reruns in a row while traffic flowed")
                break
        sent = int(sender.communicate()[0])
    time.sleep(0.5)  # the last partly filled ring block times out into the engine
    rss_end, _ = tree_usage("end")
    engine.stop()
    totals = engine.snapshot().totals
    stop_all()
    sink.close()
    counted, dropped = totals["packets"], totals["dropped"]
    exact = sent == counted + dropped
    print(f"sent {sent:,}; counted {counted:,} + dropped {dropped:,} = {counted + dropped:,}: "
          f"{'exact' if exact else 'MISMATCH'}")
    print(f"RSS start {rss_start:.1f} MB, end {rss_end:.1f} MB ({(rss_end - rss_start) / rss_start * 100:+.1f} %)")
    rss_ok = rss_base is not None and (rss_max - rss_base) / rss_base * 100 <= rss_growth_pct
    if rss_base is None:
        print(f"RSS after warm-up: no sample after {warmup_s:g} s: FAIL")
    else:
        print(f"RSS after warm-up ({warmup_s:g} s): {rss_base:.1f} MB, greatest after it {rss_max:.1f} MB, growth "
              f"{(rss_max - rss_base) / rss_base * 100:+.1f} % (bound {rss_growth_pct:g} %): "
              f"{'ok' if rss_ok else 'FAIL'}")
    threads_ok = threads_max <= max_threads
    print(f"greatest thread count {threads_max} (bound {max_threads}): {'ok' if threads_ok else 'FAIL'}")
    print(f"page reruns {reruns}, page exceptions {len(errors)}")
    for e in errors[:5]:
        print(f"  {e}")
    return exact and not errors and rss_ok and threads_ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", action="store_true", help="40 s instead of an hour (CI)")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--warmup-s", type=float, default=None,
                    help="seconds before RSS becomes the baseline (default: a quarter of the run, at most 300)")
    ap.add_argument("--rss-growth-pct", type=float, default=5.0,
                    help="most RSS growth after the warm-up, in %% of the baseline (default 5)")
    ap.add_argument("--max-threads", type=int, default=24,
                    help="most OS threads of the process tree (default 16)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the soak captures on lo: run it as root (or with CAP_NET_RAW)")
    seconds = args.seconds or (40.0 if args.short else 3600.0)
    sys.exit(0 if soak(seconds, args.warmup_s, args.rss_growth_pct, args.max_threads) else 1)


if __name__ == "__main__":
    main()
