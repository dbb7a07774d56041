"""A dead node's mail handed to a live node: `mta queue evacuate`.

When a node is gone for good (its disk survives, its daemon does not run),
its waiting mail must still go out. ``evacuate`` reads that node's spool and
hands every message with ready jobs to another node over SMTP, as a client
of that node would: the stored bytes (already DKIM-signed; the live node
adds its Received line and may sign again), the original envelope sender,
and the recipients still pending. Recipients leave the dead spool only after
the live node's 250 for them, in a durable commit per message
(docs/architecture.md, invariants 2 and 3): interrupted, the command is run
again and carries on; a crash between that 250 and the commit can send one
message twice, never lose one.

What the live node answers decides the rest: a 5xx recipient stays in the
spool for the operator; a 4xx (or no connection at all) stops the run,
because every following message would meet the same, and the next run
starts there. Held jobs are left alone: an operator put them aside.

The spool must not be in use by a daemon, which would deliver the same jobs
at the same time. LMDB itself tells: every process that has the environment
open holds a shared fcntl lock on the first byte of its ``lock.mdb``, which
LMDB takes to learn whether it is the first user. ``SpoolUsers`` asks the
kernel (F_GETLK) whether any other process holds it, before the first
message and again before each one, so a daemon started meanwhile stops the
run. The probe's descriptor is closed only after the spool: closing any
descriptor of a file drops every fcntl lock this process holds on it,
LMDB's own included.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from mta.config import HostPort
from mta.inbound.message import CAMPAIGN_HEADER, PRIORITY_HEADER
from mta.mail.reply import Reply
from mta.outbound.routes import MxHost, Route
from mta.outbound.smtp_client import ClientSettings, Deliverer, Delivery
from mta.spool.records import JobState, Message
from mta.spool.store import Spool

# struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (native alignment).
_FLOCK = "hhqqi"


class SpoolInUse(Exception):
    """Another process has the spool open; str() says which."""


class SpoolUsers:
    """Whether another process has an LMDB environment open (see the module's docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path / "lock.mdb", os.O_RDONLY)

    def check(self) -> None:
        """SpoolInUse if another process has the environment open."""
        probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        kind, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(self._fd, fcntl.F_GETLK, probe))
        if kind != fcntl.F_UNLCK:
            raise SpoolInUse(
                f"the spool at {self.path} is in use by process {pid}: "
                "stop `mta serve` on this node before evacuating it"
            )

    def close(self) -> None:
        os.close(self._fd)


@dataclass
class Tally:
    """What a run handed over, and what the spool still holds at its end."""

    messages_sent: int = 0  # messages that left the spool: every recipient handed over
    recipients_sent: int = 0
    messages_left: int = 0
    recipients_left: int = 0
    stopped: str = ""  # the message and 4xx reply (or connection failure) that stopped the run

    def summary(self, target: HostPort) -> str:
        return (
            f"handed over {self.messages_sent} message(s), {self.recipients_sent} "
            f"recipient(s) to {target}; left in the spool: {self.messages_left} message(s), "
            f"{self.recipients_left} recipient(s)"
        )


async def route_to(target: HostPort) -> Route:
    """The live node as a static route: its address, or its name's addresses."""
    try:
        addresses: tuple[str, ...] = (str(ipaddress.ip_address(target.host)),)
    except ValueError:
        try:
            found = await asyncio.get_running_loop().getaddrinfo(
                target.host, target.port, type=socket.SOCK_STREAM
            )
        except OSError as error:
            raise OSError(f"cannot resolve {target.host}: {error.strerror}") from None
        addresses = tuple(dict.fromkeys(str(info[4][0]) for info in found))
    return Route(target.host, (MxHost(target.host, 0, addresses, target.port),), static=True)


def wire_data(message: Message, body: bytes, pool_header: str) -> bytes:
    """What to send for a stored message: its bytes, after the instruction fields
    for its pool, priority and campaign, which the live node takes and removes as
    this one did. (Its tenant is not passed on: the live node knows this client
    as a relay client, not as the tenant.)"""
    instructions = (
        (pool_header, message.pool),
        (PRIORITY_HEADER, message.priority),
        (CAMPAIGN_HEADER, message.campaign),
    )
    head = "".join(f"{name}: {value}\r\n" for name, value in instructions if value)
    return head.encode() + body


async def evacuate(
    spool: Spool,
    users: SpoolUsers,
    target: HostPort,
    settings: ClientSettings,
    pool_header: str,
    out: TextIO,
) -> Tally:
    """Hand every message with ready jobs to ``target``, until a 4xx stops the run."""
    tally = Tally()
    users.check()
    route = await route_to(target)
    deliverer = Deliverer(settings)
    with spool.read() as txn:
        # Only the IDs: each message is read afresh when its turn comes.
        queue_ids = [message.id for message in spool.all_messages(txn)]
    try:
        for queue_id in queue_ids:
            users.check()
            if not await _hand_over(spool, deliverer, route, queue_id, pool_header, tally, out):
                break
    finally:
        await deliverer.close()
    with spool.read() as txn:
        stats = spool.stats(txn)
    tally.messages_left = stats.messages
    tally.recipients_left = sum(domain.recipients for domain in stats.by_domain.values())
    return tally


async def _hand_over(
    spool: Spool,
    deliverer: Deliverer,
    route: Route,
    queue_id: str,
    pool_header: str,
    tally: Tally,
    out: TextIO,
) -> bool:
    """Send one message's ready recipients and commit those accepted; counted in
    ``tally``. False if the run must stop."""
    with spool.read() as txn:
        message = spool.message(txn, queue_id)
        body = spool.body(txn, queue_id)
        jobs = spool.jobs_of(txn, queue_id)
    ready = [job for job in jobs if job.state is JobState.READY]
    if message is None or body is None or not ready:
        return True
    recipients = [recipient for job in ready for recipient in job.recipients]
    delivery = await deliverer.deliver(
        route, message.sender, recipients, wire_data(message, body, pool_header)
    )
    accepted = {r for r, reply in delivery.replies.items() if 200 <= reply.code < 300}
    if accepted:
        tally.messages_sent += _remove(spool, queue_id, accepted)
        tally.recipients_sent += len(accepted)
    _report(queue_id, delivery, out)
    deferred = [reply for reply in delivery.replies.values() if 400 <= reply.code < 500]
    if deferred:
        tally.stopped = f"{queue_id}: {deferred[0]}"
    return not deferred


def _remove(spool: Spool, queue_id: str, accepted: set[str]) -> bool:
    """Take the accepted recipients out of their jobs, durably; the message goes
    with its last job. True if it went."""
    gone = False
    with spool.write() as txn:
        for job in spool.jobs_of(txn, queue_id):
            remaining = tuple(r for r in job.recipients if r not in accepted)
            if not remaining:
                gone = spool.delete_job(txn, job)
            elif remaining != job.recipients:
                spool.put_job(txn, replace(job, recipients=remaining), old=job)
    return gone


def _report(queue_id: str, delivery: Delivery, out: TextIO) -> None:
    """One line per recipient, in the form of the daemon's delivery log lines."""
    for recipient, reply in delivery.replies.items():
        out.write(
            f"id={queue_id} to=<{recipient}> relay={delivery.relay} dsn={reply.status} "
            f"status={_status(reply)} ({reply})\n"
        )
    out.flush()


def _status(reply: Reply) -> str:
    if reply.code < 300:
        return "sent"
    return "deferred" if reply.code < 500 else "refused"
