"""The reflection/amplification detector (issue 11.3): crafted captures and a live one in a network namespace."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import need, run
from scapy.layers.inet import IP, UDP, fragment
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import wrpcap

from analysis.detect import AlertBook, Detectors
from analysis.headers import LocalMatcher, pack_records
from packet_processor import CaptureEngine, Source

T0 = 1_700_000_000.0
VICTIM = "10.9.0.5"
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def answers(n_reflectors: int, per_reflector: int, size: int, t0: float, span: float = 0.5,
            sport: int = 53, fragsize: int | None = None, dport: int = 40000) -> list[tuple[float, object]]:
    """UDP answers from `sport` of reflectors 10.8.0.x to VICTIM, fragmented when fragsize is given."""
    frames = []
    n = n_reflectors * per_reflector
    for i in range(n):
        pkt = IP(src=f"10.8.0.{i % n_reflectors + 1}", dst=VICTIM, id=1000 + i) / \
            UDP(sport=sport, dport=dport + i) / Raw(b"a" * size)
        parts = fragment(pkt, fragsize) if fragsize else [pkt]
        frames += [(t0 + span * i / n, ETH / p) for p in parts]
    return frames


def rows(frames: list) -> np.ndarray:
    return pack_records([(ts, bytes(p), len(bytes(p)), 1) for ts, p in frames], LocalMatcher())


def reflection(frames: list, splits: int = 1, **env) -> list:
    arr = rows(frames)
    det, book = Detectors(), AlertBook()
    for part in np.array_split(arr, splits):
        det.observe(part, book)
    return [a for a in book.alerts() if a.detector == "reflection"]


def numbers(evidence: str) -> dict[str, int]:
    """The figures of a reflection alert's evidence."""
    grab = {"bps": r"^([\d,]+) bit/s", "reflectors": r"from (\d+) reflector", "answers": r"([\d,]+) answers,",
            "unasked": r"([\d,]+) without a matching request"}
    return {k: int(re.search(p, evidence).group(1).replace(",", "")) for k, p in grab.items()}


def test_unasked_dns_answers_from_many_reflectors():
    frames = answers(20, 60, 1200, T0)  # 1,200 answers of 1,242 bytes on the wire in half a second
    found = reflection(frames)
    assert [(a.target, a.source, a.severity) for a in found] == [(VICTIM, "20 reflector(s)", "high")]
    got = numbers(found[0].evidence)
    wire = sum(len(bytes(p)) for _, p in frames)  # the figures, counted here from the frames themselves
    assert got == {"bps": wire * 8, "reflectors": 20, "answers": 1200, "unasked": 1200}
    assert "DNS 53" in found[0].evidence and "no request from 10.9.0.5 seen" in found[0].evidence


def test_non_first_fragments_are_attributed_by_ip_identification():
    """4,000-byte NTP answers in three fragments: only the first has UDP ports, yet all bytes count."""
    frames = answers(12, 30, 4000, T0, sport=123, fragsize=1480)  # 360 answers, 1,080 fragments
    assert len(frames) == 1080
    first_only = sum(len(bytes(p)) for _, p in frames if p[IP].frag == 0)
    wire = sum(len(bytes(p)) for _, p in frames)
    assert first_only * 8 < 10_000_000 <= wire * 8  # the alert needs the fragments without ports
    found = reflection(frames)
    assert len(found) == 1
    got = numbers(found[0].evidence)
    assert got == {"bps": wire * 8, "reflectors": 12, "answers": 360, "unasked": 360}
    assert "NTP 123" in found[0].evidence


def test_the_same_packets_in_any_batches_give_the_same_figures():
    frames = answers(15, 80, 1400, T0, sport=161, fragsize=800)  # 1,200 answers, 16 Mbit/s
    found = [reflection(frames, n) for n in (1, 3, 17, 200)]
    assert all(len(f) == 1 for f in found)
    assert len({f[0].evidence for f in found}) == 1


def test_answers_to_the_hosts_own_requests_are_no_attack_and_give_the_amplification():
    """The victim asks each of 20 servers: their answers are asked for, so no alert; the factor is reported
    when most answers are unasked."""
    frames = []
    for i in range(1200):
        server = f"10.8.0.{i % 20 + 1}"
        t = T0 + 0.5 * i / 1200
        frames.append((t, ETH / IP(src=VICTIM, dst=server) / UDP(sport=40000 + i, dport=53) / Raw(b"q" * 40)))
        frames.append((t + 0.0001, ETH / IP(src=server, dst=VICTIM) / UDP(sport=53, dport=40000 + i)
                       / Raw(b"a" * 1200)))
    assert reflection(frames) == []
    # Now 100 asked for, 1,200 not: an attack, with the factor over the requests seen.
    asked = frames[:200]
    attack = answers(20, 60, 1200, T0 + 0.6, span=0.3, dport=50000)
    found = reflection(asked + attack)
    assert len(found) == 1
    got = numbers(found[0].evidence)
    assert got["answers"] == 1300 and got["unasked"] == 1200 and got["reflectors"] == 20
    requests = sum(len(bytes(p)) for _, p in asked[0::2])
    replies = sum(len(bytes(p)) for _, p in asked[1::2] + attack)
    assert f"{replies / requests:.1f}x the {requests:,} bytes of requests" in found[0].evidence


def test_one_busy_server_or_a_slow_trickle_raise_nothing():
    assert reflection(answers(1, 1500, 1200, T0)) == []  # one source: 14 Mbit/s, but one server
    assert reflection(answers(30, 10, 1200, T0, span=0.9)) == []  # 30 sources, 2.9 Mbit/s: under the rate


@pytest.mark.live
def test_live_reflection_with_fragments_in_a_namespace(root_only, veth, monkeypatch, tmp_path: Path):
    """Ten reflector addresses inside the test namespace answer DNS and NTP to the host's veth address,
    the NTP answers as three fragments each; the engine capturing on the veth raises the alert with
    every reflector and the fragments' bytes."""
    need(shutil.which("tcpreplay") is not None, "tcpreplay is not installed")
    monkeypatch.setenv("NTM_REFLECTION_BPS", "5000000")
    reflectors = [f"{veth.prefix}{n}" for n in range(30, 40)]
    for r in reflectors:
        run(["ip", "addr", "add", f"{r}/24", "dev", veth.ns_if], ns=veth.ns)
    host_mac = Path(f"/sys/class/net/{veth.host_if}/address").read_text().strip()
    ns_mac = run(["cat", f"/sys/class/net/{veth.ns_if}/address"], ns=veth.ns).stdout.strip()
    eth = Ether(src=ns_mac, dst=host_mac)
    frames = []
    for i in range(150):  # 150 NTP answers of 4,000 bytes (three fragments) and 150 DNS answers
        r = reflectors[i % len(reflectors)]
        big = IP(src=r, dst=veth.host_ip, id=2000 + i) / UDP(sport=123, dport=45000 + i) / Raw(b"n" * 4000)
        frames += [eth / p for p in fragment(big, 1480)]
        frames.append(eth / IP(src=r, dst=veth.host_ip) / UDP(sport=53, dport=46000 + i) / Raw(b"d" * 1000))
    pcap = tmp_path / "reflection.pcap"
    wrpcap(str(pcap), frames)
    eng = CaptureEngine()
    try:
        assert eng.start(Source("live", iface=veth.host_if, bpf="udp or (ip[6:2] & 0x1fff != 0)")), \
            eng.status().error
        time.sleep(0.3)
        found = []
        for _ in range(3):  # a burst of ~50 ms, started just after a whole second: it lies within that second
            time.sleep(1.02 - time.time() % 1)  # capture time is the kernel's wall-clock stamp
            run(["tcpreplay", "-q", "--topspeed", "-i", veth.ns_if, str(pcap)], ns=veth.ns)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and not found:
                found = [a for a in eng.snapshot().alerts if a.detector == "reflection"]
                time.sleep(0.1)
            if found:
                break
        assert found and found[0].target == veth.host_ip, [a.as_dict() for a in eng.snapshot().alerts]
        got = numbers(found[0].evidence)
        assert got["reflectors"] == 10 and got["unasked"] == got["answers"] > 0
        assert "NTP 123" in found[0].evidence and "DNS 53" in found[0].evidence
        # NTP and DNS answers alternate: counted with their fragments they average ~2,600 bytes, without
        # the port-less fragments ~1,300.
        assert got["bps"] / 8 / got["answers"] > 2000, got
        assert got["answers"] == 300, got  # the whole burst within one second ...
        assert got["bps"] == 8 * sum(len(bytes(f)) for f in frames)  # ... and every byte of it
    finally:
        eng.stop()
