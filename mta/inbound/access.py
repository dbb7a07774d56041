"""Who may relay, and which envelope addresses we take: pure decisions.

This MTA delivers nothing locally: every recipient is relayed. So relaying is
allowed only to clients in ``relay_networks`` and to authenticated clients
(DESIGN invariant 5); anyone else gets 554 5.7.1 at RCPT.

Envelope addresses must be plain ``local@domain``: no source routes
(``@a,@b:user@c``), no ``%`` or ``!`` routing, no control characters, a domain
that is a host name or an address literal. Quoted local parts are kept as
aiosmtpd parsed them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from mta.config import IPNetwork

_DOMAIN = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
)
_ADDRESS_LITERAL = re.compile(r"^\[(IPv6:[0-9A-Fa-f:.]+|[0-9.]+)\]$")
_FORBIDDEN_IN_LOCAL = re.compile(r"[\x00-\x20\x7f%!]")
MAX_ADDRESS_LENGTH = 254


def may_relay(client_ip: str, authenticated: bool, networks: Iterable[IPNetwork]) -> bool:
    if authenticated:
        return True
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def address_is_valid(address: str) -> bool:
    """True for a routable ``local@domain`` address we are willing to relay to or from."""
    if len(address) > MAX_ADDRESS_LENGTH or address.startswith("@"):
        return False
    local, at, domain = address.rpartition("@")
    if not at or not local or len(local) > 64:
        return False
    if _FORBIDDEN_IN_LOCAL.search(local.strip('"') if local.startswith('"') else local):
        return False
    return bool(_DOMAIN.match(domain) or _ADDRESS_LITERAL.match(domain))
