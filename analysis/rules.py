"""Exclusion rules: alerts an engineer has judged and wants quiet, in the fields they think in.

A rule names any of: a detector, a source and a target (an address or a network in CIDR form), a
port, a direction (in, out, local, transit, against LOCAL_NETS) and an expiry (wall time), with a
comment saying why. Empty fields match anything. An alert a rule matches is not raised or sent; the
alert book keeps it apart, counted under the rule's name ("suppressed by rule X").

What an alert carries decides what a field can match: a port matches an alert that names one (a
horizontal scan's target `tcp/22`), an address field matches an alert whose end is an address (a
flood's source is a count of sources, so only detector, target and direction rules reach it). A
direction is judged from both ends when both are addresses; when only one is, from that end: a local
target (a flood's, ARP spoofing's) is `in`, a local source (a horizontal scan's) is `out`; a
non-local single end, or no address at all (a traffic spike), has no direction and no direction rule
matches it.

Light on purpose (standard library only): the detector worker process imports it.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

DIRECTIONS = ("", "in", "out", "local", "transit")
RULES_MAX = 1000  # rules are read by people; a list this long is a mistake (an import of the wrong file)
EXPORT_KIND = "ntm-exclusions"
_NAME = re.compile(r"[\w.\- ]{1,64}")
_SERVICE = re.compile(r"^(?:tcp|udp|\d+)/(\d+)$")
Net = ipaddress.IPv4Network | ipaddress.IPv6Network


class RuleError(ValueError):
    """A rule (or a rules file) that is not valid; the message says which field and why."""


@dataclass(frozen=True)
class Rule:
    """One exclusion: empty fields match anything; `expires` 0 means never."""

    name: str
    detector: str = ""
    source: str = ""
    target: str = ""
    port: int = 0
    direction: str = ""
    expires: float = 0.0
    comment: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The rule as stored and exported (JSON)."""
        return asdict(self)

    def expired(self, now: float) -> bool:
        """Whether the rule's expiry has passed."""
        return bool(self.expires) and now >= self.expires


def rule_from(d: dict[str, Any], detectors: tuple[str, ...] | None = None) -> Rule:
    """A Rule from a dict (the page's form, a stored document, an imported file); RuleError says what is wrong."""
    known = {f.name for f in fields(Rule)}
    extra = set(d) - known
    if extra:
        raise RuleError(f"unknown rule field(s): {', '.join(sorted(extra))}")
    name = str(d.get("name", "")).strip()
    if not _NAME.fullmatch(name):
        raise RuleError(f"rule name {name!r}: 1 to 64 letters, digits, spaces, '.', '-' or '_'")
    rule = Rule(name=name, detector=str(d.get("detector") or "").strip(), source=_net_text(d, "source", name),
                target=_net_text(d, "target", name), port=_int(d, "port", name, 0, 65535),
                direction=str(d.get("direction") or "").strip(), expires=_expiry(d, name),
                comment=str(d.get("comment") or "").strip()[:500])
    if rule.direction not in DIRECTIONS:
        raise RuleError(f"rule {name}: direction {rule.direction!r} is not one of {', '.join(DIRECTIONS[1:])}")
    if detectors is not None and rule.detector and rule.detector not in detectors:
        raise RuleError(f"rule {name}: detector {rule.detector!r} is not one of {', '.join(detectors)}")
    if not any((rule.detector, rule.source, rule.target, rule.port, rule.direction)):
        raise RuleError(f"rule {name}: give at least one of detector, source, target, port, direction "
                        f"(a rule that matches everything would silence every alert)")
    return rule


def _net_text(d: dict[str, Any], key: str, name: str) -> str:
    text = str(d.get(key) or "").strip()
    if not text:
        return ""
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise RuleError(f"rule {name}: {key} {text!r} is not an address or a network (CIDR)") from None


def _int(d: dict[str, Any], key: str, name: str, low: int, high: int) -> int:
    raw = d.get(key) or 0
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise RuleError(f"rule {name}: {key} {raw!r} is not a number") from None
    if not low <= value <= high:
        raise RuleError(f"rule {name}: {key} {value} is not between {low} and {high}")
    return value


def _expiry(d: dict[str, Any], name: str) -> float:
    raw = d.get("expires") or 0
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise RuleError(f"rule {name}: expires {raw!r} is not a time (epoch seconds)") from None
    if value < 0:
        raise RuleError(f"rule {name}: expires {value} is before 1970")
    return value


def _addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped or ip


class RuleSet:
    """Rules ready to match alerts: the first rule (by name) that matches wins. Picklable."""

    def __init__(self, rules: list[Rule] | tuple[Rule, ...] = (), local_nets: list[Net] | tuple[Net, ...] = (),
                 clock=time.time) -> None:
        self.rules = tuple(sorted(rules, key=lambda r: r.name))[:RULES_MAX]
        self.local_nets = tuple(local_nets)
        self._nets = {r.name: (ipaddress.ip_network(r.source) if r.source else None,
                               ipaddress.ip_network(r.target) if r.target else None) for r in self.rules}
        self.clock = clock

    def __len__(self) -> int:
        return len(self.rules)

    def __getstate__(self) -> dict[str, Any]:
        """Picklable for the worker: the clock is always the wall clock there."""
        return {"rules": self.rules, "local_nets": self.local_nets}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["rules"], state["local_nets"])

    def match(self, detector: str, source: str, target: str) -> Rule | None:
        """The rule silencing this alert, or None."""
        if not self.rules:
            return None
        now = self.clock()
        src, dst = _addr(source), _addr(target)
        service = _SERVICE.match(target)
        port = int(service.group(1)) if service else 0
        direction = self._direction(src, dst)
        for rule in self.rules:
            if rule.expired(now) or (rule.detector and rule.detector != detector):
                continue
            src_net, dst_net = self._nets[rule.name]
            if src_net is not None and (src is None or src.version != src_net.version or src not in src_net):
                continue
            if dst_net is not None and (dst is None or dst.version != dst_net.version or dst not in dst_net):
                continue
            if rule.port and rule.port != port:
                continue
            if rule.direction and rule.direction != direction:
                continue
            return rule
        return None

    def _direction(self, src: Any, dst: Any) -> str:
        """in, out, local or transit by LOCAL_NETS; with one address end, judged from that end alone."""
        s = src is not None and self._local(src)
        d = dst is not None and self._local(dst)
        if src is None and dst is None:
            return ""
        if src is None or dst is None:
            # A flood's or ARP alert's target, a horizontal scan's source: the other end is a count, a
            # MAC or a service, so only a local address end says anything (toward it in, from it out).
            return "in" if d else "out" if s else ""
        return {(True, True): "local", (True, False): "out", (False, True): "in"}.get((s, d), "transit")

    def _local(self, ip: Any) -> bool:
        return any(ip.version == n.version and ip in n for n in self.local_nets)


def export_text(rules: list[Rule]) -> str:
    """The rules as a JSON file an engineer can keep, review and import elsewhere."""
    return json.dumps({"kind": EXPORT_KIND, "version": 1, "rules": [r.as_dict() for r in rules]}, indent=1)


def import_text(text: str | bytes, detectors: tuple[str, ...] | None = None) -> list[Rule]:
    """The rules of an exported file; RuleError names the first problem (nothing is imported then)."""
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RuleError(f"not a rules file (JSON): {exc}") from None
    if not isinstance(doc, dict) or doc.get("kind") != EXPORT_KIND or not isinstance(doc.get("rules"), list):
        raise RuleError(f"not a rules file: expected a JSON object with kind {EXPORT_KIND!r} and a rules list")
    if len(doc["rules"]) > RULES_MAX:
        raise RuleError(f"{len(doc['rules'])} rules: at most {RULES_MAX}")
    out, names = [], set()
    for i, d in enumerate(doc["rules"]):
        if not isinstance(d, dict):
            raise RuleError(f"rule {i + 1} is not a JSON object")
        rule = rule_from(d, detectors)
        if rule.name in names:
            raise RuleError(f"rule name {rule.name!r} appears twice")
        names.add(rule.name)
        out.append(rule)
    return out
