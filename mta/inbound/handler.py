"""The aiosmtpd handler: the decisions at MAIL, RCPT and DATA.

MAIL   valid sender, and room in the spool (452 4.3.1 now rather than after
       the client has sent a 25 MB message we cannot keep).
RCPT   valid address, relay permission (554 5.7.1), recipient limit (452 4.5.3).
DATA   the steps every submission takes (mta.inbound.intake: header
       sanity, the tenant's checks, DKIM signing, a durable group commit);
       "250 ... queued as ID" only after the commit.

A client is a tenant (mta.inbound.tenants) by its AUTH name or its address;
a tenant's envelope sender is checked at MAIL, its From field and pool at
DATA (550 5.7.1).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

from aiosmtpd.smtp import Envelope
from aiosmtpd.smtp import Session as SmtpSession

from mta.config import Config, ServerConfig, SuppressionConfig, TenantConfig
from mta.inbound import reply_texts
from mta.inbound.access import may_relay
from mta.inbound.intake import Built, Intake, Origin
from mta.inbound.message import Rejected
from mta.inbound.tenants import Refused, check_sender
from mta.mail.address import address_is_valid
from mta.observe.escape import field
from mta.spool.ids import IdGenerator
from mta.spool.store import Spool, SpoolFull

log = logging.getLogger("mta.smtpd")

# EHLO keywords aiosmtpd does not write itself; the pipelined commands are
# read in order from one stream, which is all PIPELINING asks of a server.
_EXTRA_KEYWORDS = ("PIPELINING", "ENHANCEDSTATUSCODES")


class Handler:
    def __init__(
        self,
        config: ServerConfig,
        spool: Spool,
        intake: Intake,
        new_id: IdGenerator,
        suppression: SuppressionConfig | None = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self.intake = intake
        self.new_id = new_id
        self.suppression = suppression or SuppressionConfig()
        # Per transaction: suppressed recipients accepted at RCPT, to leave out at DATA.
        self._dropped: weakref.WeakKeyDictionary[Envelope, set[str]] = weakref.WeakKeyDictionary()

    def reload(self, config: Config) -> None:
        """Take a reloaded configuration (the intake takes its own)."""
        self.config, self.suppression = config.server, config.suppression

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
        try:
            check_sender(self._tenant(server, session), sender)
        except Refused as refused:
            return reply_texts.tenant_refused(str(refused))
        with self.spool.read() as txn:
            if self.spool.room_problem(txn):
                return reply_texts.NO_ROOM
            untried = self.spool.untried_jobs(txn)
        await self.intake.slow_inflow(untried)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return reply_texts.SENDER_OK

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
        authenticated = bool(session.authenticated)
        if not (
            may_relay(server.ip, authenticated, self.config.relay_networks)
            or self.intake.tenants.may_relay(server.ip)
        ):
            return reply_texts.relay_denied(address)
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return reply_texts.TOO_MANY_RECIPIENTS
        listed = await self.intake.suppressed(address, envelope.mail_from or "")
        if listed is not None:
            if self.suppression.action == "reject":
                return reply_texts.suppressed(address, listed.summary())
            self._dropped.setdefault(envelope, set()).add(address)  # accepted, never sent
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return reply_texts.RECIPIENT_OK

    async def handle_DATA(self, server: Any, session: SmtpSession, envelope: Envelope) -> str:
        queue_id = self.new_id()
        sender = envelope.mail_from or ""
        origin = Origin(
            helo=session.host_name or "",
            ip=server.ip,
            protocol=_protocol(session),
            tenant=self._tenant(server, session),
        )
        recipients = self._drop_suppressed(queue_id, envelope)
        try:
            # Checked even when every recipient was suppressed ("drop"): a bad
            # message gets its refusal whoever it was for (a rare case, signed in vain).
            built = await self.intake.build(
                envelope.original_content or b"",
                queue_id=queue_id,
                sender="" if sender == "<>" else sender,
                recipients=recipients or envelope.rcpt_tos,
                origin=origin,
            )
        except Rejected as rejected:
            return str(rejected)
        except Refused as refused:
            return reply_texts.tenant_refused(str(refused))
        if not recipients:  # every recipient was suppressed: nothing to keep
            return reply_texts.queued(queue_id)
        # A client that goes before the reply (a reset right after the final dot)
        # cancels this handler; the storing goes on, so that a message that gets
        # stored is also counted, logged and offered for delivery.
        left: list[bool] = []
        storing = asyncio.ensure_future(self._store(built, server.ip, left))
        try:
            return await asyncio.shield(storing)
        except asyncio.CancelledError:
            left.append(True)
            storing.add_done_callback(_log_failure)
            raise

    def _tenant(self, server: Any, session: SmtpSession) -> TenantConfig | None:
        user = session.auth_data if session.authenticated else None  # the AUTH name
        return self.intake.tenants.of_client(user, server.ip)

    async def _store(self, built: Built, client_ip: str, left: list[bool]) -> str:
        """Commit the message, then announce it; the reply. ``left`` is not
        empty when the client went before the reply."""
        try:
            await self.intake.store([built])
        except SpoolFull as full:
            log.warning("id=%s not queued: %s", built.message.id, full)
            return reply_texts.NO_ROOM
        note = " (the client left before the reply: it will likely send it again)" if left else ""
        self.intake.announce(built, client_ip, note)
        return reply_texts.queued(built.message.id)

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


def _log_failure(storing: asyncio.Future[str]) -> None:
    """A storing whose client had gone: nobody awaits it, so its failure is logged here."""
    if not storing.cancelled() and storing.exception() is not None:
        log.error("storing a message failed", exc_info=storing.exception())
