"""A response rule's suspension holds at once, on every worker, and `mta policy
resume` lets the mail it held go at once.

Yahoo answers ``421 4.7.0 [TSS04]`` when it wants a sending address to stop
for a while. Here a receiver takes 20 messages, defers the 21st that way,
then accepts everything again, so whatever it accepts after the deferral is
mail that went out on a suspended path. 40 messages go to ten domains
whose MX hosts belong to one provider ("bigmail"), so with two workers both
deliver to the site. Then the operator resumes it, and the waiting mail
must go without a flush.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.harness.client import message, send
from tests.harness.counting_peer import CountingPeer
from tests.harness.dns_server import DnsServer
from tests.harness.mta import Mta
from tests.harness.poll import eventually
from tests.integration.test_policy import add_policy, wait_for_messages

pytestmark = pytest.mark.integration

PEER = "127.0.0.21"
TSS04 = "421 4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred due to user complaints"
ACCEPTED_FIRST = 20
MESSAGES = 40  # 20 before the deferral, 20 held until the resume
MAX_CONNECTIONS = 2
DOMAINS = [f"customer{n}.test" for n in range(10)]
POLICY = f"""
[[policy.provider]]
name = "bigmail"
mx_suffixes = [".bigmail.test"]
max_connections = {MAX_CONNECTIONS}
max_rate = "20/s"
[[policy.rule]]
name = "test-tss04"
pattern = "\\\\[TSS04\\\\]"
classification = "rate_limited"
action = "suspend"
duration = 1800
"""


class DefersOnce(CountingPeer):
    """Accepts ``after`` messages, answers TSS04 to the next RCPT, then accepts again."""

    def __init__(self, host: str, after: int) -> None:
        # Deliveries take a while, so others are in flight when the 421 goes out.
        super().__init__(host, data_delay=0.2, refuse=TSS04)
        self.after = after
        self.accepted_before: int | None = None  # messages accepted when it deferred

    def _answer(self, command: str) -> str:
        if command[:4].upper() == "RCPT":
            with self._lock:
                if self.accepted_before is None and len(self.seen.clients) >= self.after:
                    self.accepted_before = len(self.seen.clients)
                    self.seen.refused += 1
                    return self.refuse
        return super()._answer(command)


def bigmail_dns() -> DnsServer:
    """NSD with the customer domains' MX at bigmail's one host, the receiver."""
    return DnsServer(
        mx={domain: [(10, "mx.bigmail.test")] for domain in DOMAINS},
        a={"mx.bigmail.test": PEER},
    )


def test_a_tss04_suspension_stops_the_site_at_once_and_resume_lets_it_go(mta: Mta) -> None:
    # Two workers: the one that got the reply and the other must both stop at once
    # (one worker alone is the first half of that; the suite's time is better spent).
    workers = 2
    dns = bigmail_dns().start()
    try:
        with DefersOnce(PEER, after=ACCEPTED_FIRST) as peer:
            mta.park_mail = False
            mta.server["workers"] = workers
            mta.delivery |= {
                "nameservers": [f"127.0.0.1:{dns.port}"],
                "smtp_port": peer.port,
                "allow_private_mx": True,
                "retry_first": 1,  # the deferred message soon waits for the suspension too
                "connection_idle_timeout": 1,  # idle connections hold slots the other worker needs
            }
            add_policy(mta, POLICY)
            mta.start()
            for number in range(MESSAGES):
                send(mta, message(f"bigmail {number}"), [f"u{number}@{DOMAINS[number % 10]}"])

            def held() -> list[dict[str, Any]] | None:
                """The waiting jobs, once every message is delivered or waits for the
                suspension (none under way)."""
                queued = mta.queue_list()
                received = len(peer.snapshot().clients)
                waiting = all("suspended (test-tss04)" in str(job["last_reply"]) for job in queued)
                return queued if waiting and len(queued) + received == MESSAGES else None

            def state() -> str:
                replies = {str(job["last_reply"]) for job in mta.queue_list()}
                return f"peer got {len(peer.snapshot().clients)}; queued jobs' replies {replies}"

            queued = eventually(held, 30, state, 0.1)
            assert "suspend default to bigmail for 1800s after test-tss04" in mta.log()
            assert peer.accepted_before is not None
            after = len(peer.snapshot().clients) - peer.accepted_before
            # Only the deliveries in flight when the 421 came may finish: at most
            # one per connection the site allows each worker, less the refused one.
            assert after <= MAX_CONNECTIONS * workers - 1, after
            # Waiting for a suspension is no attempt; the refused message made one.
            assert sorted(job["attempts"] for job in queued) == [0] * (len(queued) - 1) + [1]

            resumed = mta.cli("policy", "resume", "--site", "bigmail")
            assert resumed.returncode == 0, resumed.stderr
            assert f"; {len(queued)} waiting jobs due now" in resumed.stdout
            wait_for_messages(peer, MESSAGES, timeout=30)  # no flush
            mta.wait_for_empty_spool()
            assert len(peer.snapshot().clients) == MESSAGES  # each message once
    finally:
        dns.stop()
    assert mta.stop() == 0, mta.log()
