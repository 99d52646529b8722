"""Least privilege: with scripts/grant_capture.sh, an unprivileged user captures on lo; without it, a clear error."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PYTHON, ROOT, need

pytestmark = pytest.mark.live

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
DRIVER = """
import json, os, sys, time
from packet_processor import CaptureEngine, Source
caps = next(l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff:"))
engine = CaptureEngine()
ok = engine.start(Source("live", iface="lo", bpf="udp dst port " + sys.argv[1]))
print(json.dumps({"uid": os.getuid(), "caps": caps, "ok": ok, "error": engine.status().error}), flush=True)
if ok:
    sys.stdin.readline()
    time.sleep(0.3)
    engine.stop()
    t = engine.snapshot().totals
    print(json.dumps({"packets": t["packets"], "dropped": t["dropped"]}), flush=True)
"""


def fake_venv(base: Path, name: str) -> Path:
    """A venv like the project's (same interpreter, same site-packages) that an unprivileged user can read."""
    venv = base / name
    (venv / "bin").mkdir(parents=True)
    real = os.path.realpath(PYTHON)
    os.symlink(real, venv / "bin" / "python3")
    site = subprocess.run([PYTHON, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                          text=True, check=True).stdout.strip()
    lib = venv / "lib" / Path(site).parent.name
    lib.mkdir(parents=True)
    os.symlink(site, lib / "site-packages")
    cfg = (ROOT / ".venv" / "pyvenv.cfg").read_text() if (ROOT / ".venv" / "pyvenv.cfg").exists() else ""
    home = next((line.split("=", 1)[1].strip() for line in cfg.splitlines() if line.startswith("home")),
                str(Path(real).parent))
    (venv / "pyvenv.cfg").write_text(f"home = {home}\ninclude-system-site-packages = false\n")
    return venv


@pytest.fixture
def world_readable() -> Iterator[Path]:
    """A folder under /tmp that user nobody can read: the project's modules and two venvs go there."""
    base = Path(tempfile.mkdtemp(prefix="ntm-priv-", dir="/tmp"))
    try:
        base.chmod(0o755)
        (base / "app").mkdir()
        for module in ROOT.glob("*.py"):
            shutil.copy(module, base / "app")
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def capture_as_nobody(venv: Path, app: Path, port: int, packets: int) -> tuple[dict, dict | None]:
    """Run the engine as user nobody with this venv's python; send `packets` datagrams while it captures."""
    proc = subprocess.Popen([*NOBODY, str(venv / "bin" / "python3"), "-c", DRIVER, str(port)], cwd=app,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"PATH": os.environ["PATH"], "HOME": str(app), "PYTHONDONTWRITEBYTECODE": "1",
                                 "PYTHONPATH": str(app)})
    try:
        first = json.loads(proc.stdout.readline() or "{}")
        if not first.get("ok"):
            proc.communicate(timeout=30)
            return first, None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for i in range(packets):
                tx.sendto(b"%d" % i, ("127.0.0.1", port))
        out, _ = proc.communicate("done\n", timeout=30)
        return first, json.loads(out.strip().splitlines()[-1])
    finally:
        if proc.poll() is None:
            proc.kill()


def test_capability_lets_an_unprivileged_user_capture(root_only, world_readable):
    need(all(shutil.which(t) for t in ("setcap", "getcap", "setpriv")), "needs setcap/getcap (libcap2-bin) and "
         "setpriv (util-linux)")
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a bound port: no ICMP errors come back
    sink.bind(("127.0.0.1", 0))
    port = sink.getsockname()[1]
    app = world_readable / "app"
    try:
        # Without the capability: user nobody gets the clear message, naming the fix.
        plain = fake_venv(world_readable, "plain")
        first, _ = capture_as_nobody(plain, app, port, 0)
        assert first["uid"] == 65534 and int(first["caps"], 16) == 0
        assert not first["ok"] and "CAP_NET_RAW" in first["error"] and "setcap" in first["error"]

        # With it (granted by the script the README gives): the same user captures every packet.
        granted = fake_venv(world_readable, "granted")
        out = subprocess.run([str(ROOT / "scripts" / "grant_capture.sh"), str(granted)], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert not (granted / "bin" / "python3").is_symlink()  # its own copy, not the shared interpreter
        caps = subprocess.run(["getcap", os.path.realpath(PYTHON)], capture_output=True, text=True).stdout
        assert "cap_net_raw" not in caps  # the shared interpreter was left alone
        first, totals = capture_as_nobody(granted, app, port, 200)
        assert first["uid"] == 65534 and first["ok"], first
        assert int(first["caps"], 16) & (1 << 13)  # CAP_NET_RAW, from the file capability
        assert totals == {"packets": 200, "dropped": 0}
    finally:
        sink.close()
