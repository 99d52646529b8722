"""Exclusion rules, the alert book's exclusion hook and the delivery stage's rules (repeats, digests,
queue bound, secrets, refusing a clear-text password), each against a real receiver where one is involved.
The alerts here are the book's own Alert rows; the live tests raise them from nmap traffic."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
from conftest import wait_for
from notifyhelp import SmtpReceiver, SyslogReceiver, WebhookReceiver, free_port

from analysis.detect import Alert, AlertBook
from analysis.headers import PACKET_DTYPE
from analysis.rules import RuleError, RuleSet, export_text, import_text, rule_from
from analysis.stages import config_message
from notify.destinations import Email, Webhook, syslog_message
from notify.notifier import Notifier

LOCAL = [__import__("ipaddress").ip_network("10.0.0.0/8")]


def alert(source: str = "10.0.0.1", target: str = "10.0.0.2", detector: str = "port_scan", count: int = 1,
          t: float = 1_700_000_000.0, evidence: str = "20 ports") -> Alert:
    return Alert(detector, "medium", source, target, t, t + count, count, evidence, "a scan")


# -- rules ------------------------------------------------------------------------------------


def test_rules_match_detector_networks_port_direction_and_expiry():
    now = [1000.0]
    rules = RuleSet([rule_from({"name": "net", "source": "10.1.0.0/16"}),
                     rule_from({"name": "port", "detector": "port_scan", "port": 22}),
                     rule_from({"name": "v6", "target": "2001:db8::/32"}),
                     rule_from({"name": "inbound", "detector": "new_host", "direction": "in"}),
                     rule_from({"name": "soon", "target": "10.9.9.9", "expires": 1500})], LOCAL, clock=lambda: now[0])
    assert rules.match("port_scan", "10.1.2.3", "10.0.0.2").name == "net"
    assert rules.match("spike", "10.1.2.3", "packets/s").name == "net"
    assert rules.match("port_scan", "10.2.2.3", "10.0.0.2") is None
    assert rules.match("port_scan", "10.2.2.3", "tcp/22").name == "port"  # a horizontal scan names its port
    assert rules.match("port_scan", "10.2.2.3", "tcp/23") is None
    assert rules.match("syn_flood", "12 source(s)", "2001:db8::5").name == "v6"
    assert rules.match("syn_flood", "12 source(s)", "10.0.0.5") is None  # a count of sources is no address
    assert rules.match("new_host", "192.0.2.1", "10.0.0.5").name == "inbound"
    assert rules.match("new_host", "10.0.0.6", "10.0.0.5") is None  # local, not in
    assert rules.match("port_scan", "::ffff:10.1.0.9", "10.0.0.2").name == "net"  # mapped IPv4
    assert rules.match("port_scan", "10.3.0.1", "10.9.9.9").name == "soon"
    now[0] = 1500.0
    assert rules.match("port_scan", "10.3.0.1", "10.9.9.9") is None  # expired
    again = pickle.loads(pickle.dumps(rules))  # as the worker process gets it
    assert [r.name for r in again.rules] == [r.name for r in rules.rules]


def test_direction_rules_reach_alerts_with_one_address_end():
    rules = RuleSet([rule_from({"name": "in", "direction": "in"}),
                     rule_from({"name": "out", "direction": "out"})], LOCAL)
    assert rules.match("syn_flood", "12 source(s)", "10.0.0.5").name == "in"  # a flood on a local host
    assert rules.match("arp_spoof", "02:00:00:00:00:01", "10.0.0.7").name == "in"
    assert rules.match("port_scan", "10.0.0.9", "tcp/22").name == "out"  # a local host sweeping others
    assert rules.match("syn_flood", "12 source(s)", "192.0.2.5") is None  # one non-local end: no direction
    assert rules.match("port_scan", "192.0.2.9", "tcp/22") is None
    assert rules.match("spike", "all traffic", "packets/s") is None  # no address: no direction
    assert rules.match("new_host", "192.0.2.1", "10.0.0.5").name == "in"  # both ends, as before
    assert rules.match("new_host", "192.0.2.1", "198.51.100.1") is None  # transit


@pytest.mark.parametrize(("data", "why"), [
    ({"name": "x"}, "at least one of"),
    ({"name": "", "detector": "spike"}, "rule name"),
    ({"name": "x", "source": "10.0.0.300"}, "not an address"),
    ({"name": "x", "port": 70000}, "between 0 and 65535"),
    ({"name": "x", "direction": "sideways", "detector": "spike"}, "direction"),
    ({"name": "x", "detector": "spike", "colour": "red"}, "unknown rule field"),
    ({"name": "x", "detector": "nonsense"}, "not one of"),
])
def test_bad_rules_are_clear_errors(data, why):
    with pytest.raises(RuleError, match=why):
        rule_from(data, ("spike", "port_scan"))


def test_rules_file_round_trips_and_bad_files_import_nothing():
    rules = [rule_from({"name": "a", "detector": "spike", "comment": "noisy"}),
             rule_from({"name": "b", "source": "10.0.0.0/8", "expires": 2e9})]
    assert import_text(export_text(rules)) == rules
    with pytest.raises(RuleError, match="not a rules file"):
        import_text("{not json")
    with pytest.raises(RuleError, match="appears twice"):
        import_text(export_text([rules[0], rules[0]]))
    with pytest.raises(RuleError, match="rule name"):
        import_text('{"kind": "ntm-exclusions", "rules": [{"name": "ok", "detector": "spike"}, {"name": ""}]}')


# -- the alert book -----------------------------------------------------------------------------


def test_the_book_keeps_excluded_alerts_apart_counted_per_rule():
    book = AlertBook()
    book.set_rules(RuleSet([rule_from({"name": "lab", "source": "10.0.0.5"})], LOCAL))
    for i in range(3):  # one scan seen three times: one suppressed alert, count 3
        book.raise_alert("port_scan", "medium", "10.0.0.5", "10.0.0.1", 100.0 + i, f"{15 + i} ports", "m")
    book.raise_alert("port_scan", "medium", "10.0.0.5", "10.0.0.2", 104.0, "15 ports", "m")
    book.raise_alert("port_scan", "medium", "10.0.0.6", "10.0.0.1", 105.0, "15 ports", "m")
    assert [(a.source, a.target) for a in book.alerts()] == [("10.0.0.6", "10.0.0.1")]
    assert book.excluded_counts() == {"lab": 2}
    rows = book.excluded()
    assert [(r, a.target, a.count, a.evidence) for r, a in rows] == [("lab", "10.0.0.2", 1, "15 ports"),
                                                                       ("lab", "10.0.0.1", 3, "17 ports")]
    copy = pickle.loads(pickle.dumps(book))  # the worker's book travels like this
    assert copy.excluded_counts() == {"lab": 2}
    book.clear()
    assert book.excluded_counts() == {} and book.excluded() == []
    book.raise_alert("port_scan", "medium", "10.0.0.5", "10.0.0.1", 200.0, "15 ports", "m")
    assert book.alerts() == [] and book.excluded_counts() == {"lab": 1}  # the rules outlive a clear


def test_config_messages_are_never_mistaken_for_batches():
    from analysis.detect import Detectors
    from analysis.stages import _command, _is_command

    padded = 0
    for n in range(0, 2 * PACKET_DTYPE.itemsize):  # every length modulo the record size
        msg = config_message({"SCAN_PORTS": 20}, {"spike"}, [{"name": "r", "comment": "x" * n}], ["10.0.0.0/8"])
        assert _is_command(msg), len(msg)  # the worker's own test: this goes to _command, not the detectors
        padded += msg.endswith(b" ")  # JSON ends with '}': a space is the padding of an unlucky length
    assert padded > 0  # the lengths tried include ones that are a multiple of the record size unpadded
    for k in (1, 2, 3, 100):
        assert not _is_command(np.zeros(k, PACKET_DTYPE).tobytes())
    _, det = _command(config_message({"SCAN_PORTS": 77}, {"spike"}, [], []), AlertBook(), Detectors())
    assert det.overrides == {"SCAN_PORTS": 77} and det.disabled == {"spike"}


# -- delivery ---------------------------------------------------------------------------------


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setenv("NTM_NOTIFY_BACKOFF_S", "0.05")
    monkeypatch.setenv("NTM_NOTIFY_TIMEOUT_S", "2")
    monkeypatch.setenv("NTM_STORE_SENSOR", "unit")
    return monkeypatch


def test_a_repeat_updates_within_the_window_and_is_sent_again_after_it(quick):
    hook = WebhookReceiver()
    clock = [0.0]
    quick.setenv("NTM_NOTIFY_REPEAT_S", "300")
    n = Notifier(clock=lambda: clock[0])
    n.configure({"NOTIFY_WEBHOOK": hook.url()})
    try:
        n.offer(1, [alert(count=1)])
        assert wait_for(lambda: len(hook.docs) == 1)
        for c in (2, 3, 4):  # the scan goes on: updates, nothing sent
            clock[0] += 50
            n.offer(1, [alert(count=c)])
            assert wait_for(lambda c=c: n.updated == c - 1)
        clock[0] += 200  # 300 s after the first notification
        n.offer(1, [alert(count=5)])
        assert wait_for(lambda: len(hook.docs) == 2)
        n.offer(1, [alert(count=5), alert(source="10.0.0.9")])  # a new key is sent at once
        assert wait_for(lambda: len(hook.docs) == 3)
    finally:
        n.close()
        hook.close()
    assert [(d["repeat"], d["count"], d["source"]) for d in hook.docs] == [(False, 1, "10.0.0.1"),
                                                                          (True, 5, "10.0.0.1"),
                                                                          (False, 1, "10.0.0.9")]


def test_an_email_digest_collects_alerts_into_one_message(quick, tmp_path):
    smtp = SmtpReceiver(tmp_path)
    quick.setenv("NTM_SMTP_CA_FILE", str(smtp.cert))
    quick.setenv("NTM_SMTP_HOST", "127.0.0.1")  # the operator's server: the only one the password goes to
    quick.setenv("NTM_SMTP_PORT", str(smtp.port))
    quick.setenv("NTM_SMTP_USER", smtp.user)
    quick.setenv("NTM_SMTP_PASSWORD_FILE", str(smtp.password_file))
    n = Notifier()
    errors = n.configure({"NOTIFY_EMAIL_TO": "a@example.org,b@example.org", "NOTIFY_DIGEST_MIN": 1})
    try:
        assert errors == []
        n.offer(1, [alert(target=f"10.0.0.{i}") for i in range(2, 5)])
        time.sleep(1.5)
        assert smtp.messages == []  # a digest waits for its minute
        assert n.flush(10)  # at exit (or after the minute) it goes, as one message
    finally:
        n.close()
        smtp.close()
    assert len(smtp.messages) == 1 and smtp.tls_sessions == [True]
    assert smtp.logins == [(smtp.user, smtp.password)]  # the server takes no mail without this login
    body = smtp.messages[0].content.decode()
    assert "3 alerts on unit" in body and all(f"10.0.0.{i}" in body for i in range(2, 5))
    assert sorted(smtp.messages[0].rcpt_tos) == ["a@example.org", "b@example.org"]


def test_no_password_is_sent_without_starttls(quick, tmp_path):
    from aiosmtpd.controller import Controller

    got = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            got.append(envelope)
            return "250 OK"

    port = free_port()
    plain_server = Controller(Handler(), hostname="127.0.0.1", port=port)  # no TLS offered
    plain_server.start()
    secret = tmp_path / "pw"
    secret.write_text("do-not-send-me\n")
    try:
        mail = Email("a@example.org", "127.0.0.1", port, user="ntm", password_file=str(secret))
        with pytest.raises(OSError, match="offers no STARTTLS"):
            mail.send([{"kind": "alert", **_doc()}])
        Email("a@example.org", "127.0.0.1", port).send([{"kind": "alert", **_doc()}])  # no login: plain is fine
    finally:
        plain_server.stop()
    assert len(got) == 1


def _doc() -> dict:
    return {"severity": "high", "detector": "syn_flood", "sensor": "unit", "source": "3 source(s)",
            "target": "10.0.0.2", "count": 1, "first_seen": "x", "last_seen": "y", "evidence": "e"}


def test_webhook_token_header_and_no_secret_in_errors(quick, tmp_path):
    token = tmp_path / "token"
    token.write_text("bearer-s3cret\n")
    ok = WebhookReceiver()
    bad = WebhookReceiver(status=500)
    try:
        with_token = Webhook(ok.url("/path-token-xyz"), str(token))
        with_token.send([{"kind": "alert", "text": "t"}])
        assert ok.headers[0]["Authorization"] == "Bearer bearer-s3cret"
        assert "bearer-s3cret" in with_token.secrets()  # so redact() hides it wherever an error quotes it
        assert with_token.error_text(OSError("refused: Bearer bearer-s3cret")) == "OSError: refused: Bearer ***"
        hook = Webhook(bad.url("/path-token-xyz"))
        with pytest.raises(OSError) as exc:
            hook.send([{"kind": "alert", "text": "t"}])
        text = hook.error_text(exc.value)
        assert "HTTP 500" in text and "path-token-xyz" not in text and "path-token-xyz" not in hook.describe()
    finally:
        ok.close()
        bad.close()


def test_a_full_queue_gives_up_the_oldest_counted(quick):
    slow = WebhookReceiver(delay=1.0)
    quick.setenv("NTM_NOTIFY_QUEUE_MAX", "2")
    quick.setenv("NTM_NOTIFY_RATE_MAX", "100")
    n = Notifier()
    n.configure({"NOTIFY_WEBHOOK": slow.url()})
    try:
        n.offer(1, [alert(source=f"10.0.1.{i}") for i in range(6)])
        # Two wait (the bound) and one may already be on its way: three or four of six are given up.
        assert wait_for(lambda: n.status()["destinations"][0]["queue_dropped"] >= 3, 5), n.status()
        dropped = n.status()["destinations"][0]["queue_dropped"]
        assert wait_for(lambda: n.status()["sent"] == 6 - dropped, 10), n.status()
    finally:
        n.close()
        slow.close()
    st = n.status()
    assert dropped in (3, 4) and st["given_up"] == dropped and st["destinations"][0]["queued"] == 6
    # The book lists newest first and the dispatcher offers oldest first: 10.0.1.0 came last, and was kept.
    assert "10.0.1.0" in [d["source"] for d in slow.docs]


def test_syslog_structured_data_escapes_and_strict_parse():
    udp = SyslogReceiver("udp")
    try:
        from notify.destinations import Syslog

        doc = {"kind": "alert", "severity": "high", "detector": "arp_spoof", "source": "02:00:00:00:00:01",
               "target": "10.0.0.1", "count": 2, "sensor": "s", "first_seen": "a", "last_seen": "b",
               "evidence": 'says "10.0.0.1 is at" [x] \\ back – ünïcode'}
        Syslog(udp.url(), hostname="host with space").send([doc])
        assert wait_for(lambda: udp.raw)
        m = udp.messages()[0]
    finally:
        udp.close()
    assert (m["severity"], m["host"], m["app"]) == (2, "host_with_space", "network-traffic-monitor")
    assert m["sd"]["ntm@32473"]["evidence"] == doc["evidence"]
    assert m["msg"].endswith(doc["evidence"])
    raw = syslog_message(doc, "h", now=0.0)
    assert raw.startswith(b"<130>1 1970-01-01T00:00:00.000000Z h network-traffic-monitor ")


def test_a_store_that_cannot_save_leaves_the_rule_applied_and_says_so(tmp_path):
    from notify.control import AlertControls
    from store.embedded import EmbeddedStore

    path = str(tmp_path / "h.duckdb")
    writer = EmbeddedStore(path)
    assert writer.open()
    writer.put_doc("exclusion", "old", {"name": "old", "detector": "spike"})
    writer.put_doc("exclusion", "broken", {"name": "broken"})  # matches everything: refused when read
    writer.close()
    ro = EmbeddedStore(path, read_only=True)
    assert ro.open()
    sent = []

    class Stage:
        error = None

        def configure(self, msg: bytes) -> None:
            sent.append(msg)

    controls = AlertControls(ro, Notifier(), lambda: Stage(), ["10.0.0.0/8"])
    assert list(controls.rules) == ["old"] and controls.error is None
    controls.put_rule({"name": "new", "source": "10.0.0.5"})
    assert sorted(controls.rules) == ["new", "old"] and b'"new"' in sent[-1]  # applied to the detectors
    assert "not saved in the history store" in controls.error and "read-only" in controls.error
    ro.close()


def test_detector_settings_and_destinations_survive_a_restart(tmp_path):
    from notify.control import AlertControls
    from store.embedded import EmbeddedStore

    path = str(tmp_path / "h.duckdb")
    for round_ in range(2):
        store = EmbeddedStore(path)
        assert store.open()
        notifier = Notifier()
        controls = AlertControls(store, notifier, lambda: None, [])
        if round_ == 0:
            controls.set_detectors({"SCAN_PORTS": 40, "SPIKE_SIGMAS": 4.0}, {"spike"})  # 4.0 is the default
            with pytest.raises(ValueError, match="SCAN_PORTS must be at least 1"):
                controls.set_detectors({"SCAN_PORTS": 0}, set())
            with pytest.raises(ValueError, match="not a threshold"):
                controls.set_detectors({"DETECTOR_STATE_MAX": 10}, set())
            assert controls.set_destinations({"NOTIFY_SYSLOG": "udp://127.0.0.1:9", "NOTIFY_WEBHOOK": ""}) == []
            with pytest.raises(ValueError, match="NOTIFY_SYSLOG"):
                controls.set_destinations({"NOTIFY_SYSLOG": "http://nope"})
        assert controls.overrides == {"SCAN_PORTS": 40} and controls.disabled == {"spike"}
        assert controls.threshold("SCAN_PORTS") == 40 and controls.threshold("SCAN_HOSTS") == 10
        assert controls.destinations == {"NOTIFY_SYSLOG": "udp://127.0.0.1:9"}
        assert [d["destination"] for d in notifier.status()["destinations"]] == ["syslog udp://127.0.0.1:9"]
        notifier.close()
        store.close()


def test_any_number_of_webhooks_and_syslog_receivers_at_once(quick):
    hooks = [WebhookReceiver(), WebhookReceiver()]
    logs = [SyslogReceiver("udp"), SyslogReceiver("tcp")]
    n = Notifier()
    errors = n.configure({"NOTIFY_WEBHOOK": " ".join(h.url() for h in hooks),
                          "NOTIFY_SYSLOG": " ".join(r.url() for r in logs)})
    try:
        assert errors == [] and len(n.status()["destinations"]) == 4
        n.offer(1, [alert()])
        assert wait_for(lambda: all(h.docs for h in hooks) and all(r.raw for r in logs))
        assert n.flush(5) and n.status()["sent"] == 4
    finally:
        n.close()
        for x in (*hooks, *logs):
            x.close()
    assert [len(h.docs) for h in hooks] == [1, 1] and [len(r.messages()) for r in logs] == [1, 1]
    bad = Notifier()
    assert bad.configure({"NOTIFY_SYSLOG": "udp://127.0.0.1:9 tcp://nohost"}) == \
        ["NOTIFY_SYSLOG tcp://nohost: syslog destination 'tcp://nohost' is not udp://HOST:PORT or tcp://HOST:PORT"]
    bad.close()


def test_a_bad_webhook_setting_is_a_clear_error_that_hides_the_value(monkeypatch):
    import config

    monkeypatch.setenv("NTM_NOTIFY_WEBHOOK", "ftp://hooks.example.org/T0KEN-zz9")
    monkeypatch.setenv("NTM_NOTIFY_SYSLOG", "udp://127.0.0.1")
    bad = config.problems()
    assert any("NTM_NOTIFY_WEBHOOK=<hidden> is not valid" in p for p in bad)
    assert any("NTM_NOTIFY_SYSLOG='udp://127.0.0.1' is not valid" in p for p in bad)
    assert "T0KEN-zz9" not in " ".join(bad)


def test_a_long_syslog_datagram_is_cut_in_its_text_on_a_character_boundary():
    from notify.destinations import UDP_MAX, Syslog

    udp = SyslogReceiver("udp")
    try:
        for pad in range(3):  # one of these puts the 8,192-byte cut inside a 3-byte character
            evidence = "x" * pad + "€" * 5000  # 15,000 bytes of text: the datagram must be cut
            doc = {"kind": "alert", "severity": "high", "detector": "port_scan", "source": "10.0.0.1",
                   "target": "10.0.0.2", "count": 1, "sensor": "s", "first_seen": "a", "last_seen": "b",
                   "evidence": evidence}
            Syslog(udp.url(), hostname="h").send([doc])
            assert wait_for(lambda pad=pad: len(udp.raw) == pad + 1)
        raws = list(udp.raw)
        msgs = udp.messages()  # strict: the text must be UTF-8
    finally:
        udp.close()
    for pad, (raw, m) in enumerate(zip(raws, msgs, strict=True)):
        assert UDP_MAX - 3 <= len(raw) <= UDP_MAX
        assert m["sd"]["ntm@32473"]["evidence"] == ("x" * pad + "€" * 5000)[:1024]  # the header is whole
        assert m["sd"]["ntm@32473"]["target"] == "10.0.0.2" and m["msg"].endswith("€")
