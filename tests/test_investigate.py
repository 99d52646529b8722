"""Investigating (issue 15) through AppTest: filters from the URL re-filter every metric, chart and table;
chips; bad values; the buffer-coverage note; what a brushed box or a clicked bar turns into."""

from __future__ import annotations

import ipaddress
import json
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from invhelp import HOSTS, SERVER, SPIKER, T0, tshark_count, write_mixed
from test_dashboard import app, array, count, figures, metric, rendered, run_until
from test_dashboard import fresh as fresh  # the fixture: a new engine per test

import investigate_page as inv
from investigate import filters as flt


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> str:
    return write_mixed(tmp_path_factory.mktemp("inv") / "mixed.pcap")


def loaded(monkeypatch, path: str, **query: str | list[str]):
    """The page over `path`, opened with `query` in its URL, run until the file is read."""
    monkeypatch.setenv("NTM_PCAP", path)
    at = app()
    for k, v in query.items():
        at.query_params[k] = v
    return run_until(at, lambda a: metric(a, "Status").value == "finished")


def bytes_help(at) -> str:
    return metric(at, "Bytes").proto.help


def tables(at) -> dict[str, object]:
    """The page's tables by a column only each has."""
    out = {}
    for d in at.dataframe:
        cols = set(d.value.columns)
        name = "conversations" if "endpoint A" in cols else "recent" if "TCP flags" in cols else "other"
        out[name] = d.value
    return out


def test_src_in_the_url_shows_that_sources_exact_count_in_every_panel(fresh, capture):
    want, want_bytes = tshark_count(capture, f"ip.src=={SPIKER}")
    total, _ = tshark_count(capture, "frame")
    at = loaded(fresh, capture, src=SPIKER)
    assert not at.exception
    assert count(at) == want and want < total
    assert f"{want_bytes:,} bytes" in bytes_help(at)
    figs = figures(at)
    assert figs["Top 10 sources"]["data"][0]["y"] == [SPIKER]
    assert figs["Top 10 destinations"]["data"][0]["y"] == [SERVER]
    assert int(array(figs["Protocols by packets"]["data"][0]["values"]).sum()) == want
    udp, _ = tshark_count(capture, f"ip.src=={SPIKER} && udp")
    pie = figs["Protocols by packets"]["data"][0]
    assert dict(zip(pie["labels"], array(pie["values"]).tolist()))["UDP"] == udp
    t = tables(at)
    assert set(t["recent"]["source"]) == {SPIKER}
    assert all(SPIKER in (a + b) for a, b in zip(t["conversations"]["endpoint A"], t["conversations"]["endpoint B"]))
    assert any(rendered(b.label) == f"✕ src = {SPIKER}" for b in at.button)
    assert any(d.proto.label == "Download the filtered packets (CSV)" for d in at.get("download_button"))
    assert any(f"{want:,} packets match the filters: exact" in rendered(c.value) for c in at.caption)


def test_filters_combine_with_and(fresh, capture):
    want, want_bytes = tshark_count(capture, f"ip.addr=={HOSTS[0]} && tcp.port==443")
    at = loaded(fresh, capture, host=HOSTS[0], port="443", proto="tcp")
    assert count(at) == want > 0 and f"{want_bytes:,} bytes" in bytes_help(at)
    ports = figures(at)["Top destination ports"]["data"]
    assert [t["y"] for t in ports] == [["tcp/443 https"]]
    assert set(tables(at)["recent"]["dst port"]) == {443}


def test_a_time_span_in_the_url_epoch_or_iso(fresh, capture):
    lo, hi = T0 + 10.5, T0 + 20.25
    want, want_bytes = tshark_count(capture, f"frame.time_epoch >= {lo} && frame.time_epoch < {hi}")
    at = loaded(fresh, capture, **{"from": str(lo), "to": str(hi)})
    assert count(at) == want > 0 and f"{want_bytes:,} bytes" in bytes_help(at)
    at2 = loaded(fresh, capture, **{"from": "2023-11-14T22:13:30.5Z", "to": "2023-11-14T23:13:40.25+01:00"})
    assert count(at2) == want


def test_bad_values_give_a_clear_message_not_an_exception(fresh, capture):
    total, _ = tshark_count(capture, "frame")
    at = loaded(fresh, capture, port="99999", proto="smtp", src="10.0.0.300", **{"from": "yesterday"})
    assert not at.exception
    errors = [rendered(e.value) for e in at.error]
    assert any("port must be a whole number from 0 to 65535: '99999'" in e for e in errors)
    assert any("proto must be one of tcp, udp, icmp, icmpv6, other_ip, non_ip: 'smtp'" in e for e in errors)
    assert any("not an IP address or network: '10.0.0.300'" in e for e in errors)
    assert any("not a time (epoch seconds or ISO 8601): 'yesterday'" in e for e in errors)
    assert count(at) == total  # nothing valid left: the whole capture


def test_a_removed_chip_leaves_the_url_and_the_numbers_follow(fresh, capture):
    total, _ = tshark_count(capture, "frame")
    tcp, _ = tshark_count(capture, "tcp")
    both, _ = tshark_count(capture, f"ip.src=={SPIKER} && tcp")
    at = loaded(fresh, capture, src=SPIKER, proto="tcp")
    assert count(at) == both < tcp
    next(b for b in at.button if rendered(b.label) == f"✕ src = {SPIKER}").click().run()
    assert at.query_params.get("src") is None and count(at) == tcp
    at.button(key="filter_clear").click().run()
    assert count(at) == total and not any(b.label.startswith("✕") for b in at.button)


def test_a_typed_filter_lands_in_the_url(fresh, capture):
    want, _ = tshark_count(capture, "udp.port==5353")
    at = loaded(fresh, capture)
    at.text_input(key="filter_add").input("port=5353 proto=udp").run()
    assert at.query_params["port"] in ("5353", ["5353"]) and at.query_params["proto"] in ("udp", ["udp"])
    assert count(at) == want


def test_a_buffer_smaller_than_the_capture_says_the_figure_is_approximate(fresh, capture):
    total, _ = tshark_count(capture, "frame")
    fresh.setenv("NTM_BUFFER_SIZE", "500")
    want, _ = tshark_count(capture, f"frame.number > {total - 500} && ip.src=={SPIKER}")
    at = loaded(fresh, capture, src=SPIKER)
    assert count(at) == want
    notes = [rendered(c.value) for c in at.caption]
    assert any(f"{want:,} packets match the filters over the last 500 buffered packets, since" in n
               and "approximate" in n for n in notes)


# -- what a selection means -------------------------------------------------------------------------


def test_a_timeline_box_becomes_from_and_to_in_the_pages_zone():
    berlin = ZoneInfo("Europe/Berlin")
    sel = {"box": [{"xref": "x", "x": ["2023-11-14 23:13:40.25", "2023-11-14 23:13:30.5"]}]}
    got = dict(inv.selection_filters("timeline", sel, [], berlin))
    assert float(got["from"]) == T0 + 10.5 and float(got["to"]) == T0 + 20.25


def test_a_clicked_point_becomes_the_filter_of_its_label():
    labels = [["10.0.0.2", "10.0.0.1"]]
    pick = {"points": [{"curve_number": 0, "point_index": 1}]}
    assert inv.selection_filters("top_src", pick, labels, None) == [("src", "10.0.0.1")]
    assert inv.selection_filters("top_dst", pick, labels, None) == [("dst", "10.0.0.1")]
    pie = [["TCP", "UDP", "ICMPv6", "ARP/other"]]
    assert inv.selection_filters("pie", {"points": [{"point_index": 3}]}, pie, None) == [("proto", "non_ip")]
    assert inv.selection_filters("pie", {"points": [{"label": "ICMPv6", "point_number": 0}]}, pie, None) == \
        [("proto", "icmpv6")]
    ports = [["tcp/443 https"], ["udp/53 domain"]]
    assert inv.selection_filters("ports", {"points": [{"curve_number": 1, "point_index": 0}]}, ports, None) == \
        [("proto", "udp"), ("port", "53")]
    assert inv.selection_filters("vlans", pick, [["VLAN 7", "VLAN 10"]], None) == [("vlan", "10")]
    assert inv.selection_filters("top_src", {"points": [{"point_index": 9}]}, labels, None) == []
    row = {"a": "10.0.0.1", "b": "10.0.0.2", "a_port": 40000, "b_port": 443, "proto": "TCP"}
    assert inv.conversation_filters(row) == [("host", "10.0.0.1"), ("host", "10.0.0.2"), ("port", "443"),
                                             ("port", "40000"), ("proto", "tcp")]


def test_network_filters_match_what_ipaddress_says():
    from analysis.headers import V4_PREFIX

    rng = np.random.default_rng(3)
    v4 = [ipaddress.ip_address(int(x)) for x in rng.integers(0, 2**32, 300)]
    v6 = [ipaddress.ip_address(int(x) << 64 | 5) for x in rng.integers(0, 2**63, 300)]
    keys = [V4_PREFIX + a.packed for a in v4] + [a.packed for a in v6]
    rows = np.zeros(len(keys), dtype=[("src", "S16")])
    rows["src"] = keys
    addrs = np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 16)
    for text in ["10.0.0.0/8", f"{v4[0]}/13", f"{v4[1]}", f"{v6[0]}/48", f"{v6[2]}/7", "::/0"]:
        net = ipaddress.ip_network(text, strict=False)
        want = [a.version == net.version and a in net for a in v4 + v6]
        assert flt.addr_mask(addrs, flt.parse_one("src", text).value).tolist() == want, text


def test_query_round_trip_and_repeated_keys():
    spec = (("host", "10.0.0.1"), ("host", "10.0.0.2"), ("port", "443"))
    assert flt.from_query(flt.to_query(spec)) == spec
    assert flt.from_query({"src": "1.2.3.4", "page": "fleet"}) == (("src", "1.2.3.4"),)
    _, errors = flt.parse([("from", "20"), ("to", "10")])
    assert errors == ["from must be earlier than to: the time filter (from, to) is ignored"]
    _, errors = flt.parse([("colour", "red")])
    assert errors and "unknown filter key 'colour'" in errors[0]
    assert json.dumps(flt.to_query(spec))  # plain data for the URL


def test_history_takes_from_and_to_and_filters_totals_from_stored_conversations(fresh, tmp_path):
    """Three imported minutes of traffic; from/to in the URL narrow the stored range to the middle one."""
    import io
    import time

    from pcapgen import pcap_bytes
    from test_files import sample_frames

    import history_page
    from packet_processor import engines

    fresh.setenv("NTM_STORE", str(tmp_path / "h.duckdb"))
    fresh.setenv("NTM_PCAP", "")
    fresh.setenv("NTM_INTERFACE", "lo")
    fresh.setenv("NTM_BPF_FILTER", "udp dst port 47329")
    at = app().run()
    engine = next(e for e in engines() if e.store is not None and str(tmp_path) in str(e.store.path))
    frames = sample_frames()
    ts0 = float(int(time.time()) // 60 * 60 - 900)  # whole minutes, 15 minutes ago: inside '1 h'
    uploads = []
    for i in range(3):
        data = io.BytesIO(pcap_bytes([(ts0 + i * 60 + j * 0.01, f) for j, (_, f) in enumerate(frames)]))
        data.name = f"part{i}.pcap"
        uploads.append(data)
    assert not history_page.import_uploads(engine, uploads)["errors"]
    at.radio(key="time_range").set_value("1 h").run()
    assert count(at) == 3 * len(frames)
    at.query_params["from"] = str(ts0 + 60)
    at.query_params["to"] = str(ts0 + 120)
    at.query_params["port"] = "53"
    at.run()
    assert not at.exception
    # The stored conversations of that minute with port 53 at either end, counted from the frames themselves:
    # the Packets metric is theirs (per minute, from conversations, said), and so is the table's sum.
    from analysis.headers import LocalMatcher, pack_records

    recs = pack_records([(0.0, f, len(f), 1) for _, f in frames], LocalMatcher())
    dns = int((((recs["sport"] == 53) | (recs["dport"] == 53)) & (recs["cls"] != 5)).sum())
    assert dns > 0 and count(at, "Packets in matching conversations") == dns == count(at)
    assert any("per minute, from the stored conversations" in rendered(c.value) for c in at.caption)
    assert any("Top hosts, ports and conversations of the matching traffic" in rendered(c.value) for c in at.caption)


@pytest.mark.live
def test_live_lo_a_port_filter_counts_exactly_that_ports_packets(fresh, root_only):
    """Real traffic on lo to two ports of our own: ?port=A counts exactly A's datagrams, live."""
    import socket

    rxa, rxb = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rxa.bind(("127.0.0.1", 0))
    rxb.bind(("127.0.0.1", 0))
    pa, pb = rxa.getsockname()[1], rxb.getsockname()[1]
    fresh.setenv("NTM_INTERFACE", "lo")
    fresh.setenv("NTM_BPF_FILTER", f"udp and (port {pa} or port {pb})")
    at = app()
    at.query_params["port"] = str(pa)
    at.run()
    assert metric(at, "Status").value == "running", at.error
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(30):
        tx.sendto(b"a" * (10 + i), ("127.0.0.1", pa))
        if i % 3 == 0:
            tx.sendto(b"b", ("127.0.0.1", pb))
    def buffer(a) -> list[int]:  # 'matching of buffered'
        return [int(x.replace(",", "")) for x in metric(a, "Buffer").value.split(" of ")]
    at = run_until(at, lambda a: count(a) >= 30 and buffer(a)[1] >= 40, 15)
    assert count(at) == 30  # libpcap skips lo's outgoing copies: each datagram once
    assert buffer(at) == [30, 40]
    assert f"{sum(42 + 10 + i for i in range(30)):,} bytes" in bytes_help(at)  # Ethernet+IP+UDP = 42
    for s in (tx, rxa, rxb):
        s.close()


def test_a_conversation_rows_filters_keep_exactly_that_conversation(fresh, capture):
    """What a click on a conversation row sets (both ends, both ports, the protocol) keeps that
    conversation's packets: the row's own count, and tshark's."""
    at = loaded(fresh, capture)
    conv = tables(at)["conversations"]
    row = conv.iloc[0]
    (a, pa), (b, pb) = (str(row["endpoint A"]).rsplit(":", 1), str(row["endpoint B"]).rsplit(":", 1))
    a, b = a.strip("[]"), b.strip("[]")
    ip = "ipv6" if ":" in a else "ip"
    proto = str(row["protocol"]).lower()
    pairs = inv.conversation_filters({"a": a, "b": b, "a_port": int(pa), "b_port": int(pb), "proto": proto})
    want, _ = tshark_count(capture, f"{ip}.addr=={a} && {ip}.addr=={b} && {proto}.port=={pa} && {proto}.port=={pb}")
    at2 = loaded(fresh, capture, **flt.to_query(tuple(pairs)))
    assert count(at2) == want == int(row["packets"])
    assert len(tables(at2)["conversations"]) == 1


def test_explain_the_span_selected_in_the_url(fresh, tmp_path):
    path = write_mixed(tmp_path / "spread.pcap", seconds=40, spike_from=30, spike_pps=60, spread=True)
    at = loaded(fresh, path, **{"from": str(T0 + 30), "to": str(T0 + 40)})
    at.toggle(key="explain_span").set_value(True).run()
    assert not at.exception
    headline = next(rendered(s.value) for s in at.success)
    during, _ = tshark_count(path, f"frame.time_epoch >= {T0 + 30} && frame.time_epoch < {T0 + 40}")
    before, _ = tshark_count(path, f"frame.time_epoch >= {T0 + 20} && frame.time_epoch < {T0 + 30}")
    mine_d, _ = tshark_count(path, f"frame.time_epoch >= {T0 + 30} && frame.time_epoch < {T0 + 40} && ip.src=={SPIKER}")
    mine_b, _ = tshark_count(path, f"frame.time_epoch >= {T0 + 20} && frame.time_epoch < {T0 + 30} && ip.src=={SPIKER}")
    share = (mine_d - mine_b) / (during - before)
    assert f"of the rise in packets/s ({before / 10:,.1f} → {during / 10:,.1f}), by source host: {SPIKER} " \
           f"({100 * share:.0f} %)" in headline


def test_each_viewer_has_its_own_filters_over_the_one_capture(fresh, capture):
    total, _ = tshark_count(capture, "frame")
    mine, _ = tshark_count(capture, f"ip.src=={SPIKER}")
    filtered = loaded(fresh, capture, src=SPIKER)
    plain_view = run_until(app(), lambda a: metric(a, "Status").value == "finished")
    assert (count(filtered), count(plain_view)) == (mine, total)
    filtered.run()  # the other viewer's page does not change this one's filters
    assert count(filtered) == mine and not any(b.label.startswith("✕") for b in plain_view.button)


def test_a_filter_that_matches_nothing_draws_an_empty_page_not_an_error(fresh, capture):
    at = loaded(fresh, capture, src="10.99.99.99", **{"from": str(T0 + 5), "to": str(T0 + 6)})
    assert not at.exception and count(at) == 0
    assert any("0 packets match the filters" in rendered(c.value) for c in at.caption)
    assert not any("No packets yet" in i.value for i in at.info)  # the capture has packets: the filter has none
