"""Mail the node writes itself (TLS-RPT reports): signed and stored like any message.

A report goes through the same spool, DKIM signing, limits and retries as
the mail the node relays, so a receiver sees it signed by our domain and a
crash after the commit loses nothing.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

from mta.mail.address import domain_of
from mta.signing.signer import SignResult
from mta.spool.commit import GroupCommitter
from mta.spool.ids import IdGenerator
from mta.spool.records import Message
from mta.spool.store import Spool


class LocalMail:
    def __init__(
        self,
        spool: Spool,
        committer: GroupCommitter,
        sign: Callable[[bytes], Awaitable[SignResult]],
        new_id: IdGenerator,
        on_queued: Callable[[Message], None],
    ) -> None:
        self.spool, self.committer, self.sign = spool, committer, sign
        self.new_id, self.on_queued = new_id, on_queued

    async def enqueue(self, sender: str, recipients: Sequence[str], data: bytes) -> None:
        """Sign ``data`` and store it for ``recipients``; returns once it is committed."""
        signed = await self.sign(data)
        message = Message(
            id=self.new_id(),
            sender=sender,
            recipients=tuple(recipients),
            arrived=time.time(),
            size=len(signed.message),
            client="local (the node's own mail)",
            sending_domain=signed.domain or domain_of(sender),
        )
        await self.committer.run(lambda txn: self.spool.add(txn, message, signed.message))
        self.on_queued(message)
