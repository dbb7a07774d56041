"""The suppression list: refused at RCPT, or dropped, and managed with `mta suppress`.

A real `mta serve` and real receiving peers: a recipient a peer says does not
exist is refused afterwards for mail from the same sender domain only; a
peer's ambiguous refusal suppresses nothing; operators' entries hold for every
sender, or for the sender domain they name.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.harness.client import RawSmtp, send
from tests.harness.counting_peer import CountingPeer
from tests.harness.mta import Mta
from tests.harness.poll import eventually
from tests.integration.test_client import PEER, Peer

pytestmark = pytest.mark.integration

DAY = 86400


def rcpt(mta: Mta, address: str, sender: str = "app@example.test") -> str:
    client = RawSmtp(mta.port)
    client.hello()
    client.command(f"MAIL FROM:<{sender}>")
    reply = client.command(f"RCPT TO:<{address}>")
    client.close()
    return reply


def listed(mta: Mta) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(mta.cli("suppress", "list", "--json").stdout)
    return rows


def suppress(mta: Mta, *args: str) -> str:
    done = mta.cli("suppress", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_suppressed_addresses_and_domains_are_refused_at_rcpt(running_mta: Mta) -> None:
    suppress(
        running_mta, "add", "Gone@Example.net", "@blocked.test", "--reason", "asked us to stop"
    )
    rows = listed(running_mta)
    assert {row["entry"] for row in rows} == {"gone@example.net", "@blocked.test"}
    assert all(row["source"] == "operator" for row in rows)
    assert all(row["sender_domain"] is None and row["expires"] is None for row in rows)

    refused = rcpt(running_mta, "gone@example.net")
    assert refused.startswith("550 5.1.1 <gone@example.net>: Recipient address rejected: ")
    assert "suppression list" in refused and "asked us to stop" in refused
    assert rcpt(running_mta, "anyone@blocked.test").startswith("550 5.1.1")
    assert rcpt(running_mta, "gone@example.net", sender="").startswith("550 5.1.1")  # <>
    assert rcpt(running_mta, "other@example.net").startswith("250")
    assert 'mta_messages_rejected_total{reason="suppressed"} 3.0' in running_mta.metrics()

    removed = running_mta.cli("suppress", "remove", "gone@example.net")
    assert removed.returncode == 0
    assert rcpt(running_mta, "gone@example.net").startswith("250")
    again = running_mta.cli("suppress", "remove", "gone@example.net")
    assert again.returncode == 1 and "not on the suppression list" in again.stderr
    bad = running_mta.cli("suppress", "add", "not an address")
    assert bad.returncode == 1 and "neither an address" in bad.stderr
    send(running_mta, recipients=["gone@example.net"])  # mailable again


def test_an_operator_entry_for_one_sender_domain(running_mta: Mta) -> None:
    suppress(running_mta, "add", "gone@example.net", "--sender-domain", "Shop.test", "--for", "30d")
    [row] = listed(running_mta)
    assert row["entry"] == "gone@example.net" and row["sender_domain"] == "shop.test"
    assert row["expires"] > row["added"]

    refused = rcpt(running_mta, "gone@example.net", sender="news@shop.test")
    assert refused.startswith("550 5.1.1") and "for mail from shop.test" in refused
    assert rcpt(running_mta, "gone@example.net", sender="app@example.test").startswith("250")
    assert rcpt(running_mta, "gone@example.net", sender="").startswith("250")  # <>: no domain

    shown = suppress(running_mta, "show", "gone@example.net")
    assert "from shop.test" in shown and "operator" in shown
    elsewhere = suppress(running_mta, "show", "gone@example.net", "--sender-domain", "other.test")
    assert "not suppressed for mail from other.test" in elsewhere

    scoped_domain = running_mta.cli("suppress", "add", "@example.net", "--sender-domain", "s.test")
    assert (
        scoped_domain.returncode == 1 and "--sender-domain is for addresses" in scoped_domain.stderr
    )
    wrong = running_mta.cli("suppress", "remove", "gone@example.net", "--sender-domain", "x.test")
    assert wrong.returncode == 1 and "for mail from x.test" in wrong.stderr
    suppress(running_mta, "remove", "gone@example.net", "--sender-domain", "shop.test")
    assert listed(running_mta) == []
    assert rcpt(running_mta, "gone@example.net", sender="news@shop.test").startswith("250")


def test_drop_mode_accepts_and_leaves_the_recipient_out(mta: Mta) -> None:
    mta.extra_config += '[suppression]\naction = "drop"\n'
    mta.write_config()
    mta.start()
    assert mta.cli("suppress", "add", "gone@example.net").returncode == 0
    queue_id = send(mta, recipients=["gone@example.net", "here@example.net"])
    [row] = mta.queue_list()
    assert row["id"] == queue_id and row["recipients"] == ["here@example.net"]
    assert f"id={queue_id} to=<gone@example.net> status=suppressed" in mta.log()
    send(mta, recipients=["gone@example.net"])  # all suppressed: 250, nothing kept
    assert len(mta.queue_list()) == 1
    assert mta.stop() == 0


def test_a_recipient_that_does_not_exist_is_refused_for_that_sender_domain(mta: Mta) -> None:
    with Peer() as peer:  # refuses local parts starting with "bad": 550 5.1.1
        mta.routes = {"partial.test": f"{PEER}:{peer.port}"}
        mta.start()
        send(mta, recipients=["bad@partial.test", "good@partial.test"])  # from app@example.test
        eventually(lambda: listed(mta), 10, mta.log, 0.1)
        [entry] = listed(mta)
        assert entry["entry"] == "bad@partial.test" and entry["sender_domain"] == "example.test"
        assert entry["source"] == "bounce" and "550 5.1.1" in entry["reason"]
        assert entry["expires"][:10] > entry["added"][:10]  # [suppression] bounce_expiry later
        assert [m.recipients for m in peer.handler.messages] == [["good@partial.test"]]

        refused = rcpt(mta, "bad@partial.test", sender="other@Example.test")
        assert refused.startswith("550 5.1.1") and "for mail from example.test" in refused
        assert rcpt(mta, "bad@partial.test", sender="news@other.test").startswith("250")
        assert rcpt(mta, "bad@partial.test", sender="").startswith("250")

        assert "from example.test" in suppress(mta, "show", "bad@partial.test")
        assert suppress(mta, "remove", "bad@partial.test").strip() == "removed 1"
        assert rcpt(mta, "bad@partial.test").startswith("250")
    assert mta.stop() == 0


def test_an_ambiguous_refusal_suppresses_nothing(mta: Mta) -> None:
    unavailable = "550 5.2.1 <full@full.test>: mailbox unavailable"
    with CountingPeer(PEER, refuse=unavailable, refuse_count=1) as peer:
        mta.routes = {"full.test": f"{PEER}:{peer.port}"}
        mta.start()
        queue_id = send(mta, recipients=["full@full.test"])
        eventually(lambda: f"id={queue_id} to=<full@full.test>" in mta.log(), 10, mta.log)
        assert "status=bounced" in mta.log() and peer.snapshot().refused == 1
        assert listed(mta) == []
        assert rcpt(mta, "full@full.test").startswith("250")
    assert mta.stop() == 0
