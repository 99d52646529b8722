"""The page's alert settings through AppTest: exclusion rules (add, edit, bad input, remove, saved in the
store), destinations (editable only when signed in with ACCESS_PASSWORD, read-only without it; a secret is
never echoed back; the page-set webhook and its give-ups work), and the
per-detector switches and thresholds, proved with nmap traffic on lo reaching the running detectors."""

from __future__ import annotations

import time

import pytest
from conftest import wait_for
from notifyhelp import WebhookReceiver, free_port, nmap_scan, scan_port
from test_adversarial import Tcpdump
from test_dashboard import app, count, fresh, metric, run_until, write_capture  # noqa: F401  (the fresh fixture)

from packet_processor import engines
from store.embedded import EmbeddedStore


def page_text(at) -> str:
    """Every element's protobuf as text (labels, values, defaults, table cells): what a browser could get."""
    out = []

    def walk(node) -> None:
        proto = getattr(node, "proto", None)
        if proto is not None:
            out.append(str(proto))
        for child in getattr(node, "children", {}).values():
            walk(child)

    walk(at._tree)
    for df in at.dataframe:
        out.append(df.value.to_csv())
    return "\n".join(out)


def the_engine():
    """The page's engine: the one running (the fixture stopped every earlier one)."""
    (eng,) = [e for e in engines() if e.status().state == "running"]
    return eng


def opened(at):
    """The page with the alert settings shown (a toggle: they are not drawn until asked for)."""
    assert not [w for w in at.get("text_input") if str(w.key).startswith("ap_")]
    at.toggle(key="ap_show").set_value(True).run()
    return at


def live_page(env, sport: int):
    env.setenv("NTM_INTERFACE", "lo")
    env.setenv("NTM_BPF_FILTER", f"tcp port {sport}")
    at = app().run()
    assert metric(at, "Status").value == "running", at.error
    return opened(at)


def port_scans(eng) -> list[tuple[str, str]]:
    return sorted((a.source, a.target) for a in eng.snapshot().alerts if a.detector == "port_scan")


def analysed(eng) -> bool:
    t = eng.snapshot().totals
    st = t["stages"]["detectors"]
    return t["packets"] > 0 and st["packets_analysed"] + st["packets_skipped"] == t["packets"]


def test_rules_are_added_edited_and_refused_on_the_page(fresh, tmp_path):  # noqa: F811
    store = str(tmp_path / "h.duckdb")
    fresh.setenv("NTM_STORE", store)
    fresh.setenv("NTM_INTERFACE", "lo")
    fresh.setenv("NTM_BPF_FILTER", "udp port 9")
    at = opened(app().run())
    at.text_input(key="ap_r_name_new").input("audit box")
    at.selectbox(key="ap_r_det_new").select("port_scan")
    at.text_input(key="ap_r_src_new").input("10.20.0.0/16")
    at.number_input(key="ap_r_port_new").set_value(22)
    at.text_input(key="ap_r_comment_new").input("weekly audit")
    at.button(key="ap_r_save_new").click().run()
    assert not at.exception
    assert any("Saved rule audit box" in s.value for s in at.success)
    rules = next(d.value for d in at.dataframe if "rule" in d.value.columns)
    row = rules.iloc[0]
    assert (row["rule"], row["detector"], row["source"], row["port"], row["target"], row["comment"]) == \
        ("audit box", "port_scan", "10.20.0.0/16", 22, "any", "weekly audit")
    # Bad input: a clear error, nothing saved.
    at.text_input(key="ap_r_name_new").input("bad")
    at.text_input(key="ap_r_src_new").input("10.20.0.300")
    at.button(key="ap_r_save_new").click().run()
    assert any("source '10.20.0.300' is not an address" in e.value.replace("\\", "") for e in at.error)
    assert list(the_engine().controls.rules) == ["audit box"]
    # Edit it.
    at.selectbox(key="ap_rule_pick").select("audit box").run()
    at.text_input(key="ap_r_comment_audit box").input("monthly audit now")
    at.button(key="ap_r_save_audit box").click().run()
    assert the_engine().controls.rules["audit box"].comment == "monthly audit now"
    the_engine().close_store()
    saved = EmbeddedStore(store, read_only=True)
    assert saved.open()
    assert [(d["name"], d["body"]["comment"]) for d in saved.docs("exclusion")] == [("audit box", "monthly audit now")]
    saved.close()


def test_remove_export_and_import_rules(fresh, tmp_path):  # noqa: F811
    fresh.setenv("NTM_STORE", str(tmp_path / "h.duckdb"))
    fresh.setenv("NTM_INTERFACE", "lo")
    fresh.setenv("NTM_BPF_FILTER", "udp port 9")
    at = opened(app().run())
    controls = the_engine().controls
    controls.put_rule({"name": "a", "detector": "spike"})
    controls.put_rule({"name": "b", "target": "127.0.0.9", "comment": "lab"})
    exported = controls.export_rules()
    at.run()
    at.selectbox(key="ap_rule_pick").select("a").run()
    at.button(key="ap_rule_remove").click().run()
    assert any("Removed rule a" in s.value for s in at.success)
    assert list(controls.rules) == ["b"]
    assert controls.import_rules(exported) == 2
    assert sorted(controls.rules) == ["a", "b"] and controls.rules["b"].comment == "lab"
    with pytest.raises(ValueError, match="not a rules file"):
        controls.import_rules(b'{"rules": []}')
    assert sorted(controls.rules) == ["a", "b"]


def test_without_access_password_destinations_are_read_only(fresh, tmp_path):  # noqa: F811
    fresh.setenv("NTM_PCAP", write_capture(tmp_path))
    fresh.setenv("NTM_NOTIFY_SYSLOG", "udp://127.0.0.1:9")
    at = opened(app().run())
    assert not at.exception
    assert any("read-only here" in i.value and "ACCESS_PASSWORD" in i.value for i in at.info)
    assert any("udp://127.0.0.1:9" in c.value.replace("\\", "") for c in at.caption)
    keys = [str(w.key) for kind in ("text_input", "number_input", "checkbox", "button")
            for w in at.get(kind) if w.key]
    assert not [k for k in keys if k.startswith("ap_d_")], keys
    assert "ap_r_save_new" in keys  # the rest of the settings is there: only destinations are held back


def signed_in_page(env, sport: int, password: str = "s3cret-pass"):
    """A live page behind ACCESS_PASSWORD, signed in, settings shown."""
    env.setenv("NTM_ACCESS_PASSWORD", password)
    env.setenv("NTM_INTERFACE", "lo")
    env.setenv("NTM_BPF_FILTER", f"tcp port {sport}")
    at = app().run()
    at.text_input(key="password").input(password).run()
    at = run_until(at, lambda a: bool(a.metric) and metric(a, "Status").value == "running")
    return opened(at)


@pytest.mark.live
def test_destinations_never_echo_the_secret_and_show_give_ups(fresh, root_only):  # noqa: F811
    fresh.setenv("NTM_NOTIFY_RETRIES", "1")
    fresh.setenv("NTM_NOTIFY_BACKOFF_S", "0.1")
    fresh.setenv("NTM_NOTIFY_TIMEOUT_S", "1")
    fresh.setenv("NTM_HISTORY", "false")
    sport = scan_port()
    at = signed_in_page(fresh, sport)
    token = "XOXB-SECRET-7f3a9c"
    dead = f"http://127.0.0.1:{free_port()}/services/{token}"
    at.text_input(key="ap_d_hook").input(dead)
    at.button(key="ap_d_save").click().run()
    assert any("Destinations saved" in s.value for s in at.success), at.error
    assert at.text_input(key="ap_d_hook").value == ""
    assert token not in page_text(at)
    assert any("Webhook: webhook http://127.0.0.1" in c.value.replace("\\", "") for c in at.caption)
    dump = Tcpdump("lo", f"tcp port {sport}")
    try:
        nmap_scan(sport, "47000-47299", "127.0.0.1")
        ref, ref_dropped = dump.finish()
    finally:
        dump.kill()
    at = run_until(at, lambda a: any("1 given up" in w.value for w in a.warning), 20)
    warning = next(w.value for w in at.warning if "given up" in w.value)
    assert "0 sent" in warning and token not in page_text(at)
    # The page's numbers are exact while delivery failed: every packet tcpdump saw is counted.
    at = run_until(at, lambda a: count(a) == ref, 10)
    assert (count(at), ref_dropped) == (ref, 0) and ref >= 600
    # A working receiver set on the page gets the next scan's alert; the secret stays hidden.
    hook = WebhookReceiver()
    try:
        at.text_input(key="ap_d_hook").input(hook.url(f"/services/{token}"))
        at.button(key="ap_d_save").click().run()
        nmap_scan(sport, "47000-47299", "127.0.0.2")
        assert wait_for(lambda: hook.docs, 20), the_engine().notifier.status()
        assert [(d["detector"], d["target"]) for d in hook.docs] == [("port_scan", "127.0.0.2")]
        at.run()
        assert token not in page_text(at)
    finally:
        hook.close()


@pytest.mark.live
def test_detector_switches_and_thresholds_reach_the_running_capture(fresh, root_only):  # noqa: F811
    fresh.setenv("NTM_HISTORY", "false")
    sport = scan_port()
    at = live_page(fresh, sport)
    eng = the_engine()
    pid = eng._stage.pid()
    at.checkbox(key="ap_on_port_scan").uncheck()
    at.button(key="ap_detectors_apply").click().run()
    assert not at.exception and eng.controls.disabled == {"port_scan"}
    nmap_scan(sport, "48000-48299", "127.0.0.1")
    assert wait_for(lambda: analysed(eng), 10)
    time.sleep(0.5)
    assert port_scans(eng) == []  # switched off on the page: the scan raised nothing
    at.checkbox(key="ap_on_port_scan").check()
    at.number_input(key="ap_th_SCAN_PORTS").set_value(1000)
    at.button(key="ap_detectors_apply").click().run()
    nmap_scan(sport, "48000-48299", "127.0.0.2")
    assert wait_for(lambda: analysed(eng), 10)
    time.sleep(0.5)
    assert port_scans(eng) == []  # on again, but 300 ports are under the page's threshold of 1000
    at.number_input(key="ap_th_SCAN_PORTS").set_value(200)
    at.button(key="ap_detectors_apply").click().run()
    nmap_scan(sport, "48000-48299", "127.0.0.3")
    assert wait_for(lambda: port_scans(eng) == [("127.0.0.1", "127.0.0.3")], 10), port_scans(eng)
    assert eng._stage.pid() == pid  # the same worker process: nothing was restarted
    assert at.number_input(key="ap_th_SCAN_PORTS").value == 200
