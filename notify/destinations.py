"""Where notifications go: a webhook (JSON over HTTP), syslog (RFC 5424 over UDP, or TCP with octet
counting as RFC 6587 says) and e-mail (SMTP, STARTTLS whenever the server offers it).

A destination's send() delivers a list of documents (one, or an e-mail digest's many) or raises
OSError/ValueError; retries, back-off and counting are the channel's business (notifier.py).
Secrets (a webhook URL's token, a bearer token, the SMTP password) are read from the environment or a
file, never written to a log or the page: describe() and every error message go through redact().
"""

from __future__ import annotations

import http.client
import json
import os
import re
import smtplib
import socket
import ssl
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any
from urllib.parse import urlsplit

from notify.message import iso, plain_text

SD_ID = "ntm@32473"  # 32473: the private enterprise number RFC 5612 reserves for examples and documentation
SD_FIELDS = ("detector", "severity", "source", "target", "first_seen", "last_seen", "count", "sensor", "iface",
             "evidence", "link", "suppressed")
SD_VALUE_MAX = 1024  # evidence can be long; a UDP datagram should stay well within one packet's reach
UDP_MAX = 8192
FACILITY = 16  # local0
SEVERITY_CODE = {"high": 2, "medium": 4, "low": 5}  # crit, warning, notice (RFC 5424 table 2)
APP_NAME = "network-traffic-monitor"
BOM = b" \xef\xbb\xbf"  # SP and the UTF-8 byte order mark that start MSG (RFC 5424 section 6.4)


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """The text with every secret replaced by ***, also where an error quotes it escaped (repr)."""
    for s in secrets:
        for form in (s, repr(s)[1:-1]) if s else ():
            text = text.replace(form, "***")
    return text


def read_secret(path: str, env: str = "") -> str:
    """A secret from the file at `path` (stripped of its line end), else the environment variable `env`."""
    if path:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            return f.read().strip("\r\n")
    return os.environ.get(env, "") if env else ""


class Destination(ABC):
    """One place notifications go."""

    kind = "destination"
    digest_s = 0.0  # > 0: the channel collects this many seconds of alerts into one send (e-mail digests)

    @abstractmethod
    def describe(self) -> str:
        """Where it goes, without any secret (for the page and the logs)."""

    @abstractmethod
    def send(self, docs: list[dict[str, Any]]) -> None:
        """Deliver the documents; raise OSError or ValueError when it cannot."""

    def secrets(self) -> tuple[str, ...]:
        """The strings redact() hides in messages about this destination."""
        return ()

    def error_text(self, exc: BaseException) -> str:
        """A one-line description of a failed send, secrets hidden."""
        text = str(exc).splitlines()[0][:300] if str(exc) else ""
        return redact(f"{type(exc).__name__}: {text}".rstrip(": "), self.secrets())


class Webhook(Destination):
    """POST one JSON document per alert to a URL (Slack's incoming webhooks read its `text`)."""

    kind = "webhook"

    def __init__(self, url: str, token_file: str = "", timeout: float = 5.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the webhook is not an http:// or https:// URL")
        self.url, self.token_file, self.timeout = url, token_file, timeout

    def describe(self) -> str:
        """The scheme and host only: the path and query of a webhook URL are often its token."""
        parts = urlsplit(self.url)
        port = f":{parts.port}" if parts.port else ""
        return f"webhook {parts.scheme}://{parts.hostname}{port}/…"

    def secrets(self) -> tuple[str, ...]:
        parts = urlsplit(self.url)
        try:
            token = read_secret(self.token_file)
        except OSError:
            token = ""
        return tuple(s for s in (self.url, parts.path if len(parts.path) > 1 else "", parts.query, token) if s)

    def send(self, docs: list[dict[str, Any]]) -> None:
        """One POST per document; any status but 2xx is a failure, a redirect too (urllib would follow it
        as a GET, carrying the Authorization header to wherever it points)."""
        token = read_secret(self.token_file)
        opener = urllib.request.build_opener(_NoRedirect)
        for doc in docs:
            body = json.dumps(doc).encode()
            req = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": APP_NAME})
            if token:
                req.add_header("Authorization", f"Bearer {token}")
            try:
                with opener.open(req, timeout=self.timeout) as resp:
                    resp.read(65536)
            except urllib.error.HTTPError as exc:
                raise OSError(f"HTTP {exc.code} {exc.reason}") from None
            except http.client.HTTPException as exc:  # a bad URL or answer: neither OSError nor ValueError
                raise OSError(f"{type(exc).__name__}: {exc}") from None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse every redirect: the 3xx answer is the error (HTTPError)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl) -> None:
        """No new request: urllib raises the 3xx as an HTTPError."""
        return None


def _sd_value(value: Any) -> str:
    """An SD-PARAM value: UTF-8 with '"', '\\' and ']' escaped (RFC 5424 section 6.3.3)."""
    text = str(value)[:SD_VALUE_MAX]
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _token(text: str, limit: int) -> str:
    """A header field of printable US-ASCII without spaces (RFC 5424 PRINTUSASCII), else '-'."""
    clean = re.sub(r"[^\x21-\x7e]", "_", text)[:limit]
    return clean or "-"


def syslog_parts(doc: dict[str, Any], hostname: str, now: float | None = None) -> tuple[bytes, bytes]:
    """One RFC 5424 message in two parts: the header with one structured-data element carrying the alert's
    fields, and the text (MSG: SP, the UTF-8 BOM, the text)."""
    pri = FACILITY * 8 + (SEVERITY_CODE.get(doc.get("severity", ""), 6) if doc.get("kind") == "alert" else 6)
    stamp = iso(time.time() if now is None else now)
    params = " ".join(f'{k}="{_sd_value(doc[k])}"' for k in SD_FIELDS if doc.get(k) not in (None, ""))
    header = (f"<{pri}>1 {stamp} {_token(hostname, 255)} {APP_NAME} {os.getpid()} "
              f"{_token(str(doc.get('detector', 'alert')), 32)} [{SD_ID} {params}]")
    return header.encode(), BOM + plain_text(doc).encode()


def syslog_message(doc: dict[str, Any], hostname: str, now: float | None = None) -> bytes:
    """One RFC 5424 message: header, one structured-data element with the alert's fields, the text."""
    return b"".join(syslog_parts(doc, hostname, now))


def fit_datagram(header: bytes, text: bytes, limit: int = 0) -> bytes:
    """A message of at most `limit` (UDP_MAX) bytes: the text is cut on a UTF-8 character boundary; the
    header (with the structured data) is never cut, even when it alone is longer."""
    limit = limit or UDP_MAX
    room = limit - len(header)
    if len(text) <= room:
        return header + text
    if room <= len(BOM):
        return header
    return header + BOM + text[len(BOM):room].decode("utf-8", "ignore").encode()  # drops a split character


class Syslog(Destination):
    """RFC 5424 messages to udp://HOST:PORT (one datagram each) or tcp://HOST:PORT (octet-counted)."""

    kind = "syslog"

    def __init__(self, url: str, hostname: str, timeout: float = 5.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("udp", "tcp") or not parts.hostname or not parts.port:
            raise ValueError(f"syslog destination {url!r} is not udp://HOST:PORT or tcp://HOST:PORT")
        self.proto, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.hostname, self.timeout = hostname, timeout

    def describe(self) -> str:
        """The receiver's address."""
        return f"syslog {self.proto}://{self.host}:{self.port}"

    def send(self, docs: list[dict[str, Any]]) -> None:
        """Every document as one message; TCP frames each as 'LENGTH SP MESSAGE'."""
        parts = [syslog_parts(d, self.hostname) for d in docs]
        info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM if self.proto == "udp"
                                  else socket.SOCK_STREAM)[0]
        with socket.socket(info[0], info[1]) as s:
            s.settimeout(self.timeout)
            if self.proto == "udp":
                for header, text in parts:
                    s.sendto(fit_datagram(header, text), info[4])
            else:
                msgs = [header + text for header, text in parts]
                s.connect(info[4])
                s.sendall(b"".join(str(len(m)).encode() + b" " + m for m in msgs))


class Email(Destination):
    """One e-mail per alert, or one digest per `digest_min` minutes, through an SMTP server."""

    kind = "email"

    def __init__(self, to: str, host: str, port: int, user: str = "", password_file: str = "",
                 sender: str = "", ca_file: str = "", digest_min: float = 0, timeout: float = 5.0,
                 hostname: str = "", login_refused: bool = False) -> None:
        """login_refused: a user was set for a server that is not the operator's (the page's SMTP_HOST), so
        no login is made there: the operator's password goes only to the operator's server."""
        self.to = [a.strip() for a in to.split(",") if a.strip()]
        if not self.to or not host:
            raise ValueError("e-mail needs NOTIFY_EMAIL_TO and SMTP_HOST")
        self.host, self.port, self.user, self.password_file = host, int(port), user, password_file
        self.sender = sender or f"network-traffic-monitor@{hostname or socket.gethostname()}"
        self.ca_file, self.timeout = ca_file, timeout
        self.digest_s = float(digest_min) * 60
        self.login_refused = login_refused

    def describe(self) -> str:
        """Recipients and server (never the password)."""
        mode = f", digest every {self.digest_s / 60:g} min" if self.digest_s else ""
        no_login = " (no login: the SMTP password goes only to config's SMTP_HOST)" if self.login_refused else ""
        return f"email to {', '.join(self.to)} via {self.host}:{self.port}{mode}{no_login}"

    def secrets(self) -> tuple[str, ...]:
        if not self.user:
            return ()
        try:
            return (read_secret(self.password_file, "SMTP_PASSWORD"),)
        except OSError:
            return ()

    def message(self, docs: list[dict[str, Any]]) -> EmailMessage:
        """The e-mail for these documents (one alert, or a digest)."""
        msg = EmailMessage()
        first = docs[0]
        if len(docs) == 1:
            msg["Subject"] = f"[NTM] {plain_text(first)[:150]}"
        else:
            msg["Subject"] = f"[NTM] {len(docs)} alerts on {first.get('sensor', '')}"
        msg["From"], msg["To"] = self.sender, ", ".join(self.to)
        msg["Date"], msg["Message-ID"] = formatdate(localtime=False), make_msgid("ntm")
        lines = []
        for d in docs:
            lines.append(plain_text(d))
            if d.get("link"):
                lines.append(f"  view: {d['link']}")
            if d.get("meaning"):
                lines.append(f"  {d['meaning']}")
            lines.append("")
        msg.set_content("\n".join(lines))
        return msg

    def send(self, docs: list[dict[str, Any]]) -> None:
        """Connect, STARTTLS when offered, log in when a user is set (only over TLS), send one message."""
        msg = self.message(docs)
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
            smtp.ehlo()
            tls = smtp.has_extn("starttls")
            if tls:
                smtp.starttls(context=ssl.create_default_context(cafile=self.ca_file or None))
                smtp.ehlo()
            if self.user:
                if not tls:
                    raise OSError(f"{self.host}:{self.port} offers no STARTTLS: the SMTP password is not sent "
                                  f"in clear text")
                smtp.login(self.user, read_secret(self.password_file, "SMTP_PASSWORD"))
            smtp.send_message(msg)
