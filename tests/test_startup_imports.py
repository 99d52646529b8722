"""`python packet_processor.py summary FILE` starts without pandas, DuckDB or Plotly (issue 11: the whole
process, start-up included, is measured against tshark); the commands that need them still load them."""

from __future__ import annotations

import json
import subprocess

from conftest import PYTHON, ROOT
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

PROBE = ("import json, sys, contextlib, io\n"
         "import packet_processor\n"
         "with contextlib.redirect_stdout(io.StringIO()):\n"
         "    rc = packet_processor._cli(sys.argv[1:])\n"
         "print(json.dumps([rc, sorted(m for m in ('pandas', 'duckdb', 'plotly') if m in sys.modules)]))\n")


def run(*args: str) -> list:
    out = subprocess.run([PYTHON, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def few(tmp_path) -> str:
    path = tmp_path / "few.pcap"
    wrpcap(str(path), [Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1000 + i, dport=53) for i in range(20)])
    return str(path)


def test_summary_loads_neither_pandas_nor_duckdb(tmp_path):
    assert run("summary", few(tmp_path)) == [0, []]


def test_import_and_history_still_load_what_they_need(tmp_path):
    store = str(tmp_path / "h.duckdb")
    assert run("import", "--store", store, few(tmp_path)) == [0, ["duckdb", "pandas"]]
    assert run("history", "--store", store) == [0, ["duckdb", "pandas"]]
