"""A clicked country or network (AS) bar filters every panel and metric (issue 15): country= and asn= in the URL.

The capture is the enrichment tests' file of public and private addresses (written, never sent); the
reference is tshark's count over the addresses test_enrich_ends.WHO names for that country or network."""

from __future__ import annotations

import shutil

import pytest
from conftest import need
from invhelp import tshark_count
from test_dashboard import array, count, figures, metric, open_tab, rendered, run_until
from test_enrich_ends import FLOWS, WHO, _pcap
from test_enrich_page import app
from test_enrich_page import fresh as fresh  # a new engine and enricher per test

import investigate_page as inv
from investigate import filters as flt


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> str:
    need(shutil.which("tshark") is not None, "tshark is the reference (apt-get install tshark)")
    path = tmp_path_factory.mktemp("invgeo") / "ends.pcap"
    _pcap(path)
    return str(path)


def either_end(col: int, key: str) -> str:
    """tshark's display filter for packets with either end among WHO's addresses of that key."""
    addrs = [a for a, who in WHO.items() if who[col] == key]
    return " || ".join(f"{'ipv6' if ':' in a else 'ip'}.addr=={a}" for a in addrs)


TAB_OF = {"who_countries": "Top countries", "who_networks": "Top networks (AS)"}  # the panel's lazy tabs


def geo_loaded(at, tab: str) -> bool:
    """The open tab's chart has the database's answers (each database loads in the background)."""
    ys = (figures(at).get(tab, {}).get("data") or [{}])[0].get("y", [])
    return "US" in ys if tab == "Top countries" else any("AS15169" in y for y in ys)


def page(monkeypatch, path: str, tab: str):
    monkeypatch.setenv("NTM_PCAP", path)
    at = app()
    at.session_state["who_tab"] = tab  # only the open tab of the panel is drawn
    at = run_until(at, lambda a: metric(a, "Status").value == "finished" and geo_loaded(a, tab), 60)
    assert geo_loaded(at, tab) and not at.exception
    return at


def chart_id(at, key: str) -> str:
    """The widget id of the page's chart `key` (a chart with on_select is a widget: its id ends with its key)."""
    ids = [c.proto.id for c in at.get("plotly_chart") if c.proto.id.endswith(key)]
    assert len(ids) == 1, f"chart {key} is not selectable (no on_select)"
    return ids[0]


def click(at, key: str, label: str):
    """A click on the bar labelled `label` of chart `key` (its first trace, 'sent'), as the browser sends it:
    the chart's selection as its widget state, so that the page's own on_select callback maps it to filters.
    (AppTest has no plotly element: the state goes through its run with the other widgets' states.)"""
    import json

    labels = at.session_state[inv.LABELS_KEY][key]
    i = labels[0].index(label)
    ws = at._tree.get_widget_states()
    w = ws.widgets.add()
    w.id = chart_id(at, key)
    w.string_value = json.dumps({"selection": {"points": [{"curve_number": 0, "point_number": i, "point_index": i,
                                                           "y": label}],
                                               "point_indices": [i], "box": [], "lasso": []}})
    return at._run(ws)


@pytest.mark.parametrize(("chart", "label", "want_pair", "col", "key"), [
    ("who_countries", "US", ("country", "US"), 0, "US"),
    ("who_networks", "AS15169 Google LLC", ("asn", "15169"), 1, "AS15169 Google LLC"),
])
def test_a_clicked_country_or_network_bar_filters_every_panel(fresh, capture, chart, label, want_pair, col, key):
    """The bar's filter lands in the URL as a chip; the Packets metric, the protocol pie, the top talkers and
    the countries chart itself then hold exactly the packets with either end there (tshark's count)."""
    total, _ = tshark_count(capture, "frame")
    assert total == sum(n for *_, n in FLOWS)
    at = page(fresh, capture, TAB_OF[chart])
    at = click(at, chart, label)
    assert not at.exception
    assert flt.from_query(at.query_params) == (want_pair,)  # the page's callback wrote the URL
    want, want_bytes = tshark_count(capture, either_end(col, key))
    assert 0 < want < total
    assert count(at) == want
    assert f"{want_bytes:,} bytes" in metric(at, "Bytes").proto.help
    assert any(rendered(b.label) == f"✕ {want_pair[0]} = {want_pair[1]}" for b in at.button)
    figs = figures(at)
    assert int(array(figs["Protocols by packets"]["data"][0]["values"]).sum()) == want
    mine = {a for a, who in WHO.items() if who[col] == key}
    for title in ("Top 10 sources", "Top 10 destinations"):
        for y in figs[title]["data"][0]["y"]:
            # Each listed address is either one of the key's own, or talked to one of them.
            assert y in mine or any({y, a} <= {s, d} for s, d, *_ in FLOWS for a in mine), (title, y)
    # The countries chart re-filters too: every packet it sums has an end in the key.
    bars = figures(open_tab(at, "Top countries"))["Top countries"]["data"]
    sent = dict(zip(bars[0]["y"], array(bars[0]["x"]).tolist()))
    received = dict(zip(bars[1]["y"], array(bars[1]["x"]).tolist()))
    if col == 0:
        assert max(sent.get(key, 0), received.get(key, 0)) > 0
    assert sum(sent.values()) == want == sum(received.values())
    # The chip removed: the whole capture again, and the URL without the key.
    chip = next(b for b in at.button if rendered(b.label).startswith(f"✕ {want_pair[0]} ="))
    chip.click().run()
    assert count(at) == total and want_pair[0] not in at.query_params


def test_country_and_asn_values_parse_and_bad_ones_say_why():
    assert flt.parse_one("asn", "AS15169").value == 15169 and flt.parse_one("asn", "15169").value == 15169
    assert flt.parse_one("asn", "private").value == "private"
    assert flt.parse_one("country", " us ").value == "us" and flt.geo_match("us", "US")
    assert flt.geo_match(15169, "AS15169 Google LLC") and not flt.geo_match(1516, "AS15169 Google LLC")
    with pytest.raises(flt.FilterError, match="asn"):
        flt.parse_one("asn", "AS99999999999")
    with pytest.raises(flt.FilterError, match="country needs a value"):
        flt.parse_one("country", " ")
    assert inv.label_filters("who_networks", "private") == [("asn", "private")]
    assert inv.label_filters("who_countries", "not in database") == [("country", "not in database")]
