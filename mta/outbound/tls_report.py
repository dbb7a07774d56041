"""TLS-RPT (RFC 8460): counting every TLS session's outcome, and sending each day's report.

Counting. The SMTP client tells ``count`` the outcome of every TLS session
under a policy that names its domain, in every worker. Counts gather in
memory and ``flush`` adds them to the spool in one write every FLUSH_EVERY
seconds (``run``): a write per session would put an fsync, and the spool's
one writer lock that the group commit waits on, in every delivery's path,
while a crash loses only a few seconds of statistics. The spool's policy
state keeps one record per (UTC day, policy domain), ``tlsrpt\\0<day>\\0<domain>``:
the sessions by policy and failure detail (mta.policy.tls_report), and how
far sending its report got. A flush adds to the record inside its write
transaction, so the workers' counts add up.

Sending. ``send_due(now)`` takes the records of the days that ended
REPORT_DELAY ago (by then every worker has flushed them), looks up each
domain's ``_smtp._tls`` TXT record and sends the report to each destination:
to a ``mailto:`` address through ``enqueue`` (our own queue, which DKIM-signs
it like any mail), to an ``https:`` URL by POST (the certificate verified,
the host's addresses from our name servers and private ones refused unless
allowed, as for MTA-STS). A record is forgotten once every destination took
the report or refused it for good, or when the domain asks for no reports;
otherwise it stays, with the destinations done and the report's id, and a
later call sends the same report to the rest, for up to KEEP_DAYS days. Run
``send_due`` in one process of a node: each process that runs it sends
every report.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import secrets
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from email.utils import make_msgid
from enum import Enum
from typing import TYPE_CHECKING

import dns.exception
import dns.name
import dns.resolver
import lmdb

from mta.outbound.routes import DnsLookup, LookupFailed
from mta.policy.tls import Failure, TlsPolicy
from mta.policy.tls_report import (
    MEDIA_TYPE,
    Destination,
    FailureDetail,
    Report,
    Reporter,
    Scheme,
    Tally,
    build_report,
    decode_tally,
    encode_tally,
    parse_record,
    report_day,
    report_mail,
    reported_policy,
)
from mta.spool.store import Spool

PREFIX = "tlsrpt\0"
FLUSH_EVERY = 5.0  # seconds
REPORT_DELAY = 600.0  # seconds after a day ends: every worker's counts of it are in the spool
KEEP_DAYS = 3  # a report not sent by then is dropped
POST_TIMEOUT = 60.0
SEND_CONCURRENCY = 8  # domains whose reports go out at once
_RETRY_STATUSES = frozenset({408, 429})  # besides 5xx: the receiver may take it later

if TYPE_CHECKING:
    from aiohttp import ClientSession

log = logging.getLogger("mta.outbound")

# enqueue(sender, recipients, message): queue a message of ours for delivery.
Enqueue = Callable[[str, Sequence[str], bytes], Awaitable[None]]


class _Sent(Enum):
    TAKEN = "taken"
    REFUSED = "refused"  # for good: not tried again
    RETRY = "to be retried"


@dataclass(frozen=True)
class _Pending:
    """A (day, policy domain) record: its sessions, and how far sending its report got."""

    day: datetime.date
    domain: str
    tally: Tally = field(default_factory=Counter)
    unique_id: str = ""  # the report's, once made: a retry sends the same report
    done: frozenset[str] = frozenset()  # the destinations that took it or refused it

    @property
    def name(self) -> str:
        return _name(self.day, self.domain)

    def encode(self) -> bytes:
        record = {
            "sessions": encode_tally(self.tally),
            "unique_id": self.unique_id,
            "done": sorted(self.done),
        }
        return json.dumps(record, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, name: str, raw: bytes) -> _Pending:
        _, day, domain = name.split("\0")
        record = json.loads(raw)
        return cls(
            datetime.date.fromisoformat(day),
            domain,
            decode_tally(record["sessions"]),
            record["unique_id"],
            frozenset(record["done"]),
        )


def _name(day: datetime.date, domain: str) -> str:
    return f"{PREFIX}{day.isoformat()}\0{domain}"


class TlsReports:
    """TLS-RPT for one process: its counts, and (in one process) the sending."""

    def __init__(
        self,
        spool: Spool,
        reporter: Reporter,
        sender: str,
        enqueue: Enqueue,
        nameservers: Sequence[tuple[str, int]] | None = None,
        dns_timeout: float = 5.0,
        allow_private: bool = False,
        ca_file: str | None = None,
        post_timeout: float = POST_TIMEOUT,
    ) -> None:
        """``sender``: the envelope sender and From of the report mail."""
        self._spool = spool
        self._reporter = reporter
        self._sender = sender
        self._enqueue = enqueue
        self._dns = DnsLookup(nameservers, dns_timeout)
        self._allow_private = allow_private
        self._tls = ssl.create_default_context(cafile=ca_file)
        self._timeout = post_timeout
        self._batch: dict[tuple[datetime.date, str], Tally] = {}
        self._flushing = asyncio.Lock()

    # --- counting ---

    def count(
        self,
        policy: TlsPolicy,
        host: str,
        ip: str,
        failure: Failure | None,
        now: float,
        receiving_ip: str = "",
    ) -> None:
        """One TLS session with ``host`` from our address ``ip``: a success, or ``failure``."""
        if not policy.policy_domain:  # a level we chose ourselves: no domain to report to
            return
        detail = None if failure is None else FailureDetail(failure, ip, host, receiving_ip)
        tally = self._batch.setdefault((report_day(now), policy.policy_domain), Counter())
        tally[(reported_policy(policy), detail)] += 1

    async def flush(self) -> None:
        """Add the counts gathered since the last flush to the spool, in one write;
        returns once every count gathered before the call is there."""
        async with self._flushing:  # a flush under way holds counts this one must wait for
            batch, self._batch = self._batch, {}
            if not batch:
                return
            try:
                await asyncio.to_thread(self._add, batch)
            except lmdb.Error as error:
                log.error("tls-report: counts not stored yet, tried again later: %s", error)
                for key, tally in batch.items():
                    self._batch.setdefault(key, Counter()).update(tally)

    async def run(self, interval: float = FLUSH_EVERY) -> None:
        """Flush every ``interval`` seconds until cancelled, and once more then."""
        try:
            while True:
                await asyncio.sleep(interval)
                await self.flush()
        finally:
            await self.flush()

    def _add(self, batch: dict[tuple[datetime.date, str], Tally]) -> None:
        with self._spool.write() as txn:
            for (day, domain), tally in batch.items():
                pending = self._load(txn, _name(day, domain)) or _Pending(day, domain)
                self._spool.set_state(
                    txn, pending.name, replace(pending, tally=pending.tally + tally).encode()
                )

    def _load(self, txn: lmdb.Transaction, name: str) -> _Pending | None:
        raw = self._spool.state(txn, name)
        if raw is None:
            return None
        try:
            return _Pending.decode(name, raw)
        except (ValueError, KeyError, TypeError) as error:
            log.error("tls-report: record %r unreadable, started afresh: %s", name, error)
            return None

    # --- sending ---

    async def send_due(self, now: float) -> None:
        """Send the report of every day that ended REPORT_DELAY before ``now``."""
        await self.flush()
        last_due = report_day(now - REPORT_DELAY) - datetime.timedelta(days=1)
        with self._spool.read() as txn:
            due = [pending for pending in self._records(txn) if pending.day <= last_due]
        if not due:
            return
        limit = asyncio.Semaphore(SEND_CONCURRENCY)
        from mta.outbound import https_client  # here: see its docstring

        session = https_client.session(self._dns, self._allow_private, self._tls, self._timeout)
        async with session:

            async def send(pending: _Pending) -> _Pending | None:
                async with limit:
                    return await self._send(session, pending, now)

            left = await asyncio.gather(*map(send, due))
        await asyncio.to_thread(self._settle, due, left)

    def _records(self, txn: lmdb.Transaction) -> list[_Pending]:
        names: list[str] = []

        def note(name: str) -> bool:
            names.append(name)
            return False

        # The store lists no records; a delete that keeps every one walks them.
        self._spool.delete_states(txn, PREFIX, note)
        return [pending for name in names if (pending := self._load(txn, name)) is not None]

    async def _send(self, session: ClientSession, pending: _Pending, now: float) -> _Pending | None:
        """Send ``pending``'s report where it has not gone yet: what is left to do, or None."""
        what = f"tls-report domain={pending.domain} day={pending.day}"
        if pending.day < report_day(now) - datetime.timedelta(days=KEEP_DAYS):
            log.warning("%s: not sent within %d days, dropped", what, KEEP_DAYS)
            return None
        try:
            destinations = await self._destinations(pending.domain)
        except LookupFailed as error:
            log.warning("%s: _smtp._tls lookup failed, tried again later: %s", what, error)
            return pending
        if not destinations:
            log.info("%s: the domain asks for no reports", what)
            return None
        if not pending.unique_id:
            pending = replace(pending, unique_id=secrets.token_hex(16))
        report = build_report(
            self._reporter, pending.domain, pending.day, pending.unique_id, pending.tally
        )
        done = await self._deliver_all(session, report, destinations, pending.done, now)
        return None if done.issuperset(map(str, destinations)) else replace(pending, done=done)

    async def _deliver_all(
        self,
        session: ClientSession,
        report: Report,
        destinations: tuple[Destination, ...],
        done: frozenset[str],
        now: float,
    ) -> frozenset[str]:
        """Send ``report`` to each destination not ``done``: the destinations done now."""
        now_done = set(done)
        for destination in destinations:
            if str(destination) in done:
                continue
            sent, detail = await self._deliver(session, report, destination, now)
            log.info(
                "tls-report domain=%s id=%s to=%s: %s (%s)",
                report.policy_domain,
                report.report_id,
                destination,
                sent.value,
                detail,
            )
            if sent is not _Sent.RETRY:
                now_done.add(str(destination))
        return frozenset(now_done)

    async def _destinations(self, domain: str) -> tuple[Destination, ...]:
        """Where ``domain`` wants its reports; LookupFailed when the DNS does not say."""
        try:
            return parse_record(await self._dns.texts(f"_smtp._tls.{domain}"))
        except dns.resolver.NXDOMAIN:
            return ()
        except dns.exception.DNSException as error:
            raise LookupFailed(str(error) or type(error).__name__) from None

    async def _deliver(
        self,
        session: ClientSession,
        report: Report,
        destination: Destination,
        now: float,
    ) -> tuple[_Sent, str]:
        if destination.scheme is Scheme.MAILTO:
            return await self._mail(report, destination.target, now)
        return await self._post(session, report, destination.target)

    async def _mail(self, report: Report, address: str, now: float) -> tuple[_Sent, str]:
        message = report_mail(
            report,
            self._reporter,
            sender=self._sender,
            recipient=address,
            now=now,
            message_id=make_msgid(domain=self._reporter.submitter),
        )
        try:
            await self._enqueue(self._sender, [address], message)
        except Exception as error:  # whatever keeps it out of the queue now may not later
            return _Sent.RETRY, f"not queued: {str(error) or type(error).__name__}"
        return _Sent.TAKEN, "queued"

    async def _post(self, session: ClientSession, report: Report, url: str) -> tuple[_Sent, str]:
        import aiohttp  # here: see mta.outbound.https_client

        try:
            async with session.post(
                url,
                data=report.gzipped,
                headers={"Content-Type": MEDIA_TYPE},
                allow_redirects=False,
            ) as response:
                status = response.status
        except TimeoutError:
            return _Sent.RETRY, f"no answer within {self._timeout:g} s"
        except aiohttp.ClientError as error:
            return _Sent.RETRY, str(error) or type(error).__name__
        return _posted(status), f"HTTP status {status}"

    def _settle(self, due: list[_Pending], left: list[_Pending | None]) -> None:
        """Forget the reports that are done; note how far the others got. Counts
        flushed meanwhile are kept in a record that stays, lost with one that goes."""
        with self._spool.write() as txn:
            for pending, rest in zip(due, left, strict=True):
                current = self._load(txn, pending.name)
                if rest is None or current is None:
                    # delete_states goes by prefix: only the record of this very name.
                    self._spool.delete_states(txn, pending.name, pending.name.__eq__)
                else:
                    progress = replace(current, unique_id=rest.unique_id, done=rest.done)
                    self._spool.set_state(txn, pending.name, progress.encode())


def _posted(status: int) -> _Sent:
    if 200 <= status < 300:
        return _Sent.TAKEN
    if status >= 500 or status in _RETRY_STATUSES:
        return _Sent.RETRY
    return _Sent.REFUSED  # a redirect too: a report is not sent where we were not told
