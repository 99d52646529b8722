"""The benchmarks' own tools: the seeded loopback mix generator, read back with tshark."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections import Counter

import pytest
from conftest import PYTHON, ROOT, need

sys.path.insert(0, str(ROOT / "benchmarks"))
import mixgen

FIELDS = ["ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "vlan.id", "ip.proto", "ipv6.nxt", "tcp.flags",
          "udp.srcport", "udp.dstport", "icmp.type", "icmpv6.type"]
CHECKSUMS = ["ip.checksum.status", "tcp.checksum.status", "udp.checksum.status", "icmp.checksum.status",
             "icmpv6.checksum.status"]


def tshark_rows(path) -> list[dict[str, str]]:
    """One dict per frame of the FIELDS tshark decodes (checksums verified)."""
    out = subprocess.run(["tshark", "-n", "-r", str(path), "-o", "ip.check_checksum:TRUE", "-o",
                          "tcp.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE", "-T", "fields",
                          *[a for f in FIELDS + CHECKSUMS for a in ("-e", f)]], capture_output=True, text=True,
                         check=True)
    return [dict(zip(FIELDS + CHECKSUMS, line.split("\t"))) for line in out.stdout.splitlines()]


def kind_of(r: dict[str, str]) -> str:
    """The generator's kind of one frame, from tshark's fields alone."""
    if r["vlan.id"]:
        return "vlan"
    if r["ipv6.src"]:
        return "ipv6"
    if r["ip.proto"] == "1":
        return "icmp"
    if r["ip.proto"] == "17":
        return "dns" if "53" in (r["udp.srcport"], r["udp.dstport"]) else "udp"
    return "tcp" if r["ip.proto"] == "6" else "other"


def is_loopback(addr: str) -> bool:
    return addr == "::1" or (addr.startswith("127.") and addr.count(".") == 3)


@pytest.fixture(scope="module")
def tshark() -> None:
    need(shutil.which("tshark") is not None, "the generator is checked with tshark")


@pytest.mark.parametrize("mix", [None, {"scan": 50, "dns": 20, "vlan": 30}, {"flow": 40, "udp": 20, "icmp": 20,
                                                                             "ipv6": 20}])
def test_mix_is_all_loopback_and_as_asked(tshark, tmp_path, mix):
    n = 40_000
    path = tmp_path / "mix.pcap"
    counts = mixgen.make_mix(path, n, seed=7, mix=mix)
    rows = tshark_rows(path)
    assert len(rows) == n == sum(counts.values())
    for r in rows:
        addrs = [a for f in ("ip.src", "ip.dst", "ipv6.src", "ipv6.dst") for a in r[f].split(",") if a]
        assert addrs and all(is_loopback(a) for a in addrs), r
    # Every checksum tshark verifies is good (status 1), none bad (0); IPv4 headers all verified.
    status = Counter((f, v) for r in rows for f in CHECKSUMS for v in r[f].split(",") if v)
    assert {v for _, v in status} == {"1"}, status
    assert status[("ip.checksum.status", "1")] == sum(1 for r in rows if r["ip.src"])
    seen = Counter(kind_of(r) for r in rows)
    want = dict(mix or mixgen.DEFAULT_MIX)
    exact = {k: v for k, v in counts.items() if k not in ("scan", "flow")}
    exact["tcp"] = counts["scan"] + counts["flow"]
    assert {k: v for k, v in seen.items() if v} == {k: v for k, v in exact.items() if v}
    total = sum(want.values())
    for kind, share in want.items():  # the asked shares of packets, within 1.5 points
        assert abs(counts[kind] / n - share / total) < 0.015, (kind, counts[kind], share)
    for kind in set(mixgen.UNITS) - set(want):
        assert counts[kind] == 0


def test_tcp_flags_and_echo_types_of_the_default_mix(tshark, tmp_path):
    path = tmp_path / "mix.pcap"
    mixgen.make_mix(path, 30_000, seed=11)
    rows = tshark_rows(path)
    flags = Counter(int(r["tcp.flags"], 16) for r in rows if r["tcp.flags"])
    for f in (0x02, 0x12, 0x14, 0x11, 0x10):  # SYN, SYN-ACK, RST-ACK, FIN-ACK, ACK
        assert flags[f] > 300, flags
    assert set(flags) == {0x02, 0x12, 0x14, 0x11, 0x10}
    assert Counter(r["icmp.type"] for r in rows if r["icmp.type"]).keys() == {"8", "0"}
    assert Counter(r["icmpv6.type"] for r in rows if r["icmpv6.type"]).keys() == {"128", "129"}
    # Short flows: a SYN-ACK answers every flow's SYN, so SYN-ACKs are as many as the flows.
    assert flags[0x12] * 2 == flags[0x11]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    digests = []
    for i, seed in enumerate((5, 5, 6)):
        path = tmp_path / f"m{i}.pcap"
        mixgen.make_mix(path, 20_000, seed=seed)
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1] != digests[2]


def test_command_line_writes_the_file_and_reports_the_kinds(tmp_path):
    import json

    path = tmp_path / "cli.pcap"
    out = subprocess.run([PYTHON, str(ROOT / "benchmarks" / "mixgen.py"), str(path), "-n", "5000", "--seed", "2",
                          "--mix", "dns=50,icmp=50"], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert report["packets"] == 5000 and report["bytes"] == path.stat().st_size
    assert report["kinds"] == mixgen.make_mix(tmp_path / "again.pcap", 5000, seed=2, mix={"dns": 50, "icmp": 50})
    assert (tmp_path / "again.pcap").read_bytes() == path.read_bytes()


def run_quick(script: str, timeout: int = 300) -> str:
    """A hostile-traffic benchmark in --quick mode: it exits 1 on a wrong count, not on speed."""
    out = subprocess.run([PYTHON, str(ROOT / "benchmarks" / script), "--quick"], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_file_scan_mix_quick(tshark):
    out = run_quick("file_scan_mix.py")
    assert "PASS  counts equal tshark's" in out and "PASS  the port scans in the mix raise port_scan" in out
    assert "tshark -T fields (reference)" in out and "ratio whole process / tshark" in out


@pytest.mark.live
def test_live_scan_quick(root_only):
    need(all(shutil.which(p) for p in ("nmap", "hping3", "tcpdump")), "needs nmap, hping3 and tcpdump")
    out = run_quick("live_scan.py")
    assert "PASS  nmap -p- on lo: engine count = tcpdump's" in out
    assert "PASS  hping3 SYN flood: engine count = tcpdump's" in out
    assert "port_scan alert" in out and "syn_flood alert" in out


@pytest.mark.live
def test_live_mix_quick(root_only):
    need(all(shutil.which(p) for p in ("tcpreplay", "tcpdump")), "needs tcpreplay and tcpdump")
    out = run_quick("live_mix.py")
    assert "PASS  nothing counted twice" in out and "PASS  every frame the engine missed is counted" in out
    assert "tcpdump (reference)" in out


@pytest.mark.live
@pytest.mark.browser
def test_viewers_quick(root_only):
    import os

    need(os.path.exists("/usr/bin/chromium"), "Debian's chromium is not installed (apt-get install chromium)")
    out = run_quick("viewers.py", timeout=600)
    assert "PASS  all 2 tabs refreshed by themselves" in out and "highest loss-free rate" in out
