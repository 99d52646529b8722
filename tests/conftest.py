"""Shared fixtures: the project root on sys.path, the shared pcap corpus, root checks and test namespaces."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared"
PCAPS = SHARED / "pcaps"
IN_CI = os.environ.get("CI", "").lower() == "true"
VENV_PY = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PY) if VENV_PY.exists() else sys.executable


def need(condition: bool, reason: str) -> None:
    """Skip with a reason a user would accept, but never in CI, where everything must run."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_pcaps() -> Path:
    """The public capture corpus beside the project (../shared/pcaps)."""
    need((PCAPS / "files").is_dir(), f"the shared capture corpus is not beside this clone ({PCAPS})")
    return PCAPS


@pytest.fixture
def root_only() -> None:
    """Live capture needs root (or CAP_NET_RAW)."""
    need(os.geteuid() == 0, "live capture tests need root: run them with sudo")


def wait_for(pred, timeout: float = 5.0, step: float = 0.05) -> bool:
    """Poll pred until it holds or the time runs out; its last answer."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def run(cmd: list[str], ns: str | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a command, in network namespace `ns` when given."""
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


@dataclass
class VethNet:
    """A veth pair: `host_if` in the root namespace, its peer inside namespace `ns`."""

    ns: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str
    host_ip6: str
    ns_ip6: str
    prefix: str


def make_veth(tag: str) -> VethNet:
    """Create a namespace joined to the host by a veth pair, on a private /24 picked here."""
    need(os.geteuid() == 0 and shutil.which("ip") is not None, "namespace tests need root and iproute2")
    n = random.randint(2, 250)
    suffix = f"{os.getpid() % 10000}{tag}"
    net = VethNet(ns=f"ntm-{suffix}", host_if=f"ntmh{suffix}"[:15], ns_if=f"ntmn{suffix}"[:15],
                  host_ip=f"10.213.{n}.1", ns_ip=f"10.213.{n}.2",
                  host_ip6=f"fd00:213:{n}::1", ns_ip6=f"fd00:213:{n}::2", prefix=f"10.213.{n}.")
    run(["ip", "netns", "add", net.ns])
    run(["ip", "link", "add", net.host_if, "type", "veth", "peer", "name", net.ns_if])
    run(["ip", "link", "set", net.ns_if, "netns", net.ns])
    run(["ip", "addr", "add", f"{net.host_ip}/24", "dev", net.host_if])
    run(["ip", "-6", "addr", "add", f"{net.host_ip6}/64", "dev", net.host_if, "nodad"])
    run(["ip", "link", "set", net.host_if, "up"])
    run(["ip", "addr", "add", f"{net.ns_ip}/24", "dev", net.ns_if], ns=net.ns)
    run(["ip", "-6", "addr", "add", f"{net.ns_ip6}/64", "dev", net.ns_if, "nodad"], ns=net.ns)
    run(["ip", "link", "set", net.ns_if, "up"], ns=net.ns)
    run(["ip", "link", "set", "lo", "up"], ns=net.ns)
    time.sleep(0.3)
    return net


def remove_veth(net: VethNet) -> None:
    """Delete the pair and the namespace (deleting one end of a veth deletes both)."""
    run(["ip", "link", "del", net.host_if], check=False)
    run(["ip", "netns", "del", net.ns], check=False)


@pytest.fixture
def veth() -> Iterator[VethNet]:
    """A fresh namespace + veth pair for one test, always removed afterwards."""
    net = make_veth("a")
    try:
        yield net
    finally:
        remove_veth(net)


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests see the defaults, not the developer's NTM_* environment, and never write the real
    per-user history store (the dashboard records by default): its folder is a temporary one."""
    for key in list(os.environ):
        if key.startswith("NTM_"):
            monkeypatch.delenv(key)
    # Reverse DNS is on by default and asks the system's resolver, which is not on this machine's loopback:
    # tests send nothing beyond 127.0.0.0/8 and their namespaces, so an unset resolver is a loopback address
    # where nothing answers (lookups time out, in the background). Tests of names set their own (dnsmasq).
    monkeypatch.setenv("NTM_DNS_SERVER", "127.0.0.9")
    xdg = tmp_path_factory.getbasetemp() / "xdg-data"
    xdg.mkdir(exist_ok=True)
    xdg.chmod(0o1777)  # the dashboard, dropped to nobody, creates its store here
    monkeypatch.setenv("XDG_DATA_HOME", str(xdg))


@pytest.fixture(autouse=True)
def _tmp_open_to_the_dropped_user(tmp_path: Path) -> None:
    """Started as root, the dashboard gives up root for `nobody` (capture/broker.py) before it reads a file,
    as it would for the user who ran sudo, whose own files those are. pytest's folders are root's (0700):
    make the chain traversable and each test's folder writable (sticky, like /tmp) for that user."""
    if os.geteuid() != 0:
        return
    for folder in (tmp_path.parent.parent, tmp_path.parent):
        folder.chmod(0o755)
    tmp_path.chmod(0o1777)
