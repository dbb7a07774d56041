"""Hostile clients that abuse the protocol itself: password guessing that
stalls a worker, error floods, a second STARTTLS, NUL in the data (issue 20).

As in test_hostile_clients.py, each scenario runs the real `mta serve` on
loopback, here with two worker processes (connections are spread over them
by the kernel), and asserts replies and counts, never times. Clients outside
relay_networks connect from 127.0.0.2 and up.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import secrets
import signal
import ssl
import threading

import pytest

from tests.harness.client import MESSAGE, RawSmtp
from tests.harness.mta import Mta
from tests.harness.poll import eventually
from tests.reliability.conftest import Scenario

pytestmark = pytest.mark.integration

OUTSIDER = "127.0.0.2"
WORKERS = 2
TOO_MANY_ERRORS = "421 4.7.0 mta.test Error: too many errors"


def starttls(client: RawSmtp) -> str:
    """STARTTLS, then EHLO again over TLS; the EHLO reply."""
    assert client.command("STARTTLS").startswith("220 2.0.0")
    context = ssl._create_unverified_context()
    client.sock = context.wrap_socket(client.sock, server_hostname="mta.test")
    answer = client.command("EHLO client.test")
    assert answer.startswith("250-"), answer
    return answer


def send_message(client: RawSmtp) -> str:
    for line in ("MAIL FROM:<app@example.test>", "RCPT TO:<user@example.net>", "DATA"):
        assert client.command(line)[:1] in "23", line
    client.send(MESSAGE + b".\r\n")
    return client.reply()


def replies_until_closed(client: RawSmtp) -> list[str]:
    """Every reply up to the end of the connection (a reset counts as its end:
    the server closed with the client's pipelined commands unread)."""
    replies = []
    while True:
        try:
            reply = client.reply()
        except ConnectionResetError:
            return replies
        if not reply:
            return replies
        replies.append(reply)


def rejected(mta: Mta, reason: str) -> float:
    """mta_messages_rejected_total for ``reason``, summed over the workers."""
    match = re.search(
        rf'^mta_messages_rejected_total{{reason="{reason}"}} (\S+)$', mta.metrics(), re.MULTILINE
    )
    return float(match.group(1)) if match else 0.0


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


# --- password guessing does not stall the other sessions (item 1) ----------


def costly_hash(password: str, p: int) -> str:
    """A users-file hash at `mta user add`'s n and r, with p rounds: p times the
    work of a normal check, so that checks are still under way while the
    legitimate sessions run (the count asserted, not a time)."""
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=p, dklen=32)
    encoded = [base64.b64encode(part).decode() for part in (salt, key)]
    return f"$scrypt$n=16384,r=8,p={p}${encoded[0]}${encoded[1]}"


class Guesser(threading.Thread):
    """One connection from its own address: two wrong passwords, then QUIT."""

    def __init__(self, mta: Mta, source: str, ready: threading.Barrier, answers: list[str]):
        super().__init__(daemon=True)
        self.client = RawSmtp(mta.port, source=source, timeout=120)
        self.ready = ready
        self.answers = answers
        self.sent = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        try:
            self.client.hello()
            starttls(self.client)
            self.ready.wait(timeout=60)
            for attempt in range(2):
                self.client.send(f"AUTH PLAIN {plain('app1', f'guess-{attempt}')}\r\n".encode())
                self.sent.set()
                answer = self.client.reply()
                with self.lock:
                    self.answers.append(answer)
            self.client.command("QUIT")
        finally:
            self.sent.set()
            self.client.close()


def test_password_guessing_does_not_stall_other_sessions(mta: Mta, scenario: Scenario) -> None:
    # About 0.3 s of scrypt per wrong password (p=8). Before the fix each
    # check ran on its worker's event loop, so a session could only be served
    # between checks: every session on a worker waited for all the guesses
    # that had reached it.
    mta.users_file.write_text(f"app1:{costly_hash('correct-horse-battery-9', p=8)}\n")
    mta.start_workers(WORKERS)
    guessers_count, legitimate = 8, 10
    answers: list[str] = []
    ready = threading.Barrier(guessers_count)
    guessers = [
        Guesser(mta, f"127.0.0.{10 + number}", ready, answers) for number in range(guessers_count)
    ]
    for guesser in guessers:
        guesser.start()
    for guesser in guessers:
        assert guesser.sent.wait(60)
    # Now every guesser has a wrong password on its way to a worker: legitimate
    # sessions (from relay_networks, no AUTH) meanwhile.
    served = []
    for _ in range(legitimate):
        client = RawSmtp(mta.port)
        session = [client.reply(), client.command("EHLO client.test")]
        session += [client.command("NOOP") for _ in range(5)]
        session.append(client.command("QUIT"))
        client.close()
        served.append(session)
    answered_meanwhile = len(answers)
    for guesser in guessers:
        guesser.join(timeout=120)
        assert not guesser.is_alive()
    for session in served:
        assert session[0].startswith("220 mta.test ESMTP"), session
        assert session[1].startswith("250-mta.test") and "AUTH" not in session[1], session
        assert session[2:7] == ["250 2.0.0 OK"] * 5, session
        assert session[7] == "221 2.0.0 Bye", session
    assert answers == ["535 5.7.8 Authentication credentials invalid"] * (2 * guessers_count)
    # The legitimate sessions were all served while wrong passwords were
    # still being checked: with checks on the event loop, each was served
    # only after every guess that had reached its worker.
    assert answered_meanwhile < len(answers), answered_meanwhile
    mta.wait_for_no_sessions()
    assert rejected(mta, "auth_failed") == 2 * guessers_count
    mta.stop()
    scenario.checked = (
        f"{guessers_count} addresses guessing passwords (2 each, checks 8x the normal cost) "
        f"over {WORKERS} workers: {legitimate} sessions of EHLO, 5 NOOP, QUIT all answered "
        f"in full while guesses were still being checked ({answered_meanwhile} of "
        f"{len(answers)} answered by then); every guess 535"
    )


# --- the hard error limit (item 5) -------------------------------------------


def test_an_error_flood_is_cut_off_at_the_hard_error_limit(mta: Mta, scenario: Scenario) -> None:
    mta.start_workers(WORKERS)
    flood = 10_000
    client = RawSmtp(mta.port, source=OUTSIDER, timeout=30)
    client.hello("outsider.test")
    before = len(mta.log().splitlines())
    # MAIL, 10,000 refused RCPTs, then a whole transaction, in as few writes as
    # the socket takes: the flood (10,000 replies and 6.6 MB of log).
    payload = (
        b"MAIL FROM:<probe@outsider.test>\r\n"
        + b"".join(f"RCPT TO:<victim{number}@example.net>\r\n".encode() for number in range(flood))
        + b"RSET\r\nMAIL FROM:<app@example.test>\r\nRCPT TO:<user@example.net>\r\nDATA\r\n"
        + MESSAGE
        + b".\r\n"
    )

    def send() -> None:
        with contextlib.suppress(OSError):  # the server closed with the rest unread
            client.sock.sendall(payload)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    replies = replies_until_closed(client)
    sender.join(timeout=30)
    client.close()
    assert replies[0] == "250 2.1.0 Ok"
    assert replies[1:21] == [
        f"554 5.7.1 <victim{number}@example.net>: Relay access denied" for number in range(20)
    ]
    assert replies[21:] == [TOO_MANY_ERRORS]
    mta.wait_for_no_sessions()
    assert mta.queue_list() == []
    assert rejected(mta, "relay_denied") == 20
    assert rejected(mta, "too_many_errors") == 1
    refusals = [line for line in mta.log().splitlines()[before:] if "reject: client=" in line]
    assert len(refusals) == 21, refusals[-3:]  # nothing pipelined after the 421 ran
    mta.stop()
    scenario.checked = (
        f"MAIL, {flood} refused RCPTs and a transaction pipelined from outside "
        "relay_networks: 20 x 554 5.7.1, then 421 4.7.0 too many errors and close; "
        "21 refusal log lines, nothing after the 421 run, nothing queued"
    )


def errors_until_closed(mta: Mta, count: int) -> list[str]:
    """``count`` commands out of sequence on a new session; the replies."""
    client = RawSmtp(mta.port)
    client.hello()
    client.send(b"RCPT TO:<user@example.net>\r\n" * count)
    replies = replies_until_closed(client)
    client.close()
    return replies


def test_the_error_limit_is_configured_reloaded_and_reset_by_a_message(
    mta: Mta, scenario: Scenario
) -> None:
    mta.start_workers(WORKERS, hard_error_limit=5)
    assert mta.process is not None
    need_mail = "503 5.5.1 Error: need MAIL command"
    # Four errors, a message accepted, four more: a sender that makes the odd
    # mistake on a long connection is not cut off.
    client = RawSmtp(mta.port)
    client.hello()
    for _ in range(4):
        assert client.command("RCPT TO:<user@example.net>") == need_mail
    assert send_message(client).startswith("250 2.0.0 Ok: queued as")
    for _ in range(4):
        assert client.command("RCPT TO:<user@example.net>") == need_mail
    client.send(b"RCPT TO:<user@example.net>\r\n")
    assert replies_until_closed(client) == [need_mail, TOO_MANY_ERRORS]
    client.close()
    assert errors_until_closed(mta, 8) == [need_mail] * 5 + [TOO_MANY_ERRORS]
    # A reload applies the new limit to the next sessions, on every worker.
    mta.server["hard_error_limit"] = 7
    mta.write_config()
    mta.process.send_signal(signal.SIGHUP)
    eventually(lambda: mta.log().count("reloaded ") >= WORKERS, 10, mta.log)
    for _ in range(4):  # four sessions: both workers, almost surely
        assert errors_until_closed(mta, 9) == [need_mail] * 7 + [TOO_MANY_ERRORS]
    mta.wait_for_no_sessions()
    assert rejected(mta, "too_many_errors") == 6
    assert len(mta.queue_list()) == 1
    mta.stop()
    scenario.checked = (
        "hard_error_limit = 5: four errors, a message, four errors and the session goes "
        "on; the fifth then gets 421 4.7.0; after a reload to 7, new sessions get 421 "
        "after the seventh"
    )
    scenario.sent = scenario.accepted = 1


# --- a second STARTTLS (item 7) ------------------------------------------------


def test_starttls_inside_tls_gets_503(mta: Mta, scenario: Scenario) -> None:
    mta.start_workers(WORKERS)
    sessions = 4  # over both workers, almost surely
    for _ in range(sessions):
        client = RawSmtp(mta.port)
        client.hello()
        assert "STARTTLS" not in starttls(client)  # RFC 3207 4.2: not offered again
        assert client.command("STARTTLS") == "503 5.5.1 Error: TLS already active"
        assert client.command("STARTTLS") == "503 5.5.1 Error: TLS already active"
        assert client.command("NOOP") == "250 2.0.0 OK"
        assert send_message(client).startswith("250 2.0.0 Ok: queued as")
        assert client.command("QUIT") == "221 2.0.0 Bye"
        client.close()
    mta.wait_for_no_sessions()
    assert len(mta.queue_list()) == sessions
    log = mta.log()
    mta.stop()
    assert "Traceback" not in log
    assert not [line for line in log.splitlines() if ": ERROR:" in line]
    scenario.checked = (
        f"{sessions} sessions send STARTTLS twice inside TLS: 503 5.5.1 each time, no "
        "handshake attempted, no error logged; the session then queues a message"
    )
    scenario.sent = scenario.accepted = sessions


# --- NUL in the data (item 9) --------------------------------------------------

NUL_CASES = {
    "NUL before a fake end of data": MESSAGE + b"\x00.\r\nMAIL FROM:<smuggled@example.test>\r\n",
    "NUL in a header field": MESSAGE.replace(b"receipt 42", b"receipt\x0042"),
    "NUL at the end of a body line": MESSAGE + b"last line\x00\r\n",
    "NUL line": MESSAGE + b"\x00\r\n",
}


def test_nul_in_message_data_is_refused(mta: Mta, scenario: Scenario) -> None:
    mta.start_workers(WORKERS)
    for name, data in NUL_CASES.items():
        client = RawSmtp(mta.port)
        client.hello()
        client.send(
            b"MAIL FROM:<app@example.test>\r\nRCPT TO:<user@example.net>\r\nDATA\r\n"
            + data
            + b".\r\n"
        )
        answers = [client.reply() for _ in range(4)]
        assert answers[:3] == [
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "354 End data with <CR><LF>.<CR><LF>",
        ]
        assert answers[3] == "550 5.6.0 Error: NUL character in message data (RFC 5322 3.5)", name
        # The session goes on: an honest message is queued.
        assert send_message(client).startswith("250 2.0.0 Ok: queued as"), name
        client.close()
    mta.wait_for_no_sessions()
    rows = mta.queue_list()
    assert len(rows) == len(NUL_CASES)  # the honest ones only
    assert all(row["sender"] == "app@example.test" for row in rows), rows
    for row in rows:
        assert b"\x00" not in mta.raw_message(row["id"])
    assert rejected(mta, "nul_character") == len(NUL_CASES)
    mta.stop()
    scenario.checked = (
        f"{len(NUL_CASES)} messages with a NUL octet (before a fake end of data, in a "
        "header, in the body): each 550 5.6.0, counted as nul_character, nothing of "
        "them queued; the honest follow-up messages are"
    )
    scenario.sent = 2 * len(NUL_CASES)
    scenario.accepted = len(NUL_CASES)
