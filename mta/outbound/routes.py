"""Where to deliver a domain's mail: its MX hosts, their addresses and the port.

``Resolver.route(domain)`` answers with a ``Route`` (the hosts to try, in
order) or raises ``ResolveError`` (why not, as an RFC 3463 status, and
whether it is worth trying again). The rules:

1. A configured static route (the exact domain, else ``"*"``) wins: its host
   is an IP address, or a name whose A/AAAA records are used (no MX lookup).
   Private and loopback addresses are fine there: the operator chose them;
   its failures are never permanent: a typo in the configuration must not
   bounce mail.
2. Otherwise the domain's MX records, by preference, shuffled among equal
   preferences; each host's A then AAAA addresses (the additional section's,
   when the server sent them). A null MX (RFC 7505) refuses mail for good.
   No MX records at all: the domain's own A/AAAA (implicit MX, RFC 5321 5.1).
3. Unless ``allow_private``, addresses that are not globally routable
   (loopback, RFC 1918, ULA, link-local, ...) are dropped, so a hostile or
   broken DNS record cannot point our delivery into the internal network.
4. A domain that is an address literal (``[192.0.2.1]``, RFC 5321 4.1.3) is
   routed to that address, under the same private-address rule.

Because dnspython spends about 0.3 ms of CPU per parsed answer and mail goes
to the same domains over and over, there are two caches on one clock: routes
by domain, and A/AAAA results by host name (shared by every domain hosted on
the same MX hosts, and by static routes). Lifetimes:

- a route or a host's addresses: the smallest TTL of the answers they came
  from, 1 s to 1 day;
- a permanent failure (NXDOMAIN, null MX, no addresses) and "only private
  addresses": ``negative_ttl``, or the DNS's own negative (SOA) TTL if shorter;
- a temporary DNS failure (SERVFAIL, timeout, ...): ``TEMPORARY_TTL`` seconds,
  so a broken name server isn't asked again for every message, yet mail moves
  soon after it recovers;
- a route built while some MX host's lookup failed temporarily: at most
  ``negative_ttl``, so the missing host is looked up again soon.

Concurrent calls for the same domain (or host) share one lookup. The DNS part
is the injectable ``lookup`` coroutine (``DnsLookup`` by default), so the
rules above are unit-tested without sockets.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from mta.mail.address import parse_ip
from mta.mail.domain import is_domain_name, normalize_domain

MIN_TTL = 1.0
MAX_TTL = 86400.0
TEMPORARY_TTL = 5.0
# A domain with dozens of MX records gets its first ten tried; resolving all
# of them would let one hostile zone cost us hundreds of queries.
MAX_MX_HOSTS = 10
# How often expired cache entries are swept out (seconds of the clock).
SWEEP_INTERVAL = 60.0


@dataclass(frozen=True)
class MxHost:
    name: str  # host name without trailing dot, lowercase (or the IP for an IP route)
    preference: int
    addresses: tuple[str, ...]  # usable IP addresses to connect to, in order to try
    port: int


@dataclass(frozen=True)
class Route:
    domain: str
    hosts: tuple[MxHost, ...]  # in the order to try; never empty
    implicit: bool = False  # no MX: the domain's own A/AAAA (RFC 5321 5.1)
    static: bool = False  # from a configured static route


class ResolveError(Exception):
    """Why mail for a domain cannot be routed now; str() is a human sentence."""

    def __init__(self, status: str, text: str, permanent: bool) -> None:
        super().__init__(status, text, permanent)  # all of them: picklable across processes
        self.status = status  # RFC 3463 enhanced status code
        self.text = text
        self.permanent = permanent

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"ResolveError({self.status!r}, {self.text!r}, permanent={self.permanent})"


# --- what one DNS query gives the routing rules ---


@dataclass(frozen=True)
class Answer:
    """One DNS answer, reduced to what routing needs.

    ``ttl`` is how many more seconds the answer is true: the smallest TTL of
    the records used, or for an empty answer (NODATA) the SOA's negative TTL.
    ``additional`` holds (host, address) pairs from the additional section of
    an MX answer, for the MX hosts only.
    """

    ttl: float
    mx: tuple[tuple[int, str], ...] = ()  # (preference, host); host "." is a null MX
    addresses: tuple[str, ...] = ()
    additional: tuple[tuple[str, str], ...] = ()


class NoSuchDomain(Exception):
    """NXDOMAIN; ``ttl`` is the negative TTL from the SOA, if the answer had one."""

    def __init__(self, ttl: float | None = None) -> None:
        super().__init__("no such domain")
        self.ttl = ttl


class LookupFailed(Exception):
    """SERVFAIL, REFUSED, a timeout, no name server answering: try later."""


# (name without trailing dot, "MX" | "A" | "AAAA") -> Answer, or raises
# NoSuchDomain / LookupFailed.
Lookup = Callable[[str, str], Awaitable[Answer]]


class DnsLookup:
    """The real lookup: dnspython's asyncio stub resolver (its own cache off: ours
    runs on the injected clock)."""

    def __init__(
        self, nameservers: Sequence[tuple[str, int]] | None = None, timeout: float = 5.0
    ) -> None:
        if nameservers is None:
            try:
                resolver = dns.asyncresolver.Resolver()  # reads /etc/resolv.conf
            except dns.exception.DNSException as error:
                raise ValueError(f"cannot use the system's name servers: {error}") from None
        else:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(address, port) for address, port in nameservers
            ]
        resolver.lifetime = timeout
        resolver.timeout = min(resolver.timeout, timeout)
        self.resolver = resolver

    async def texts(self, name: str) -> list[bytes]:
        """The TXT records at ``name``, each's strings joined (RFC 7208 3.3); [] for
        none. dns.resolver.NXDOMAIN, or another DNSException, when the DNS fails."""
        answer = await self.resolver.resolve(
            dns.name.from_text(name), "TXT", raise_on_no_answer=False, search=False
        )
        return [b"".join(record.strings) for record in answer.rrset or ()]

    async def __call__(self, name: str, rdtype: str) -> Answer:
        try:
            # An absolute name: resolv.conf's search list must not apply.
            qname = dns.name.from_text(name)
            answer = await self.resolver.resolve(
                qname, rdtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN as error:
            raise NoSuchDomain(_nxdomain_ttl(error)) from None
        except dns.exception.Timeout:
            raise LookupFailed(f"no answer within {self.resolver.lifetime:g} s") from None
        except dns.resolver.NoNameservers as error:
            raise LookupFailed(_server_errors(error)) from None
        except dns.exception.DNSException as error:
            raise LookupFailed(str(error)) from None
        return answer_from_dnspython(answer, time.time())


def answer_from_dnspython(answer: dns.resolver.Answer, now: float) -> Answer:
    """Reduce a dnspython answer, fresh or from its cache, to an ``Answer``.

    TTLs count down from when the answer was received: dnspython's cache hands
    back the answer it stored, with the TTLs as they were then.
    """
    received = answer.expiration - answer.chaining_result.minimum_ttl
    ttl = answer.expiration - now
    rrset = answer.rrset
    if rrset is None:
        return Answer(ttl=ttl)
    if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return Answer(ttl=ttl, addresses=tuple(rdata.address for rdata in rrset))
    if rrset.rdtype != dns.rdatatype.MX:
        return Answer(ttl=ttl)
    mx = tuple((rdata.preference, _host_name(rdata.exchange)) for rdata in rrset)
    hosts = {host for _, host in mx}
    additional: list[tuple[str, str]] = []
    for extra in answer.response.additional:
        host = _host_name(extra.name)
        if (
            host in hosts
            and extra.rdclass == dns.rdataclass.IN
            and extra.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        ):
            ttl = min(ttl, extra.ttl - (now - received))
            additional.extend((host, rdata.address) for rdata in extra)
    return Answer(ttl=ttl, mx=mx, additional=tuple(additional))


def _host_name(name: dns.name.Name) -> str:
    if name == dns.name.root:
        return "."
    return str(name.to_text(omit_final_dot=True)).lower()


def _nxdomain_ttl(error: dns.resolver.NXDOMAIN) -> float | None:
    ttls = []
    for response in error.responses().values():
        try:
            ttls.append(response.resolve_chaining().minimum_ttl)
        except dns.exception.DNSException:
            continue
    return min(ttls) if ttls else None


def _server_errors(error: dns.resolver.NoNameservers) -> str:
    """'127.0.0.1@53 answered SERVFAIL' rather than dnspython's whole query dump."""
    return "; ".join(map(_server_error, error.kwargs.get("errors", []))) or (
        "no name server answered"
    )


def _server_error(failure: tuple[object, ...]) -> str:
    # (server, tcp, port, exception or rcode text, response)
    server, tcp, problem = str(failure[0]).removeprefix("Do53:"), failure[1], failure[3]
    if isinstance(problem, dns.message.Truncated):
        return f"{server} answered truncated (TC) over UDP"
    if isinstance(problem, EOFError):
        return f"{server} closed the {'TCP ' if tcp else ''}connection without an answer"
    if isinstance(problem, BaseException):
        return f"{server}{' over TCP' if tcp else ''} failed: {problem or type(problem).__name__}"
    return f"{server} answered {problem}"


# --- the pure rules ---


def order_mx(records: Iterable[tuple[int, str]], rng: random.Random) -> list[tuple[int, str]]:
    """MX records in the order to try: by preference, shuffled among equals.

    A host listed twice keeps its best preference; "." targets (null MX
    fragments) are dropped; at most ``MAX_MX_HOSTS`` are kept.
    """
    best: dict[str, int] = {}
    for preference, host in records:
        if host != "." and (host not in best or preference < best[host]):
            best[host] = preference
    by_preference: dict[int, list[str]] = {}
    for host, preference in best.items():
        by_preference.setdefault(preference, []).append(host)
    ordered: list[tuple[int, str]] = []
    for preference in sorted(by_preference):
        hosts = sorted(by_preference[preference])  # the same input gives the same shuffle
        rng.shuffle(hosts)
        ordered.extend((preference, host) for host in hosts)
    return ordered[:MAX_MX_HOSTS]


def is_null_mx(records: Sequence[tuple[int, str]]) -> bool:
    """RFC 7505: the domain's only MX record targets the root."""
    return len(records) == 1 and records[0][1] == "."


def is_public(address: str) -> bool:
    """True for a globally routable unicast address (IPv4-mapped IPv6 judged as IPv4)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def ipv4_first(addresses: Iterable[str]) -> tuple[str, ...]:
    """Unique addresses, IPv4 before IPv6 (IPv6 may have no route), otherwise in DNS order."""
    unique = list(dict.fromkeys(addresses))
    return tuple(sorted(unique, key=lambda address: ":" in address))


def domain_key(domain: str) -> str:
    """The domain as DNS knows it (lowercase ASCII, no final dot), or ResolveError."""
    name = normalize_domain(domain)
    if name is None:
        raise ResolveError("5.1.2", f"{domain!r} is not a valid domain name", permanent=True)
    return name


@dataclass(frozen=True)
class _Static:
    host: str  # a name, or the IP address
    port: int
    ip: str | None


@dataclass(frozen=True)
class _Addresses:
    """What looking up one host's A and AAAA records found."""

    addresses: tuple[str, ...]
    ttl: float  # seconds this stays true (answers' TTLs, positive or negative)
    failure: str | None  # why a lookup failed temporarily, if one did


T = TypeVar("T")


class _Shared(Generic[T]):
    """Results by key until they expire, and one lookup per key at a time."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._entries: dict[str, tuple[float, T]] = {}
        self._inflight: dict[str, asyncio.Task[tuple[float, T]]] = {}
        self._next_sweep = clock() + SWEEP_INTERVAL

    def __len__(self) -> int:
        return len(self._entries)

    async def get(
        self, key: str, resolve: Callable[[], Awaitable[tuple[T, float]]]
    ) -> tuple[T, float]:
        """The value for ``key`` and the seconds it stays valid; ``resolve`` gives
        a fresh value and how long to keep it."""
        entry = self._entries.get(key)
        if entry is None or entry[0] <= self._clock():
            task = self._inflight.get(key)
            if task is None:
                task = asyncio.ensure_future(self._resolve(key, resolve))
                self._inflight[key] = task
                task.add_done_callback(lambda done: self._finished(key, done))
            # shield: one caller giving up (cancelled) must not cancel the
            # lookup the others are waiting for.
            entry = await asyncio.shield(task)
        return entry[1], max(entry[0] - self._clock(), 0.0)

    async def _resolve(
        self, key: str, resolve: Callable[[], Awaitable[tuple[T, float]]]
    ) -> tuple[float, T]:
        value, ttl = await resolve()
        now = self._clock()
        if now >= self._next_sweep:
            self._entries = {k: e for k, e in self._entries.items() if e[0] > now}
            self._next_sweep = now + SWEEP_INTERVAL
        entry = (now + ttl, value)
        if ttl > 0:
            self._entries[key] = entry
        return entry

    def _finished(self, key: str, task: asyncio.Task[tuple[float, T]]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved, even if every waiter was cancelled


# A route or why not, and how long to cache it.
_Outcome = tuple[Route | ResolveError, float]


class Resolver:
    """Routes for destination domains, cached; one instance per process.

    Two caches on the same clock: routes by domain, and host addresses by
    host name, so that the many domains hosted on one provider's MX hosts
    share those hosts' A/AAAA lookups.
    """

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] | None = None,
        smtp_port: int = 25,
        allow_private: bool = False,
        routes: Mapping[str, tuple[str, int]] | None = None,
        timeout: float = 5.0,
        negative_ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        lookup: Lookup | None = None,
    ) -> None:
        self._lookup: Lookup = lookup or DnsLookup(nameservers, timeout)
        self._port = smtp_port
        self._allow_private = allow_private
        self._negative_ttl = negative_ttl
        self._rng = rng or random.Random()
        self._static = {
            pattern if pattern == "*" else pattern.lower().removesuffix("."): _static(host, port)
            for pattern, (host, port) in (routes or {}).items()
        }
        self._routes: _Shared[Route | ResolveError] = _Shared(clock)
        self._hosts: _Shared[_Addresses] = _Shared(clock)

    async def route(self, domain: str) -> Route:
        """Where to deliver mail for ``domain``; raises ResolveError."""
        name = domain.lower().removesuffix(".")
        static = self._static.get(name) or self._static.get("*")
        if static is not None:
            result = await self._static_route(static, name)
        elif (ip := _address_literal(name)) is not None:
            result = self._literal_route(name, ip)
        else:
            key = domain_key(name)
            result, _ = await self._routes.get(key, lambda: self._resolve_mx(key, name))
        if isinstance(result, ResolveError):
            # A fresh exception each time: re-raising the cached one would
            # grow its traceback with every message.
            raise ResolveError(result.status, result.text, result.permanent)
        return result if result.domain == name else replace(result, domain=name)

    # --- outcomes and their cache lifetimes ---

    def _found(self, route: Route, ttl: float) -> _Outcome:
        return route, min(max(ttl, MIN_TTL), MAX_TTL)

    def _negative(self, status: str, text: str, permanent: bool, ttl: float | None) -> _Outcome:
        """A definite DNS answer that gives no route: cached up to negative_ttl."""
        return ResolveError(status, text, permanent), self._negative_lifetime(ttl)

    def _negative_lifetime(self, ttl: float | None) -> float:
        return self._negative_ttl if ttl is None else min(max(ttl, 0.0), self._negative_ttl)

    def _temporary(self, text: str) -> _Outcome:
        """The DNS failed to answer: cached briefly, then asked again."""
        return ResolveError("4.4.3", text, permanent=False), self._temporary_lifetime()

    def _temporary_lifetime(self) -> float:
        return min(TEMPORARY_TTL, self._negative_ttl)

    # --- the lookups ---

    async def _resolve_mx(self, key: str, name: str) -> _Outcome:
        try:
            answer = await self._lookup(key, "MX")
        except NoSuchDomain as error:
            return self._negative("5.1.2", f"domain {name} does not exist", True, error.ttl)
        except LookupFailed as error:
            return self._temporary(f"cannot look up the MX records of {name}: {error}")
        if not answer.mx:
            return await self._resolve_implicit(key, name, answer.ttl)
        if is_null_mx(answer.mx):
            text = f"{name} does not accept mail (null MX, RFC 7505)"
            return self._negative("5.1.10", text, True, answer.ttl)

        ordered = order_mx(answer.mx, self._rng)
        additional: dict[str, list[str]] = {}
        for host, address in answer.additional:
            additional.setdefault(host, []).append(address)
        # The additional section's addresses when the server sent any for a
        # host (it sends what it has), else ask; all hosts at once.
        found = await asyncio.gather(
            *(
                self._given(additional[host], answer.ttl)
                if host in additional
                else self._addresses(host)
                for _, host in ordered
            )
        )
        hosts, ttl, failures, private = [], answer.ttl, [], False
        for (preference, host), result in zip(ordered, found, strict=True):
            if result.failure:
                # Its brief lifetime must not shorten the route's: the
                # negative_ttl cap below has that job.
                failures.append(f"{host}: {result.failure}")
            else:
                ttl = min(ttl, result.ttl)
            usable = self._usable(result.addresses)
            private = private or len(usable) < len(result.addresses)
            if usable:
                hosts.append(MxHost(host, preference, usable, self._port))
        if hosts:
            if failures:  # a host is missing only for now: look again soon
                ttl = min(ttl, self._negative_ttl)
            return self._found(Route(name, tuple(hosts)), ttl)
        if failures:
            text = f"cannot look up the addresses of the MX hosts of {name}: "
            return self._temporary(text + "; ".join(failures))
        if private:
            text = (
                f"the MX hosts of {name} resolve only to private or loopback addresses; "
                "[delivery] allow_private_mx permits delivery to them"
            )
            return self._negative("4.4.4", text, False, ttl)
        return self._negative("5.1.2", f"MX hosts of {name} have no addresses", True, ttl)

    async def _resolve_implicit(self, key: str, name: str, mx_ttl: float) -> _Outcome:
        """No MX records: the domain's own addresses, as RFC 5321 5.1 says."""
        result = await self._addresses(key)
        ttl = min(mx_ttl, result.ttl)
        usable = self._usable(result.addresses)
        if usable:
            host = MxHost(key, 0, usable, self._port)
            return self._found(Route(name, (host,), implicit=True), ttl)
        if result.failure:
            return self._temporary(f"cannot look up the addresses of {name}: {result.failure}")
        if result.addresses:
            text = (
                f"{name} has no MX records and resolves only to private or loopback "
                "addresses; [delivery] allow_private_mx permits delivery to them"
            )
            return self._negative("4.4.4", text, False, ttl)
        text = f"domain {name} has no MX and no address records"
        return self._negative("5.1.2", text, True, ttl)

    async def _static_route(self, static: _Static, name: str) -> Route | ResolveError:
        """A static route: its IP, or its host's A/AAAA; failures are temporary."""
        if static.ip is not None:
            return Route(name, (MxHost(static.ip, 0, (static.ip,), static.port),), static=True)
        result = await self._addresses(static.host)
        if result.addresses:
            host = MxHost(static.host, 0, result.addresses, static.port)
            return Route(name, (host,), static=True)
        if result.failure:
            text = f"cannot look up the static route host {static.host}: {result.failure}"
        else:
            text = f"the static route host {static.host} has no addresses"
        return ResolveError("4.4.3", text, permanent=False)

    def _literal_route(self, name: str, ip: str) -> Route | ResolveError:
        """``[192.0.2.1]``: deliver to that address (RFC 5321 address literal)."""
        if not self._allow_private and not is_public(ip):
            text = (
                f"{name} is a private or loopback address; "
                "[delivery] allow_private_mx permits delivery to it"
            )
            return ResolveError("4.4.4", text, permanent=False)
        return Route(name, (MxHost(ip, 0, (ip,), self._port),))

    async def _addresses(self, host: str) -> _Addresses:
        """A and AAAA records of ``host``, from the host cache or the DNS."""
        result, remaining = await self._hosts.get(host, lambda: self._lookup_addresses(host))
        return replace(result, ttl=remaining)

    async def _lookup_addresses(self, host: str) -> tuple[_Addresses, float]:
        results = await asyncio.gather(
            self._lookup(host, "A"), self._lookup(host, "AAAA"), return_exceptions=True
        )
        addresses: list[str] = []
        ttl = MAX_TTL
        failure = None
        for result in results:
            if isinstance(result, Answer):
                addresses.extend(result.addresses)
                ttl = min(ttl, result.ttl)
            elif isinstance(result, NoSuchDomain):
                ttl = min(ttl, self._negative_ttl if result.ttl is None else result.ttl)
            elif isinstance(result, LookupFailed):
                failure = str(result)
            else:
                raise result
        found = _Addresses(ipv4_first(addresses), ttl, failure)
        if failure is not None:  # even with the other family's addresses: retry soon
            return found, self._temporary_lifetime()
        if addresses:
            return found, min(max(ttl, MIN_TTL), MAX_TTL)
        return found, self._negative_lifetime(ttl)

    async def _given(self, addresses: list[str], ttl: float) -> _Addresses:
        return _Addresses(ipv4_first(addresses), ttl, None)

    def _usable(self, addresses: tuple[str, ...]) -> tuple[str, ...]:
        if self._allow_private:
            return addresses
        return tuple(address for address in addresses if is_public(address))


def _static(host: str, port: int) -> _Static:
    ip = parse_ip(host)
    if ip is not None:
        return _Static(ip, port, ip)
    name = host.lower().removesuffix(".")
    if not is_domain_name(name):
        raise ValueError(f"static route host {host!r} is neither an IP address nor a host name")
    return _Static(name, port, None)


def _address_literal(domain: str) -> str | None:
    if domain.startswith("[") and domain.endswith("]"):
        return parse_ip(domain)
    return None
