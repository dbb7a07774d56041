"""Transactional mail overtakes a bulk backlog on a throttled site.

A real `mta serve` delivers a few hundred bulk messages to a receiving site
held to a low rate (a `[[policy.provider]]` whose MX is the counting peer,
tests/harness/counting_peer.py, reached by static routes); while most of the
backlog still waits, transactional messages (`X-MTA-Priority: transactional`)
arrive for the same domain and for another domain of the same site. The
receiver's order of arrival is the measure, not time: each transactional
message must arrive within a few bulk deliveries of its submission, while
most of the backlog is still queued (in arrival order it would come last).
"""

from __future__ import annotations

import smtplib

import pytest

from tests.harness.client import message, send
from tests.harness.counting_peer import CountingPeer
from tests.harness.mta import Mta
from tests.harness.poll import eventually

pytestmark = pytest.mark.integration

PEER = "127.0.0.23"
BULK = 200  # at 20/s, ten seconds of backlog
URGENT = ["u1@bulk.test", "u2@codes.test", "u3@bulk.test", "u4@codes.test"]
# Bulk deliveries that may come between a transactional message's submission and
# its delivery: those leased already (the site's connections) and a margin for
# a slow machine; in arrival order it would be the whole backlog left.
OVERTAKEN_AT_MOST = 40


def throttled_site(mta: Mta, peer: CountingPeer) -> None:
    mta.park_mail = False
    mta.routes = {domain: f"{PEER}:{peer.port}" for domain in ("bulk.test", "codes.test")}
    mta.delivery |= {"retry_first": 1, "retry_max": 1}
    mta.extra_config += (
        f'[[policy.provider]]\nname = "peer"\nmx_suffixes = ["{PEER}"]\nmax_rate = "20/s"\n'
    )


def send_bulk(mta: Mta, count: int) -> None:
    """``count`` bulk messages to bulk.test over one connection (no priority: bulk)."""
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as client:
        for number in range(count):
            client.sendmail("app@example.test", ["bulk@bulk.test"], message(f"bulk {number}"))


def urgent(subject: str) -> bytes:
    return b"X-MTA-Priority: transactional\r\n" + message(subject)


def bulk_seen(peer: CountingPeer) -> int:
    return sum(subject.startswith("bulk ") for subject in peer.snapshot().subjects)


def test_transactional_mail_overtakes_a_bulk_backlog_on_a_throttled_site(mta: Mta) -> None:
    with CountingPeer(PEER) as peer:
        throttled_site(mta, peer)
        mta.start()
        send_bulk(mta, BULK)
        eventually(lambda: bulk_seen(peer) >= 10, 20, "the backlog to be under way")
        submitted_after = {}  # subject -> bulk messages the peer had seen before it was sent
        for number, recipient in enumerate(URGENT):
            subject = f"code {number}"
            submitted_after[subject] = bulk_seen(peer)
            send(mta, urgent(subject), [recipient])
        eventually(
            lambda: set(submitted_after) <= set(peer.snapshot().subjects),
            20,
            lambda: f"transactional mail to arrive; the peer saw {peer.snapshot().subjects}",
        )
        subjects = peer.snapshot().subjects
        for subject, before in submitted_after.items():
            overtaken = sum(s.startswith("bulk ") for s in subjects[: subjects.index(subject)])
            assert overtaken - before <= OVERTAKEN_AT_MOST, (subject, before, subjects)
            assert BULK - overtaken > BULK // 4  # much of the backlog still queued
    assert mta.stop() == 0


def test_holding_a_campaign_stops_its_jobs_waiting_for_the_path_too(mta: Mta) -> None:
    """Jobs already read and waiting in the ready queue for the throttled path are
    held as well: after the hold, only deliveries already under way (at most the
    site's 2 connections) reach the receiver."""
    with CountingPeer(PEER) as peer:
        throttled_site(mta, peer)
        mta.extra_config += "max_connections = 2\n"
        mta.start()
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as client:
            for number in range(100):
                data = b"X-MTA-Campaign: spring\r\n" + message(f"bulk {number}")
                client.sendmail("app@example.test", ["bulk@bulk.test"], data)
        eventually(lambda: bulk_seen(peer) >= 5, 20, "the campaign to be under way")
        held = mta.cli("queue", "hold", "--campaign", "spring")
        assert held.returncode == 0, held.stderr
        seen_at_hold = bulk_seen(peer)
        # A later bulk message waits behind every job of the line: once it is
        # delivered, each job that was waiting has had its turn.
        send(mta, message("after the hold"), ["late@bulk.test"])
        eventually(lambda: "after the hold" in peer.snapshot().subjects, 20, "the late message")
        assert bulk_seen(peer) - seen_at_hold <= 2, peer.snapshot().subjects
        held_jobs = [row for row in mta.queue_list() if row["state"] == "held"]
        assert len(held_jobs) == 100 - bulk_seen(peer)
    assert mta.stop() == 0
