"""Delivery events: what happened to each recipient, for the sending application.

Every reception, delivery, deferral, bounce and expiry of one recipient is an
``Event`` (a flat JSON object; ``id`` lets a consumer drop duplicates), built
here from the message and the attempt's decision. Where events go is
mta.events.log (the file, and the spool for the webhook) and
mta.events.webhook (the POSTs).

An attempt that never talked SMTP because no path may send yet (a rate
limit, a warmup cap, a suspension: the job just waits, its attempt count
unchanged) makes no ``deferred`` event; its log line says so. If the message
expires meanwhile, that is an ``expired`` event.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from mta.mail.reply import Reply
from mta.observe.timefmt import iso_time
from mta.policy.disposition import Decision
from mta.policy.outcome import Outcome, outcome
from mta.spool.records import Message

EventType = Literal["received", "delivered", "deferred", "bounced", "expired"]


@dataclass(frozen=True)
class Event:
    """One thing that happened to one recipient of one message.

    Fields that do not apply are None: a reception has no source, site, MX,
    reply or classification; a delivery has no classification.
    """

    # "<queue id>.<recipient>.<attempt>.<type>": stable across a resend, and
    # unique in the fleet because the queue ID ends in the node's tag.
    id: str
    type: EventType
    time: str  # ISO 8601 UTC, when it happened
    queue_id: str
    message_id: str  # the Message-ID header
    sender: str  # "" for the null sender (a bounce)
    recipient: str
    source: str | None  # the egress source that sent
    site: str | None  # the destination site (MX host set) it was sent to
    mx: str | None  # the relay that answered: "mx.example.net[192.0.2.1]:25"
    reply: str | None  # the reply that decided this recipient: "550 5.1.1 ..."
    dsn: str | None  # its RFC 3463 status: "5.1.1"
    classification: str | None  # for failures: invalid_recipient, spam_block, ...
    attempt: int  # delivery attempts so far (0 for a reception)
    arrived: str  # ISO 8601 UTC, when the message was accepted
    tenant: str | None  # the [[tenant]] whose mail it is
    campaign: str | None  # the mailing it belongs to, as its sender named it
    metadata: Mapping[str, str]  # the API client's own keys, as it gave them

    def encode(self) -> bytes:
        """Compact JSON, ASCII only (anything else \\u-escaped), one line."""
        return json.dumps(asdict(self), separators=(",", ":")).encode()


def _event(
    kind: EventType,
    message: Message,
    recipient: str,
    attempt: int,
    now: float,
    *,
    source: str | None = None,
    site: str | None = None,
    mx: str | None = None,
    reply: Reply | None = None,
    classification: str | None = None,
) -> Event:
    return Event(
        id=f"{message.id}.{recipient}.{attempt}.{kind}",
        type=kind,
        time=iso_time(now),
        queue_id=message.id,
        message_id=message.message_id,
        sender=message.sender,
        recipient=recipient,
        source=source,
        site=site,
        mx=mx,
        reply=None if reply is None else str(reply),
        dsn=None if reply is None else reply.status,
        classification=classification,
        attempt=attempt,
        arrived=iso_time(message.arrived),
        tenant=message.tenant or None,
        campaign=message.campaign or None,
        metadata=message.metadata,
    )


def received_events(message: Message, now: float) -> list[Event]:
    """One ``received`` event per recipient of a message just accepted."""
    return [_event("received", message, recipient, 0, now) for recipient in message.recipients]


def attempt_events(
    *,
    message: Message,
    recipients: Sequence[str],
    replies: Mapping[str, Reply],
    decision: Decision,
    attempt: int,
    now: float,
    classify: Callable[[Reply], str],
    mx: str | None = None,
    source: str | None = None,
    site: str | None = None,
    tried: bool = True,
) -> list[Event]:
    """The events of one delivery attempt of ``recipients`` (one job).

    ``replies`` are the replies the decision was made on; ``attempt`` counts
    this one; ``tried`` is False when no SMTP was attempted (no path may send
    yet), which makes no ``deferred`` events.
    """
    bounced = dict(decision.bounced)
    events = []
    for recipient in recipients:
        given = replies[recipient]
        path = {"source": source, "site": site, "mx": mx}
        if recipient in decision.delivered:
            events.append(
                _event("delivered", message, recipient, attempt, now, reply=given, **path)
            )
        elif recipient in bounced:
            reply = bounced[recipient]
            kind: EventType = (
                "expired"
                if decision.expired and outcome(given) is not Outcome.BOUNCED
                else "bounced"
            )
            events.append(
                _event(
                    kind,
                    message,
                    recipient,
                    attempt,
                    now,
                    reply=reply,
                    classification=classify(reply),
                    **path,
                )
            )
        elif tried:
            events.append(
                _event(
                    "deferred",
                    message,
                    recipient,
                    attempt,
                    now,
                    reply=given,
                    classification=classify(given),
                    **path,
                )
            )
    return events
