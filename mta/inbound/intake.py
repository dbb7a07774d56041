"""Taking mail in: the steps SMTP's DATA and the HTTP API share.

1. ``build``: header sanity and the fields we add (mta.inbound.message), the
   tenant's checks and the message's pool and priority (mta.inbound.tenants),
   DKIM signing; a ``Built`` message, not yet stored;
2. ``store``: one durable group commit for one or many built messages, with
   their ``received`` events; all of them or none;
3. ``announce``: after that commit, count, log and hand them to delivery.

A client is told its mail is queued only after step 2 (docs/architecture.md,
invariant 1). ``suppressed`` is the suppression list's answer for one
recipient, asked at RCPT over SMTP and per recipient over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import lmdb

from mta.config import Config, TenantConfig
from mta.events.event import received_events
from mta.events.log import EventLog
from mta.inbound.message import (
    CAMPAIGN_HEADER,
    PRIORITY_HEADER,
    Rejected,
    prepare,
    received_field,
)
from mta.inbound.tenants import Tenants, check_author, pool_for, priority_for
from mta.mail.address import domain_of
from mta.mail.header import header_safe
from mta.observe import metrics
from mta.observe.escape import field as log_field
from mta.observe.escape import tenant_fields
from mta.policy import inflow
from mta.signing.signer import Signer, SignResult
from mta.spool import suppression
from mta.spool.commit import GroupCommitter
from mta.spool.records import Message
from mta.spool.store import Spool, SpoolFull

log = logging.getLogger("mta.smtpd")

# Messages up to this size are signed on the event loop, larger ones in the
# thread pool. Signing 4-256 KB takes 0.5-1.2 ms (mostly RSA, GIL released),
# and handing it to a thread costs more than that under load: two wake-ups,
# and the signing thread waiting for the GIL to come back to it (see
# docs/benchmarks.md). Above it, signing is Python work long enough (25 MB:
# about 110 ms) that the loop's other sessions should not wait for it.
INLINE_SIGN_MAX = 256 * 1024


@dataclass(frozen=True)
class Origin:
    """Who submitted the mail, for the Received field, the checks and the log."""

    helo: str  # the EHLO name; for HTTP, the client's address
    ip: str
    protocol: str  # the Received field's "with": ESMTPSA, HTTPS, ...
    tenant: TenantConfig | None = None


@dataclass(frozen=True)
class Wanted:
    """What the submitter asks of a message beyond its bytes: an API request's
    fields. Over SMTP the instruction header fields say it; a field given
    here wins over the header."""

    pool: str | None = None
    priority: str | None = None
    campaign: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Built:
    """A message ready to store: its record and its signed bytes."""

    message: Message
    signed: SignResult


class Intake:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        committer: GroupCommitter,
        signer: Signer,
        sign_pool: Executor,
        on_queued: Callable[[Message], None],
        events: EventLog,
    ) -> None:
        self.config = config
        self.spool = spool
        self.committer = committer
        self.signer = signer
        self.sign_pool = sign_pool
        self.on_queued = on_queued  # the scheduler tries new mail at once
        self.events = events
        self.tenants = Tenants(config.tenant)  # SMTP's and the API's

    def reload(self, config: Config, signer: Signer) -> None:
        """Take a reloaded configuration and the signer built from its keys."""
        self.config, self.signer = config, signer
        self.tenants = Tenants(config.tenant)

    async def build(
        self,
        data: bytes,
        *,
        queue_id: str,
        sender: str,
        recipients: Sequence[str],
        origin: Origin,
        wanted: Wanted = Wanted(),
    ) -> Built:
        """The message, checked and signed; Rejected (a bad message, its SMTP
        reply) or Refused (its tenant may not send it)."""
        now = time.time()
        egress = self.config.egress
        prepared = prepare(
            data,
            received=received_field(
                helo=origin.helo,
                client_ip=origin.ip,
                hostname=self.config.server.hostname,
                protocol=origin.protocol,
                queue_id=queue_id,
                recipients=list(recipients),
                now=now,
            ),
            queue_id=queue_id,
            hostname=self.config.server.hostname,
            now=now,
            instructions=(egress.pool_header, PRIORITY_HEADER, CAMPAIGN_HEADER),
        )
        told = prepared.instructed
        if origin.tenant is not None:  # the envelope sender was checked at MAIL or per request
            check_author(origin.tenant, prepared.author)
        pool = _choose(
            lambda name: pool_for(origin.tenant, name, sender, egress),
            wanted.pool,
            told.get(egress.pool_header.lower()),
            egress.pool_header,
            "names no configured pool",
        )
        priority = _choose(
            lambda name: priority_for(origin.tenant, name),
            wanted.priority,
            told.get(PRIORITY_HEADER.lower()),
            PRIORITY_HEADER,
            'is neither "transactional" nor "bulk"',
        )
        campaign = wanted.campaign or told.get(CAMPAIGN_HEADER.lower(), "")
        signed = await self.sign(prepared.data)
        message = Message(
            id=queue_id,
            sender=sender,
            recipients=tuple(recipients),
            arrived=now,
            size=len(signed.message),
            client=f"{origin.helo} ([{origin.ip}])",
            message_id=prepared.message_id,
            pool=pool,
            sending_domain=signed.domain or domain_of(sender),
            tenant=origin.tenant.name if origin.tenant else "",
            campaign=header_safe(campaign)[:128],
            priority=priority,
            metadata=dict(wanted.metadata),
        )
        return Built(message, signed)

    async def store(self, built: Sequence[Built]) -> None:
        """Commit ``built`` with their ``received`` events, all or none (SpoolFull),
        then publish the events."""
        now = time.time()
        events = [event for one in built for event in received_events(one.message, now)]

        def add_all(txn: lmdb.Transaction) -> None:
            for one in built:
                self.spool.add(txn, one.message, one.signed.message)

        await self.committer.run(self.events.storing(events, add_all))
        self.events.publish(events)

    def announce(self, built: Built, client_ip: str, note: str = "") -> None:
        """After the commit: count, log and offer one stored message for delivery."""
        message = built.message
        metrics.MESSAGES_RECEIVED.inc()
        if message.tenant:
            metrics.TENANT_MESSAGES.labels(message.tenant, "received").inc()
        self.on_queued(message)
        # The sender and the Message-ID are the client's: escape.field keeps
        # them from reading as other fields (a Message-ID holding " status=...").
        log.info(
            "id=%s from=%s size=%d nrcpt=%d client=[%s] message-id=%s dkim=%s%s status=queued%s",
            message.id,
            log_field(f"<{message.sender}>"),
            message.size,
            len(message.recipients),
            client_ip,
            log_field(message.message_id),
            _dkim_summary(built.signed),
            tenant_fields(message.tenant, message.campaign),
            note,
        )

    async def slow_inflow(self, untried: int) -> None:
        """Wait as inflow control says for the node's backlog of untried mail (at
        MAIL FROM, and before an API request is built)."""
        server = self.config.server
        wait = inflow.delay(untried, server.inflow_backlog, server.inflow_max_delay)
        if wait > 0:
            metrics.INFLOW_DELAYED.inc()
            metrics.INFLOW_DELAY_SECONDS.inc(wait)
            await asyncio.sleep(wait)

    async def suppressed(self, address: str, sender: str) -> suppression.Entry | None:
        """The entry that stops mail from ``sender`` to ``address``; expired ones met go."""
        now = time.time()
        with self.spool.read() as txn:
            found = suppression.lookup(self.spool, txn, address, sender, now)
        if found.expired:
            # A full spool keeps them a while longer: they stop nothing meanwhile.
            with contextlib.suppress(SpoolFull):
                await self.committer.run(
                    lambda txn: suppression.remove_expired(self.spool, txn, found.expired, now)
                )
        return found.entry

    async def sign(self, data: bytes) -> SignResult:
        """``data`` signed with the keys of the configuration in force."""
        if len(data) <= INLINE_SIGN_MAX:
            return self._sign_now(data)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.sign_pool, self._sign_now, data)

    def _sign_now(self, data: bytes) -> SignResult:
        started = time.perf_counter()
        result = self.signer.sign(data)
        metrics.DKIM_SIGN_SECONDS.observe(time.perf_counter() - started)
        metrics.DKIM_MESSAGES.labels("signed" if result.domain else "unsigned").inc()
        return result


def _choose(
    decide: Callable[[str | None], str],
    given: str | None,
    header: str | None,
    header_name: str,
    problem: str,
) -> str:
    """``decide`` on the given value, else the header's; a value that is no
    name is Rejected with the field's name (Refused passes through)."""
    chosen = given if given is not None else header
    try:
        return decide(chosen)
    except ValueError:
        shown = header_safe(chosen or "")[:64]  # the client's text, in a reply and the log
        raise Rejected(f"550 5.7.0 Error: {header_name} {problem}: {shown}") from None


def _dkim_summary(result: SignResult) -> str:
    if result.domain is None:
        return "none"
    return f"{result.domain}/{','.join(result.selectors)}"
