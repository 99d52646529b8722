"""Viewers: the loss-free live rate of the real dashboard with 6 browser tabs open, against none.

Starts `streamlit run dashboard.py -- --iface lo --filter 'udp dst port P'` (NTM_REFRESH_S=2) pinned
to the first core, and the C sender of live_capture.py (benchmarks/udp_sender.c) pinned to the
second. For each rate, the sender sends 60-byte UDP datagrams for a few seconds; the dashboard's
own "Packets" and "Dropped" figures (read from the page before and after, once the count has
settled) give what the server's engine counted. Loss = (sent - counted) / sent; a rate is held
when the loss is at most 0.1 %.
  - none: no tab refreshing while the sender runs: one reader tab, its auto-refresh turned off,
    reruns the page only to read the figures before and after each run; the rate ladder climbs,
    then bisects between the held and the missed rate.
  - 6 tabs: six headless Chromium tabs (Debian's /usr/bin/chromium, niced to 10 on the second core,
    so they measure the server, not Chromium) auto-refreshing every 2 s during every run (the
    reader as before); first at 90 % of the rate held with none, then climbing.
Target: the rate held with 6 tabs >= 90 % of the rate held with none.

    python benchmarks/viewers.py            # root, chromium, playwright (in the venv)
    python benchmarks/viewers.py --quick    # two low rates (10k, 20k/s) of 2 s, two tabs; target reported, not enforced
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from live_capture import PAYLOAD, build_sender
from playwright.sync_api import Error as PlaywrightError
from targets import ROOT, Verdicts, machine

CHROMIUM = "/usr/bin/chromium"
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]
TABS = 6
LADDER = [50_000, 100_000, 200_000, 400_000, 600_000, 800_000, 1_000_000]
QUICK_LADDER = [10_000, 20_000]
NICE = 10  # after the tabs have loaded: niced before, they took minutes to load on a machine shared with other work
LOSS_FREE = 0.001
TARGET = 0.9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def dashboard(udp_port: int, log_path: Path):
    """The real dashboard on its own port, capturing lo for one UDP port, pinned to the first core."""
    port = free_port()
    env = {**os.environ, "NTM_REFRESH_S": "2"}
    cmd = [str(ROOT / ".venv/bin/streamlit"), "run", "dashboard.py", "--server.port", str(port),
           "--server.headless", "true", "--", "--iface", "lo", "--filter", f"udp dst port {udp_port}"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["taskset", "-c", "0", *cmd], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=1).status == 200:
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"the dashboard did not start; see {log_path}") from None
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def metric(page, label: str) -> int:
    """An integer metric of the page's metrics row ("Packets", "Dropped")."""
    box = page.locator('[data-testid="stMetric"]', has_text=label).first
    return int(box.locator('[data-testid="stMetricValue"]').inner_text().replace(",", ""))


def open_tabs(browser, url: str, n: int = 1) -> list:
    """n tabs of the page, one after the other (all at once, some never drew here); each niced once drawn."""
    pages = []
    for _ in range(n):
        page = browser.new_page(viewport={"width": 1440, "height": 2000})
        page.goto(url)
        try:
            page.wait_for_selector('[data-testid="stMetric"]', timeout=120_000)
        except PlaywrightError as exc:
            text = " ".join(page.inner_text("body").split())[:600]
            raise SystemExit(f"tab {len(pages) + 1} did not draw its metrics: {exc.message.splitlines()[0]}; "
                             f"it shows: {text!r}") from None
        pin_browser()  # its renderer is a new process; niced only now, as niced it took minutes to load
        pages.append(page)
    return pages


def reader_tab(browser, url: str):
    """The tab that reads the figures: auto-refresh off, so it loads the server only when asked."""
    page = open_tabs(browser, url)[0]
    page.get_by_text("Auto-refresh").click(timeout=120_000)  # the sidebar may draw after the metrics
    page.wait_for_timeout(1000)
    first = metric(page, "Packets")
    page.wait_for_timeout(2500)
    if metric(page, "Packets") != first or page.get_by_role("switch", name="Auto-refresh").is_checked():
        raise SystemExit("could not turn the reader tab's auto-refresh off")
    return page


def rerun(page) -> tuple[int, int]:
    """Click "Refresh now", wait for the rerun to finish; (packets, dropped) as the page then shows them."""
    page.get_by_role("button", name="Refresh now").click()
    page.wait_for_timeout(300)
    page.wait_for_selector('[data-testid="stStatusWidget"]', state="hidden", timeout=120_000)
    return metric(page, "Packets"), metric(page, "Dropped")


def settled_counts(page) -> tuple[int, int]:
    """(packets, dropped) once two reruns a second apart agree: the engine has taken every packet."""
    last = None
    for _ in range(60):
        now = rerun(page)
        if now == last:
            return now
        last = now
        page.wait_for_timeout(1000)
    raise SystemExit("the page's count never settled")


def one_run(sender: str, rate: int, seconds: float, udp_port: int, reader) -> dict:
    """Send `rate` packets/s for `seconds`; what the dashboard counted, read from its own page."""
    before = settled_counts(reader)
    sent = int(subprocess.run([sender, str(udp_port), str(rate), str(seconds), str(PAYLOAD), "1"],
                              capture_output=True, text=True, check=True).stdout)
    after = settled_counts(reader)
    counted, dropped = after[0] - before[0], after[1] - before[1]
    return {"sent": sent, "counted": counted, "dropped": dropped, "loss": (sent - counted) / sent if sent else 1.0}


def held(run, rates: list[int], bisect: int) -> tuple[int, int | None]:
    """Climb `rates` until one loses more than 0.1 %; then bisect between held and missed. (held, missed)"""
    ok, bad = 0, None
    for rate in rates:
        if run(rate):
            ok = rate
        else:
            bad = rate
            break
    for _ in range(bisect if bad else 0):
        mid = (ok + bad) // 2
        if run(mid):
            ok = mid
        else:
            bad = mid
    return ok, bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", "--short", action="store_true", help="two low rates of 2 s; target not enforced")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--bisect", type=int, default=2, help="bisection steps between the held and missed rates")
    ap.add_argument("--tabs", type=int, default=None,
                    help=f"tabs besides the reader (default {TABS}; 2 with --quick)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("live capture needs root")
    if not os.path.exists(CHROMIUM):
        raise SystemExit("needs Debian's chromium (apt-get install chromium); never `playwright install`")
    from playwright.sync_api import sync_playwright

    # --quick: low rates that a loaded machine (CI) still sends on time; it checks counts, not speed.
    seconds, ladder, bisect = (2.0, QUICK_LADDER, 0) if args.quick else (args.seconds, LADDER, args.bisect)
    # --quick checks that the tool works (it is a CI test): two tabs show that each refreshes by itself.
    n_tabs = args.tabs if args.tabs is not None else (2 if args.quick else TABS)
    verdicts = Verdicts(enforce=not args.quick)
    print(f"machine: {machine()}")
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a bound port: no ICMP errors come back
    sink.bind(("127.0.0.1", 0))
    udp_port = sink.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp, dashboard(udp_port, Path(tmp) / "server.log") as url, \
            sync_playwright() as p:
        sender = build_sender(tmp)
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROME_ARGS)
        tabs: list = []

        def run(rate: int) -> bool:
            r = one_run(sender, rate, seconds, udp_port, reader)
            print(f"  {len(tabs)} tabs {rate:>9,}/s  sent {r['sent']:,} counted {r['counted']:,} "
                  f"dropped {r['dropped']:,}  loss {r['loss'] * 100:.3f} %", flush=True)
            return r["sent"] >= 0.98 * rate * seconds and r["loss"] <= LOSS_FREE

        reader = reader_tab(browser, url)  # its first run starts the shared capture
        print(f"none: {seconds:g} s per rate", flush=True)
        none, missed_none = held(run, ladder, bisect)
        tabs.extend(open_tabs(browser, url, n_tabs))
        print(f"  {pin_browser()} Chromium processes on core 1, niced to {NICE}", flush=True)
        print(f"{n_tabs} tabs refreshing every 2 s: {seconds:g} s per rate", flush=True)
        start = int(none * TARGET)
        six, missed_six = held(run, [start] + [r for r in ladder if r > start] if start else ladder[:1], bisect)
        final = settled_counts(reader)[0]
        tabs[-1].wait_for_timeout(2500)
        shown = [metric(t, "Packets") for t in tabs]
        browser.close()
    sink.close()
    ratio = six / none if none else 0.0
    top = " (the top of the ladder: no rate was missed)"
    print(f"\nhighest loss-free rate (<= 0.1 % loss): none {none:,}/s{top if missed_none is None else ''}, "
          f"{n_tabs} tabs {six:,}/s{top if missed_six is None else ''}, ratio {ratio:.2f}")
    verdicts.check("the dashboard held a rate with no tab open", none > 0, f"{none:,}/s", correctness=True)
    verdicts.check(f"all {n_tabs} tabs refreshed by themselves to the final count", set(shown) == {final},
                   f"{shown} vs {final:,}", correctness=True)
    verdicts.check(f"{n_tabs} tabs: loss-free rate >= {TARGET:.0%} of the rate with none", ratio >= TARGET,
                   f"{ratio:.2f}")
    return verdicts.exit_status()


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren...), from /proc."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        this = todo.pop()
        kids = [c for c, p in parent.items() if p == this]
        out += kids
        todo += kids
    return out


def pin_browser(nice: bool = True) -> int:
    """This run's Chromium processes niced on the second core, so they measure the server, not Chromium."""
    if (os.cpu_count() or 1) < 2:
        return 0
    pinned = 0
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"chrom" not in fh.read():
                    continue
            os.sched_setaffinity(pid, {1})
            if nice:
                os.setpriority(os.PRIO_PROCESS, pid, NICE)
            pinned += 1
        except OSError:
            continue  # a process that has just ended
    return pinned


if __name__ == "__main__":
    raise SystemExit(main())
