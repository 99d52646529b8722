"""The operator's secrets go only where the operator sent them: a webhook or SMTP server set on the page
gets no bearer token and no SMTP password, the password file is no page field, a redirect carries no token,
and errors that quote a secret are redacted. Real receivers on 127.0.0.1."""

from __future__ import annotations

import http.server
import threading

import pytest
from conftest import wait_for
from notifyhelp import SmtpReceiver, WebhookReceiver, free_port

from analysis.detect import Alert
from notify.control import AlertControls
from notify.destinations import Webhook
from notify.notifier import Notifier


def alert(source: str = "10.0.0.1") -> Alert:
    return Alert("port_scan", "medium", source, "10.0.0.2", 1.7e9, 1.7e9 + 1, 1, "20 ports", "a scan")


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setenv("NTM_NOTIFY_BACKOFF_S", "0.05")
    monkeypatch.setenv("NTM_NOTIFY_RETRIES", "0")
    monkeypatch.setenv("NTM_NOTIFY_TIMEOUT_S", "2")
    monkeypatch.setenv("NTM_STORE_SENSOR", "unit")
    return monkeypatch


def test_a_page_set_webhook_never_gets_the_operators_bearer_token(quick, tmp_path):
    token = tmp_path / "token"
    token.write_text("ADMIN-BEARER-TOKEN\n")
    operator, page = WebhookReceiver(), WebhookReceiver()
    quick.setenv("NTM_NOTIFY_WEBHOOK_TOKEN_FILE", str(token))
    quick.setenv("NTM_NOTIFY_WEBHOOK", operator.url("/op"))
    n = Notifier()
    controls = AlertControls(None, n, lambda: None, [])
    try:
        n.offer(1, [alert()])
        assert wait_for(lambda: operator.headers, 5)
        # What a signed-in viewer does on the page: their webhook, and the operator's one kept beside it.
        assert controls.set_destinations({"NOTIFY_WEBHOOK": f"{page.url('/x')} {operator.url('/op')}"}) == []
        n.offer(1, [alert("10.0.0.9")])
        assert wait_for(lambda: page.headers and len(operator.headers) == 2, 5)
    finally:
        n.close()
        operator.close()
        page.close()
    assert [h.get("Authorization") for h in operator.headers] == ["Bearer ADMIN-BEARER-TOKEN"] * 2
    assert [h.get("Authorization") for h in page.headers] == [None]


def test_a_page_set_smtp_server_never_gets_the_password(quick, tmp_path):
    (tmp_path / "op").mkdir()
    (tmp_path / "page").mkdir()
    operator = SmtpReceiver(tmp_path / "op")
    page = SmtpReceiver(tmp_path / "page", auth_required=False)  # takes mail with or without a login
    ca = tmp_path / "ca.pem"
    ca.write_text(operator.cert.read_text() + page.cert.read_text())
    for name, value in {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": operator.port, "SMTP_USER": operator.user,
                        "SMTP_PASSWORD_FILE": operator.password_file, "SMTP_CA_FILE": ca,
                        "NOTIFY_EMAIL_TO": "noc@example.org"}.items():
        quick.setenv(f"NTM_{name}", str(value))
    n = Notifier()
    controls = AlertControls(None, n, lambda: None, [])
    try:
        n.offer(1, [alert()])
        assert n.flush(10) and len(operator.messages) == 1, n.status()
        with pytest.raises(ValueError, match="SMTP_PASSWORD_FILE is not a destination setting"):
            controls.set_destinations({"SMTP_PASSWORD_FILE": "/etc/shadow"})
        # The page points e-mail at another server (the config's user stays): it gets mail, never a login.
        assert controls.set_destinations({"SMTP_PORT": page.port}) == []
        assert "no login" in n.status()["destinations"][0]["destination"]
        n.offer(1, [alert("10.0.0.9")])
        assert n.flush(10) and len(page.messages) == 1, n.status()
    finally:
        n.close()
        operator.close()
        page.close()
    assert operator.logins == [(operator.user, operator.password)]
    assert page.logins == [] and page.tls_sessions == [True]


def test_the_password_file_saved_by_an_older_page_is_ignored(quick, tmp_path):
    from store.embedded import EmbeddedStore

    store = EmbeddedStore(str(tmp_path / "h.duckdb"))
    assert store.open()
    store.put_doc("notify", "settings", {"SMTP_PASSWORD_FILE": "/etc/shadow", "NOTIFY_EMAIL_TO": "a@example.org",
                                         "SMTP_HOST": "127.0.0.1"})
    n = Notifier()
    try:
        controls = AlertControls(store, n, lambda: None, [])
        assert controls.destinations == {"NOTIFY_EMAIL_TO": "a@example.org", "SMTP_HOST": "127.0.0.1"}
        assert n.settings.values["SMTP_PASSWORD_FILE"] == ""
    finally:
        n.close()
        store.close()


class _Redirector:
    """An HTTP server that answers every POST with a 302 to `target`, and one that counts what follows it."""

    def __init__(self, target: str) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_webhook_redirect_is_a_failure_and_carries_no_token(tmp_path):
    token = tmp_path / "token"
    token.write_text("ADMIN-BEARER-TOKEN\n")
    elsewhere_gets = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            elsewhere_gets.append(dict(self.headers))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    got = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=got.serve_forever, daemon=True).start()
    hop = _Redirector(f"http://127.0.0.1:{got.server_address[1]}/steal")
    try:
        hook = Webhook(hop.url(), str(token), timeout=2)
        with pytest.raises(OSError, match="HTTP 302"):
            hook.send([{"kind": "alert", "text": "t"}])
    finally:
        hop.close()
        got.shutdown()
        got.server_close()
    assert elsewhere_gets == []  # urllib would have followed as a GET, with the Authorization header


def test_errors_that_quote_the_url_or_the_token_are_redacted(tmp_path):
    # http.client quotes a URL it refuses, and a header value it refuses: both hold a secret here.
    hook = Webhook(f"http://127.0.0.1:{free_port()}/services/T0KEN-path x")
    with pytest.raises(OSError) as exc:  # an OSError, as the channel counts and retries it
        hook.send([{"kind": "alert", "text": "t"}])
    assert "T0KEN-path" in str(exc.value)  # the error really holds it ...
    assert "T0KEN-path" not in hook.error_text(exc.value)  # ... and what is logged and shown does not
    token = tmp_path / "token"
    token.write_text("bearer-s3cret\nsecond-line\n")
    receiver = WebhookReceiver()
    try:
        hook = Webhook(receiver.url(), str(token))
        with pytest.raises(ValueError) as exc:
            hook.send([{"kind": "alert", "text": "t"}])
    finally:
        receiver.close()
    assert "bearer-s3cret" in str(exc.value)
    text = hook.error_text(exc.value)
    assert "s3cret" not in text and "second-line" not in text and "***" in text


def test_the_store_holding_page_destinations_is_private(tmp_path):
    import os
    import stat

    from store.embedded import EmbeddedStore

    def mode(p) -> int:
        return stat.S_IMODE(os.stat(p).st_mode)

    old = os.umask(0o022)  # the usual umask: what DuckDB and makedirs would otherwise use
    try:
        folder = tmp_path / "made-here"
        store = EmbeddedStore(str(folder / "h.duckdb"))
        assert store.open()
        for i in range(2):  # a checkpoint in between: DuckDB makes the log afresh
            store.put_doc("notify", "settings", {"NOTIFY_WEBHOOK": f"https://hooks.example.org/T0KEN{i}"})
            assert (folder / "h.duckdb.wal").exists()
            assert (mode(folder), mode(folder / "h.duckdb"), mode(folder / "h.duckdb.wal")) == (0o700, 0o600, 0o600)
            store._con.execute("CHECKPOINT")
        store.close()
        assert mode(folder / "h.duckdb") == 0o600
    finally:
        os.umask(old)
