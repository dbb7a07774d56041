"""One delivery attempt of one job: route, deliver, decide, record, report.

The steps, each in the module that owns it:

1. read the job, its message and body (a read transaction; a job that was
   deleted or held since it fell due is left alone);
2. find the route (mta.outbound.routes), lease a path from the message's
   egress pool to the site (mta.outbound.egress: limits, warmup,
   suspensions; a transactional job ahead of bulk ones, and no delivery
   slot held while it waits) and talk SMTP from that source
   (mta.outbound.smtp_client), which gives one reply per recipient; the
   site's replies may suspend or throttle the path (response rules);
3. decide per recipient: delivered, bounced, or deferred until when
   (mta.policy.disposition, pure);
4. for bounces, build and sign the DSN (mta.outbound.dsn) before touching the
   spool, then record everything in ONE group commit: the job shrinks, waits
   or goes, and the DSN is queued in the same transaction (docs/architecture.md, invariant 2);
   The attempt's delivery events (mta.events.event) are stored in that same
   commit when a webhook takes them, and published after it;
5. one Postfix-style log line per recipient, and metrics.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace

import lmdb

from mta.config import Config, EventsConfig, SuppressionConfig
from mta.events.event import Event, attempt_events
from mta.events.log import EventLog
from mta.mail.address import domain_of
from mta.mail.reply import Reply
from mta.observe import metrics
from mta.observe.escape import field, tenant_fields
from mta.outbound.dsn import Failure, build_dsn
from mta.outbound.egress import Egress, Lease, Stream, Wait
from mta.outbound.routes import ResolveError, Resolver
from mta.outbound.tls_policies import TlsPolicies
from mta.policy.disposition import Decision, decide
from mta.policy.retry import RetrySchedule
from mta.policy.rules import Action, Rule, classify, match
from mta.policy.tls import TlsPolicy
from mta.signing.signer import Signer
from mta.spool import suppression
from mta.spool.commit import GroupCommitter
from mta.spool.ids import IdGenerator
from mta.spool.records import Job, JobState, Message
from mta.spool.scheduled_queue import current_slot
from mta.spool.store import Spool

log = logging.getLogger("mta.delivery")

NO_RELAY = "none"


@dataclass(frozen=True)
class AttemptResult:
    """What one attempt found out, before the decision."""

    relay: str
    replies: dict[str, Reply]
    lease: Lease | None = None  # the path used, when SMTP was tried
    wait_until: float | None = None  # no path may send yet: not an attempt, only a later time
    tls: TlsPolicy | None = None  # the TLS policy SMTP was tried under


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
        egress: Egress,
        signer: Signer,
        sign_pool: Executor,
        new_id: IdGenerator,
        schedule: RetrySchedule,
        hostname: str,
        on_queued: Callable[[Message], None],
        tls_policies: TlsPolicies,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        events: EventLog | None = None,
        suppression_config: SuppressionConfig | None = None,
    ) -> None:
        self.spool = spool
        self.committer = committer
        self.resolver = resolver
        self.egress = egress
        self.signer = signer
        self.sign_pool = sign_pool
        self.new_id = new_id
        self.schedule = schedule
        self.hostname = hostname
        self.on_queued = on_queued
        self.tls_policies = tls_policies
        self.clock = clock
        self.rng = rng or random.Random()
        self.events = events or EventLog(EventsConfig())  # none configured: counted only
        self.suppression = suppression_config or SuppressionConfig()

    def reload(
        self, config: Config, signer: Signer, resolver: Resolver, schedule: RetrySchedule
    ) -> None:
        """Take a reloaded configuration and what was built from it; attempts under
        way finish with what they started with."""
        self.signer, self.resolver, self.schedule = signer, resolver, schedule
        self.hostname, self.suppression = config.server.hostname, config.suppression
        self.tls_policies.reload(config)

    async def __call__(self, key: bytes) -> None:
        loaded = self._load(key)
        if loaded is None:
            return
        job, message, body = loaded
        result = await self._deliver(job, message, body)
        if result is None:
            log.info("id=%s domain=%s: held or deleted while it waited", job.message_id, job.domain)
            return
        decision = decide(
            job, result.replies, message.arrived, self.clock(), self.schedule, self.rng
        )
        if result.wait_until is not None and decision.next_attempt is not None:
            decision = replace(decision, next_attempt=result.wait_until)
        bounce = await self._bounce(message, body, decision, result.relay)
        events = self._events(job, message, result, decision)
        try:
            still_there = await self.committer.run(
                lambda txn: self._record(txn, key, message.sender, decision, result, bounce, events)
            )
        finally:
            if result.lease is not None:
                self.egress.settle(result.lease)
        if not still_there:
            log.info(
                "id=%s domain=%s: deleted by an operator during delivery",
                job.message_id,
                job.domain,
            )
        self.events.publish(events)
        self._report(job, message, result, decision, bounce)
        if bounce is not None:
            self.on_queued(bounce.message)

    def _still_ready(self, job: Job) -> bool:
        with self.spool.read() as txn:
            now = self.spool.job(txn, job.key)
        return now is not None and now.state is JobState.READY

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

    async def _deliver(self, job: Job, message: Message, body: bytes) -> AttemptResult | None:
        """Route, lease a path, talk SMTP: each recipient's reply; None when an
        operator held or deleted the job while it waited for its path."""
        try:
            route = await self.resolver.route(job.domain)
            # Before the lease: finding the policy must not hold a connection slot.
            tls, route = await self.tls_policies.for_route(route)
        except ResolveError as failure:
            reply = Reply(550 if failure.permanent else 451, f"{failure.status} {failure.text}")
            return AttemptResult(NO_RELAY, dict.fromkeys(job.recipients, reply))
        site = self.egress.site(job.domain, route)
        stream = Stream(message.sending_domain, message.id)
        # Waiting for a path, the job holds no delivery slot (mta.outbound.ready_queue).
        lease = await self.egress.lease(
            message.pool,
            site,
            job.domain,
            len(job.recipients),
            stream,
            job.priority,
            # After a wait: `mta queue hold --campaign` stops what waited for a path too.
            still_wanted=lambda: self._still_ready(job),
        )
        if lease is None:
            return None
        if isinstance(lease, Wait):
            reply = Reply(451, f"4.7.0 delivery deferred: {lease.reason}")
            return AttemptResult(
                NO_RELAY, dict.fromkeys(job.recipients, reply), wait_until=lease.until
            )
        sending = lease.recipients(job.recipients)
        # The rest wait for another source, or the next day: a warmup cap.
        capped = Reply(451, f"4.7.0 {lease.source.name} reached its warmup cap for {site.name}")
        replies = dict.fromkeys(job.recipients[len(sending) :], capped)
        relay = NO_RELAY
        try:
            # A site may take only so many recipients per transaction.
            size = lease.limits.max_recipients or len(sending)
            for start in range(0, len(sending), size):
                delivery = await lease.source.deliverer.deliver(
                    route,
                    message.sender,
                    sending[start : start + size],
                    body,
                    lease.limits.max_messages_per_connection,
                    lease.slot,
                    tls,
                )
                replies.update(delivery.replies)
                relay = delivery.relay
            # Before the lease goes back: jobs waiting for the path must find
            # the suspension these replies call for.
            rules = tuple(self.egress.react(lease, replies))
        finally:
            self.egress.release(lease)
            # The domain's servers are done with: its slot is for the next job, not
            # for this one's fsync'd commit (a slot held through it kept one busy
            # domain below what the worker could deliver: docs/benchmarks.md).
            current_slot().give_back()
        return AttemptResult(relay, _blocks_defer(replies, rules), lease, tls=tls)

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
        sender: str,  # the message's envelope sender, whose domain a hard bounce is scoped to
        decision: Decision,
        result: AttemptResult,
        bounce: Bounce | None,
        events: Sequence[Event] = (),
    ) -> bool:
        """Write the attempt's result; False if the job is gone (deleted meanwhile).

        The events are stored either way: the attempt happened.
        """
        self.events.store(txn, events)
        if result.lease is not None:
            self.egress.count_sent(txn, result.lease, len(decision.delivered))
        current = self.spool.job(txn, key)
        if current is None:
            return False
        waiting = tuple(r for r in current.recipients if r in decision.deferred)
        if waiting:
            assert decision.next_attempt is not None
            updated = replace(
                current,
                recipients=waiting,
                attempts=current.attempts + (0 if result.wait_until is not None else 1),
                next_attempt=decision.next_attempt,
                last_reply=str(result.replies[waiting[0]]),
                last_class=classify(self.egress.rules, result.replies[waiting[0]]),
            )
            self.spool.put_job(txn, updated, old=current)
        else:
            self.spool.delete_job(txn, current)
        if bounce is not None:
            self.spool.add(txn, bounce.message, bounce.body, within_limits=False)
        self._suppress_invalid(txn, sender, decision, result)
        return True

    def _suppress_invalid(
        self, txn: lmdb.Transaction, sender: str, decision: Decision, result: AttemptResult
    ) -> None:
        """Suppress, for mail from ``sender``'s domain, recipients a receiving server said
        beyond doubt do not exist (the null sender has no domain: nothing to scope to)."""
        sender_domain = domain_of(sender)
        if not (self.suppression.add_hard_bounces and sender_domain) or result.relay == NO_RELAY:
            return
        lifetime = self.suppression.bounce_expiry
        for recipient, reply in decision.bounced:
            if suppression.is_hard_bounce(reply):
                listed = suppression.new(suppression.BOUNCE, str(reply), self.clock(), lifetime)
                suppression.add(self.spool, txn, recipient, listed, sender_domain)

    def _events(
        self, job: Job, message: Message, result: AttemptResult, decision: Decision
    ) -> list[Event]:
        tried = result.wait_until is None
        lease = result.lease
        return attempt_events(
            message=message,
            recipients=job.recipients,
            replies=result.replies,
            decision=decision,
            attempt=job.attempts + (1 if tried else 0),
            now=self.clock(),
            classify=lambda reply: classify(self.egress.rules, reply),
            mx=None if result.relay == NO_RELAY else result.relay,
            source=lease.source.name if lease else None,
            site=lease.site.name if lease else None,
            tried=tried,
        )

    def _report(
        self,
        job: Job,
        message: Message,
        result: AttemptResult,
        decision: Decision,
        bounce: Bounce | None,
    ) -> None:
        delay = self.clock() - message.arrived
        attempts = job.attempts + (0 if result.wait_until is not None else 1)
        bounced = dict(decision.bounced)
        source = f" source={result.lease.source.name}" if result.lease else ""
        if result.tls is not None:  # which TLS policy applied, and on whose word
            source += f" tls={result.tls.level}/{result.tls.source}"
        for recipient in job.recipients:
            reply = bounced.get(recipient) or result.replies[recipient]
            if recipient in decision.delivered:
                status, kind = "sent", ""
                metrics.MESSAGES_DELIVERED.inc()
                metrics.DELIVERY_DELAY_SECONDS.observe(delay)
            else:
                status = "bounced" if recipient in bounced else "deferred"
                kind = f" class={classify(self.egress.rules, reply)}"
                counter = (
                    metrics.MESSAGES_BOUNCED if status == "bounced" else metrics.MESSAGES_DEFERRED
                )
                counter.inc()
            log.info(
                "id=%s to=%s relay=%s%s delay=%.2f attempts=%d dsn=%s%s%s status=%s (%s)",
                job.message_id,
                field(f"<{recipient}>"),
                result.relay,
                source,
                delay,
                attempts,
                reply.status,
                kind,
                tenant_fields(message.tenant, message.campaign),
                status,
                reply,
            )
            if message.tenant:
                event = "delivered" if status == "sent" else status
                metrics.TENANT_MESSAGES.labels(message.tenant, event).inc()
        metrics.DELIVERY_ATTEMPTS.labels(_attempt_result(decision)).inc()
        if bounce is not None:
            log.info(
                "id=%s sender non-delivery notification: %s", job.message_id, bounce.message.id
            )


def _blocks_defer(replies: dict[str, Reply], rules: tuple[Rule, ...]) -> dict[str, Reply]:
    """A permanent refusal that suspended the path blocks our address, not the
    recipient: it waits for the suspension to end (or expires), never bounces."""
    suspending = [rule for rule in rules if rule.action is Action.SUSPEND]
    return {
        recipient: (
            Reply(451, f"4.7.0 {reply} (blocked by rule {rule.name}; retrying later)")
            if reply.code >= 500 and (rule := match(suspending, reply))
            else reply
        )
        for recipient, reply in replies.items()
    }


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
