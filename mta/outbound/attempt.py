"""One delivery attempt of one job: route, deliver, decide, record, report.

The steps, each in the module that owns it:

1. read the job, its message and body (a read transaction; a job that was
   deleted or held since it fell due is left alone);
2. find the route (mta.outbound.resolver) and talk SMTP (mta.outbound.client),
   which give one reply per recipient;
3. decide per recipient: delivered, bounced, or deferred until when
   (mta.policy.disposition, pure);
4. for bounces, build and sign the DSN (mta.outbound.dsn) before touching the
   spool, then record everything in ONE group commit: the job shrinks, waits
   or goes, and the DSN is queued in the same transaction (DESIGN invariant 2);
5. one Postfix-style log line per recipient, and metrics.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace

import lmdb

from mta import metrics
from mta.outbound.client import Deliverer
from mta.outbound.dsn import Failure, build_dsn
from mta.outbound.resolver import ResolveError, Resolver
from mta.policy.disposition import Decision, decide
from mta.policy.replies import Reply
from mta.policy.retry import RetrySchedule
from mta.queue.commit import GroupCommitter
from mta.queue.ids import IdGenerator
from mta.queue.records import Job, JobState, Message
from mta.queue.store import Spool
from mta.signing import Signer

log = logging.getLogger("mta.delivery")

NO_RELAY = "none"


@dataclass(frozen=True)
class Bounce:
    """A DSN ready to queue: its envelope record and its signed bytes."""

    message: Message
    body: bytes


class Attempter:
    def __init__(
        self,
        *,
        spool: Spool,
        committer: GroupCommitter,
        resolver: Resolver,
        deliverer: Deliverer,
        signer: Signer,
        sign_pool: Executor,
        new_id: IdGenerator,
        schedule: RetrySchedule,
        hostname: str,
        on_queued: Callable[[], None],
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.spool = spool
        self.committer = committer
        self.resolver = resolver
        self.deliverer = deliverer
        self.signer = signer
        self.sign_pool = sign_pool
        self.new_id = new_id
        self.schedule = schedule
        self.hostname = hostname
        self.on_queued = on_queued
        self.clock = clock
        self.rng = rng or random.Random()

    async def __call__(self, key: bytes) -> None:
        loaded = self._load(key)
        if loaded is None:
            return
        job, message, body = loaded
        relay, replies = await self._deliver(job, message, body)
        decision = decide(job, replies, message.arrived, self.clock(), self.schedule, self.rng)
        bounce = await self._bounce(message, body, decision, relay)
        still_there = await self.committer.run(
            lambda txn: self._record(txn, key, decision, replies, bounce)
        )
        if not still_there:
            log.info(
                "id=%s domain=%s: deleted by an operator during delivery",
                job.message_id,
                job.domain,
            )
        self._report(job, message, relay, replies, decision, bounce)
        if bounce is not None:
            self.on_queued()

    def _load(self, key: bytes) -> tuple[Job, Message, bytes] | None:
        with self.spool.read() as txn:
            job = self.spool.job(txn, key)
            if job is None or job.state is not JobState.READY:
                return None
            message = self.spool.message(txn, job.message_id)
            body = self.spool.body(txn, job.message_id)
        if message is None or body is None:
            log.error("id=%s: job without its message; left for an operator", job.message_id)
            return None
        return job, message, body

    async def _deliver(
        self, job: Job, message: Message, body: bytes
    ) -> tuple[str, dict[str, Reply]]:
        """The relay that answered, and each recipient's reply."""
        try:
            route = await self.resolver.route(job.domain)
        except ResolveError as failure:
            reply = Reply(550 if failure.permanent else 451, f"{failure.status} {failure.text}")
            return NO_RELAY, dict.fromkeys(job.recipients, reply)
        attempt = await self.deliverer.deliver(route, message.sender, job.recipients, body)
        return attempt.relay, dict(attempt.replies)

    async def _bounce(
        self, message: Message, body: bytes, decision: Decision, relay: str
    ) -> Bounce | None:
        """The signed DSN for the bounced recipients; none for the null sender."""
        if not decision.bounced or not message.sender:
            return None
        queue_id = self.new_id()
        now = self.clock()
        remote = None if relay == NO_RELAY else relay.split("[", 1)[0]
        failures = [
            Failure(recipient, reply.status, str(reply), remote)
            for recipient, reply in decision.bounced
        ]
        dsn = build_dsn(
            original=body,
            message_queue_id=message.id,
            sender=message.sender,
            arrived=message.arrived,
            failures=failures,
            reporting_mta=self.hostname,
            now=now,
            dsn_message_id=f"<{queue_id}@{self.hostname}>",
        )
        loop = asyncio.get_running_loop()
        signed = (await loop.run_in_executor(self.sign_pool, self.signer.sign, dsn)).message
        record = Message(
            id=queue_id,
            sender="",
            recipients=(message.sender,),
            arrived=now,
            size=len(signed),
            client=f"bounce of {message.id}",
            message_id=f"<{queue_id}@{self.hostname}>",
        )
        return Bounce(record, signed)

    def _record(
        self,
        txn: lmdb.Transaction,
        key: bytes,
        decision: Decision,
        replies: dict[str, Reply],
        bounce: Bounce | None,
    ) -> bool:
        """Write the attempt's outcome; False if the job is gone (deleted meanwhile)."""
        current = self.spool.job(txn, key)
        if current is None:
            return False
        waiting = tuple(r for r in current.recipients if r in decision.deferred)
        if waiting:
            assert decision.next_attempt is not None
            updated = replace(
                current,
                recipients=waiting,
                attempts=current.attempts + 1,
                next_attempt=decision.next_attempt,
                last_reply=str(replies[waiting[0]]),
            )
            self.spool.put_job(txn, updated, old=current)
        else:
            self.spool.delete_job(txn, current)
        if bounce is not None:
            self.spool.add(txn, bounce.message, bounce.body, within_limits=False)
        return True

    def _report(
        self,
        job: Job,
        message: Message,
        relay: str,
        replies: dict[str, Reply],
        decision: Decision,
        bounce: Bounce | None,
    ) -> None:
        now = self.clock()
        delay = now - message.arrived
        attempts = job.attempts + 1
        bounced = dict(decision.bounced)
        for recipient in job.recipients:
            if recipient in decision.delivered:
                status, reply = "sent", replies[recipient]
                metrics.MESSAGES_DELIVERED.inc()
                metrics.DELIVERY_DELAY_SECONDS.observe(delay)
            elif recipient in bounced:
                status, reply = "bounced", bounced[recipient]
                metrics.MESSAGES_BOUNCED.inc()
            else:
                status, reply = "deferred", replies[recipient]
                metrics.MESSAGES_DEFERRED.inc()
            log.info(
                "id=%s to=<%s> relay=%s delay=%.2f attempts=%d dsn=%s status=%s (%s)",
                job.message_id,
                recipient,
                relay,
                delay,
                attempts,
                reply.status,
                status,
                reply,
            )
        metrics.DELIVERY_ATTEMPTS.labels(_attempt_result(decision)).inc()
        if bounce is not None:
            log.info(
                "id=%s sender non-delivery notification: %s", job.message_id, bounce.message.id
            )


def _attempt_result(decision: Decision) -> str:
    kinds = [
        name
        for name, recipients in (
            ("delivered", decision.delivered),
            ("bounced", decision.bounced),
            ("deferred", decision.deferred),
        )
        if recipients
    ]
    return kinds[0] if len(kinds) == 1 else "partial"
