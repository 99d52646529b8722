"""Labels for addresses that belong to no country: private, loopback, link-local, multicast, reserved."""

from __future__ import annotations

import ipaddress
from functools import lru_cache

LABELS = ("private", "loopback", "link-local", "multicast", "reserved")

# RFC 1918, RFC 6598 shared address space (carrier-grade NAT) and IPv6 unique local addresses.
_PRIVATE = tuple(ipaddress.ip_network(n) for n in
                 ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"))


@lru_cache(maxsize=65_536)  # bounded; every refresh asks again for the same few thousand top addresses
def range_label(addr: str) -> str | None:
    """The range label of an address, or None for a public (global unicast) address or text that is no address."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if any(ip in net for net in _PRIVATE if net.version == ip.version):
        return "private"
    # Documentation, benchmarking, unspecified, 0/8, 240/4, broadcast...: none is routed on the Internet.
    if not ip.is_global or ip.is_reserved or ip.is_unspecified:
        return "reserved"
    return None
