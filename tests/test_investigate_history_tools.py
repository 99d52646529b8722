"""Explain, baselines and the threshold back-test over a stored range (issue 15), drawn by the history view
for any store: here the host's own history store; tests/test_investigate_fleet.py shows them on the fleet page.

The file: two minutes of mixed traffic whose second minute carries SPIKER's UDP burst (invhelp), imported
through the page's action; expectations from tshark's reading of the same file and fresh detectors."""

from __future__ import annotations

import pandas as pd
import pytest
from invhelp import SERVER, SPIKER
from test_dashboard import fresh as fresh  # the fixture: a new engine per test
from test_dashboard import rendered, run_until
from test_investigate_backtest_history import packets_trials, spiky  # noqa: F401  (the module's file)
from test_investigate_history import filtered, history_page_at, per_minute

SPIKE_VALUES = [10, 50, 100]


def tools_on(at, since: int, until: int):
    """The page on [since, until] (from/to in the URL narrow the stored range)."""
    return filtered(at, **{"from": str(since), "to": str(until + 1)})


def explained_share(path: str, host: str, m0: int, m1: int) -> float:
    """tshark's share of the rise from minute m0 to minute m1 carried by conversations with `host` at an end."""
    every = per_minute(path, "ip || ipv6")
    mine = per_minute(path, f"ip.addr=={host}")
    return (mine[m1] - mine[m0]) / (every[m1] - every[m0])


def test_history_explains_the_spiking_host_with_its_share(fresh, tmp_path, spiky):  # noqa: F811
    path, pkts = spiky
    m0 = int(float(pkts[0].time)) // 60 * 60
    at = tools_on(history_page_at(fresh, tmp_path, path), m0 + 60, m0 + 119)
    at.toggle(key="hist_explain").set_value(True).run()
    assert not at.exception
    detail = next(d.value for d in at.dataframe if "share of the change %" in d.value.columns and "by" not in
                  d.value.columns)
    rows = dict(zip(detail["key"], detail["share of the change %"]))
    want = explained_share(path, SPIKER, m0, m0 + 60)
    assert rows[SPIKER] == pytest.approx(100 * want, abs=0.05) and want > 0.5
    # The headline names the burst's service with its share of the rise, as tshark counts it.
    headline = next(rendered(s.value) for s in at.success if "explain" in rendered(s.value))
    every, burst = per_minute(path, "ip || ipv6"), per_minute(path, "udp.port==5353")
    share = (burst[m0 + 60] - burst[m0]) / (every[m0 + 60] - every[m0])
    assert share > 0.8 and f"1 key explains {100 * share:.0f} %" in headline  # the burst alone explains it
    assert f"by port: udp/5353 ({100 * share:.0f} %)" in headline, headline


def test_history_explain_follows_the_url_filters(fresh, tmp_path, spiky):  # noqa: F811
    path, pkts = spiky
    m0 = int(float(pkts[0].time)) // 60 * 60
    at = history_page_at(fresh, tmp_path, path)
    at = filtered(at, **{"from": str(m0 + 60), "to": str(m0 + 120), "host": "10.1.0.1"})
    at.toggle(key="hist_explain").set_value(True).run()
    at.selectbox(key="hist_explain_dim").set_value("host (either end)").run()
    detail = next(d.value for d in at.dataframe if "key" in d.value.columns and "share of the change %" in
                  d.value.columns)
    during = dict(zip(detail["key"], detail["during (packets/s)"]))
    before = dict(zip(detail["key"], detail["before (packets/s)"]))
    mine = per_minute(path, "ip.addr==10.1.0.1")
    assert SPIKER not in during  # the filter keeps 10.1.0.1's conversations only (with the server)
    assert during["10.1.0.1"] == pytest.approx(mine[m0 + 60] / 60, abs=0.05)
    assert before["10.1.0.1"] == pytest.approx(mine[m0] / 60, abs=0.05)
    assert any("filtered to the conversations matching host" in rendered(c.value) for c in at.caption)


def conv(rows: list) -> pd.DataFrame:
    """Stored conversation rows (a, b, packets) of one minute, TCP port 80 to 1000 + i."""
    return pd.DataFrame([{"minute": 0, "a": a, "b": b, "a_port": 1000 + i, "b_port": 80, "proto": 6, "vlan": 0,
                          "packets": n, "bytes": 100 * n, "first_us": 0} for i, (a, b, n) in enumerate(rows)])


def test_stored_explain_counts_a_conversation_once_in_its_headline():
    from investigate import stored

    # Before: 10.5.0.1 <-> 10.6.0.1, 600 packets a minute. During: the same, and two new conversations of
    # 300 packets each, every host in its own /24: the rise is 600 packets, 300 of them per new conversation.
    before = conv([("10.5.0.1", "10.6.0.1", 600)])
    during = conv([("10.5.0.1", "10.6.0.1", 600), ("10.1.0.1", "10.2.0.1", 300), ("10.3.0.1", "10.4.0.1", 300)])
    ex = stored.explain(before, during, 60, 120, 0)
    dim, named = ex.best
    keys = [r.key for r in named]
    assert len(keys) == 2, ex.headline
    # What the named keys truly carry of the rise: the new conversations with either of them at an end.
    new = during.iloc[1:]
    end = (lambda col: new[col].str.rsplit(".", n=1).str[0] + ".0/24") if dim.startswith("network") else (
        lambda col: new[col])
    share = new.loc[end("a").isin(keys) | end("b").isin(keys), "packets"].sum() / 600
    assert share == 1.0 and "2 keys explain 100 %" in ex.headline, ex.headline
    # One conversation's two ends are one conversation: 10.1.0.1 and 10.2.0.1 explain 50 %, not 100 %.
    assert stored._union(before, during, "host (either end)", "packets", (1.0, 60, 60), 10.0, 10.0)(
        ["10.1.0.1", "10.2.0.1"])[0] == pytest.approx(0.5)


def test_history_back_test_and_baseline_over_the_range(fresh, tmp_path, spiky):  # noqa: F811
    path, pkts = spiky
    m0 = int(float(pkts[0].time)) // 60 * 60
    at = history_page_at(fresh, tmp_path, path)
    # Back-test: the spike thresholds over the range's stored seconds = the detectors on the packets.
    want = packets_trials(pkts)
    at.selectbox(key="hbt_setting").set_value("SPIKE_MIN_PPS").run()
    at.text_input(key="hbt_values_SPIKE_MIN_PPS").input(", ".join(map(str, SPIKE_VALUES))).run()
    at.button(key="hbt_run").click().run()  # a background job: the page reruns until it is done
    at = run_until(at, lambda a: any("times raised" in d.value.columns for d in a.dataframe), 30)
    table = next(d.value for d in at.dataframe if "times raised" in d.value.columns)
    assert table["alerts"].tolist() == [t.rows for t in want] and want[0].rows >= 1
    assert table["times raised"].tolist() == [t.raised for t in want]
    # Another range: the result of the last hour is not shown under it.
    at.radio(key="time_range").set_value("6 h").run()
    assert not any("times raised" in d.value.columns for d in at.dataframe)
    # Baseline: the first minute saved; the second minute's new hosts and services are what it adds.
    at = tools_on(at, m0, m0 + 59)
    at.text_input(key="hist_baseline_name").input("first-minute").run()
    at.button(key="hist_baseline_save").click().run()
    assert any("Baseline first-minute saved" in rendered(s.value) for s in at.success)
    at = tools_on(at, m0 + 60, m0 + 119)
    at.selectbox(key="hist_baseline_pick").set_value("first-minute").run()
    at.button(key="hist_baseline_compare").click().run()
    new = next(d.value for d in at.dataframe if "new service" in d.value.columns)
    services = dict(zip(new["new service"], new["first seen"]))
    assert "udp/53" not in services and "tcp/443" not in services  # first-minute services are not new
    # The burst's service, first seen in the second minute: when tshark sees its first packet.
    first = min(float(p.time) for p in pkts if p.haslayer("UDP") and p["UDP"].dport == 5353)
    import visualizations as viz
    assert services["udp/5353"] == viz.time_texts([first], None)[0]
    # Another range (from/to changed): the diff of the second minute is not shown under it.
    at = tools_on(at, m0, m0 + 59)
    assert not any("new service" in d.value.columns for d in at.dataframe)
    assert not at.exception


def test_history_tools_say_approximate_when_minutes_were_capped(fresh, tmp_path, spiky):  # noqa: F811
    path, pkts = spiky
    m0 = int(float(pkts[0].time)) // 60 * 60
    # tshark: each of the two minutes holds far more than 3 conversations (random client ports).
    convs = per_minute(path, "tcp.flags.ack==1 || udp")
    assert convs[m0] > 3 and convs[m0 + 60] > 3
    fresh.setenv("NTM_STORE_CONV_MAX", "3")
    at = tools_on(history_page_at(fresh, tmp_path, path), m0 + 60, m0 + 119)
    at.toggle(key="hist_explain").set_value(True).run()
    caption = " ".join(rendered(c.value) for c in at.caption)
    assert "approximate: 2 minutes held more than STORE_CONV_MAX" in caption, caption
    at.text_input(key="hist_baseline_name").input("capped").run()
    at.button(key="hist_baseline_save").click().run()
    assert any("approximate: 1 minute held more than STORE_CONV_MAX" in rendered(s.value) for s in at.success)
    at.button(key="hist_baseline_compare").click().run()
    caption = " ".join(rendered(c.value) for c in at.caption)
    assert "may list hosts or services as new that it left out" in caption


def test_a_shortened_baseline_starts_at_the_stores_first_traffic_not_its_minute(fresh, tmp_path, spiky):  # noqa: F811
    """Traffic from :45: a baseline cut by the store's start is the 75 s it holds, not 2 whole minutes."""
    from scapy.all import wrpcap

    import visualizations as viz

    _, pkts = spiky
    m0 = int(float(pkts[0].time)) // 60 * 60
    moved = []
    for p in pkts:
        q = p.copy()
        q.time = float(p.time) - float(pkts[0].time) + m0 + 45  # the first packet at m0 + 45
        moved.append(q)
    path = tmp_path / "at45.pcap"
    wrpcap(str(path), moved)
    # Explain [m0 + 120, m0 + 240): its 2 min baseline would begin at m0, before the store's first traffic.
    at = tools_on(history_page_at(fresh, tmp_path, str(path)), m0 + 120, m0 + 239)
    at.toggle(key="hist_explain").set_value(True).run()
    assert not at.exception
    at.selectbox(key="hist_explain_dim").set_value("host (either end)").run()
    detail = next(d.value for d in at.dataframe if "before (packets/s)" in d.value.columns and "by" not in
                  d.value.columns)
    before = dict(zip(detail["key"], detail["before (packets/s)"]))
    host = SERVER
    n = sum(1 for q in moved if q.haslayer("IP") and host in (q["IP"].src, q["IP"].dst)
            and float(q.time) < m0 + 120)
    assert n > 0 and before[host] == pytest.approx(n / 75, abs=0.05)  # over the 75 s held, not 120
    caption = " ".join(rendered(c.value) for c in at.caption)
    assert f"only the 1 min 15 s before it (from the store's first traffic, {viz.time_texts([m0 + 45], None)[0]})" \
        in caption, caption


def test_the_read_cache_is_one_bounded_lru_for_the_process(monkeypatch):
    import investigate_page as ip

    monkeypatch.setattr(ip, "_READS", type(ip._READS)())
    monkeypatch.setattr(ip, "READ_ROWS_KEPT", 250)
    reads: list[str] = []

    def frame(name: str, n: int):
        return lambda: reads.append(name) or (pd.DataFrame({"x": range(n)}), False)

    ip.cached_read("a", frame("a", 100))
    ip.cached_read("b", frame("b", 100))
    ip.cached_read("a", frame("a", 100))  # reused: a is now the most recently used
    ip.cached_read("c", frame("c", 100))  # 300 rows > 250: the least recently used (b) goes
    assert reads == ["a", "b", "c"] and list(ip._READS) == ["a", "c"]
    ip.cached_read("b", frame("b", 100))
    assert reads[-1] == "b" and list(ip._READS) == ["c", "b"]
    # Expired entries are dropped, whoever asks.
    clock = [ip.time.monotonic() + ip.READ_TTL_S + 1]
    monkeypatch.setattr(ip.time, "monotonic", lambda: clock[0])
    ip.cached_read("d", frame("d", 10), ttl=600)
    assert list(ip._READS) == ["d"]
    clock[0] += ip.READ_TTL_S + 1  # d lives longer (a fixed past range)
    ip.cached_read("d", frame("d", 10), ttl=600)
    assert reads.count("d") == 1


def test_stored_union_counts_each_conversation_once_for_any_key_set():
    import numpy as np

    from investigate import stored

    rng = np.random.default_rng(3)
    hosts = [f"10.{i % 3}.0.{i}" for i in range(12)]
    rows = [(hosts[rng.integers(12)], hosts[rng.integers(12)], int(rng.integers(1, 50))) for _ in range(300)]
    rows += [("10.0.0.0", "10.0.0.0", 7)]  # both ends the same key: counted once
    before, during = conv(rows[:150]), conv(rows[150:])
    for dim in ("host (either end)", "network (either end)"):
        share = stored._union(before, during, dim, "packets", (1.0, 60.0, 60.0), 5.0, 3.0)
        a_b, a_d = stored._ends(before, dim), stored._ends(during, dim)
        keys = sorted(set(a_d[0]) | set(a_d[1]))
        for ks in [keys[:1], keys[:2], keys[:4], keys[2:3], keys[:3], ["nowhere", *keys[:2]]]:  # grown, or not
            sb = before.loc[a_b[0].isin(ks) | a_b[1].isin(ks), "packets"].sum() / 60
            sd = during.loc[a_d[0].isin(ks) | a_d[1].isin(ks), "packets"].sum() / 60
            assert share(ks) == pytest.approx(((sd - sb) / 5.0, sb / 3.0)), (dim, ks)
