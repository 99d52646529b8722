"""What the adversarial benchmarks share: PASS/FAIL verdicts, tcpdump as the reference, a test namespace."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

log = logging.getLogger(__name__)


@dataclass
class Verdicts:
    """Targets checked by one benchmark run; exit status 1 when any enforced target is missed."""

    enforce: bool = True  # --quick runs report the targets but only correctness decides the exit status
    lines: list[tuple[str, bool, bool]] = field(default_factory=list)  # (text, passed, enforced)

    def check(self, what: str, passed: bool, detail: str = "", correctness: bool = False) -> bool:
        """Record and print one target as PASS or FAIL."""
        enforced = self.enforce or correctness
        tag = "PASS" if passed else ("FAIL" if enforced else "miss (quick mode: not enforced)")
        text = f"{tag:4}  {what}" + (f"  [{detail}]" if detail else "")
        self.lines.append((text, passed, enforced))
        print(text, flush=True)
        return passed

    def exit_status(self) -> int:
        """0 when every enforced target passed, else 1; prints the tally."""
        failed = [t for t, ok, enforced in self.lines if enforced and not ok]
        met = sum(ok for _, ok, _ in self.lines)
        print(f"\n{met} of {len(self.lines)} targets met; {len(failed)} enforced target(s) missed"
              + ("" if self.enforce else " (quick mode: speed targets are reported, not enforced)"), flush=True)
        return 1 if failed else 0


class Tcpdump:
    """tcpdump on the same interface and filter: the reference count (it skips lo's outgoing copies too)."""

    def __init__(self, iface: str, bpf: str, buffer_kib: int = 65536) -> None:
        # Not --immediate-mode: it hands over packets one by one and drops under a burst on a busy machine.
        self.proc = subprocess.Popen(["tcpdump", "-i", iface, "-n", "-B", str(buffer_kib), "-w", "/dev/null",
                                      bpf], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        if "listening on" not in line:
            raise SystemExit(f"tcpdump did not start: {line.strip()} {self.proc.stderr.read()}")

    def finish(self, settle: float = 1.5) -> tuple[int, int]:
        """(captured, dropped by kernel), after libpcap's 1 s buffer timeout has handed over the last block."""
        time.sleep(settle)
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        captured = dropped = 0
        for line in err.splitlines():
            if line.endswith("packets captured"):
                captured = int(line.split()[0])
            elif line.endswith("packets dropped by kernel"):
                dropped = int(line.split()[0])
        return captured, dropped

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def sh(cmd: list[str], ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command (in namespace `ns` when given), output captured."""
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


@dataclass
class Namespace:
    """A network namespace joined to the host by a veth pair on a private /24; delete() removes both."""

    ns: str
    host_if: str
    host_ip: str
    ns_ip: str

    @classmethod
    def create(cls, tag: str = "b") -> Namespace:
        n = random.randint(2, 250)
        suffix = f"{os.getpid() % 10000}{tag}"
        net = cls(f"ntmb-{suffix}", f"ntmbh{suffix}"[:15], f"10.214.{n}.1", f"10.214.{n}.2")
        peer = f"ntmbn{suffix}"[:15]
        try:
            sh(["ip", "netns", "add", net.ns])
            sh(["ip", "link", "add", net.host_if, "type", "veth", "peer", "name", peer])
            sh(["ip", "link", "set", peer, "netns", net.ns])
            sh(["ip", "addr", "add", f"{net.host_ip}/24", "dev", net.host_if])
            sh(["ip", "link", "set", net.host_if, "up"])
            sh(["ip", "addr", "add", f"{net.ns_ip}/24", "dev", peer], ns=net.ns)
            sh(["ip", "link", "set", peer, "up"], ns=net.ns)
            sh(["ip", "link", "set", "lo", "up"], ns=net.ns)
            # IPv6 off on the pair, so router solicitations and MLD reports do not join the count.
            for scope, ifname in ((None, net.host_if), (net.ns, peer)):
                sh(["sysctl", "-q", "-w", f"net.ipv6.conf.{ifname}.disable_ipv6=1"], ns=scope, check=False)
        except subprocess.CalledProcessError as exc:
            net.delete()
            raise SystemExit(f"could not create the test namespace: {exc.stderr}") from exc
        time.sleep(0.3)
        return net

    def delete(self) -> None:
        sh(["ip", "link", "del", self.host_if], check=False)
        sh(["ip", "netns", "del", self.ns], check=False)


def machine() -> str:
    """nproc, the CPU model and the load, for the figures' context."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
        with open("/proc/loadavg") as fh:
            load = fh.read().split()[:3]
    except OSError:
        load = ["?"] * 3
    return f"{os.cpu_count()} cores, {model}, load {' '.join(load)}"
