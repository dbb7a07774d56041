"""Who may relay: a pure decision.

This MTA delivers nothing locally: every recipient is relayed. So relaying is
allowed only to clients in ``relay_networks`` and to authenticated clients
(docs/architecture.md, invariant 5); anyone else gets 554 5.7.1 at RCPT.

Which envelope addresses we take is mta.mail.address's business.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from mta.config import IPNetwork


def may_relay(client_ip: str, authenticated: bool, networks: Iterable[IPNetwork]) -> bool:
    return authenticated or in_networks(client_ip, networks)


def in_networks(client_ip: str, networks: Iterable[IPNetwork]) -> bool:
    """Whether the client's address (an IPv4-mapped IPv6 one as IPv4) is in ``networks``."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:  # not from a TCP socket
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
