"""Who is calling: the socket peer, or behind a trusted proxy the nearest untrusted hop.

`X-Forwarded-For` is believed only from peers in SMSBUS_TRUSTED_PROXIES, so the callback allowlist
cannot be bypassed by a client that writes the header itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from bus.config import IPNetwork


def _in(address: str, networks: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(
    peer: str | None, forwarded_for: str | None, trusted: Sequence[IPNetwork]
) -> str | None:
    """The address to judge a request by."""
    if peer is None or not forwarded_for or not _in(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _in(hop, trusted):
            return hop
    return hops[0] if hops else peer


def allowed(address: str | None, allowlist: Sequence[IPNetwork]) -> bool:
    """True when no allowlist is set, or the address is inside it."""
    if not allowlist:
        return True
    return address is not None and _in(address, allowlist)
