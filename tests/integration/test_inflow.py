"""Inflow control on the real daemon: new mail piling up untried slows MAIL FROM
(and an API request before it is built).

The receiver takes connections and never answers, so delivery holds the
domain's one connection slot and every other job stays untried: the backlog
grows past ``inflow_backlog`` and each later transaction waits before its
MAIL FROM is answered, and is still accepted (slowed, never refused).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.api_mta import ApiMta
from tests.harness.client import message, send
from tests.harness.mta import Mta

pytestmark = pytest.mark.integration


def test_an_untried_backlog_slows_mail_from_and_loses_nothing(mta: Mta) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # never accepted: the handshake completes, no banner comes
        mta.park_mail = False
        mta.routes = {"slow.test": f"127.0.0.1:{silent.getsockname()[1]}"}
        # shutdown_timeout: stop() gives up the delivery stuck on the silent receiver
        # after a second instead of ten.
        mta.server |= {"inflow_backlog": 3, "inflow_max_delay": 0.2, "shutdown_timeout": 1}
        mta.delivery |= {"max_concurrent_per_domain": 1}
        mta.start()
        for number in range(8):
            send(mta, message(f"inflow {number}"), [f"u{number}@slow.test"])
        queued = mta.queue_list()
        # One job is being tried; the rest are untried. Every message was taken.
        assert len(queued) == 8
        assert mta.metric("mta_spool_untried_jobs") >= 6
        # Transactions 5 to 8 found more than 3 untried jobs before them.
        assert mta.metric("mta_inflow_delayed_total") >= 3
        assert mta.stop() == 0


@pytest.fixture
def api_mta(tmp_path: Path) -> Iterator[ApiMta]:
    instance = ApiMta(tmp_path, tenants=[{"name": "shop", "sender_domains": ["example.test"]}])
    yield instance
    instance.kill()  # the test failed before it stopped it


def test_an_api_request_waits_for_an_untried_backlog_too(api_mta: ApiMta) -> None:
    mta = api_mta
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        mta.park_mail = False
        mta.routes = {"slow.test": f"127.0.0.1:{silent.getsockname()[1]}"}
        mta.server |= {"inflow_backlog": 3, "inflow_max_delay": 0.2, "shutdown_timeout": 1}
        mta.delivery |= {"max_concurrent_per_domain": 1}
        mta.start()
        for number in range(5):
            send(mta, message(f"inflow {number}"), [f"u{number}@slow.test"])
        delayed = mta.metric("mta_inflow_delayed_total")
        request = {
            "envelope_sender": "app@example.test",
            "recipients": [{"email": "api@slow.test"}],
            "content": {"from": {"email": "app@example.test"}, "text_body": "hi"},
        }
        answer = mta.post(request, token=mta.add_token("shop"))
        assert answer.status == 200 and answer.body["success_count"] == 1, answer
        assert mta.metric("mta_inflow_delayed_total") == delayed + 1  # slowed, not refused
        assert mta.stop() == 0
