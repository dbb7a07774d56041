"""MTA-STS policies (RFC 8461) from the DNS and the web, cached in the spool.

``MtaSts.policy(domain)`` answers with the domain's policy in force (or None)
and, when getting a new one failed, why: a TLS-RPT result type (RFC 8460
4.3). The rules are mta.policy.mta_sts's; this module does the I/O:

- the TXT record at ``_mta-sts.<domain>``, from the name servers routing
  uses (``DnsLookup`` of mta.outbound.routes);
- the policy from ``https://mta-sts.<domain>/.well-known/mta-sts.txt``
  (aiohttp): the certificate verified for that name (``ca_file`` or the
  system's store), no redirect followed (3.3), 200 and text/plain only, at
  most 64 KiB, within ``fetch_timeout``. The host's addresses come from the
  same name servers, and private ones are refused unless ``allow_private``,
  as for MX hosts;
- the policy cached in the spool's policy state under ``mta-sts\\0<domain>``
  (``CachedPolicy.to_json``: the policy file, its TXT id and when it was
  fetched), so every worker and a restart keep it;
- each domain's answer remembered in memory for up to ``recheck`` seconds,
  and concurrent calls for a domain share one lookup and one fetch.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dns.exception
import dns.name
import lmdb

from mta.mail.domain import normalize_domain

if TYPE_CHECKING:
    from aiohttp import ClientResponse
from mta.outbound.routes import (
    DnsLookup,
    _Shared,
)
from mta.policy.mta_sts import (
    CachedPolicy,
    StsError,
    StsPolicy,
    decide,
    parse_policy,
    policy_id,
    recheck_in,
)
from mta.policy.tls import Failure
from mta.spool.store import Spool

STATE_PREFIX = "mta-sts\0"
MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 3.3 lets senders refuse larger policies
FETCH_TIMEOUT = 60.0  # RFC 8461 3.3 suggests a minute
# A domain's TXT record is looked at again after this many seconds (and a
# failed fetch tried again): a new policy id is seen within minutes, without
# a DNS query per message.
RECHECK = 300.0
_IDENTITY = {"Accept-Encoding": "identity"}
log = logging.getLogger("mta.outbound")


@dataclass(frozen=True)
class StsResult:
    policy: StsPolicy | None = None  # the policy in force
    failure: Failure | None = None  # why a new policy could not be had, for TLS-RPT
    detail: str = ""  # the failure in words, for the log


class _FetchFailed(Exception):
    def __init__(self, failure: Failure, detail: str) -> None:
        super().__init__(failure, detail)
        self.failure = failure
        self.detail = detail


class MtaSts:
    """Domains' MTA-STS policies; one instance per process."""

    def __init__(
        self,
        spool: Spool,
        nameservers: Sequence[tuple[str, int]] | None = None,
        dns_timeout: float = 5.0,
        allow_private: bool = False,
        port: int = 443,
        ca_file: str | None = None,
        fetch_timeout: float = FETCH_TIMEOUT,
        recheck: float = RECHECK,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock``: wall-clock seconds, since fetch times are kept across restarts."""
        self._spool = spool
        self._dns = DnsLookup(nameservers, dns_timeout)
        self._allow_private = allow_private
        self._port = port
        self._tls = ssl.create_default_context(cafile=ca_file)
        self._timeout = fetch_timeout
        self._recheck = recheck
        self._clock = clock
        self._answers: _Shared[StsResult] = _Shared(clock)

    async def policy(self, domain: str) -> StsResult:
        """The MTA-STS policy in force for ``domain``, and why a new one failed, if it did."""
        name = normalize_domain(domain)
        if name is None:  # an address literal, or no domain at all
            return StsResult()
        result, _ = await self._answers.get(name, lambda: self._look_up(name))
        return result

    async def _look_up(self, domain: str) -> tuple[StsResult, float]:
        decision = decide(self._load(domain), await self._record_id(domain), self._clock())
        in_force, failed = decision.in_force, None
        if decision.fetch is not None:
            try:
                in_force = await self._fetch(domain, decision.fetch)
            except _FetchFailed as error:
                failed = error
                kept = "the cached policy stays in force" if in_force else "no policy"
                log.warning(
                    "mta-sts domain=%s %s: %s; %s", domain, error.failure, error.detail, kept
                )
        policy = in_force.policy if in_force else None
        result = StsResult(policy, failed.failure, failed.detail) if failed else StsResult(policy)
        return result, recheck_in(in_force, self._clock(), self._recheck)

    async def _record_id(self, domain: str) -> str | None:
        """The policy id the domain's TXT record announces; None without one, or
        when the DNS fails: either way the cached policy holds until it expires."""
        try:
            return policy_id(await self._dns.texts(f"_mta-sts.{domain}"))
        except dns.exception.DNSException:
            return None

    # --- the spool's cache ---

    def _load(self, domain: str) -> CachedPolicy | None:
        with self._spool.read() as txn:
            raw = self._spool.state(txn, STATE_PREFIX + domain)
        if raw is None:
            return None
        try:
            return CachedPolicy.from_json(raw)
        except StsError as error:
            log.error(
                "mta-sts domain=%s: the cached policy is unreadable, fetched anew: %s",
                domain,
                error,
            )
            return None

    def _store(self, domain: str, cached: CachedPolicy) -> None:
        try:
            with self._spool.write() as txn:
                self._spool.set_state(txn, STATE_PREFIX + domain, cached.to_json())
        except lmdb.Error as error:
            log.error(
                "mta-sts domain=%s: policy not stored, fetched again later: %s", domain, error
            )

    # --- the fetch ---

    async def _fetch(self, domain: str, record_id: str) -> CachedPolicy:
        body = await self._get(f"mta-sts.{domain}")
        try:
            policy = parse_policy(body)
        except StsError as error:
            raise _FetchFailed(Failure.STS_POLICY_INVALID, str(error)) from None
        fetched = CachedPolicy(policy, record_id, self._clock())
        self._store(domain, fetched)
        return fetched

    async def _get(self, host: str) -> bytes:
        port = "" if self._port == 443 else f":{self._port}"
        url = f"https://{host}{port}/.well-known/mta-sts.txt"
        import aiohttp  # here: see mta.outbound.https_client

        from mta.outbound import https_client

        # Uncompressed only: the size cap must hold for what is read, not for
        # what a small compressed body would inflate to.
        session = https_client.session(
            self._dns, self._allow_private, self._tls, self._timeout, auto_decompress=False
        )
        try:
            async with (
                session,
                session.get(url, allow_redirects=False, headers=_IDENTITY) as response,
            ):
                return await _policy_body(response)
        except aiohttp.ClientSSLError as error:
            raise _FetchFailed(Failure.STS_WEBPKI_INVALID, str(error)) from None
        except TimeoutError:
            text = f"no answer within {self._timeout:g} s"
            raise _FetchFailed(Failure.STS_POLICY_FETCH_ERROR, text) from None
        except aiohttp.ClientError as error:
            text = str(error) or type(error).__name__
            raise _FetchFailed(Failure.STS_POLICY_FETCH_ERROR, text) from None


async def _policy_body(response: ClientResponse) -> bytes:
    if response.status != 200:  # a redirect too: RFC 8461 3.3 forbids following it
        raise _FetchFailed(Failure.STS_POLICY_FETCH_ERROR, f"HTTP status {response.status}")
    if response.content_type != "text/plain":
        text = f"content type {response.content_type}, not text/plain"
        raise _FetchFailed(Failure.STS_POLICY_INVALID, text)
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > MAX_POLICY_BYTES:
            raise _FetchFailed(Failure.STS_POLICY_INVALID, "the policy is over 64 KiB")
    return bytes(body)
