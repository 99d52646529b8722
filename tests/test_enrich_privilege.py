"""By process after the real privilege drop: started as root, the engine gives up root (user nobody, as the
dashboard does) and psutil then lists other users' sockets without a PID. Those ports are said plainly to be
owned by processes this unprivileged process cannot see, never 'unknown' (closed or another namespace)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time

import pytest
from conftest import ROOT
from test_enrich_process import _free_port
from test_privilege import NOBODY_UID, root_env, venv  # noqa: F401  - the venv user nobody can run

pytestmark = pytest.mark.live

DRIVER = """
import json, os, sys, time
from capture import broker
print(broker.separate().text, file=sys.stderr)
from packet_processor import CaptureEngine, Source
from enrich.processes import shared_table
from enrich_page import owners_note
port = int(sys.argv[1])
engine = CaptureEngine()
assert engine.start(Source("live", iface="lo", bpf="tcp port %d" % port)), engine.status().error
print("ready", flush=True)
sys.stdin.readline()
time.sleep(0.5)
def settled():
    rows = engine.snapshot().totals["by_process"] or []
    return rows and not any(r["process"] == "not named yet" for r in rows)
end = time.monotonic() + 15
while not settled() and time.monotonic() < end:
    time.sleep(0.2)
snap = engine.snapshot()
engine.stop()
t = shared_table()
print(json.dumps({"uid": os.getuid(), "packets": snap.totals["packets"], "rows": snap.totals["by_process"],
                  "label": t.label("tcp", port), "note": owners_note(t)}), flush=True)
"""


def test_by_process_after_the_drop_says_which_owners_it_cannot_see(root_only, venv):  # noqa: F811
    """Root's server and client talk on lo; the dropped engine counts their packets once, under the 'not visible'
    label, and the page's note says how many ports it cannot name and why."""
    port = _free_port()
    proc = subprocess.Popen([str(venv / "bin" / "python3"), "-c", DRIVER, str(port)], cwd=ROOT, env=root_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    srv = socket.socket()  # root's sockets: user nobody cannot read this process's fd table
    try:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen()
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        cli = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        for _ in range(10):
            cli.sendall(b"x" * 100)
            time.sleep(0.05)
        time.sleep(2.5)  # the socket table (re-read every second) lists the connection while it is open
        cli.close()
        conn.close()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        srv.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    got = json.loads(out)
    assert got["uid"] == NOBODY_UID, err  # the drop really happened
    names = {r["process"]: r for r in got["rows"]}
    from enrich.processes import HIDDEN
    assert "unknown" not in names, names
    # Both ends are root's: each packet once, under the one label (the capture's own total is the reference).
    assert set(names) == {HIDDEN} and names[HIDDEN]["packets"] == got["packets"] > 20, (names, got["packets"])
    assert got["label"] == HIDDEN
    assert "ports owned by processes this unprivileged process cannot see" in got["note"], got["note"]
    # From /proc/net, no privilege needed; root among the users (others' sockets, e.g. an earlier test's process
    # still running as nobody, may be listed before it).
    assert re.search(r"their sockets belong to [^.]*\broot \(\d+\)", got["note"]), got["note"]
    assert "it runs as nobody" in got["note"] and "set RUN_AS_USER to the user who owns them" in got["note"]

