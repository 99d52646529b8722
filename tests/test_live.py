"""Live capture of real packets on lo and on a veth pair into a test namespace."""

from __future__ import annotations

import json
import os
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import PYTHON, ROOT, need, run, wait_for

from packet_processor import ICMP, NON_IP, CaptureEngine, Source, addr_text

pytestmark = pytest.mark.live

LOCAL, IN, OUT = 2, 0, 1


@pytest.fixture
def engine(root_only) -> Iterator[CaptureEngine]:
    eng = CaptureEngine()
    yield eng
    eng.stop()


def start(eng: CaptureEngine, iface: str, bpf: str = "") -> None:
    assert eng.start(Source("live", iface=iface, bpf=bpf)), eng.status().error
    time.sleep(0.2)


def rows(eng: CaptureEngine) -> np.ndarray:
    return eng.snapshot().packets


def test_udp_datagrams_on_lo_exact(engine):
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.77", 0))
    port = rx.getsockname()[1]
    start(engine, "lo", f"udp and dst port {port}")
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    t_before = time.time()
    sizes = [10 + i for i in range(25)]
    for n in sizes:
        tx.sendto(b"u" * n, ("127.0.0.77", port))
    t_after = time.time()
    assert wait_for(lambda: engine.snapshot().totals["packets"] >= 25)
    time.sleep(0.3)  # nothing more may arrive: each datagram counts once on lo
    snap = engine.snapshot()
    assert snap.totals["packets"] == 25
    assert snap.totals["transport_counts"]["udp"] == 25
    r = snap.packets
    assert {addr_text(a) for a in r["src"]} == {"127.0.0.1"}
    assert {addr_text(a) for a in r["dst"]} == {"127.0.0.77"}
    assert set(r["sport"].tolist()) == {tx.getsockname()[1]} and set(r["dport"].tolist()) == {port}
    assert r["wire_len"].tolist() == [14 + 20 + 8 + n for n in sizes]
    assert set(r["direction"].tolist()) == {LOCAL}
    assert (r["ts"] >= t_before - 0.01).all() and (r["ts"] <= t_after + 0.01).all()
    assert np.all(np.diff(r["ts"]) >= 0)
    tx.close()
    rx.close()


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data = self.request.recv(4096)
        self.request.sendall(data.upper())


def test_tcp_exchange_on_lo_matches_tshark(engine, tmp_path):
    need(shutil.which("tcpdump") and shutil.which("tshark"), "this test compares with tcpdump + tshark")
    server = socketserver.TCPServer(("127.0.0.1", 0), _Echo)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pcap = tmp_path / "tcp.pcap"
    dump = subprocess.Popen(["tcpdump", "--immediate-mode", "-Z", "root", "-i", "lo", "-U", "-w", str(pcap),
                             f"tcp port {port}"],
                            stderr=subprocess.PIPE, text=True)
    assert "listening" in dump.stderr.readline()
    start(engine, "lo", f"tcp port {port}")
    t_before = time.time()
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(b"hello" * 20)
        assert c.recv(4096) == b"HELLO" * 20
    time.sleep(0.5)
    t_after = time.time()
    dump.terminate()
    dump.wait(5)
    server.shutdown()
    server.server_close()
    out = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "tcp.flags", "-e", "frame.len",
                          "-e", "tcp.srcport", "-e", "tcp.dstport"], capture_output=True, text=True, check=True)
    want = [line.split("\t") for line in out.stdout.strip().splitlines()]
    snap = engine.snapshot()
    r = snap.packets
    assert snap.totals["packets"] == len(want) >= 6
    assert snap.totals["transport_counts"]["tcp"] == len(want)
    assert r["tcp_flags"].tolist() == [int(w[0], 16) for w in want]
    assert r["wire_len"].tolist() == [int(w[1]) for w in want]
    assert r["sport"].tolist() == [int(w[2]) for w in want]
    assert r["dport"].tolist() == [int(w[3]) for w in want]
    assert r["tcp_flags"][0] == 0x02 and r["tcp_flags"][1] == 0x12  # SYN, then SYN-ACK
    assert int(((r["tcp_flags"] & 0x01) != 0).sum()) == 2  # one FIN each way
    assert (r["ts"] >= t_before - 0.01).all() and (r["ts"] <= t_after).all()


def test_ping_on_lo(engine):
    need(shutil.which("ping") is not None, "ping (iputils-ping) is not installed")
    start(engine, "lo", "icmp and host 127.0.0.78")
    run(["ping", "-c", "4", "-i", "0.2", "127.0.0.78"])
    assert wait_for(lambda: engine.snapshot().totals["packets"] >= 8)
    time.sleep(0.2)
    snap = engine.snapshot()
    assert snap.totals["packets"] == 8 and snap.totals["transport_counts"]["icmp"] == 8
    assert sorted(snap.packets["icmp_type"].tolist()) == [0] * 4 + [8] * 4
    assert set(snap.packets["cls"].tolist()) == {ICMP}


def test_bpf_filter_passes_only_matching_packets(engine):
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.1", 0))
    port, other_port = rx.getsockname()[1], other.getsockname()[1]
    start(engine, "lo", f"udp port {port}")
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(7):
        tx.sendto(b"yes", ("127.0.0.1", port))
        tx.sendto(b"no", ("127.0.0.1", other_port))
    run(["ping", "-c", "2", "-i", "0.2", "127.0.0.1"], check=False)
    assert wait_for(lambda: engine.snapshot().totals["packets"] >= 7)
    time.sleep(0.3)
    r = rows(engine)
    assert len(r) == 7 and set(r["dport"].tolist()) == {port}
    for s in (rx, other, tx):
        s.close()


def test_bad_bpf_filter_is_a_clear_error(engine):
    assert not engine.start(Source("live", iface="lo", bpf="tcp port banana"))
    st = engine.status()
    assert st.state == "error" and "bad BPF filter" in st.error and "banana" in st.error


def test_unknown_interface_lists_the_available_ones(engine):
    assert not engine.start(Source("live", iface="nosuch0"))
    st = engine.status()
    assert "unknown interface 'nosuch0'" in st.error and "lo" in st.error


def test_stop_on_a_silent_interface_is_prompt_and_idempotent(engine, veth):
    start(engine, veth.host_if, "udp port 9")  # nothing will ever match
    time.sleep(0.5)
    pid = engine._stage.pid()
    engine.stop()
    # stop() waits a bounded time: that the thread has really ended when it returns is what shows it
    # noticed the stop on a link that never delivers a packet (not the time stop() took).
    assert not engine.status().alive
    assert not [t for t in threading.enumerate() if t.name.startswith(("capture-", "detectors-"))]
    assert process_gone(pid), f"detector worker {pid} outlived stop()"
    engine.stop()  # a second stop is harmless
    assert engine.status().state == "stopped" and engine.status().error is None


def process_gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_unprivileged_capture_says_how_to_fix_it(root_only):
    need(shutil.which("setpriv") is not None, "setpriv (util-linux) is not installed")
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                          PYTHON, "packet_processor.py", "capture", "--iface", "lo", "--seconds", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert out.returncode == 1, out.stderr
    s = json.loads(out.stdout)
    assert "CAP_NET_RAW" in s["error"] and "sudo" in s["error"] and "setcap cap_net_raw+eip" in s["error"]
    assert "cap_net_admin" not in s["error"]  # capture, promiscuous mode included, needs CAP_NET_RAW only


def test_veth_namespace_directions_ipv6_and_arp(engine, veth):
    start(engine, veth.host_if)
    run(["ip", "neigh", "flush", "dev", veth.host_if], check=False)
    run(["ping", "-c", "3", "-i", "0.2", veth.host_ip], ns=veth.ns)  # from the namespace: in
    run(["ping", "-c", "2", "-i", "0.2", veth.ns_ip])  # from the host: out
    run(["ping", "-6", "-c", "2", "-i", "0.2", veth.ns_ip6])
    time.sleep(0.5)
    snap = engine.snapshot()
    r = snap.packets
    src = np.array([addr_text(a) for a in r["src"]])
    dst = np.array([addr_text(a) for a in r["dst"]])
    icmp4 = r["cls"] == ICMP
    from_ns = icmp4 & (src == veth.ns_ip)
    from_host = icmp4 & (src == veth.host_ip)
    # 3 requests from the namespace + 2 replies to the host's pings; and the mirror image.
    assert int(from_ns.sum()) == 5 and set(r["direction"][from_ns].tolist()) == {IN}
    assert int(from_host.sum()) == 5 and set(r["direction"][from_host].tolist()) == {OUT}
    req_in = from_ns & (r["icmp_type"] == 8)
    assert int(req_in.sum()) == 3 and set(dst[req_in].tolist()) == {veth.host_ip}
    v6 = (r["ipver"] == 6) & (r["proto"] == 58)
    echo6 = v6 & np.isin(r["icmp_type"], [128, 129])
    assert int(echo6.sum()) == 4
    assert set(r["direction"][echo6 & (src == veth.host_ip6)].tolist()) == {OUT}
    assert set(r["direction"][echo6 & (src == veth.ns_ip6)].tolist()) == {IN}
    arp = (r["cls"] == NON_IP) & (r["ethertype"] == 0x0806)
    assert int(arp.sum()) >= 2 and {1, 2} <= set(r["arp_op"][arp].tolist())
    assert set(src[arp].tolist()) <= {veth.host_ip, veth.ns_ip}
    seen = set(src[r["cls"] != NON_IP].tolist())
    assert all(s.startswith((veth.prefix, "fd00:213:", "fe80:")) or s == "::" for s in seen), seen
    assert snap.totals["transport_counts"]["non_ip"] >= 2
    assert snap.totals["packets"] == len(r)  # the buffer holds all of them: nothing was lost on the way


def test_capture_on_one_interface_never_sees_another(engine, veth):
    """The socket must not receive anything before it is bound to its interface (busy lo meanwhile)."""
    stop = threading.Event()
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))

    def blast() -> None:
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        end = time.monotonic() + 10
        while not stop.is_set() and time.monotonic() < end:
            tx.sendto(b"lo", rx.getsockname())
        tx.close()

    sender = threading.Thread(target=blast, daemon=True)
    sender.start()
    try:
        for _ in range(5):  # each start opens a new socket: five chances for a leak
            start(engine, veth.host_if)
            run(["ping", "-c", "1", veth.ns_ip])
            assert wait_for(lambda: len(rows(engine)) >= 2)  # the echo request and its reply
            r = rows(engine)
            assert not {addr_text(a) for a in r["src"]} & {"127.0.0.1"}
    finally:
        stop.set()
        sender.join(2)
        rx.close()


def test_interface_going_away_is_an_error_and_start_resumes(engine, veth):
    from conftest import make_veth, remove_veth

    start(engine, veth.host_if)
    remove_veth(veth)
    # The error is recorded first, then the thread finishes closing its socket.
    assert wait_for(lambda: engine.status().state == "error" and not engine.status().alive, 5)
    assert engine.status().error == f"interface {veth.host_if} went away"
    again = make_veth("a")  # the same names come back
    try:
        assert again.host_if == veth.host_if
        start(engine, again.host_if)
        run(["ping", "-c", "2", "-i", "0.2", again.ns_ip])
        assert wait_for(lambda: engine.snapshot().totals["transport_counts"]["icmp"] >= 4)
        assert engine.status().state == "running" and engine.status().error is None
    finally:
        remove_veth(again)


def test_capture_thread_failure_is_shown_not_hidden(engine, monkeypatch):
    import packet_processor

    def boom(*args, **kwargs):
        raise RuntimeError("injected fault")

    start(engine, "lo", "icmp")
    monkeypatch.setattr(packet_processor, "parse_batch", boom)
    run(["ping", "-c", "1", "127.0.0.1"])
    assert wait_for(lambda: engine.status().state == "error" and not engine.status().alive, 5)
    assert engine.status().error == "capture stopped: RuntimeError: injected fault"


def test_no_payload_anywhere_after_a_live_capture(engine, caplog):
    """A marker in every packet's payload: absent from the buffer, the snapshot, the summary, the CSV and the logs."""
    import logging
    import pickle

    from packet_processor import packets_csv

    caplog.set_level(logging.DEBUG)
    marker = b"NTM-LIVE-PAYLOAD-MARKER-c41d"
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    port = rx.getsockname()[1]
    start(engine, "lo", f"udp port {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for i in range(100):
            tx.sendto(marker + b"%04d" % i, ("127.0.0.1", port))
    assert wait_for(lambda: engine.snapshot().totals["packets"] == 100)
    engine.stop()
    rx.close()
    snap = engine.snapshot()
    places = {
        "buffer": snap.packets.tobytes(),
        "snapshot": pickle.dumps(snap),
        "summary": json.dumps(engine.summary(), default=str).encode(),
        "csv": packets_csv(snap.packets),
        "logs": caplog.text.encode(),
    }
    for name, data in places.items():
        assert marker not in data and marker.hex().encode() not in data.lower(), name
