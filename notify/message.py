"""What a notification says: one JSON document per alert (the summary's alert fields plus sensor, first and
last seen, count, evidence and a link to the filtered view), its Slack-compatible text, and the notice
sent when a rate limit bites."""

from __future__ import annotations

import ipaddress
import math
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

_SERVICE = re.compile(r"^(tcp|udp)/(\d+)$")
SEVERITY_MARK = {"high": ":red_circle:", "medium": ":large_orange_circle:", "low": ":white_circle:"}


def iso(ts: float) -> str:
    """Epoch seconds as ISO 8601 in UTC with microseconds."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _address(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def view_link(base: str, alert: Any) -> str | None:
    """The dashboard view filtered to the alert (query keys of the investigation view: src, dst, port,
    proto, from, to), or None when DASHBOARD_URL is not set."""
    if not base:
        return None
    query: dict[str, Any] = {}
    if src := _address(alert.source):
        query["src"] = src
    if dst := _address(alert.target):
        query["dst"] = dst
    elif m := _SERVICE.match(alert.target):
        query["proto"], query["port"] = m.group(1), m.group(2)
    query["from"] = math.floor(alert.first_ts)
    query["to"] = math.ceil(alert.last_ts) + 1
    return f"{base.rstrip('/')}/?{urlencode(query)}"


def alert_doc(alert: Any, sensor: str, iface: str, dashboard_url: str, repeat: bool = False) -> dict[str, Any]:
    """The webhook's JSON document for one alert (also the fields of the syslog and e-mail forms)."""
    doc = {"kind": "alert", "repeat": repeat, "sensor": sensor, "iface": iface, "detector": alert.detector,
           "severity": alert.severity, "source": alert.source, "target": alert.target,
           "first_ts": alert.first_ts, "last_ts": alert.last_ts, "first_seen": iso(alert.first_ts),
           "last_seen": iso(alert.last_ts), "count": alert.count, "evidence": alert.evidence,
           "meaning": getattr(alert, "meaning", ""), "link": view_link(dashboard_url, alert)}
    doc["text"] = slack_text(doc)
    return doc


def plain_text(doc: dict[str, Any]) -> str:
    """One readable line (syslog's message, an e-mail's subject line and body)."""
    if doc.get("kind") != "alert":
        return str(doc["plain"] if "plain" in doc else doc["text"])
    again = " (repeat)" if doc.get("repeat") else ""
    return (f"{doc['severity']} {doc['detector']}{again} on {doc['sensor']}: {doc['source']} -> {doc['target']}, "
            f"{doc['count']}x, {doc['first_seen']} .. {doc['last_seen']}: {doc['evidence']}")


def slack_text(doc: dict[str, Any]) -> str:
    """The Slack-compatible `text`: escaped, a severity mark, the link when there is one."""
    text = f"{SEVERITY_MARK.get(doc['severity'], '')} {_slack_escape(plain_text(doc))}".strip()
    return f"{text} <{doc['link']}|view>" if doc.get("link") else text


def suppressed_doc(n: int, window_s: float, destination: str, sensor: str) -> dict[str, Any]:
    """The notice that follows a rate-limited window: how many alerts were not sent."""
    text = (f"{n} more alert{'s' if n != 1 else ''} suppressed on {sensor}: {destination} sends at most "
            f"NOTIFY_RATE_MAX per {window_s:g} s; see the dashboard for all of them")
    return {"kind": "suppressed", "suppressed": n, "window_s": window_s, "sensor": sensor,
            "severity": "low", "detector": "suppressed", "plain": text, "text": _slack_escape(text)}


def _slack_escape(text: str) -> str:
    """Slack's three control characters, as its message formatting asks."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
