"""One delivery attempt recorded in a real spool, with fake DNS and SMTP.

The resolver and the SMTP client are stand-ins (what they do for real is
tested in tests/integration/); the spool, the group committer, the decision
and the DSN are the real ones. Nothing sleeps: the clock is injected.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from mta import config
from mta.events.log import EventLog
from mta.mail.reply import Reply
from mta.outbound.dispatcher import Attempter
from mta.outbound.egress import Egress
from mta.outbound.routes import MxHost, ResolveError, Route
from mta.outbound.smtp_client import OPPORTUNISTIC, Delivery, Slot
from mta.outbound.tls_policies import TlsPolicies
from mta.policy.retry import RetrySchedule
from mta.policy.tls import TlsPolicy
from mta.signing.signer import Signer
from mta.spool.commit import GroupCommitter
from mta.spool.ids import IdGenerator
from mta.spool.records import JobState, Message, job_key
from mta.spool.scheduled_queue import _CURRENT_SLOT, DeliverySlot
from mta.spool.store import Spool

NOW = 1_800_000_000.0
BODY = b"From: app@example.test\r\nSubject: hi\r\n\r\nbody\r\n"
ROUTE = Route("example.net", (MxHost("mx.example.net", 10, ("192.0.2.1",), 25),))


class FakeResolver:
    def __init__(self, error: ResolveError | None = None) -> None:
        self.error = error

    async def route(self, domain: str) -> Route:
        if self.error is not None:
            raise self.error
        return ROUTE


class FakeDeliverer:
    """Answers each recipient by its local part; runs ``meanwhile`` mid-delivery."""

    ANSWERS = {
        "ok": Reply(250, "2.0.0 Ok"),
        "busy": Reply(451, "4.3.0 try later"),
        "gone": Reply(550, "5.1.1 no such user"),
        "blocked": Reply(
            554, "5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org"
        ),
    }

    def __init__(self, meanwhile: Callable[[], None] = lambda: None) -> None:
        self.meanwhile = meanwhile

    async def deliver(
        self,
        route: Route,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        max_messages: int | None = None,
        slot: Slot | None = None,
        tls: TlsPolicy = OPPORTUNISTIC,
    ) -> Delivery:
        self.meanwhile()
        replies = {r: self.ANSWERS[r.split("@")[0]] for r in recipients}
        return Delivery("mx.example.net[192.0.2.1]:25", replies)

    def take_idle(self, path: str, domain: str) -> Slot | None:
        return None  # no connection is ever kept open

    def give_back(self, slot: Slot) -> None:
        pass


def run_attempt(
    tmp_path: Path,
    recipients: tuple[str, ...],
    sender: str = "app@example.test",
    resolver: FakeResolver | None = None,
    meanwhile: Callable[[Spool, str], None] = lambda spool, queue_id: None,
    events: Callable[[Spool], EventLog] | None = None,
) -> tuple[Spool, str]:
    spool = Spool(tmp_path / "spool", max_size=2**20)
    new_id = IdGenerator(node="test", clock=lambda: NOW)
    queue_id = new_id()
    with spool.write() as txn:
        spool.add(txn, Message(queue_id, sender, recipients, NOW, len(BODY)), BODY)

    async def main() -> None:
        committer = GroupCommitter(spool)
        egress = Egress(config.parse({}), spool, clock=lambda: NOW)
        [source] = egress.sources  # no [egress] configured: the host's own address
        source.deliverer = FakeDeliverer(lambda: meanwhile(spool, queue_id))  # type: ignore[assignment]
        with ThreadPoolExecutor(1) as pool:
            attempter = Attempter(
                spool=spool,
                committer=committer,
                resolver=resolver or FakeResolver(),  # type: ignore[arg-type]
                egress=egress,
                signer=Signer([]),
                sign_pool=pool,
                new_id=new_id,
                schedule=RetrySchedule(first=60, jitter=0),
                hostname="mta.example.test",
                on_queued=lambda message: None,
                tls_policies=TlsPolicies(config.parse({"delivery": {"mta_sts": False}}), spool),
                clock=lambda: NOW,
                events=events(spool) if events else None,
            )
            await attempter(job_key(queue_id, "example.net"))
        committer.close()

    asyncio.run(main())
    return spool, queue_id


def bounces(spool: Spool, original: str) -> list[tuple[Message, bytes]]:
    with spool.read() as txn:
        found = []
        for message in spool.all_messages(txn):
            if message.id != original:
                body = spool.body(txn, message.id)
                assert body is not None
                found.append((message, body))
        return found


def test_all_delivered_leaves_nothing(tmp_path: Path) -> None:
    spool, _ = run_attempt(tmp_path, ("ok@example.net",))
    with spool.read() as txn:
        assert spool.message_count(txn) == 0 and spool.stored_bytes(txn) == 0
        assert list(spool.due(txn)) == []


def test_mixed_replies_shrink_the_job_and_queue_one_dsn(tmp_path: Path) -> None:
    spool, queue_id = run_attempt(
        tmp_path, ("ok@example.net", "busy@example.net", "gone@example.net")
    )
    with spool.read() as txn:
        [job] = spool.jobs_of(txn, queue_id)
    assert job.recipients == ("busy@example.net",)
    assert job.attempts == 1 and job.next_attempt == NOW + 60
    assert job.last_reply == "451 4.3.0 try later"
    [(dsn, body)] = bounces(spool, queue_id)
    assert dsn.sender == "" and dsn.recipients == ("app@example.test",)
    report = email.message_from_bytes(body, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert b"Final-Recipient: rfc822; gone@example.net" in body
    assert b"busy@example.net" not in body.split(b"message/delivery-status")[1]


def test_a_bounce_of_the_null_sender_makes_no_dsn(tmp_path: Path) -> None:
    spool, queue_id = run_attempt(tmp_path, ("gone@example.net",), sender="")
    assert bounces(spool, queue_id) == []
    with spool.read() as txn:
        assert spool.message_count(txn) == 0


def test_a_permanent_dns_failure_bounces_everyone(tmp_path: Path) -> None:
    error = ResolveError("5.1.10", "example.net does not accept mail", permanent=True)
    spool, queue_id = run_attempt(
        tmp_path, ("ok@example.net", "busy@example.net"), resolver=FakeResolver(error)
    )
    [(_, body)] = bounces(spool, queue_id)
    assert body.count(b"Status: 5.1.10") == 2


def test_a_job_deleted_during_delivery_is_not_brought_back(tmp_path: Path) -> None:
    def delete(spool: Spool, queue_id: str) -> None:
        with spool.write() as txn:
            for job in spool.jobs_of(txn, queue_id):
                spool.delete_job(txn, job)

    spool, queue_id = run_attempt(
        tmp_path, ("busy@example.net", "gone@example.net"), meanwhile=delete
    )
    with spool.read() as txn:
        assert spool.message_count(txn) == 0  # neither the job nor a DSN


def test_a_job_held_during_delivery_stays_held(tmp_path: Path) -> None:
    def hold(spool: Spool, queue_id: str) -> None:
        with spool.write() as txn:
            [job] = spool.jobs_of(txn, queue_id)
            spool.put_job(txn, job.with_state(JobState.HELD), old=job)

    spool, queue_id = run_attempt(tmp_path, ("ok@example.net", "busy@example.net"), meanwhile=hold)
    with spool.read() as txn:
        [job] = spool.jobs_of(txn, queue_id)
        assert list(spool.due(txn)) == []
    assert job.state is JobState.HELD and job.recipients == ("busy@example.net",)


def test_a_refusal_that_blocks_our_address_waits_instead_of_bouncing(tmp_path: Path) -> None:
    spool, queue_id = run_attempt(tmp_path, ("blocked@example.net",))
    assert bounces(spool, queue_id) == []
    with spool.read() as txn:
        [job] = spool.jobs_of(txn, queue_id)
    assert job.recipients == ("blocked@example.net",) and job.attempts == 1
    assert job.last_reply.startswith("451 4.7.0 554 5.7.1") and "dnsbl-listed" in job.last_reply


def test_the_delivery_slot_is_given_back_when_smtp_ends_before_the_commit(
    tmp_path: Path,
) -> None:
    """The domain's slot is for its servers: the next job may start while this
    one's result is being committed (fsync'd), not only after."""
    steps: list[str] = []

    class RecordingSlot(DeliverySlot):
        def give_back(self) -> None:
            steps.append("slot given back")

    original_run = GroupCommitter.run

    async def run(self: GroupCommitter, change: Any) -> Any:
        steps.append("commit")
        return await original_run(self, change)

    _CURRENT_SLOT.set(RecordingSlot())  # asyncio.run's task copies this context
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(GroupCommitter, "run", run)
            run_attempt(tmp_path, ("ok@example.net",))
    finally:
        _CURRENT_SLOT.set(None)
    assert steps == ["slot given back", "commit"]
