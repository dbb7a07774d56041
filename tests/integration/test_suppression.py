"""The suppression list: refused at RCPT, or dropped, and managed with `mta suppress`."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import Mta, RawSmtp
from tests.integration.test_accept import send

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
