"""What a remote server's SMTP reply means for the recipient it answered.

Delivered, deferred (try again later) or bounced, by the reply's class.
"""

from __future__ import annotations

from enum import StrEnum

from mta.mail.reply import Reply


class Outcome(StrEnum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


def outcome(reply: Reply) -> Outcome:
    """2xx delivered, 4xx deferred, 5xx bounced; anything else deferred.

    A 1xx or 3xx where a final reply was due, or a code above 5xx, is a
    protocol error: not the recipient's fault, so it is not a reason to bounce.
    """
    klass = reply.code // 100
    if klass == 2:
        return Outcome.DELIVERED
    if klass == 5:
        return Outcome.BOUNCED
    return Outcome.DEFERRED
