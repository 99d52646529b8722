"""Notifications from real traffic: nmap scans on lo raise alerts that real receivers get (an HTTP server,
syslog over UDP and TCP parsed as strict RFC 5424, aiosmtpd with STARTTLS and a login); a dead or slow
receiver leaves the capture exact and its give-ups counted; a storm sends at most the rate limit and one
notice; an exclusion rule silences exactly its scanner, also after a restart; threshold and switch changes
reach the running detectors. Each test's scans leave from their own source port, and the capture filter
keeps only those packets, so other traffic on lo does not count."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time

import pytest
from conftest import PYTHON, ROOT, wait_for
from notifyhelp import SmtpReceiver, SyslogReceiver, WebhookReceiver, free_port, nmap_scan, scan_port
from test_adversarial import Tcpdump

from packet_processor import CaptureEngine, Source

pytestmark = pytest.mark.live


@pytest.fixture
def env(root_only, monkeypatch):
    """Quick delivery settings for tests; each test adds its destinations."""
    monkeypatch.setenv("NTM_NOTIFY_BACKOFF_S", "0.1")
    monkeypatch.setenv("NTM_NOTIFY_TIMEOUT_S", "2")
    monkeypatch.setenv("NTM_STORE_SENSOR", "sensor-t")
    monkeypatch.setenv("NTM_DASHBOARD_URL", "http://127.0.0.1:8501")
    return monkeypatch


def start(eng: CaptureEngine, sport: int) -> None:
    assert eng.start(Source("live", iface="lo", bpf=f"tcp port {sport}")), eng.status().error
    time.sleep(0.4)


def analysed(eng: CaptureEngine) -> bool:
    """The detectors have analysed every packet counted so far."""
    t = eng.snapshot().totals
    st = t["stages"]["detectors"]
    return t["packets"] > 0 and st["packets_analysed"] + st["packets_skipped"] == t["packets"]


def scans(eng: CaptureEngine) -> list[tuple[str, str]]:
    return sorted((a.source, a.target) for a in eng.snapshot().alerts if a.detector == "port_scan")


def test_every_destination_receives_a_real_scan_alert(env, tmp_path, caplog):
    hook, udp, tcp = WebhookReceiver(), SyslogReceiver("udp"), SyslogReceiver("tcp")
    smtp = SmtpReceiver(tmp_path)
    env.setenv("NTM_NOTIFY_WEBHOOK", hook.url("/hook/T0KEN-abc"))
    env.setenv("NTM_NOTIFY_SYSLOG", udp.url())
    env.setenv("NTM_NOTIFY_EMAIL_TO", "noc@example.org")
    env.setenv("NTM_SMTP_HOST", "127.0.0.1")
    env.setenv("NTM_SMTP_PORT", str(smtp.port))
    env.setenv("NTM_SMTP_USER", smtp.user)
    env.setenv("NTM_SMTP_PASSWORD_FILE", str(smtp.password_file))
    env.setenv("NTM_SMTP_CA_FILE", str(smtp.cert))
    caplog.set_level(logging.DEBUG)
    eng = CaptureEngine()
    env.setenv("NTM_NOTIFY_SYSLOG", tcp.url())  # a second engine sends syslog over TCP (one syslog each)
    eng2 = CaptureEngine()
    sport = scan_port()
    try:
        start(eng, sport)
        start(eng2, sport)
        nmap_scan(sport, "41000-41299")
        assert wait_for(lambda: hook.docs and tcp.raw and udp.raw and smtp.messages, 20), \
            (eng.notifier.status(), eng2.notifier.status())
        time.sleep(1.0)  # repeats of the same scan within NOTIFY_REPEAT_S must not arrive
        alert = next(a for a in eng.snapshot().alerts if a.detector == "port_scan")
    finally:
        for e in (eng, eng2):
            e.stop()
            e.close_store()
        hook.close()
        udp.close()
        tcp.close()
        smtp.close()
    docs = [d for d in hook.docs if d["detector"] == "port_scan"]
    assert len(docs) == len(hook.docs) == 2  # one from each engine (the same webhook); no repeat
    d = next(d for d in docs if d["first_ts"] == alert.first_ts)
    assert (d["source"], d["target"], d["sensor"], d["severity"]) == ("127.0.0.1", "127.0.0.1", "sensor-t", "medium")
    assert d["first_ts"] == alert.first_ts and d["count"] <= alert.count and "ports on 127.0.0.1" in d["evidence"]
    assert d["first_seen"].startswith(time.strftime("%Y-%m-%dT", time.gmtime(alert.first_ts)))
    assert d["link"].startswith("http://127.0.0.1:8501/?src=127.0.0.1&dst=127.0.0.1&from=")
    assert "port_scan" in d["text"] and d["text"].endswith("|view>") and "-&gt;" in d["text"]
    for receiver in (udp, tcp):
        msgs = receiver.messages()
        assert len(msgs) == 1, msgs
        m = msgs[0]
        assert (m["facility"], m["severity"], m["host"], m["msgid"]) == (16, 4, "sensor-t", "port_scan")
        sd = m["sd"]["ntm@32473"]
        assert (sd["detector"], sd["source"], sd["target"]) == ("port_scan", "127.0.0.1", "127.0.0.1")
        assert int(sd["count"]) >= 1 and sd["evidence"] in {x["evidence"] for x in docs} and sd["link"].startswith("http://")
        assert "port_scan" in m["msg"]
    assert len(smtp.messages) == 2 and all(smtp.tls_sessions)  # one per engine, both after STARTTLS
    mail = smtp.messages[0]
    assert mail.rcpt_tos == ["noc@example.org"] and b"port_scan" in mail.content
    # No secret in any log line or status: the webhook token, the SMTP password.
    status = json.dumps(eng.notifier.status())
    ours = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("mail"))  # not aiosmtpd's
    assert f"alerts go to webhook http://127.0.0.1:{hook.server.server_address[1]}/…" in ours
    for secret in ("T0KEN-abc", smtp.password):
        assert secret not in ours and secret not in status


def test_a_dead_or_slow_receiver_leaves_capture_exact_and_counts_give_ups(env):
    slow = WebhookReceiver(delay=3.0)
    env.setenv("NTM_NOTIFY_WEBHOOK", f"http://127.0.0.1:{free_port()}/dead")  # nothing listens there
    env.setenv("NTM_NOTIFY_RETRIES", "2")
    env.setenv("NTM_NOTIFY_TIMEOUT_S", "0.5")
    dead = CaptureEngine()
    env.setenv("NTM_NOTIFY_WEBHOOK", slow.url())
    slow_eng = CaptureEngine()
    sport = scan_port()
    dump = Tcpdump("lo", f"tcp port {sport}")
    try:
        start(dead, sport)
        start(slow_eng, sport)
        nmap_scan(sport, "42000-42299")
        ref, ref_dropped = dump.finish()
        for e in (dead, slow_eng):
            assert wait_for(lambda e=e: e.notifier.status()["given_up"] >= 1, 20), e.notifier.status()
            t = e.snapshot().totals
            assert (t["packets"], t["dropped"], ref_dropped) == (ref, 0, 0)  # the capture counted every packet
            st = e.notifier.status()["destinations"][0]
            assert st["sent"] == 0 and st["attempts"] == 3 * st["given_up"] and st["failures"] == st["attempts"]
            assert st["last_error"]
        assert slow.requests >= 3  # the slow receiver got each attempt; every one timed out
    finally:
        dump.kill()
        for e in (dead, slow_eng):
            e.stop()
            e.close_store()
        slow.close()


def test_a_storm_sends_at_most_the_rate_limit_and_one_notice(env):
    env.setenv("NTM_ALERTS_PER_DETECTOR", "2000")
    env.setenv("NTM_ALERTS_MAX", "5000")
    env.setenv("NTM_NOTIFY_RATE_MAX", "5")
    env.setenv("NTM_NOTIFY_RATE_WINDOW_S", "4")
    hook = WebhookReceiver()
    env.setenv("NTM_NOTIFY_WEBHOOK", hook.url())
    eng = CaptureEngine()
    sport = scan_port()
    try:
        start(eng, sport)
        # 200 ports on 30 addresses: a horizontal scan alert per port, a vertical one per address.
        nmap_scan(sport, "43000-43199", "127.0.0.1-30")
        assert wait_for(lambda: any(d["kind"] == "suppressed" for d in hook.docs), 20), eng.notifier.status()
        time.sleep(1.0)
        st = eng.notifier.status()["destinations"][0]
        raised = len([a for a in eng.snapshot().alerts if a.detector == "port_scan"])
    finally:
        eng.stop()
        eng.close_store()
        hook.close()
    alerts = [d for d in hook.docs if d["kind"] == "alert"]
    notices = [d for d in hook.docs if d["kind"] == "suppressed"]
    assert raised >= 200
    assert len(alerts) == 5 and len(notices) == 1
    assert notices[0]["suppressed"] == st["rate_suppressed"] == st["queued"] + st["rate_suppressed"] - 5
    assert st["rate_suppressed"] >= raised - 5
    assert f"{st['rate_suppressed']} more alerts suppressed" in notices[0]["text"]


def test_an_exclusion_silences_exactly_its_scanner_and_survives_a_restart(env, tmp_path):
    hook = WebhookReceiver()
    env.setenv("NTM_NOTIFY_WEBHOOK", hook.url())
    path = str(tmp_path / "h.duckdb")
    for round_ in range(2):
        eng = CaptureEngine(record=True, store_path=path)
        if round_ == 0:
            eng.controls.put_rule({"name": "lab scanner", "detector": "port_scan", "source": "127.0.0.5",
                                   "comment": "the weekly audit"})
        assert list(eng.controls.rules) == ["lab scanner"]  # the second engine read it from the store
        sport = scan_port()
        try:
            start(eng, sport)
            nmap_scan(sport, "44000-44299", source="127.0.0.5")
            nmap_scan(sport, "44000-44299", source="127.0.0.6")
            assert wait_for(lambda eng=eng: scans(eng) and eng.alerts.excluded()[0], 20)
            assert wait_for(lambda eng=eng: analysed(eng), 10)
            time.sleep(0.5)
            assert scans(eng) == [("127.0.0.6", "127.0.0.1")]
            counts, rows = eng.alerts.excluded()
            assert counts == {"lab scanner": 1}
            assert [(r, a.detector, a.source, a.target) for r, a in rows] == \
                [("lab scanner", "port_scan", "127.0.0.5", "127.0.0.1")]
            assert eng.snapshot().totals["alerts_excluded"] == {"lab scanner": 1}
            assert wait_for(lambda n=round_ + 1: len(hook.docs) >= n, 10)
        finally:
            eng.stop()
            eng.close_store()
    hook.close()
    assert [(d["detector"], d["source"]) for d in hook.docs] == [("port_scan", "127.0.0.6")] * 2


def test_threshold_and_switch_changes_reach_the_running_detectors(env):
    eng = CaptureEngine()
    sport = scan_port()
    try:
        start(eng, sport)
        pid = eng._stage.pid()
        eng.controls.set_detectors({"SCAN_PORTS": 1000}, set())
        nmap_scan(sport, "45000-45299", "127.0.0.1")
        assert wait_for(lambda: analysed(eng), 10)
        time.sleep(0.5)
        assert scans(eng) == []  # 300 failed ports: under the threshold set on the page
        eng.controls.set_detectors({"SCAN_PORTS": 100}, set())
        nmap_scan(sport, "45000-45299", "127.0.0.2")
        assert wait_for(lambda: scans(eng) == [("127.0.0.1", "127.0.0.2")], 10), scans(eng)
        eng.controls.set_detectors({"SCAN_PORTS": 100}, {"port_scan"})
        nmap_scan(sport, "45000-45299", "127.0.0.3")
        assert wait_for(lambda: analysed(eng), 10)
        time.sleep(0.5)
        assert scans(eng) == [("127.0.0.1", "127.0.0.2")]  # switched off: the scan of .3 raised nothing
        assert eng._stage.pid() == pid and eng.status().state == "running"  # no restart of anything
    finally:
        eng.stop()
        eng.close_store()


def test_the_headless_capture_command_delivers(env, tmp_path):
    udp = SyslogReceiver("udp")
    sport = scan_port()
    environ = dict(os.environ, NTM_NOTIFY_SYSLOG=udp.url())
    proc = subprocess.Popen([PYTHON, str(ROOT / "packet_processor.py"), "capture", "--iface", "lo", "--filter",
                             f"tcp port {sport}", "--seconds", "4"], cwd=str(tmp_path), env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)  # start-up and the capture ring
        threading.Thread(target=nmap_scan, args=(sport, "46000-46299"), daemon=True).start()
        out, err = proc.communicate(timeout=60)
    finally:
        udp.close()
        if proc.poll() is None:
            proc.kill()
    summary = json.loads(out)
    assert summary["notify"]["sent"] == 1 and summary["notify"]["given_up"] == 0, err
    msgs = udp.messages()
    assert [m["sd"]["ntm@32473"]["detector"] for m in msgs] == ["port_scan"]


def test_the_capture_json_counts_what_is_given_up_at_exit(env, tmp_path):
    # A dead webhook and a long back-off: at exit the alert still waits for its retry, and closing gives
    # it up; the JSON must say so (it was built before the close, showing 0 given up).
    sport = scan_port()
    environ = dict(os.environ, NTM_NOTIFY_WEBHOOK=f"http://127.0.0.1:{free_port()}/hook", NTM_NOTIFY_RETRIES="5",
                   NTM_NOTIFY_BACKOFF_S="60", NTM_NOTIFY_TIMEOUT_S="1")
    proc = subprocess.Popen([PYTHON, str(ROOT / "packet_processor.py"), "capture", "--iface", "lo", "--filter",
                             f"tcp port {sport}", "--seconds", "4"], cwd=str(tmp_path), env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)  # start-up and the capture ring
        threading.Thread(target=nmap_scan, args=(sport, "45000-45299"), daemon=True).start()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    notify = json.loads(out)["notify"]
    assert (notify["sent"], notify["given_up"]) == (0, 1), (notify, err[-2000:])
    assert notify["destinations"][0]["failures"] == 1  # one attempt; the retry was 60 s away at exit
