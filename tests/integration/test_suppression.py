"""The suppression list: refused at RCPT, or dropped, and managed with `mta suppress`."""

from __future__ import annotations

import json

import pytest

from tests.harness.client import RawSmtp, send
from tests.harness.mta import Mta
from tests.harness.poll import eventually
from tests.integration.test_client import PEER, Peer

pytestmark = pytest.mark.integration


def rcpt(mta: Mta, address: str) -> str:
    client = RawSmtp(mta.port)
    client.hello()
    client.command("MAIL FROM:<app@example.test>")
    reply = client.command(f"RCPT TO:<{address}>")
    client.close()
    return reply


def test_suppressed_addresses_and_domains_are_refused_at_rcpt(running_mta: Mta) -> None:
    added = running_mta.cli(
        "suppress", "add", "Gone@Example.net", "@blocked.test", "--reason", "asked us to stop"
    )
    assert added.returncode == 0, added.stderr
    listed = json.loads(running_mta.cli("suppress", "list", "--json").stdout)
    assert {row["entry"] for row in listed} == {"gone@example.net", "@blocked.test"}
    assert all(row["source"] == "operator" for row in listed)

    refused = rcpt(running_mta, "gone@example.net")
    assert refused.startswith("550 5.1.1 <gone@example.net>: Recipient address rejected: ")
    assert "suppression list" in refused and "asked us to stop" in refused
    assert rcpt(running_mta, "anyone@blocked.test").startswith("550 5.1.1")
    assert rcpt(running_mta, "other@example.net").startswith("250")
    assert 'mta_messages_rejected_total{reason="suppressed"} 2.0' in running_mta.metrics()

    removed = running_mta.cli("suppress", "remove", "gone@example.net")
    assert removed.returncode == 0
    assert rcpt(running_mta, "gone@example.net").startswith("250")
    again = running_mta.cli("suppress", "remove", "gone@example.net")
    assert again.returncode == 1 and "not on the suppression list" in again.stderr
    bad = running_mta.cli("suppress", "add", "not an address")
    assert bad.returncode == 1 and "neither an address" in bad.stderr
    send(running_mta, recipients=["gone@example.net"])  # mailable again


def test_drop_mode_accepts_and_leaves_the_recipient_out(mta: Mta) -> None:
    mta.write_config()
    original = mta.write_config

    def write_config() -> None:
        original()
        with mta.config_path.open("a") as config:
            config.write('[suppression]\naction = "drop"\n')

    mta.write_config = write_config  # type: ignore[method-assign]
    mta.start()
    assert mta.cli("suppress", "add", "gone@example.net").returncode == 0
    queue_id = send(mta, recipients=["gone@example.net", "here@example.net"])
    [row] = mta.queue_list()
    assert row["id"] == queue_id and row["recipients"] == ["here@example.net"]
    assert f"id={queue_id} to=<gone@example.net> status=suppressed" in mta.log()
    send(mta, recipients=["gone@example.net"])  # all suppressed: 250, nothing kept
    assert len(mta.queue_list()) == 1
    assert mta.stop() == 0


def test_a_recipient_that_does_not_exist_joins_the_list(mta: Mta) -> None:
    with Peer() as peer:  # refuses local parts starting with "bad": 550 5.1.1
        mta.routes = {"partial.test": f"{PEER}:{peer.port}"}
        mta.start()
        send(mta, recipients=["bad@partial.test", "good@partial.test"])
        eventually(
            lambda: "bad@partial.test" in mta.cli("suppress", "list", "--json").stdout,
            10,
            mta.log,
            0.1,
        )
        [entry] = json.loads(mta.cli("suppress", "list", "--json").stdout)
        assert entry["source"] == "bounce" and "550 5.1.1" in entry["reason"]
        assert rcpt(mta, "bad@partial.test").startswith("550 5.1.1")
        assert [m.recipients for m in peer.handler.messages] == [["good@partial.test"]]
    assert mta.stop() == 0
