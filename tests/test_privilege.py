"""Least privilege, checked from /proc: started as root, the page and the CLI give up root while capture works; only
a small broker holds CAP_NET_RAW; CAP_NET_RAW alone is enough for capture, promiscuous mode included."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PYTHON, ROOT, need, wait_for
from test_browser import open_page

from capture import broker

pytestmark = pytest.mark.live

NOBODY_UID = 65534
CAP_NET_RAW = 1 << 13
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
ONLY_NET_RAW = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all,+net_raw",
                "--ambient-caps=-all,+net_raw", "--bounding-set=-all,+net_raw"]
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
# Every step of a promiscuous TPACKET_V3 capture after socket(): filter, ring, bind, promiscuous membership.
PROMISC = """
import os, socket, struct, sys
from capture import broker
from capture.sources import _attach
if sys.argv[2] == "broker":
    print(broker.separate().text, file=sys.stderr)
try:
    s = broker.packet_socket(socket.SOCK_RAW, sys.argv[1])
except PermissionError as exc:
    print("socket: " + str(exc), flush=True)
    sys.exit(0)
_attach(s, [(0x06, 0, 0, 0xFFFF)])  # SO_ATTACH_FILTER: accept, 65535 bytes
s.setsockopt(263, 10, 2)  # PACKET_VERSION: TPACKET_V3
s.setsockopt(263, 5, struct.pack("=IIIIIII", 1 << 16, 4, 2048, (1 << 18) // 2048, 50, 0, 0))  # PACKET_RX_RING
s.bind((sys.argv[1], 3))  # ETH_P_ALL
mreq = struct.pack("=iHH8s", socket.if_nametoindex(sys.argv[1]), 1, 0, b"")  # PACKET_MR_PROMISC
s.setsockopt(263, 1, mreq)  # PACKET_ADD_MEMBERSHIP
caps = next(l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff:"))
print("promiscuous uid=%d caps=%s" % (os.getuid(), caps), flush=True)
sys.stdin.readline()
s.close()
"""


# -------------------------------------------------------------------------------------------------
# An interpreter and a venv that user nobody can run
# -------------------------------------------------------------------------------------------------


def readable_python() -> str:
    """The venv's interpreter when user nobody can run it, else the system's of the same version.

    A pyenv build under /root (mode 700) cannot be read by anyone else: after the drop the process
    could not import the rest of the standard library. The same minor version shares site-packages."""
    real = os.path.realpath(PYTHON)
    stdlib = subprocess.run([PYTHON, "-c", "import os; print(os.path.dirname(os.__file__))"], capture_output=True,
                            text=True, check=True).stdout.strip()
    if not broker.unreadable([real, stdlib], NOBODY_UID, NOBODY_UID):
        return real
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    need(os.path.exists(system) and not broker.unreadable([system], NOBODY_UID, NOBODY_UID),
         f"no interpreter user nobody can read: {real} is not readable and there is no {system}")
    return system


def fake_venv(base: Path, name: str) -> Path:
    """A venv like the project's (same site-packages) whose interpreter user nobody can run."""
    venv = base / name
    (venv / "bin").mkdir(parents=True)
    real = readable_python()
    os.symlink(real, venv / "bin" / "python3")
    site = subprocess.run([PYTHON, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                          text=True, check=True).stdout.strip()
    lib = venv / "lib" / Path(site).parent.name
    lib.mkdir(parents=True)
    os.symlink(site, lib / "site-packages")
    (venv / "pyvenv.cfg").write_text(f"home = {Path(real).parent}\ninclude-system-site-packages = false\n")
    for path in (venv, *venv.rglob("*")):
        if not path.is_symlink():
            path.chmod(0o755)
    return venv


@pytest.fixture
def world_readable() -> Iterator[Path]:
    """A folder under /tmp that user nobody can read: the project's modules and packages, and venvs, go there."""
    base = Path(tempfile.mkdtemp(prefix="ntm-priv-", dir="/tmp"))
    try:
        base.chmod(0o755)
        (base / "app").mkdir()
        for module in ROOT.glob("*.py"):
            shutil.copy(module, base / "app")
        for package in ROOT.iterdir():
            if (package / "__init__.py").exists() and package.name != "tests":
                shutil.copytree(package, base / "app" / package.name, ignore=shutil.ignore_patterns("__pycache__"))
        for path in (base / "app").rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def venv(tmp_path_factory) -> Iterator[Path]:
    """A venv user nobody can run, for processes started as root that then drop to nobody."""
    base = Path(tempfile.mkdtemp(prefix="ntm-venv-", dir="/tmp"))
    try:
        base.chmod(0o755)
        yield fake_venv(base, "venv")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def root_env(**extra: str) -> dict[str, str]:
    """A root environment without sudo's variables, so the drop goes to user nobody."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUDO_", "NTM_"))}
    return {**env, "PYTHONDONTWRITEBYTECODE": "1", **extra}


# -------------------------------------------------------------------------------------------------
# /proc
# -------------------------------------------------------------------------------------------------


def brokers(pid: int) -> list[int]:
    """The capture helpers (capture/broker.py) among pid's children; the detector worker is another child."""
    out = []
    for kid in children(pid):
        try:
            if "capture/broker.py" in Path(f"/proc/{kid}/cmdline").read_text(errors="replace"):
                out.append(kid)
        except OSError:
            continue
    return out


def children(pid: int) -> list[int]:
    """The processes whose parent is pid."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def packet_inodes(running: bool = False) -> set[int]:
    """Inodes of the AF_PACKET sockets on the machine (/proc/net/packet); `running`: bound and receiving."""
    rows = [line.split() for line in Path("/proc/net/packet").read_text().splitlines()[1:]]
    # columns: sk RefCnt Type Proto Iface R Rmem User Inode
    return {int(r[-1]) for r in rows if r and (not running or (r[5] == "1" and int(r[3], 16) != 0))}


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process pid holds open."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def assert_unprivileged(pid: int, uid: int = NOBODY_UID) -> dict[int, broker.Creds]:
    """Every thread of pid: the unprivileged user, no groups, no capability, no_new_privs."""
    creds = broker.thread_creds(pid)
    assert len(creds) >= 1
    for tid, c in creds.items():
        assert set(c.uids) == {uid} and set(c.gids) == {uid}, (tid, c)
        assert c.groups == (), (tid, c)
        assert (c.cap_prm, c.cap_eff, c.cap_inh, c.cap_amb) == (0, 0, 0, 0), (tid, c)
        assert c.no_new_privs == 1, (tid, c)
    return creds


def the_broker(pid: int, uid: int = NOBODY_UID) -> int:
    """The one child of pid, which must be the broker: user `uid` with CAP_NET_RAW only, no capture socket."""
    kids = brokers(pid)
    assert len(kids) == 1, children(pid)
    c = broker.read_creds(f"/proc/{kids[0]}/status")
    assert set(c.uids) == {uid} and set(c.gids) == {uid} and c.groups == ()
    assert c.cap_prm == c.cap_eff == c.cap_bnd == CAP_NET_RAW and c.cap_inh == c.cap_amb == 0
    assert c.no_new_privs == 1
    assert not socket_inodes(kids[0]) & packet_inodes(), "the broker kept a capture socket"
    return kids[0]


def send_udp(port: int, count: int, host: str = "127.0.0.1") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for i in range(count):
            tx.sendto(b"%d" % i, (host, port))


@pytest.fixture
def udp_port() -> Iterator[int]:
    """A bound UDP port on 127.0.0.1 (no ICMP errors come back), distinctive for the filters of one test."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    yield sink.getsockname()[1]
    sink.close()


def promiscuity(iface: str) -> int:
    """The interface's promiscuity count, as `ip -d link show` reports it."""
    words = subprocess.run(["ip", "-d", "link", "show", iface], capture_output=True, text=True,
                           check=True).stdout.split()
    return int(words[words.index("promiscuity") + 1])


# -------------------------------------------------------------------------------------------------
# The broker on its own
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("request_bytes", [
    b"open raw ../../etc", b"open raw " + b"a" * 16, b"open raw lo lo", b"open tcp lo", b"exec /bin/sh x",
    b"open raw ntm-no-such-if", b"open raw", b"\xff\xfe\xfd", b"open raw lo\n", b"", b"open raw " + b"x" * 80,
])
def test_broker_refuses_anything_but_an_existing_interface(request_bytes):
    with pytest.raises(ValueError):
        broker.check_request(request_bytes)


def test_broker_accepts_interface_names_and_any():
    assert broker.check_request(b"open raw lo") == (socket.SOCK_RAW, "lo")
    assert broker.check_request(b"open dgram any") == (socket.SOCK_DGRAM, "any")


BROKER_DRIVER = """
import json, os, socket, sys, time
from capture import broker
b = broker.start_broker(65534, 65534)
answers = []
for req in (b"open raw ../../etc", b"open raw ntm-no-such-if", b"exec /bin/sh x", b"\\xff" * 70):
    b._conn.send(req)
    msg, fds, _, _ = socket.recv_fds(b._conn, 512, 4)
    answers.append([msg.decode(errors="replace"), len(fds)])
s = b.open(socket.SOCK_RAW, "lo")
info = {"answers": answers, "family": s.family, "type": s.type, "proto": s.proto, "broker": b.proc.pid}
print(json.dumps(info), flush=True)
s.close()
time.sleep(60)
"""


def test_broker_answers_only_valid_requests_holds_only_net_raw_and_exits_with_its_parent(root_only, venv):
    proc = subprocess.Popen([str(venv / "bin" / "python3"), "-c", BROKER_DRIVER], cwd=ROOT, env=root_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline() or "{}")
        assert info, proc.stderr.read() if proc.poll() is not None else "no answer"
        for msg, nfds in info["answers"]:
            assert msg.startswith("err 22 ") and nfds == 0, info  # EINVAL, and no descriptor
        assert (info["family"], info["type"]) == (socket.AF_PACKET, socket.SOCK_RAW)
        pid = info["broker"]
        assert wait_for(lambda: the_broker(proc.pid) == pid, 5)
        # Its parent dies without a word (SIGKILL): the broker sees end-of-file and leaves.
        proc.kill()
        proc.wait(5)
        assert wait_for(lambda: not Path(f"/proc/{pid}").exists() or
                        Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z", 3)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("request_bytes", [
    b"compile 262144 lo", b"compile 262144 lo ", b"compile 0 lo udp", b"compile 999999 lo udp",
    b"compile x lo udp", b"compile 262144 any vlan", b"compile 262144 ../x udp", b"compile 262144 ntm-no-such-if udp",
    b"compile 262144 lo udp\x00port 1", b"compile 262144 lo \xff", b"compile 96 lo " + b"udp or " * 700 + b"udp",
])
def test_broker_refuses_compile_requests_it_must_not_serve(request_bytes):
    with pytest.raises(ValueError):
        broker.check_compile(request_bytes)


def test_broker_accepts_compile_requests():
    assert broker.check_compile(b"compile 96 lo vlan 100 and udp") == (96, "lo", "vlan 100 and udp")
    longest = "udp or " * 584 + "udp"  # 4091 bytes: under the bound
    assert broker.check_compile(f"compile 262144 lo {longest}".encode())[2] == longest


COMPILE_DRIVER = """
import json, socket, sys
from capture import broker
b = broker.start_broker(65534, 65534)
out = {}
for name, expr, iface in (("vlan", "vlan 100", "lo"), ("bad", "udp port", "lo"),
                          ("long", "udp or " * 700 + "udp", "lo"), ("noif", "udp", "ntm-no-such-if"),
                          ("any", "udp", "any")):
    try:
        out[name] = [len(b.compile(expr, iface, 262144)), b.compile(expr, iface, 262144)]
    except broker.CompileError as exc:
        out[name] = ["err", str(exc), exc.denied]
print(json.dumps(out), flush=True)
"""


def test_broker_compiles_filters_on_a_live_handle(root_only, venv):
    """The broker (user nobody, CAP_NET_RAW only) compiles `vlan 100` on a live handle, as tcpdump -d does: the
    VLAN test reads the kernel's metadata (15 instructions), not 0x8100 at byte 12 (a dead handle's 9)."""
    tcpdump = shutil.which("tcpdump")
    need(tcpdump is not None, "compares with tcpdump -dd (apt-get install tcpdump)")
    proc = subprocess.run([str(venv / "bin" / "python3"), "-c", COMPILE_DRIVER], cwd=ROOT, env=root_env(),
                          capture_output=True, text=True, timeout=30)
    out = json.loads(proc.stdout or "{}")
    assert out, proc.stderr
    dd = subprocess.run([tcpdump, "-i", "lo", "-dd", "vlan 100"], capture_output=True, text=True, check=True).stdout
    expected = [[int(v, 0) for v in re.findall(r"0x[0-9a-f]+|\d+", line)] for line in dd.splitlines() if "{" in line]
    assert out["vlan"][1] == expected and out["vlan"][0] == 15, (out["vlan"], dd)
    assert out["bad"][0] == "err" and "syntax error" in out["bad"][1] and not out["bad"][2]
    assert out["long"][0] == "err" and "too long" in out["long"][1]
    assert out["noif"][0] == "err" and "no interface 'ntm-no-such-if'" in out["noif"][1]
    assert out["any"][0] == "err" and "not an interface name: 'any'" in out["any"][1]


UNPRIVILEGED_COMPILE = """
from capture.sources import LINKTYPE_COOKED, LINKTYPE_ETHERNET, CaptureError, compile_bpf, validate_bpf
try:
    print("compiled", len(compile_bpf("vlan 100", LINKTYPE_ETHERNET, 262144, "lo")))
except CaptureError as exc:
    print("error", exc)
print("validate", validate_bpf("vlan 100", "lo"), len(compile_bpf("udp", LINKTYPE_COOKED, 262144, "any")))
"""


def test_without_privilege_an_ethernet_filter_is_refused_not_compiled_blind(root_only, venv, world_readable):
    """No helper and no CAP_NET_RAW: no dead handle's `vlan 100` (9 instructions looking for 0x8100 in the frame,
    where the kernel no longer leaves it), but an error naming the fix; syntax checks and `any` need no privilege."""
    proc = subprocess.run([*NOBODY, str(venv / "bin" / "python3"), "-c", UNPRIVILEGED_COMPILE],
                          cwd=world_readable / "app", capture_output=True, text=True, timeout=30,
                          env={"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1"})
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("error cannot compile the filter for 'lo'") and "CAP_NET_RAW" in lines[0], lines
    assert lines[1].split()[:2] == ["validate", "None"] and int(lines[1].split()[2]) > 0, lines


# -------------------------------------------------------------------------------------------------
# The capture CLI and the engine, started as root
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("env", "uid", "name"), [
    ({}, NOBODY_UID, "nobody"),  # root, not through sudo
    ({"SUDO_UID": "4242", "SUDO_GID": "4242", "SUDO_USER": "operator"}, 4242, "operator"),  # through sudo
    ({"SUDO_UID": "4242", "SUDO_GID": "4242", "NTM_RUN_AS_USER": "4343"}, 4343, "4343"),  # the setting wins
])
def test_cli_capture_as_root_gives_up_root_and_captures_every_packet(root_only, venv, udp_port, env, uid, name):
    cmd = [str(venv / "bin" / "python3"), "packet_processor.py", "capture", "--iface", "lo", "--filter",
           f"udp dst port {udp_port}", "--seconds", "6"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=root_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert wait_for(lambda: broker.read_creds(f"/proc/{proc.pid}/status").uids[0] == uid, 20)
        assert wait_for(lambda: bool(socket_inodes(proc.pid) & packet_inodes(running=True)), 10), "no capture socket"
        creds = assert_unprivileged(proc.pid, uid)
        assert creds[proc.pid].cap_bnd == 0  # the CLI drops from its main thread: its bounding set is empty too
        the_broker(proc.pid, uid)
        send_udp(udp_port, 300)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = json.loads(out)
    assert (summary["packets"], summary["dropped"], summary["error"]) == (300, 0, None), err
    assert f"running as {name} (uid {uid})" in err and "opened a raw packet socket for lo" in err


ENGINE_DRIVER = """
import json, os, socket, sys, time
from capture import broker
from packet_processor import CaptureEngine, Source
print(broker.separate().text, file=sys.stderr)
port, other, other_dst, rounds = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
engine = CaptureEngine()
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
counts = []
def mine():
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            t = os.readlink("/proc/self/fd/" + fd)
        except OSError:
            continue
        if t.startswith("socket:["):
            fds.add(int(t[8:-1]))
    packet = {int(l.split()[-1]) for l in open("/proc/net/packet").read().splitlines()[1:]}
    return len(fds & packet)
for i in range(rounds):
    for iface, dst in (("lo", "127.0.0.1"), (other, other_dst)):
        assert engine.start(Source("live", iface=iface, bpf=f"udp dst port {port}")), engine.status().error
        time.sleep(0.2)
        for k in range(25):
            tx.sendto(b"x", (dst, port))
        time.sleep(0.4)
        held = mine()
        engine.stop()
        t = engine.snapshot().totals
        counts.append([iface, t["packets"], t["dropped"], held])
print(json.dumps({"uid": os.getuid(), "counts": counts, "open_after": mine()}), flush=True)
"""


def test_engine_after_the_drop_starts_and_stops_on_several_interfaces(root_only, venv, udp_port, veth):
    rounds = 5
    proc = subprocess.run([str(venv / "bin" / "python3"), "-c", ENGINE_DRIVER, str(udp_port), veth.host_if,
                           veth.ns_ip, str(rounds)], cwd=ROOT, env=root_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["uid"] == NOBODY_UID
    # Each Start gets a new socket from the broker; each capture saw its 25 datagrams, and held one socket.
    assert out["counts"] == [[iface, 25, 0, 1] for _ in range(rounds) for iface in ("lo", veth.host_if)], out
    assert out["open_after"] == 0  # Stop closed every one of them
    assert proc.stderr.count("opened a raw packet socket") == 2 * rounds


def test_unreadable_paths_are_found_by_mode_bits(world_readable):
    closed = world_readable / "closed"
    (closed / "inner").mkdir(parents=True)
    closed.chmod(0o700)
    assert broker.unreadable([str(closed / "inner")], NOBODY_UID, NOBODY_UID) == [str(closed / "inner")]
    closed.chmod(0o711)  # search is enough for the folders above
    (closed / "inner").chmod(0o755)
    assert broker.unreadable([str(closed / "inner")], NOBODY_UID, NOBODY_UID) == []
    (closed / "inner").chmod(0o750)
    assert broker.unreadable([str(closed / "inner")], NOBODY_UID, NOBODY_UID) == [str(closed / "inner")]
    assert broker.unreadable([str(closed / "inner")], 0, 0) == []  # root owns it


def test_an_install_the_user_cannot_read_keeps_root_and_says_so(root_only, venv, world_readable, udp_port):
    """Rather than fail with an ImportError in the middle of a capture, nothing changes and the log says why."""
    world_readable.chmod(0o700)  # the project copy is now out of nobody's reach
    app = world_readable / "app"
    proc = subprocess.Popen([str(venv / "bin" / "python3"), "packet_processor.py", "capture", "--iface", "lo",
                             "--filter", f"udp dst port {udp_port}", "--seconds", "3"], cwd=app, env=root_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: bool(socket_inodes(proc.pid) & packet_inodes(running=True)), 15)
        assert broker.read_creds(f"/proc/{proc.pid}/status").uids[0] == 0 and not brokers(proc.pid)
        send_udp(udp_port, 50)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert f"still running as root: user nobody could not read {app}" in err, err
    assert json.loads(out)["packets"] == 50


EXEC_DRIVER = """
import json, subprocess, sys, threading
from capture import broker
probe = [sys.argv[1], "-c", "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')))"]
go, out = threading.Event(), {}
def caps():
    try:
        return subprocess.run(probe, capture_output=True, text=True).stdout.strip()
    except PermissionError:  # the kernel refuses a capability-marked program it may not give its capability
        return "refused"
def older():  # a thread that existed before the drop, like Streamlit's server threads
    go.wait()
    out["older"] = caps()
t = threading.Thread(target=older)
t.start()
print(broker.separate().text, file=sys.stderr)
go.set()
t.join()
out["dropper"] = caps()
print(json.dumps(out))
"""


def test_no_thread_gets_a_privilege_back_through_a_file_capability(root_only, venv, world_readable):
    """no_new_privs in every thread: a program carrying a file capability gives it to no child."""
    need(shutil.which("setcap") is not None, "needs setcap (libcap2-bin)")
    capped = world_readable / "capped-python"
    shutil.copy(os.path.realpath(venv / "bin" / "python3"), capped)
    subprocess.run(["setcap", "cap_net_raw+eip", str(capped)], check=True)
    control = subprocess.run([*NOBODY, str(capped), "-c", "print(next(l.split()[1] for l in "
                              "open('/proc/self/status') if l.startswith('CapEff')))"], capture_output=True,
                             text=True, check=True, cwd="/")
    assert int(control.stdout, 16) == CAP_NET_RAW  # without no_new_privs, nobody gets it from the file
    proc = subprocess.run([str(venv / "bin" / "python3"), "-c", EXEC_DRIVER, str(capped)], cwd=ROOT,
                          env=root_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # With no_new_privs the kernel grants nothing from the file. The thread that dropped has an empty
    # bounding set too, so the kernel refuses the program outright (its file says the capability is
    # needed); an older thread's child runs, without it.
    out = json.loads(proc.stdout)
    assert out == {"older": "0" * 16, "dropper": "refused"}, (out, proc.stderr)


# -------------------------------------------------------------------------------------------------
# Promiscuous mode: CAP_NET_RAW is the only privilege it takes
# -------------------------------------------------------------------------------------------------


def _promisc_run(cmd: list[str], iface: str) -> tuple[str, int, int]:
    """Run the PROMISC script: (its first line, promiscuity while it holds the socket, after it closed it)."""
    proc = subprocess.Popen([*cmd, "-c", PROMISC, iface, "direct"], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=root_env())
    try:
        first = proc.stdout.readline().strip()
        during = promiscuity(iface)
        _, err = proc.communicate("go\n", timeout=20)
        return first or err, during, promiscuity(iface)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_promiscuous_capture_needs_cap_net_raw_and_nothing_else(root_only, venv, veth):
    need(shutil.which("setpriv") is not None, "needs setpriv (util-linux)")
    py = str(venv / "bin" / "python3")
    assert promiscuity(veth.host_if) == 0
    # User nobody with no capability: the socket is refused.
    first, during, _ = _promisc_run([*NOBODY, py], veth.host_if)
    assert first.startswith("socket:") and "Operation not permitted" in first, first
    assert during == 0
    # User nobody with CAP_NET_RAW only (no CAP_NET_ADMIN): filter, ring, bind and promiscuous mode all work.
    first, during, after = _promisc_run([*ONLY_NET_RAW, py], veth.host_if)
    assert first == f"promiscuous uid={NOBODY_UID} caps={CAP_NET_RAW:016x}", first
    assert (during, after) == (1, 0)  # the kernel undoes the membership when the socket closes


def test_promiscuous_mode_works_on_a_socket_from_the_broker(root_only, venv, veth):
    """Root started, dropped to nobody without any capability: the broker's socket still goes promiscuous."""
    proc = subprocess.Popen([str(venv / "bin" / "python3"), "-c", PROMISC, veth.host_if, "broker"], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=root_env())
    try:
        first = proc.stdout.readline().strip()
        assert first == f"promiscuous uid={NOBODY_UID} caps={0:016x}", first or proc.stderr.read()
        assert promiscuity(veth.host_if) == 1
        assert_unprivileged(proc.pid)
        proc.communicate("go\n", timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert promiscuity(veth.host_if) == 0


# -------------------------------------------------------------------------------------------------
# scripts/grant_capture.sh: capture without root at all
# -------------------------------------------------------------------------------------------------


def capture_as_nobody(venv: Path, app: Path, port: int, packets: int) -> tuple[dict, dict | None]:
    """Run the engine as user nobody with this venv's python; send `packets` datagrams while it captures."""
    proc = subprocess.Popen([*NOBODY, str(venv / "bin" / "python3"), "-c", DRIVER, str(port)], cwd=app,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"PATH": os.environ["PATH"], "HOME": str(app), "PYTHONDONTWRITEBYTECODE": "1",
                                 "PYTHONPATH": str(app)})
    try:
        first = json.loads(proc.stdout.readline() or "{}")
        if not first.get("ok"):
            _, err = proc.communicate(timeout=30)
            return first or {"stderr": err}, None
        send_udp(port, packets)
        out, _ = proc.communicate("done\n", timeout=30)
        return first, json.loads(out.strip().splitlines()[-1])
    finally:
        if proc.poll() is None:
            proc.kill()


def test_capability_lets_an_unprivileged_user_capture(root_only, world_readable, udp_port):
    need(all(shutil.which(t) for t in ("setcap", "getcap", "setpriv")), "needs setcap/getcap (libcap2-bin) and "
         "setpriv (util-linux)")
    app = world_readable / "app"
    # Without the capability: user nobody gets the clear message, naming the fix.
    plain = fake_venv(world_readable, "plain")
    first, _ = capture_as_nobody(plain, app, udp_port, 0)
    assert first.get("uid") == NOBODY_UID and int(first["caps"], 16) == 0, first
    assert not first["ok"] and "CAP_NET_RAW" in first["error"] and "setcap" in first["error"]

    # With it (granted by the script the README gives): the same user captures every packet.
    granted = fake_venv(world_readable, "granted")
    shared = os.path.realpath(granted / "bin" / "python3")
    out = subprocess.run([str(ROOT / "scripts" / "grant_capture.sh"), str(granted)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not (granted / "bin" / "python3").is_symlink()  # its own copy, not the shared interpreter
    caps = subprocess.run(["getcap", str(granted / "bin" / "python3")], capture_output=True, text=True).stdout
    assert caps.split()[-1] == "cap_net_raw=eip", caps  # CAP_NET_RAW and no other privilege
    for interpreter in {shared, os.path.realpath(PYTHON)}:  # the shared interpreters were left alone
        assert "cap_net" not in subprocess.run(["getcap", interpreter], capture_output=True, text=True).stdout
    first, totals = capture_as_nobody(granted, app, udp_port, 200)
    assert first["uid"] == NOBODY_UID and first["ok"], first
    # Not root: no broker, and the process keeps its one capability (see README, Privileges).
    assert int(first["caps"], 16) == CAP_NET_RAW
    assert totals == {"packets": 200, "dropped": 0}


# -------------------------------------------------------------------------------------------------
# The page, started as root with `streamlit run`
# -------------------------------------------------------------------------------------------------


def metric(page, label: str) -> int:
    value = page.locator('[data-testid="stMetric"]', has_text=label).first
    return int(value.locator('[data-testid="stMetricValue"]').inner_text().replace(",", ""))


def status(page) -> str:
    value = page.locator('[data-testid="stMetric"]', has_text="Status").first
    return value.locator('[data-testid="stMetricValue"]').inner_text().strip()


def status_source(page) -> str:
    """The health line under the metrics, which names the capture's source."""
    return " ".join(page.locator('[data-testid="stCaptionContainer"]').all_inner_texts())


def press(sidebar, name: str, done, tries: int = 3) -> None:
    """Click a sidebar button until `done()` holds: a click that lands while an auto-refresh rerun is
    starting can be lost by the browser side (seen under load), which is not what this test is about."""
    for _ in range(tries):
        sidebar.get_by_role("button", name=name).click()
        if wait_for(done, 8):
            return
    pytest.fail(f"{name} did not take effect after {tries} clicks")


def _healthy(port: int) -> bool:
    """Streamlit's own health check answers."""
    import urllib.request

    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status == 200
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, wait, then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def pick_interface(page, name: str) -> None:
    box = page.locator('[data-testid="stSelectbox"]', has_text="Interface").first
    for _ in range(3):
        box.click()
        page.keyboard.type(name)
        page.keyboard.press("Enter")
        if wait_for(lambda: name in box.inner_text() + box.locator("input").first.input_value(), 5):
            return
        page.keyboard.press("Escape")
    pytest.fail(f"could not pick {name}: {box.inner_text()}")


@pytest.mark.browser
def test_page_started_as_root_runs_unprivileged_while_it_captures(root_only, venv, udp_port, veth, tmp_path):
    need(os.path.exists("/usr/bin/chromium"), "Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(venv / "bin" / "python3"), "-m", "streamlit", "run", "dashboard.py",
                                 "--server.port", str(port), "--server.headless", "true", "--",
                                 "--iface", "lo", "--filter", f"udp dst port {udp_port}"], cwd=ROOT,
                                env=root_env(NTM_REFRESH_S="2"), stdout=log, stderr=subprocess.STDOUT)
    try:
        assert broker.read_creds(f"/proc/{proc.pid}/status").uids[0] == 0  # it starts as root
        with sync_playwright() as p:
            chromium = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                         args=["--no-sandbox", "--disable-gpu"])
            page = chromium.new_page(viewport={"width": 1440, "height": 1600})
            # Open the page once Streamlit answers its health check; a page opened before that, on a
            # loaded machine, can stay blank, so one reload is allowed before "no metrics" is a failure.
            assert wait_for(lambda: _healthy(port), 60), log_path.read_text()[-3000:]
            open_page(page, f"http://127.0.0.1:{port}", context=lambda: log_path.read_text()[-3000:])
            assert wait_for(lambda: bool(socket_inodes(proc.pid) & packet_inodes(running=True)), 10), \
                log_path.read_text()
            send_udp(udp_port, 300)
            assert wait_for(lambda: metric(page, "Packets") == 300, 15), metric(page, "Packets")

            # The server (every thread) runs as nobody without capabilities; it holds the capture socket.
            assert_unprivileged(proc.pid)
            broker_pid = the_broker(proc.pid)
            assert page.locator('[data-testid="stException"]').count() == 0

            # A second viewer, whose session starts after the drop, sees the same capture (root's home,
            # which Streamlit used to read for every new session, is out of nobody's reach).
            second = chromium.new_page()
            second.goto(f"http://127.0.0.1:{port}")
            second.wait_for_selector('[data-testid="stMetric"]', timeout=60_000)
            assert wait_for(lambda: metric(second, "Packets") == 300, 15), metric(second, "Packets")
            second.close()

            sidebar = page.get_by_test_id("stSidebarUserContent")
            # Stop and Start again, three times: a new socket from the broker each time.
            for _ in range(3):
                press(sidebar, "Stop", lambda: status(page) == "stopped")
                assert wait_for(lambda: not socket_inodes(proc.pid) & packet_inodes(), 30), \
                    log_path.read_text()[-3000:]
                press(sidebar, "Start", lambda: bool(socket_inodes(proc.pid) & packet_inodes(running=True)))
                send_udp(udp_port, 50)
                assert wait_for(lambda: metric(page, "Packets") == 50, 15), (metric(page, "Packets"), status(page))

            # Another interface: the veth pair's host end.
            pick_interface(page, veth.host_if)
            press(sidebar, "Start", lambda: veth.host_if in status_source(page))
            assert wait_for(lambda: bool(socket_inodes(proc.pid) & packet_inodes(running=True)), 15)
            time.sleep(0.5)
            send_udp(udp_port, 40, veth.ns_ip)
            assert wait_for(lambda: metric(page, "Packets") == 40, 15), (metric(page, "Packets"), status_source(page))
            assert page.locator('[data-testid="stException"]').count() == 0
            chromium.close()
        assert_unprivileged(proc.pid)
        assert the_broker(proc.pid) == broker_pid  # the same broker served every Start
    finally:
        stop_process(proc)
    text = log_path.read_text()
    threads = re.search(r"running as nobody \(uid 65534\) without capabilities, in all (\d+) threads", text)
    assert threads and int(threads[1]) > 1, text  # Streamlit's threads were already running at the drop
    assert text.count("opened a raw packet socket for lo") == 4 and f"packet socket for {veth.host_if}" in text
