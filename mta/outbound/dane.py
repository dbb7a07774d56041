"""DANE for SMTP (RFC 7672): the TLSA records that pin each MX host's certificate.

``Dane.tlsa(domain, mx_hosts)`` asks resolvers the operator trusts to
validate DNSSEC (``[delivery] dnssec_nameservers``, e.g. a local unbound),
with the DO bit set, and trusts an answer's AD bit only from them. The
rules (RFC 7672 2.2):

1. DANE applies only when the domain's MX answer is validated (a validated
   "no MX" makes the domain its own, implicit, MX host). An MX host of the
   route that the validated answer does not name must not be used now.
2. For each MX host whose address (A) answer is validated too, the TLSA
   records at ``_25._tcp.<host>`` (the port is the one we connect to); for a
   host reached through validated CNAMEs, first at the name they lead to,
   then at the host's own name (2.2.2).
3. Per host, the verdict:
   - validated usable records (usage 2 or 3, selector 0 or 1, matching type
     0, 1 or 2 with a digest of the right size): DANE is required;
   - validated "no TLSA" (NXDOMAIN, NODATA), answers that are not validated,
     and validated records none of which is usable: no DANE for that host;
   - a lookup that fails (SERVFAIL, as a validating resolver answers for a
     bogus zone, or no answer): the host cannot be used now and delivery to
     it waits (2.1.1), for it may well have required DANE; a failed MX
     lookup makes every host wait.

``dane_policy(result)`` turns a result with DANE hosts into the ``TlsPolicy``
the client enforces. The DNS part is the injectable ``ask`` coroutine
(``DnssecLookup`` by default), so the rules are unit-tested without sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.TLSA import TLSA

from mta.outbound.routes import domain_key
from mta.policy.tls import Level, Tlsa, TlsPolicy

# The DNS flag day 2020 size: signed answers fit without IP fragmentation,
# larger ones come over TCP.
EDNS_PAYLOAD = 1232
USABLE_USAGES = frozenset({2, 3})  # DANE-TA, DANE-EE; PKIX usages are unusable for SMTP (3.1.3)
USABLE_SELECTORS = frozenset({0, 1})
# Matching type -> the digest size it requires (None: the full data, any size).
DIGEST_SIZES: Mapping[int, int | None] = {0: None, 1: 32, 2: 64}


class LookupFailed(Exception):
    """SERVFAIL (bogus, or a broken zone), REFUSED, no answer: the DNSSEC state is unknown."""


@dataclass(frozen=True)
class Reply:
    """One DNS answer, reduced to what DANE needs."""

    secure: bool  # validated: the AD bit, set by a resolver trusted to validate
    name: str  # the owner of the records: the name asked, or where its CNAMEs lead
    records: tuple[dns.rdata.Rdata, ...] = ()  # empty for NXDOMAIN and NODATA


# (name, "MX" | "A" | "TLSA") -> Reply, or raises LookupFailed.
Ask = Callable[[str, str], Awaitable[Reply]]


class HostStatus(StrEnum):
    DANE = "dane"  # usable TLSA records: TLS required, the chain must match them
    NONE = "none"  # no DANE for this host: the other policies decide
    FAILED = "failed"  # the lookup failed: do not deliver to this host now


@dataclass(frozen=True)
class HostDane:
    status: HostStatus
    records: tuple[Tlsa, ...] = ()  # the usable ones, for DANE
    reason: str = ""  # a sentence for the log, for NONE and FAILED


@dataclass(frozen=True)
class DaneResult:
    domain: str
    mx_validated: bool
    hosts: Mapping[str, HostDane]  # by MX host name, lower case, no final dot

    @property
    def failed(self) -> dict[str, str]:
        """The hosts delivery must not use now, with why."""
        return {
            host: dane.reason
            for host, dane in self.hosts.items()
            if dane.status is HostStatus.FAILED
        }


def dane_policy(result: DaneResult) -> TlsPolicy | None:
    """The DANE policy for the hosts with usable TLSA records, or None if there are none.

    Hosts absent from its ``tlsa`` have no DANE: opportunistic TLS for them.
    """
    tlsa = {
        host: dane.records for host, dane in result.hosts.items() if dane.status is HostStatus.DANE
    }
    if not tlsa:
        return None
    return TlsPolicy(level=Level.DANE, source="dane", tlsa=tlsa, policy_domain=result.domain)


class Dane:
    """TLSA records of a route's MX hosts, from resolvers trusted to validate DNSSEC.

    ``validating``: True when every one of ``nameservers`` validates, False
    when none does (DANE never applies), or the ones that do. ``timeout``
    is per resolver asked.
    """

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]],
        validating: bool | Collection[tuple[str, int]] = True,
        timeout: float = 5.0,
        smtp_port: int = 25,
        ask: Ask | None = None,
    ) -> None:
        self._ask: Ask = ask or DnssecLookup(nameservers, validating, timeout)
        self._port = smtp_port

    async def tlsa(self, domain: str, mx_hosts: Sequence[str]) -> DaneResult:
        """The DANE verdict for each of ``mx_hosts``, the route's hosts for ``domain``."""
        hosts = [_host_key(host) for host in mx_hosts]
        key = domain_key(domain)
        try:
            mx = await self._ask(key, "MX")
        except LookupFailed as error:
            reason = f"cannot look up the MX records of {domain} with DNSSEC: {error}"
            return _everywhere(domain, False, hosts, HostDane(HostStatus.FAILED, reason=reason))
        if not mx.secure:
            reason = f"the MX records of {domain} are not DNSSEC-validated"
            return _everywhere(domain, False, hosts, HostDane(HostStatus.NONE, reason=reason))
        listed = validated_mx_hosts(key, mx)
        verdicts = await asyncio.gather(*(self._host(host, listed) for host in hosts))
        return DaneResult(domain, True, dict(zip(hosts, verdicts, strict=True)))

    async def _host(self, host: str, listed: frozenset[str]) -> HostDane:
        if host not in listed:
            reason = (
                f"{host} is not among the DNSSEC-validated MX hosts ({', '.join(sorted(listed))})"
            )
            return HostDane(HostStatus.FAILED, reason=reason)
        try:
            address = await self._ask(host, "A")
            if not address.secure:
                reason = f"the addresses of {host} are not DNSSEC-validated"
                return HostDane(HostStatus.NONE, reason=reason)
            return await self._tlsa_at(tlsa_bases(host, address))
        except LookupFailed as error:
            return HostDane(HostStatus.FAILED, reason=str(error))

    async def _tlsa_at(self, bases: Sequence[str]) -> HostDane:
        names = [f"_{self._port}._tcp.{base}" for base in bases]
        for name in names:
            reply = await self._ask(name, "TLSA")
            if reply.secure and reply.records:
                return verdict(name, reply.records)
        reason = f"no DNSSEC-validated TLSA records at {' or '.join(names)}"
        return HostDane(HostStatus.NONE, reason=reason)


def _everywhere(domain: str, validated: bool, hosts: Sequence[str], dane: HostDane) -> DaneResult:
    return DaneResult(domain, validated, dict.fromkeys(hosts, dane))


# --- the pure rules ---


def validated_mx_hosts(domain: str, mx: Reply) -> frozenset[str]:
    """The hosts a validated MX answer names; for "no MX", the domain itself (RFC 5321 5.1)."""
    if not mx.records:
        return frozenset({domain})
    return frozenset(_name_key(record.exchange) for record in mx.records if isinstance(record, MX))


def tlsa_bases(host: str, address: Reply) -> tuple[str, ...]:
    """Where to look for a host's TLSA records: where its validated CNAMEs lead, then
    its own name (RFC 7672 2.2.2)."""
    return (host,) if address.name == host else (address.name, host)


def verdict(name: str, records: Sequence[dns.rdata.Rdata]) -> HostDane:
    """DANE with the usable records of a validated TLSA answer, else none."""
    found = [_tlsa(record) for record in records if isinstance(record, TLSA)]
    usable = tuple(record for record in found if is_usable(record))
    if usable:
        return HostDane(HostStatus.DANE, usable)
    if found:
        # RFC 7672 2.2 (and Postfix): a TLSA set with none usable still asks for TLS,
        # unauthenticated; the client makes that "encrypt" for the host.
        reason = f"none of the TLSA records at {name} is usable: TLS without authentication"
        return HostDane(HostStatus.DANE, tuple(found), reason)
    return HostDane(HostStatus.NONE, reason=f"no TLSA records at {name}: no DANE")


def is_usable(record: Tlsa) -> bool:
    """Usage DANE-TA or DANE-EE, a known selector and matching type, a digest of its size."""
    if (
        record.usage not in USABLE_USAGES
        or record.selector not in USABLE_SELECTORS
        or record.matching_type not in DIGEST_SIZES
    ):
        return False
    size = DIGEST_SIZES[record.matching_type]
    return len(record.data) == size if size else bool(record.data)


def reply_from(response: dns.message.Message, trusted: bool) -> Reply:
    """Reduce a NOERROR or NXDOMAIN response to a ``Reply``; ``trusted``: the resolver
    that sent it validates DNSSEC, so its AD bit means the answer is validated."""
    if not isinstance(response, dns.message.QueryMessage):
        raise LookupFailed("the answer has no question section")
    try:
        chain = response.resolve_chaining()
    except dns.exception.DNSException as error:
        raise LookupFailed(f"unusable answer: {error}") from None
    records = tuple(chain.answer) if chain.answer is not None else ()
    secure = trusted and bool(response.flags & dns.flags.AD)
    return Reply(secure, _name_key(chain.canonical_name), records)


def _tlsa(record: TLSA) -> Tlsa:
    return Tlsa(record.usage, record.selector, record.mtype, bytes(record.cert))


def _name_key(name: dns.name.Name) -> str:
    return _host_key(name.to_text())


def _host_key(host: str) -> str:
    return host.lower().removesuffix(".")


# --- the real lookup ---


class DnssecLookup:
    """Asks the resolvers in order with the DO bit set, over UDP (TCP when truncated).

    A resolver that fails (SERVFAIL, no answer) passes the question to the
    next one, except that after a trusted resolver failed, untrusted ones are
    not asked: their unvalidated answer would turn a bogus zone into one
    without DANE.
    """

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]],
        validating: bool | Collection[tuple[str, int]],
        timeout: float,
    ) -> None:
        if not nameservers:
            raise ValueError("DANE needs at least one name server that validates DNSSEC")
        self._nameservers = tuple(nameservers)
        self._trusted = _trusted(self._nameservers, validating)
        self._timeout = timeout

    async def __call__(self, name: str, rdtype: str) -> Reply:
        query = dns.message.make_query(
            dns.name.from_text(name), rdtype, want_dnssec=True, payload=EDNS_PAYLOAD
        )
        failures: list[str] = []
        trusted_failed = False
        for server in self._nameservers:
            trusted = server in self._trusted
            if trusted_failed and not trusted:
                continue
            try:
                return reply_from(await self._query(query, server), trusted)
            except LookupFailed as error:
                failures.append(str(error))
                trusted_failed = trusted_failed or trusted
        raise LookupFailed(f"{name} {rdtype}: {'; '.join(failures)}")

    async def _query(
        self, query: dns.message.Message, server: tuple[str, int]
    ) -> dns.message.Message:
        address, port = server
        where = f"{address}@{port}"
        try:
            response, _ = await dns.asyncquery.udp_with_fallback(
                query, address, timeout=self._timeout, port=port
            )
        except dns.exception.Timeout:
            raise LookupFailed(f"{where}: no answer within {self._timeout:g} s") from None
        except (dns.exception.DNSException, OSError) as error:
            raise LookupFailed(f"{where} failed: {error or type(error).__name__}") from None
        rcode = response.rcode()
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            raise LookupFailed(f"{where} answered {dns.rcode.to_text(rcode)}")
        return response


def _trusted(
    nameservers: Sequence[tuple[str, int]], validating: bool | Collection[tuple[str, int]]
) -> frozenset[tuple[str, int]]:
    if isinstance(validating, bool):
        return frozenset(nameservers) if validating else frozenset()
    return frozenset(validating)
