"""The aiosmtpd handler: the decisions at MAIL, RCPT and DATA.

MAIL   valid sender, and room in the spool (452 4.3.1 now rather than after
       the client has sent a 25 MB message we cannot keep).
RCPT   valid address, relay permission (554 5.7.1), recipient limit (452 4.5.3).
DATA   header sanity (mta.inbound.message), DKIM signing (on the event
       loop up to INLINE_SIGN_MAX bytes, in a thread pool above), then a
       durable group commit; "250 ... queued as ID" only after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from aiosmtpd.smtp import Envelope
from aiosmtpd.smtp import Session as SmtpSession

from mta.config import Config, EgressConfig, EventsConfig, ServerConfig, SuppressionConfig
from mta.events.event import received_events
from mta.events.log import EventLog
from mta.inbound import reply_texts
from mta.inbound.access import may_relay
from mta.inbound.message import Rejected, prepare, received_field
from mta.mail.address import address_is_valid, domain_of
from mta.mail.header import header_safe
from mta.observe import metrics
from mta.observe.escape import field
from mta.policy import inflow
from mta.signing.signer import Signer, SignResult
from mta.spool import suppression
from mta.spool.commit import GroupCommitter
from mta.spool.ids import IdGenerator
from mta.spool.records import Message
from mta.spool.store import Spool, SpoolFull

log = logging.getLogger("mta.smtpd")

# EHLO keywords aiosmtpd does not write itself; the pipelined commands are
# read in order from one stream, which is all PIPELINING asks of a server.
_EXTRA_KEYWORDS = ("PIPELINING", "ENHANCEDSTATUSCODES")

# Messages up to this size are signed on the event loop, larger ones in the
# thread pool. Signing 4-256 KB takes 0.5-1.2 ms (mostly RSA, GIL released),
# and handing it to a thread costs more than that under load: two wake-ups,
# and the signing thread waiting for the GIL to come back to it (see
# docs/benchmarks.md). Above
# it, signing is Python work long enough (25 MB: about 110 ms) that the
# loop's other sessions should not wait for it.
INLINE_SIGN_MAX = 256 * 1024


class Handler:
    def __init__(
        self,
        config: ServerConfig,
        egress: EgressConfig,
        spool: Spool,
        committer: GroupCommitter,
        signer: Signer,
        sign_pool: Executor,
        new_id: IdGenerator,
        on_queued: Callable[[Message], None],
        suppression: SuppressionConfig | None = None,
        events: EventLog | None = None,
    ) -> None:
        self.config = config
        self.egress = egress
        self.spool = spool
        self.committer = committer
        self.signer = signer
        self.sign_pool = sign_pool
        self.new_id = new_id
        self.on_queued = on_queued  # the scheduler tries new mail at once
        self.suppression = suppression or SuppressionConfig()
        self.events = events or EventLog(EventsConfig())
        # Per transaction: suppressed recipients accepted at RCPT, to leave out at DATA.
        self._dropped: weakref.WeakKeyDictionary[Envelope, set[str]] = weakref.WeakKeyDictionary()

    def reload(self, config: Config, signer: Signer) -> None:
        """Take a reloaded configuration and the signer built from its keys."""
        self.config, self.egress, self.signer = config.server, config.egress, signer
        self.suppression = config.suppression

    async def handle_EHLO(
        self,
        server: Any,
        session: SmtpSession,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        keywords = [line[4:] for line in responses[1:] if line[4:] != "HELP"]
        keywords += _EXTRA_KEYWORDS
        lines = [responses[0]] + [f"250-{keyword}" for keyword in keywords]
        return lines[:-1] + ["250 " + lines[-1][4:]]

    async def handle_MAIL(
        self,
        server: Any,
        session: SmtpSession,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        sender = "" if address == "<>" else address
        if sender and not address_is_valid(sender):
            return reply_texts.bad_address(address, "sender")
        with self.spool.read() as txn:
            if self.spool.room_problem(txn):
                return reply_texts.NO_ROOM
            untried = self.spool.untried_jobs(txn)
        await self._slow_inflow(untried)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return reply_texts.SENDER_OK

    async def _slow_inflow(self, untried: int) -> None:
        """Wait as inflow control says for the node's backlog of untried mail."""
        wait = inflow.delay(untried, self.config.inflow_backlog, self.config.inflow_max_delay)
        if wait > 0:
            metrics.INFLOW_DELAYED.inc()
            metrics.INFLOW_DELAY_SECONDS.inc(wait)
            await asyncio.sleep(wait)

    async def handle_RCPT(
        self,
        server: Any,
        session: SmtpSession,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if not address_is_valid(address):
            return reply_texts.bad_address(address, "recipient")
        if not may_relay(server.ip, bool(session.authenticated), self.config.relay_networks):
            return reply_texts.relay_denied(address)
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return reply_texts.TOO_MANY_RECIPIENTS
        listed = await self._suppressed(address, envelope.mail_from or "")
        if listed is not None:
            if self.suppression.action == "reject":
                return reply_texts.suppressed(address, listed.summary())
            self._dropped.setdefault(envelope, set()).add(address)  # accepted, never sent
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return reply_texts.RECIPIENT_OK

    async def _suppressed(self, address: str, sender: str) -> suppression.Entry | None:
        """The entry that stops mail from ``sender`` to ``address``; expired ones met go."""
        now = time.time()
        with self.spool.read() as txn:
            found = suppression.lookup(self.spool, txn, address, sender, now)
        if found.expired:
            await self._remove_expired(found.expired, now)
        return found.entry

    async def _remove_expired(self, keys: tuple[str, ...], now: float) -> None:
        # A full spool keeps them a while longer: they stop nothing meanwhile.
        with contextlib.suppress(SpoolFull):
            await self.committer.run(
                lambda txn: suppression.remove_expired(self.spool, txn, keys, now)
            )

    async def handle_DATA(self, server: Any, session: SmtpSession, envelope: Envelope) -> str:
        queue_id = self.new_id()
        now = time.time()
        helo = session.host_name or ""
        try:
            prepared = prepare(
                envelope.original_content or b"",
                received=received_field(
                    helo=helo,
                    client_ip=server.ip,
                    hostname=self.config.hostname,
                    protocol=_protocol(session),
                    queue_id=queue_id,
                    recipients=envelope.rcpt_tos,
                    now=now,
                ),
                queue_id=queue_id,
                hostname=self.config.hostname,
                now=now,
                instruction=self.egress.pool_header,
            )
            pool = self._pool(prepared.instructed, envelope.mail_from or "")
        except Rejected as rejected:
            return str(rejected)
        recipients = self._drop_suppressed(queue_id, envelope)
        if not recipients:  # every recipient was suppressed: nothing to keep
            return reply_texts.queued(queue_id)
        if len(prepared.data) <= INLINE_SIGN_MAX:
            signed = self._sign(prepared.data)
        else:
            loop = asyncio.get_running_loop()
            signed = await loop.run_in_executor(self.sign_pool, self._sign, prepared.data)
        sender = envelope.mail_from or ""
        message = Message(
            id=queue_id,
            sender="" if sender == "<>" else sender,
            recipients=recipients,
            arrived=now,
            size=len(signed.message),
            client=f"{helo} ([{server.ip}])",
            message_id=prepared.message_id,
            pool=pool,
            sending_domain=signed.domain or domain_of(sender),
        )
        # A client that goes before the reply (a reset right after the final dot)
        # cancels this handler; the storing goes on, so that a message that gets
        # stored is also counted, logged and offered for delivery.
        left: list[bool] = []
        storing = asyncio.ensure_future(self._store(message, signed, server.ip, left))
        try:
            return await asyncio.shield(storing)
        except asyncio.CancelledError:
            left.append(True)
            storing.add_done_callback(_log_failure)
            raise

    async def _store(
        self, message: Message, signed: SignResult, client_ip: str, left: list[bool]
    ) -> str:
        """Commit the message, then count it, log it and hand it to delivery; the reply.
        ``left`` is not empty when the client went before the reply."""
        try:
            events = received_events(message, message.arrived)
            await self.committer.run(
                self.events.storing(
                    events, lambda txn: self.spool.add(txn, message, signed.message)
                )
            )
        except SpoolFull as full:
            log.warning("id=%s not queued: %s", message.id, full)
            return reply_texts.NO_ROOM
        metrics.MESSAGES_RECEIVED.inc()
        self.events.publish(events)
        self.on_queued(message)
        # The sender and the Message-ID are the client's: escape.field keeps
        # them from reading as other fields (a Message-ID holding " status=...").
        log.info(
            "id=%s from=%s size=%d nrcpt=%d client=[%s] message-id=%s dkim=%s status=queued%s",
            message.id,
            field(f"<{message.sender}>"),
            message.size,
            len(message.recipients),
            client_ip,
            field(message.message_id),
            _dkim_summary(signed),
            " (the client left before the reply: it will likely send it again)" if left else "",
        )
        return reply_texts.queued(message.id)

    def _drop_suppressed(self, queue_id: str, envelope: Envelope) -> tuple[str, ...]:
        """The recipients to keep; those on the suppression list (action "drop") are logged."""
        dropped = self._dropped.pop(envelope, set())
        for recipient in dropped:
            log.info(
                "id=%s to=%s status=suppressed (on the suppression list)",
                queue_id,
                field(f"<{recipient}>"),
            )
        return tuple(r for r in envelope.rcpt_tos if r not in dropped)

    def _pool(self, instructed: str | None, sender: str) -> str:
        """The egress pool: the pool header's, else the sender domain's, else the default."""
        if not self.egress.pool:
            return ""  # no pools configured: the host's own address
        if instructed is not None:
            name = instructed.strip()
            if name not in {pool.name for pool in self.egress.pool}:
                header = self.egress.pool_header
                shown = header_safe(name)[:64]  # the client's text, in a reply and the log
                raise Rejected(f"550 5.7.0 Error: {header} names no configured pool: {shown}")
            return name
        domain = sender.rpartition("@")[2].lower()
        return self.egress.sender_pools.get(domain, self.egress.default_pool)

    def _sign(self, data: bytes) -> SignResult:
        started = time.perf_counter()
        result = self.signer.sign(data)
        metrics.DKIM_SIGN_SECONDS.observe(time.perf_counter() - started)
        metrics.DKIM_MESSAGES.labels("signed" if result.domain else "unsigned").inc()
        return result

    async def handle_exception(self, error: Exception) -> str:
        # The error's text may quote the client's input.
        log.error("SMTP session error: %s", field(repr(error)), exc_info=error)
        return reply_texts.INTERNAL_ERROR


def _protocol(session: SmtpSession) -> str:
    """The "with" keyword of a Received field (RFC 3848)."""
    name = "ESMTP" if session.extended_smtp else "SMTP"
    if session.ssl:
        name += "S"
    if session.authenticated:
        name += "A"
    return name


def _dkim_summary(result: SignResult) -> str:
    if result.domain is None:
        return "none"
    return f"{result.domain}/{','.join(result.selectors)}"


def _log_failure(storing: asyncio.Future[str]) -> None:
    """A storing whose client had gone: nobody awaits it, so its failure is logged here."""
    if not storing.cancelled() and storing.exception() is not None:
        log.error("storing a message failed", exc_info=storing.exception())
