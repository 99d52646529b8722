"""Service names for ports ("443/https"), from /etc/services, else Scapy's copy of the same table."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

SERVICES_FILE = Path("/etc/services")


def parse_services(text: str) -> dict[tuple[int, str], str]:
    """(port, 'tcp'|'udp') -> name from the text of a services(5) file (the first name listed wins)."""
    out: dict[tuple[int, str], str] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2 or "/" not in fields[1]:
            continue
        port, _, proto = fields[1].partition("/")
        if port.isdigit() and proto in ("tcp", "udp"):
            out.setdefault((int(port), proto), fields[0])
    return out


def _scapy_table() -> dict[tuple[int, str], str]:
    from scapy.data import TCP_SERVICES, UDP_SERVICES
    out = {}
    for proto, table in (("tcp", TCP_SERVICES), ("udp", UDP_SERVICES)):
        for name in table:
            out.setdefault((int(table[name]), proto), name)
    return out


class Services:
    """Port to service-name table, loaded once (a few thousand entries: bounded by the file)."""

    def __init__(self, path: Path = SERVICES_FILE) -> None:
        try:
            self.table = parse_services(path.read_text(errors="replace"))
            self.origin = str(path)
        except OSError as exc:
            log.warning("cannot read %s (%s); using Scapy's service table", path, exc)
            self.table = _scapy_table()
            self.origin = "scapy"

    def name(self, port: int | None, proto: str = "tcp") -> str | None:
        """The service name of a port for 'tcp' or 'udp' (case-insensitive), or None."""
        if port is None or port < 0:
            return None
        return self.table.get((int(port), proto.lower()))

    def label(self, port: int | None, proto: str = "tcp") -> str:
        """'443/https' style text; the bare port when the service is unknown, '' without a port."""
        if port is None or port < 0:
            return ""
        name = self.name(port, proto)
        return f"{port}/{name}" if name else str(port)
