"""Real receivers for the notification tests (an HTTP server, syslog over UDP and TCP, an SMTP server
with STARTTLS and a login) and nmap scans on lo that raise alerts, isolated by their source port."""

from __future__ import annotations

import http.server
import json
import random
import re
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import need


class WebhookReceiver:
    """A local HTTP server that keeps every JSON document POSTed to it; `delay` makes it slow, `status`
    makes it answer with an error; `hold` s: each request waits (at most that long) for `release` to be
    set before it answers, and `answered` is set once an answer has gone out."""

    def __init__(self, delay: float = 0.0, status: int = 204, hold: float = 0.0) -> None:
        self.docs: list[dict] = []
        self.headers: list[dict] = []
        self.requests = 0
        self.delay, self.status, self.hold = delay, status, hold
        self.release, self.answered = threading.Event(), threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.requests += 1
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.delay:
                    time.sleep(outer.delay)
                if outer.hold:
                    outer.release.wait(outer.hold)
                if outer.status < 300:
                    outer.docs.append(json.loads(body))
                    outer.headers.append(dict(self.headers))
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                outer.answered.set()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# RFC 5424 section 6, strictly: HEADER SP STRUCTURED-DATA [SP MSG]; PARAM-VALUE escapes only '"', '\\', ']'.
_PARAM = rb' [^ =\]"]{1,32}="(?:[^"\\\]]|\\["\\\]])*"'
_ELEMENT = rb'\[[^ =\]"]{1,32}(?:' + _PARAM + rb')*\]'
RFC5424 = re.compile(
    rb"^<(?P<pri>\d{1,3})>(?P<version>[1-9]\d{0,2}) (?P<ts>-|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?"
    rb"(?:Z|[+-]\d\d:\d\d)) (?P<host>[\x21-\x7e]{1,255}) (?P<app>[\x21-\x7e]{1,48}) (?P<procid>[\x21-\x7e]{1,128}) "
    rb"(?P<msgid>[\x21-\x7e]{1,32}) (?P<sd>-|(?:" + _ELEMENT + rb")+)(?: (?P<msg>.*))?$", re.S)
SD_ELEMENT = re.compile(r'\[(?P<id>[^ =\]"]{1,32})(?P<params>(?: [^ =\]"]{1,32}="(?:[^"\\\]]|\\["\\\]])*")*)\]')
SD_PARAM = re.compile(r' ([^ =\]"]{1,32})="((?:[^"\\\]]|\\["\\\]])*)"')


def parse_rfc5424(raw: bytes) -> dict:
    """A syslog message parsed strictly (AssertionError when it is not RFC 5424): header fields, the
    structured data as {sd_id: {param: value}} (escapes undone) and the message text (BOM removed)."""
    m = RFC5424.match(raw)
    assert m, f"not RFC 5424: {raw[:200]!r}"
    pri = int(m["pri"])
    assert 0 <= pri <= 191 and m["version"] == b"1"
    sd_text = m["sd"].decode("utf-8")
    sd: dict[str, dict[str, str]] = {}
    pos = 0
    while sd_text != "-" and pos < len(sd_text):
        el = SD_ELEMENT.match(sd_text, pos)
        assert el, f"bad structured data at {sd_text[pos:pos + 80]!r}"
        sd[el["id"]] = {k: re.sub(r'\\(["\\\]])', r"\1", v) for k, v in SD_PARAM.findall(el["params"])}
        pos = el.end()
    msg = m["msg"] or b""
    if msg.startswith(b"\xef\xbb\xbf"):
        msg = msg[3:]
    return {"facility": pri // 8, "severity": pri % 8, "ts": m["ts"].decode(), "host": m["host"].decode(),
            "app": m["app"].decode(), "procid": m["procid"].decode(), "msgid": m["msgid"].decode(), "sd": sd,
            "msg": msg.decode("utf-8")}


class SyslogReceiver:
    """A Python socket server on 127.0.0.1: UDP (one message per datagram) or TCP (RFC 6587 octet
    counting: 'LENGTH SP MESSAGE'); keeps the raw messages."""

    def __init__(self, proto: str) -> None:
        self.proto = proto
        self.raw: list[bytes] = []
        outer = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer.raw.append(self.request[0])

        class Tcp(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while True:
                    length = b""
                    while (c := self.rfile.read(1)) not in (b" ", b""):
                        assert c.isdigit(), f"octet count expected, got {c!r}"
                        length += c
                    if not length:
                        return
                    outer.raw.append(self.rfile.read(int(length)))

        cls = socketserver.ThreadingUDPServer if proto == "udp" else socketserver.ThreadingTCPServer
        self.server = cls(("127.0.0.1", 0), Udp if proto == "udp" else Tcp)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self) -> str:
        return f"{self.proto}://127.0.0.1:{self.server.server_address[1]}"

    def messages(self) -> list[dict]:
        return [parse_rfc5424(r) for r in list(self.raw)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class SmtpReceiver:
    """aiosmtpd on 127.0.0.1 offering STARTTLS (a self-signed certificate) and requiring it, and requiring a
    login with this user and password before any mail (auth_required=False: a login is optional); every
    login tried is kept in `logins` as (user, password)."""

    folder: Path
    user: str = "ntm"
    password: str = "s3cret-Pa55"
    auth_required: bool = True
    messages: list = field(default_factory=list)
    tls_sessions: list = field(default_factory=list)
    logins: list = field(default_factory=list)

    def __post_init__(self) -> None:
        import ssl

        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult

        need(shutil.which("openssl") is not None, "openssl makes the SMTP server's test certificate")
        self.cert, key = self.folder / "cert.pem", self.folder / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                        str(self.cert)], check=True, capture_output=True, timeout=60)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.cert), str(key))
        outer = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                outer.messages.append(envelope)
                outer.tls_sessions.append(session.ssl is not None)
                return "250 OK"

        def auth(server, session, envelope, mechanism, data):
            outer.logins.append((data.login.decode(), data.password.decode()))
            ok = data.login.decode() == outer.user and data.password.decode() == outer.password
            return AuthResult(success=ok)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=port, tls_context=ctx,
                                     require_starttls=True, authenticator=auth, auth_require_tls=True,
                                     auth_required=self.auth_required)
        self.controller.start()
        self.port = port
        self.password_file = self.folder / "smtp-password"
        self.password_file.write_text(self.password + "\n")

    def close(self) -> None:
        self.controller.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nmap_scan(sport: int, ports: str, targets: str = "127.0.0.1", source: str | None = None) -> None:
    """A SYN scan from source port `sport` (so a BPF filter isolates it), optionally from a spoofed 127.x
    source address (answered on lo, as every 127.0.0.0/8 address is this host's)."""
    need(shutil.which("nmap") is not None, "nmap is not installed")
    cmd = ["nmap", "-n", "-Pn", "-sS", "-T5", "--max-retries", "0", "-p", ports, "-g", str(sport)]
    if source:
        cmd += ["-S", source, "-e", "lo"]
    subprocess.run([*cmd, *targets.split()], capture_output=True, check=True, timeout=120)


def scan_port() -> int:
    """A random source port for one test's scans."""
    return random.randint(40_000, 60_000)
