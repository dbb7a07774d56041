"""Egress leases and the spool's suspensions, with a clock the test controls: no sleeps.

Every lease looks at the suspensions in the spool, which the workers of a
node share; these tests pin that a suspension (a reply's or an operator's)
and a resume are in force from the very next lease, in every worker, and
that `mta policy resume` makes the jobs the suspension deferred due at once.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

from mta import config
from mta.cli import policy
from mta.mail.reply import Reply
from mta.outbound import warmup_counts
from mta.outbound.egress import Egress, Lease, Stream, Wait
from mta.policy.limits import Site, site_for
from mta.policy.throttle import domain_key
from mta.spool.records import Message, jobs_for
from mta.spool.store import Spool

TSS04 = Reply(421, "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred")


def test_a_suspension_and_a_resume_are_seen_by_the_next_lease(tmp_path: Path) -> None:
    settings = config.parse({})
    spool = Spool(tmp_path / "spool", max_size=2**20)
    now = [time.time()]  # policyctl stamps suspensions with the real time
    egress = Egress(settings, spool, clock=lambda: now[0])
    site = site_for("ops.test", ["mx.ops.test"], {})

    async def lease() -> Lease | Wait:
        return await egress.lease("", site, "ops.test")  # "": the default pool

    async def main() -> None:
        first = await lease()  # reads the suspensions (none)
        assert isinstance(first, Lease)
        egress.release(first)
        # The clock stands still: no periodic re-read can be what sees these.
        policy.suspend(spool, settings, "ops.test", None, 3600, io.StringIO())
        waiting = await lease()
        assert isinstance(waiting, Wait) and "operator" in waiting.reason
        policy.resume(spool, settings, "ops.test", None, io.StringIO())
        resumed = await lease()
        assert isinstance(resumed, Lease)
        egress.release(resumed)

    try:
        asyncio.run(main())
    finally:
        spool.close()


def _leaser(egress: Egress, site: Site) -> Callable[[], Coroutine[Any, Any, Lease | Wait]]:
    return lambda: egress.lease("", site, site.name)  # "": the default pool


def test_a_replys_suspension_holds_for_the_next_lease_in_every_worker(tmp_path: Path) -> None:
    """No clock moves and no release comes first: before the fix, the worker's
    own waiting jobs re-read the spool before the delivery's commit stored the
    suspension, and the other worker looked only a second later."""
    settings = config.parse({})
    spool = Spool(tmp_path / "spool", max_size=2**20)
    site = site_for("yahoo.test", ["mx.yahoo.test"], {})
    worker = Egress(settings, spool)
    # Another worker: its own memory, the node's spool and shared limits
    # (one process may open an LMDB environment only once).
    other_worker = Egress(settings, spool, shared=worker.shared)
    lease, other_lease = _leaser(worker, site), _leaser(other_worker, site)

    async def main() -> None:
        assert isinstance(await other_lease(), Lease)  # it has looked: nothing suspended
        first = await lease()
        assert isinstance(first, Lease)
        [rule] = worker.react(first, {"u@yahoo.test": TSS04})
        assert rule.name == "yahoo-tss04"
        elsewhere = await other_lease()
        assert isinstance(elsewhere, Wait) and "yahoo-tss04" in elsewhere.reason
        worker.release(first)  # wakes this worker's waiting jobs
        here = await lease()
        assert isinstance(here, Wait) and here.until == elsewhere.until

    try:
        asyncio.run(main())
    finally:
        spool.close()


def test_resume_makes_the_jobs_the_suspension_deferred_due_now(tmp_path: Path) -> None:
    settings = config.parse({"policy": {"shipped_shaping": False}})  # no rate to wait for
    spool = Spool(tmp_path / "spool", max_size=2**20)
    site = site_for("yahoo.test", ["mx.yahoo.test"], {})
    now = [time.time()]  # `mta policy resume` compares with the real time
    egress = Egress(settings, spool, clock=lambda: now[0])
    lease = _leaser(egress, site)

    async def suspend() -> tuple[Wait, Wait]:
        """Two deliveries under way get TSS04 a second apart: each reply
        (re)suspends the path, and jobs deferred in between wait for the first end."""
        first, second = await lease(), await lease()
        assert isinstance(first, Lease) and isinstance(second, Lease)
        egress.react(first, {"u@yahoo.test": TSS04})
        egress.release(first)
        before = await lease()
        now[0] += 1
        egress.react(second, {"v@yahoo.test": TSS04})
        egress.release(second)
        after = await lease()
        assert isinstance(before, Wait) and isinstance(after, Wait)
        return before, after

    try:
        before, after = asyncio.run(suspend())
        assert after.until == before.until + 1
        body = b"Subject: x\r\n\r\nx\r\n"
        waits = {"a": before.until, "b": after.until, "c": after.until + 60}
        with spool.write() as txn:
            for queue_id, until in waits.items():
                message = Message(queue_id, "", (f"{queue_id}@yahoo.test",), 0, len(body))
                spool.add(txn, message, body)
                [job] = jobs_for(message)
                spool.put_job(txn, replace(job, next_attempt=until), old=job)
        out = io.StringIO()
        policy.resume(spool, settings, "yahoo.test", None, out)
        assert out.getvalue() == "resumed default to yahoo.test; 2 waiting jobs due now\n"
        with spool.read() as txn:
            due = {key.split(b"\0")[0].decode(): when for when, key in spool.due(txn)}
        assert due["a"] <= time.time() and due["b"] <= time.time()
        assert due["c"] == int(waits["c"] * 1000) / 1000  # a retry of its own: untouched
        assert isinstance(asyncio.run(lease()), Lease)
    finally:
        spool.close()


# --- rules that do not burn pools, and days that do not count ---

TWO_SOURCES = {
    "egress": {
        "source": [
            {"name": "ip1", "address": "127.0.0.2"},
            {"name": "ip2", "address": "127.0.0.3"},
        ],
    },
    "policy": {"shipped_shaping": False},  # no rate: nothing but the rules makes a job wait
}
GMAIL = Site("gmail", "gmail")
BLOCKLISTED = Reply(553, "5.7.1 [BL21] Connections will not be accepted from 127.0.0.2")
DKIM_DOMAIN = Reply(
    421,
    "4.7.28 Gmail has detected an unusual rate of mail originating from your DKIM domain "
    "[news.example 30]. To protect our users from spam, mail sent from your DKIM domain has "
    "been temporarily rate limited.",
)


def _streams(domain: str) -> list[Stream]:
    return [Stream(domain, f"message-{number}") for number in range(40)]


def _lease_each(egress: Egress, streams: list[Stream]) -> list[Lease | Wait]:
    async def each() -> list[Lease | Wait]:
        leased = []
        for stream in streams:
            lease = await egress.lease("", GMAIL, "gmail.com", 1, stream)
            if isinstance(lease, Lease):
                egress.release(lease)
            leased.append(lease)
        return leased

    return asyncio.run(each())


def test_a_suspended_source_keeps_its_mail_instead_of_moving_it_to_siblings(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool", max_size=2**20)
    egress = Egress(config.parse(TWO_SOURCES), spool)
    try:
        [first] = [
            lease
            for lease in _lease_each(egress, _streams("shop.example")[:1])
            if isinstance(lease, Lease)
        ]
        suspended = replace(first, source=egress.pools[""][0][0])  # ip1 got the block
        [rule] = egress.react(suspended, {"u@gmail.com": BLOCKLISTED})
        assert not rule.failover
        leases = _lease_each(egress, _streams("shop.example"))
        waiting = [lease for lease in leases if isinstance(lease, Wait)]
        sent = [lease for lease in leases if isinstance(lease, Lease)]
        # Each message has one home among the two; ip1's wait, ip2's go, none moves.
        assert waiting and sent
        assert {lease.source.name for lease in sent} == {"ip2"}
        again = _lease_each(egress, _streams("shop.example"))
        assert [isinstance(lease, Wait) for lease in again] == [
            isinstance(lease, Wait) for lease in leases
        ]
    finally:
        spool.close()


def test_a_dkim_domain_reply_slows_that_domain_on_every_path_and_no_other(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool", max_size=2**20)
    egress = Egress(config.parse(TWO_SOURCES), spool)
    try:
        [lease] = _lease_each(egress, _streams("news.example")[:1])
        assert isinstance(lease, Lease)
        [rule] = egress.react(lease, {"u@gmail.com": DKIM_DOMAIN})
        assert rule.scope == "domain"
        now = time.time()
        restricted = egress.throttles.active(now)
        assert list(restricted) == [(domain_key("news.example"), "gmail")]
        # The sources' own paths are untouched: other senders' mail is not slowed.
        assert egress.throttles.factor(("ip1", "gmail"), now) == 1.0
        assert egress.throttles.factor(("ip2", "gmail"), now) == 1.0
    finally:
        spool.close()


def test_a_day_held_back_for_reputation_does_not_count_towards_the_warmup_plan(
    tmp_path: Path,
) -> None:
    day = datetime.datetime(2026, 12, 7, 12, tzinfo=datetime.UTC).timestamp()
    now = [day]
    settings = config.parse(
        {
            "egress": {
                "source": [
                    {
                        "name": "ip1",
                        "address": "127.0.0.2",
                        "warmup": {"start": "2026-12-06", "schedule": [240, 480, 960]},
                    }
                ]
            }
        }
    )
    spool = Spool(tmp_path / "spool", max_size=2**20)
    egress = Egress(settings, spool, clock=lambda: now[0])
    warmup = settings.egress.source[0].warmup
    assert warmup is not None

    def plan_on(moment: float) -> warmup_counts.PlanToday:
        with spool.read() as txn:
            return warmup_counts.plan_today(spool, txn, warmup, "ip1", "gmail", moment)

    try:
        [lease] = _lease_each(egress, _streams("shop.example")[:1])
        assert isinstance(lease, Lease) and lease.reservation is not None
        assert lease.reservation.recipients == 1
        assert plan_on(day).cap == 480  # day 2
        egress.react(lease, {"u@gmail.com": BLOCKLISTED})
        tomorrow = day + 86400
        # Day 2 was held back: tomorrow is day 2 again, not day 3.
        assert (plan_on(tomorrow).day, plan_on(tomorrow).cap) == (2, 480)
        assert plan_on(day).cap == 480  # today's cap stands
    finally:
        spool.close()
