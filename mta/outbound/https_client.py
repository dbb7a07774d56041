"""HTTPS out (MTA-STS policies, TLS-RPT reports): aiohttp sessions that look names up
through our own name servers.

Imported only when a request is made: aiohttp takes a tenth of a second to
import, which every process start (and every worker's) would pay otherwise.
"""

from __future__ import annotations

import socket
import ssl

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from mta.outbound.routes import DnsLookup, LookupFailed, NoSuchDomain, ipv4_first, is_public


def session(
    lookup: DnsLookup,
    allow_private: bool,
    tls: ssl.SSLContext,
    timeout: float,
    auto_decompress: bool = True,
) -> aiohttp.ClientSession:
    """A session of its own (requests are rare: nothing is kept open between them)."""
    connector = aiohttp.TCPConnector(resolver=HostResolver(lookup, allow_private), ssl=tls)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        auto_decompress=auto_decompress,
    )


class HostResolver(AbstractResolver):
    """aiohttp's name lookups through our name servers: the same DNS as routing's,
    and no private addresses unless allowed."""

    def __init__(self, lookup: DnsLookup, allow_private: bool) -> None:
        self._lookup = lookup
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found: list[str] = []
        problems: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                found.extend((await self._lookup(host, rdtype)).addresses)
            except NoSuchDomain:
                pass
            except LookupFailed as error:
                problems.append(str(error))
        usable = [address for address in found if self._allow_private or is_public(address)]
        if usable:
            return [_resolved(host, address, port) for address in ipv4_first(usable)]
        # (None, text): how aiohttp's own resolvers raise, so its error message shows the text.
        if found:
            raise OSError(None, f"{host} resolves only to private or loopback addresses")
        raise OSError(None, f"{host}: {'; '.join(problems) or 'no address records'}")

    async def close(self) -> None:
        """Nothing to release: the lookup is shared and holds no connection."""


def _resolved(host: str, address: str, port: int) -> ResolveResult:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return ResolveResult(
        hostname=host, host=address, port=port, family=family, proto=0, flags=socket.AI_NUMERICHOST
    )
