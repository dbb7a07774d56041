"""Clients that go right after the final dot: every message stored is told.

A client that resets the connection right after ``.`` cancels the session's
handler while the message may already be on its way to disk. Whatever got
stored must be counted (``mta_messages_received_total``), logged with its
``status=queued`` line, and offered for delivery, like any other: an operator
tracing a queue ID finds where it came from. Many such clients at once, on
the real daemon with two workers.
"""

from __future__ import annotations

import re
import socket
import struct
import threading

import pytest

from tests.harness.client import MESSAGE, RawSmtp
from tests.harness.mta import Mta
from tests.harness.poll import eventually
from tests.reliability.conftest import Scenario, scaled

pytestmark = pytest.mark.integration


def send_and_reset(port: int, number: int) -> None:
    """One message, then a reset (RST, not FIN) right after the final dot."""
    client = RawSmtp(port)
    client.hello()
    client.send(
        b"MAIL FROM:<app@example.test>\r\n"
        + f"RCPT TO:<left{number}@example.net>\r\n".encode()
        + b"DATA\r\n"
    )
    for _ in range(3):
        client.reply()
    client.send(MESSAGE + b".\r\n")
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def test_every_message_stored_by_a_client_that_left_is_counted_and_logged(
    mta: Mta, scenario: Scenario
) -> None:
    mta.server["workers"] = 2
    mta.start()
    clients = scaled(150, 1500)
    threads = [
        threading.Thread(target=send_and_reset, args=(mta.port, number))
        for number in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    mta.wait_for_no_sessions()
    stored = {row["id"] for row in mta.queue_list()}  # parked mail stays in the spool
    logged = set(re.findall(r"id=(\S+) from=\S+ .*status=queued", mta.log()))
    eventually(
        lambda: int(mta.metric("mta_messages_received_total")) == len(stored),
        10,
        lambda: f"counted {int(mta.metric('mta_messages_received_total'))}, stored {len(stored)}",
    )
    assert stored, "no message was stored at all: the test shows nothing"
    assert stored == logged, (sorted(stored - logged), sorted(logged - stored))
    scenario.checked = "a reset right after the final dot: each stored message counted and logged"
    scenario.sent, scenario.accepted = clients, len(stored)
    assert mta.stop() == 0
