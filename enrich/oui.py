"""Device makers from MAC addresses, with Wireshark's manuf table (Debian's libwireshark-data)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

log = logging.getLogger(__name__)

MANUF_FILE = Path("/usr/share/wireshark/manuf")


def parse_manuf(text: str) -> dict[int, dict[int, str]]:
    """{prefix bits: {prefix value: maker}} from manuf text ('00:00:0C<TAB>Cisco<TAB>Cisco Systems, Inc')."""
    out: dict[int, dict[int, str]] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        prefix, _, bits_text = fields[0].partition("/")
        try:
            raw = bytes.fromhex(prefix.replace(":", "").replace("-", "").replace(".", ""))
        except ValueError:
            continue
        bits = int(bits_text) if bits_text.isdigit() else len(raw) * 8
        value = int.from_bytes(raw.ljust(6, b"\0"), "big") >> (48 - bits)
        maker = (fields[2] if len(fields) > 2 and fields[2].strip() else fields[1]).strip()
        out.setdefault(bits, {})[value] = maker
    return out


class OUI:
    """MAC prefix -> maker; the file (about 50,000 lines) is read once, on first use."""

    def __init__(self, path: Path = MANUF_FILE) -> None:
        self.path = path
        self._table: dict[int, dict[int, str]] | None = None
        self._lock = threading.Lock()
        self.error: str | None = None

    def _load(self) -> dict[int, dict[int, str]]:
        with self._lock:
            if self._table is None:
                try:
                    self._table = parse_manuf(self.path.read_text(errors="replace"))
                except OSError as exc:
                    self.error = f"no OUI table ({exc}); install libwireshark-data"
                    log.warning("%s", self.error)
                    self._table = {}
            return self._table

    def maker(self, mac: bytes | str) -> str | None:
        """The maker registered for a MAC address (6 bytes or 'aa:bb:cc:dd:ee:ff'), longest prefix first."""
        raw = mac if isinstance(mac, bytes) else bytes.fromhex(mac.replace(":", "").replace("-", ""))
        if len(raw) != 6 or raw == b"\0" * 6:
            return None
        value = int.from_bytes(raw, "big")
        table = self._load()
        for bits in sorted(table, reverse=True):
            hit = table[bits].get(value >> (48 - bits))
            if hit:
                return hit
        return None
