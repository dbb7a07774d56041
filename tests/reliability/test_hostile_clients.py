"""Hostile clients: smuggling, injection, relay probes, oversize input, floods, guessing.

Every scenario runs the real `mta serve` on loopback and talks to it byte by
byte (RawSmtp), because the interesting inputs are the ones a well-behaved
client library refuses to send. Clients outside relay_networks connect from
127.0.0.2 and up; the fixture's relay_networks is 127.0.0.1/32.
"""

from __future__ import annotations

import base64
import re
import ssl
import threading
from pathlib import Path

import pytest

from tests.harness.client import MESSAGE, RawSmtp, send
from tests.harness.mta import Mta
from tests.reliability.conftest import Scenario, scaled

pytestmark = pytest.mark.integration

OUTSIDER = "127.0.0.2"


def starttls(client: RawSmtp) -> None:
    """STARTTLS on a RawSmtp session, then EHLO again over TLS."""
    assert client.command("STARTTLS").startswith("220 2.0.0")
    assert client.buffer == b""
    context = ssl._create_unverified_context()
    client.sock = context.wrap_socket(client.sock, server_hostname="mta.test")
    assert client.command("EHLO client.test").startswith("250-")


def nothing_more(client: RawSmtp, wait: float = 0.3) -> bool:
    """True when the server sends nothing more within ``wait`` seconds."""
    if client.buffer:
        return False
    client.sock.settimeout(wait)
    try:
        return client.sock.recv(1) == b""  # closed counts as nothing more
    except TimeoutError:
        return True
    finally:
        client.sock.settimeout(10.0)


def queued_recipients(mta: Mta) -> list[str]:
    return sorted(rcpt for row in mta.queue_list() for rcpt in row["recipients"])


def rss_kib(mta: Mta) -> int:
    assert mta.process is not None
    status = Path(f"/proc/{mta.process.pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match.group(1))


# --- SMTP smuggling --------------------------------------------------------

# A fake end of data, then a whole second transaction an attacker hopes the
# server will take as a separate message (CVE-2023-51764 and kin).
SMUGGLING_VECTORS = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CR.LF": b"\r.\n",
}
BARE_ENDINGS = {
    "bare CR in a header": b"X-Note: one\rBcc: victim@example.net\r\n",
    "bare LF in the body": b"line one\nline two\r\n",
}


def test_smuggling_vectors_pipelined_are_refused(running_mta: Mta, scenario: Scenario) -> None:
    smuggled = (
        b"MAIL FROM:<ceo@example.test>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
        b"From: ceo@example.test\r\nSubject: smuggled\r\n\r\nwire the money\r\n"
    )
    cases = {name: MESSAGE + vector + smuggled for name, vector in SMUGGLING_VECTORS.items()}
    cases |= {name: MESSAGE + line for name, line in BARE_ENDINGS.items()}
    for name, data in cases.items():
        client = RawSmtp(running_mta.port)
        assert "PIPELINING" in client.hello()
        # The whole attempt in one write, as an attacker would pipeline it.
        client.send(
            b"MAIL FROM:<app@example.test>\r\nRCPT TO:<user@example.net>\r\nDATA\r\n"
            + data
            + b"\r\n.\r\n"
        )
        answers = [client.reply() for _ in range(4)]
        assert [answer[:3] for answer in answers] == ["250", "250", "354", "550"], (name, answers)
        assert answers[3].startswith("550 5.5.2 Error: bare <CR> or <LF>"), (name, answers)
        assert nothing_more(client), name  # the smuggled commands were never run
        # The session is still good for an honest message.
        for line in ("MAIL FROM:<app@example.test>", "RCPT TO:<user@example.net>", "DATA"):
            assert client.command(line)[:1] in "23", (name, line)
        client.send(MESSAGE + b".\r\n")
        assert client.reply().startswith("250 2.0.0 Ok: queued as"), name
        client.close()
    rows = running_mta.queue_list()
    assert len({row["id"] for row in rows}) == len(cases)  # only the honest ones
    assert queued_recipients(running_mta) == ["user@example.net"] * len(cases)
    scenario.checked = (
        f"{len(cases)} smuggling/bare CR-LF vectors pipelined in one write: each 550 5.5.2, "
        "no smuggled command answered, only the honest follow-up messages queued"
    )
    scenario.sent = 2 * len(cases)
    scenario.accepted = len(cases)


# --- STARTTLS command injection --------------------------------------------


def test_starttls_command_injection_is_discarded(running_mta: Mta, scenario: Scenario) -> None:
    client = RawSmtp(running_mta.port)
    client.hello()
    # Injected commands after STARTTLS in the same packet (CVE-2011-0411 style).
    client.send(
        b"STARTTLS\r\nMAIL FROM:<injected@example.test>\r\nRCPT TO:<victim@example.net>\r\n"
    )
    assert client.reply().startswith("220 2.0.0")
    assert client.buffer == b""  # nothing answered in clear text
    context = ssl._create_unverified_context()
    client.sock = context.wrap_socket(client.sock, server_hostname="mta.test")
    assert nothing_more(client, 0.5)  # nor over TLS: the injected lines were dropped
    assert client.command("EHLO client.test").startswith("250-")
    # No MAIL is pending: a nested MAIL would be 503.
    assert client.command("MAIL FROM:<app@example.test>").startswith("250 2.1.0")
    assert client.command("RCPT TO:<user@example.net>").startswith("250 2.1.5")
    assert client.command("DATA").startswith("354")
    client.send(MESSAGE + b".\r\n")
    assert client.reply().startswith("250 2.0.0 Ok: queued as")
    client.close()
    assert queued_recipients(running_mta) == ["user@example.net"]
    scenario.checked = (
        "MAIL and RCPT pipelined after STARTTLS in one packet: never answered, in clear "
        "or over TLS; the session then works normally"
    )
    scenario.sent = scenario.accepted = 1


# --- open relay probes -----------------------------------------------------

RELAY_PROBES = [
    "user%external.test@mta.test",
    "user%external.test@example.test",
    '"user@external.test"@mta.test',
    '"user@external.test"@example.test',
    "external.test!user@mta.test",
    "@mta.test,@relay.test:user@external.test",
    "@mta.test:user@external.test",
    "user@[192.0.2.1]",
    "user@[127.0.0.1]",
    "user@[IPv6:2001:db8::1]",
    "user@external.test",
    "user@example.test",
    "postmaster@mta.test",
    "postmaster",
    "user@external.test.",
    "user@mta.test@external.test",
]


def test_open_relay_probes_are_refused(running_mta: Mta, scenario: Scenario) -> None:
    refusals = {}
    for probe in RELAY_PROBES:
        # A session per probe: two errors each, and [server] hard_error_limit
        # would close one session after ten probes.
        client = RawSmtp(running_mta.port, source=OUTSIDER)
        client.hello("outsider.test")
        assert client.command("MAIL FROM:<probe@outsider.test>").startswith("250 2.1.0")
        answer = client.command(f"RCPT TO:<{probe}>")
        refusals[probe] = answer
        assert client.command("DATA").startswith("503"), probe
        client.close()
    accepted = {probe: answer for probe, answer in refusals.items() if answer.startswith("2")}
    assert not accepted
    codes = {answer[:9] for answer in refusals.values()}
    assert codes <= {"554 5.7.1", "501 5.1.3", "553 5.1.3"}, refusals
    assert running_mta.queue_list() == []
    scenario.checked = (
        f"{len(RELAY_PROBES)} relay probes from outside relay_networks (% and ! routing, "
        "quoted @, source routes, IP literals, plain external): all 554 5.7.1 or 5.1.3, "
        "nothing queued"
    )


# --- CR, LF, NUL inside commands -------------------------------------------

VALID_MAIL = b"MAIL FROM:<app@example.test>\r\n"
CONTROL_CHARACTER_CASES = [
    (b"", b"MAIL FROM:<a@b.test> SIZE=10\rX"),
    (b"", b"MAIL FROM:<a@b.test> SIZE=10\rRCPT TO:<victim@example.net>"),
    (b"", b"MAIL FROM:<a@b.test>\rRCPT TO:<victim@example.net>"),
    (b"", b"MAIL FROM:<a\r@b.test>"),
    (b"", b"MAIL FROM:<a@b.test\x00>"),
    (b"", b"MAIL FROM:<a\x00@b.test>"),
    (b"", b"MAIL FROM:<a@b.test> SIZE=10\x00"),
    (b"", b"MAIL FROM:<a@b.test> BODY=8BITMIME\x00RCPT TO:<victim@example.net>"),
    (b"", b"MAIL FROM:<a@b.test>\nRCPT TO:<victim@example.net>"),
    (b"", b"MAIL FROM:<a@b\n.test>"),
    (VALID_MAIL, b"RCPT TO:<victim@example.net>\rDATA"),
    (VALID_MAIL, b"RCPT TO:<victim\x00@example.net>"),
    (VALID_MAIL, b"RCPT TO:<victim@example.net\r>"),
    (VALID_MAIL, b"RCPT TO:<victim@example.net> NOTIFY=NEVER\rDATA"),
    (VALID_MAIL, b"RCPT TO:<victim@example.net>\nDATA"),
]


def test_control_characters_in_envelope_and_parameters(
    running_mta: Mta, scenario: Scenario
) -> None:
    client = RawSmtp(running_mta.port)
    client.hello()
    for before, line in CONTROL_CHARACTER_CASES:
        if before:
            client.send(before)
            assert client.reply().startswith("250 2.1.0"), line
        # The hostile line and a NOOP in one write: exactly two replies may come.
        client.send(line + b"\r\nNOOP\r\n")
        refusal = client.reply()
        if b"\n" in line:
            # A bare LF ends the session: nothing after it is read as a command.
            assert refusal.startswith("521 5.5.2 mta.test Error: bare <LF>"), (line, refusal)
            assert client.reply() == "", line
            client.close()
            client = RawSmtp(running_mta.port)
            client.hello()
            continue
        assert refusal == "500 5.5.2 Error: control character in command line", (line, refusal)
        assert client.reply().startswith("250 2.0.0"), (line, refusal)
        assert nothing_more(client, 0.1), line
        assert client.command("RSET").startswith("250")
    assert client.command("MAIL FROM:<app@example.test>").startswith("250 2.1.0")
    assert client.command("RCPT TO:<user@example.net>").startswith("250 2.1.5")
    client.close()
    assert running_mta.queue_list() == []
    scenario.checked = (
        f"{len(CONTROL_CHARACTER_CASES)} MAIL/RCPT lines with CR, LF or NUL inside the "
        "address or a parameter: each one refusal (a bare LF: 521 and close), never a "
        "second command"
    )


# --- long lines ------------------------------------------------------------


def test_long_command_and_text_lines(running_mta: Mta, scenario: Scenario) -> None:
    client = RawSmtp(running_mta.port)
    client.hello()
    for length in (513, 600, 5_000, 100_000):
        answer = client.command("NOOP " + "x" * (length - 5))
        assert answer.startswith("500 5.5.2"), (length, answer)
        assert client.command("NOOP").startswith("250 2.0.0"), length
    long_address = "MAIL FROM:<" + "a" * 600 + "@example.test>"
    assert client.command(long_address).startswith("500 5.5.2")
    for length in (1001, 1002, 1_200, 50_000):
        assert client.command("MAIL FROM:<app@example.test>").startswith("250")
        assert client.command("RCPT TO:<user@example.net>").startswith("250")
        assert client.command("DATA").startswith("354")
        client.send(MESSAGE + b"y" * (length - 2) + b"\r\n.\r\n")
        answer = client.reply()
        assert answer.startswith("500 5.5.2"), (length, answer)
    # A line of exactly 1000 bytes with its CRLF is allowed.
    assert client.command("MAIL FROM:<app@example.test>").startswith("250")
    assert client.command("RCPT TO:<user@example.net>").startswith("250")
    assert client.command("DATA").startswith("354")
    client.send(MESSAGE + b"z" * 998 + b"\r\n.\r\n")
    assert client.reply().startswith("250 2.0.0 Ok: queued as")
    client.close()
    assert len(running_mta.queue_list()) == 1
    scenario.checked = (
        "command lines of 513 B to 100 KB and text lines of 1001 B to 50 KB: 500 5.5.2, "
        "the session stays usable; a 1000-byte line is accepted"
    )
    scenario.sent = 4
    scenario.accepted = 1


# --- oversize messages -----------------------------------------------------


def test_messages_over_size_announced_and_not(mta: Mta, scenario: Scenario) -> None:
    limit = 100_000
    mta.server["max_message_size"] = limit
    mta.server["hard_error_limit"] = 100  # a refusal per round, 20 rounds in the soak run
    mta.start()
    client = RawSmtp(mta.port)
    assert f"SIZE {limit}" in client.hello()
    before = rss_kib(mta)
    assert client.command(f"MAIL FROM:<app@example.test> SIZE={limit + 1}").startswith("552 5.3.4")
    assert client.command("MAIL FROM:<app@example.test> SIZE=99999999999999999999").startswith(
        "552 5.3.4"
    )
    rounds = scaled(3, 20)
    factor = scaled(2, 50)
    line = b"x" * 78 + b"\r\n"
    for _ in range(rounds):
        # Not announced (or announced small): the limit holds while the data streams in.
        assert client.command("MAIL FROM:<app@example.test> SIZE=1000").startswith("250")
        assert client.command("RCPT TO:<user@example.net>").startswith("250")
        assert client.command("DATA").startswith("354")
        client.send(MESSAGE)
        for _ in range(factor * limit // len(line)):
            client.send(line)
        client.send(b".\r\n")
        assert client.reply().startswith("552 5.3.4")
    assert client.command("NOOP").startswith("250 2.0.0")
    client.close()
    growth = rss_kib(mta) - before
    assert mta.queue_list() == []
    assert growth < 64 * 1024, f"RSS grew by {growth} KiB"
    mta.stop()
    scenario.checked = (
        f"SIZE= over the limit: 552 5.3.4 at MAIL; {rounds} messages streamed to {factor}x "
        f"max_message_size: 552 5.3.4, nothing queued, RSS grew {growth} KiB"
    )
    scenario.sent = rounds + 2


# --- thousands of recipients -----------------------------------------------


def test_thousands_of_recipients(mta: Mta, scenario: Scenario) -> None:
    mta.server["max_recipients"] = 1000
    mta.start()
    count = scaled(3000, 10_000)
    client = RawSmtp(mta.port)
    client.hello()
    assert client.command("MAIL FROM:<app@example.test>").startswith("250")
    batch = 500
    answers: list[str] = []
    for start in range(0, count, batch):
        client.send(
            b"".join(
                f"RCPT TO:<u{number}@example.net>\r\n".encode()
                for number in range(start, min(start + batch, count))
            )
        )
        answers += [client.reply() for _ in range(start, min(start + batch, count))]
    assert answers[:1000] == ["250 2.1.5 Ok"] * 1000
    assert answers[1000:] == ["452 4.5.3 Error: too many recipients"] * (count - 1000)
    assert client.command("DATA").startswith("354")
    client.send(MESSAGE + b".\r\n")
    assert client.reply().startswith("250 2.0.0 Ok: queued as")
    client.close()
    assert queued_recipients(mta) == sorted(f"u{number}@example.net" for number in range(1000))
    mta.stop()
    scenario.checked = (
        f"{count} RCPTs pipelined with max_recipients 1000: 1000 x 250, the rest 452 4.5.3; "
        "the message is queued for exactly the first 1000"
    )
    scenario.sent = scenario.accepted = 1


# --- slowloris and floods --------------------------------------------------


class Dribbler(threading.Thread):
    """A slowloris client: one byte every ``interval`` seconds, until the server closes."""

    def __init__(self, client: RawSmtp, interval: float, payload: bytes) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.interval = interval
        self.payload = payload
        self.closed = False
        self.final = ""

    def run(self) -> None:
        self.client.sock.settimeout(self.interval)
        received = b""
        for byte in self.payload * 1000:
            try:
                self.client.sock.send(bytes([byte]))
            except OSError:
                break
            try:
                chunk = self.client.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            received += chunk
        self.closed = True
        self.final = received.decode(errors="replace")
        self.client.close()


class Talker(threading.Thread):
    """A client that starts and resets a transaction every ``interval`` seconds until
    ``stop`` is set (NOOP alone keeps a session only within idle_timeout of real work)."""

    def __init__(self, client: RawSmtp, interval: float) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.interval = interval
        self.stop = threading.Event()
        self.replies: list[str] = []

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.replies.append(self.client.command("MAIL FROM:<talker@example.test>"))
            self.replies.append(self.client.command("RSET"))
        self.client.close()


def test_slowloris_sessions_are_timed_out(mta: Mta, scenario: Scenario) -> None:
    idle = 2
    mta.server["idle_timeout"] = idle
    mta.server["relay_networks"] = ["127.0.0.0/8"]
    mta.start()
    # Before the banner is read, after EHLO, and inside a command: a byte at a time.
    dribblers = []
    for number, hello in enumerate((False, True, True)):
        client = RawSmtp(mta.port, source=f"127.0.0.{10 + number}", timeout=30)
        if hello:
            client.hello()
        payload = b"MAIL FROM:<slow@example.test>" if number == 2 else b"NOOP "
        dribblers.append(Dribbler(client, 0.3, payload))
    # A session that starts a transaction, then dribbles its message body.
    data_client = RawSmtp(mta.port, source="127.0.0.20", timeout=30)
    data_client.hello()
    data_client.command("MAIL FROM:<app@example.test>")
    data_client.command("RCPT TO:<user@example.net>")
    assert data_client.command("DATA").startswith("354")
    data_dribbler = Dribbler(data_client, 0.3, b"x")
    idler = RawSmtp(mta.port, source="127.0.0.21", timeout=30)
    idler.hello()
    # A client that starts and resets a transaction four times per idle_timeout
    # is not idle.
    talker = Talker(RawSmtp(mta.port, source="127.0.0.22", timeout=30), idle / 4)
    talker.client.hello()
    talker.start()
    for dribbler in [*dribblers, data_dribbler]:
        dribbler.start()
    # Meanwhile an honest client is served at once.
    send(mta)
    assert idler.reply() == "421 4.4.2 mta.test Error: timeout exceeded"
    assert idler.reply() == ""
    for dribbler in [*dribblers, data_dribbler]:
        dribbler.join(timeout=idle + 10)
        assert dribbler.closed, "a slowloris session was never closed"
        assert "421 4.4.2" in dribbler.final, dribbler.final
    # Outlived the idler and every dribbler, every command answered: the timeout is
    # about silence, not about how long a session lasts.
    talker.stop.set()
    talker.join(timeout=10)
    assert talker.replies and all(r.startswith("250 ") for r in talker.replies), talker.replies
    assert len(mta.queue_list()) == 1  # the honest message only
    mta.wait_for_no_sessions()
    mta.stop()
    scenario.checked = (
        f"3 clients dribbling a command, 1 dribbling DATA, 1 idle, idle_timeout {idle}s: "
        "all get 421 4.4.2 and are closed; an honest client is served meanwhile, and one "
        f"starting and resetting a transaction every {idle / 4}s stays open throughout"
    )
    scenario.sent = scenario.accepted = 1


def test_connection_flood_over_the_limits(mta: Mta, scenario: Scenario) -> None:
    per_ip, total = 5, 12
    mta.server["max_connections_per_ip"] = per_ip
    mta.server["max_connections"] = total
    mta.server["relay_networks"] = ["127.0.0.0/8"]
    mta.start()
    flood_size = scaled(50, 500)
    held: list[RawSmtp] = []
    refused = 0
    for _ in range(flood_size):
        client = RawSmtp(mta.port, source="127.0.0.1")
        greeting = client.reply()
        if greeting.startswith("220"):
            held.append(client)
        else:
            assert greeting == "421 4.7.0 mta.test Error: too many connections from 127.0.0.1"
            assert client.reply() == ""  # and closed
            client.close()
            refused += 1
    assert len(held) == per_ip and refused == flood_size - per_ip
    # Another address is served while the flood holds its slots.
    other = RawSmtp(mta.port, source="127.0.0.2")
    other.hello()
    assert other.command("MAIL FROM:<app@example.test>").startswith("250")
    assert other.command("RCPT TO:<user@example.net>").startswith("250")
    assert other.command("DATA").startswith("354")
    other.send(MESSAGE + b".\r\n")
    assert other.reply().startswith("250 2.0.0 Ok: queued as")
    other.close()
    # A flood from many addresses fills the total; the rest get 421 too.
    busy = 0
    for number in range(3, 3 + flood_size):
        client = RawSmtp(mta.port, source=f"127.0.1.{number % 250}")
        greeting = client.reply()
        if greeting.startswith("220"):
            held.append(client)
        else:
            assert greeting.startswith("421 4.7.0"), greeting
            client.close()
            busy += 1
    assert len(held) == total and busy == flood_size - (total - per_ip)
    for client in held:
        client.close()
    mta.wait_for_no_sessions()
    send(mta)  # all slots come back
    assert len(mta.queue_list()) == 2
    assert "too many connections" in mta.log()
    mta.stop()
    scenario.checked = (
        f"{flood_size} connections from one address (limit {per_ip}) and {flood_size} from "
        f"many (limit {total}): the excess gets 421 4.7.0 and is closed; another address "
        "is served during the flood; every slot comes back"
    )
    scenario.sent = scenario.accepted = 2


# --- AUTH brute force ------------------------------------------------------


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_auth_brute_force_is_rate_limited(mta: Mta, scenario: Scenario) -> None:
    mta.start()
    secret = "correct-horse-battery-9"
    assert mta.cli("user", "add", "app1", stdin=secret + "\n").returncode == 0
    mta.stop()
    mta.start()
    guesses = [f"guess-{number}-Zq7" for number in range(20)]
    attempts = iter(guesses)
    answers: list[str] = []
    sessions = 0
    # Each session may fail three times; the third failure ends it with 421.
    while True:
        client = RawSmtp(mta.port, source=OUTSIDER)
        client.hello()
        starttls(client)
        sessions += 1
        session_answers = []
        for number in range(3):
            guess = next(attempts)
            if number == 1:  # LOGIN as well as PLAIN
                assert client.command("AUTH LOGIN").startswith("334 ")
                assert client.command(base64.b64encode(b"app1").decode()).startswith("334 ")
                answer = client.command(base64.b64encode(guess.encode()).decode())
            else:
                answer = client.command(f"AUTH PLAIN {plain('app1', guess)}")
            session_answers.append(answer)
            if answer.startswith("421"):
                break
        answers += session_answers
        assert client.reply() == ""  # closed after the 421
        client.close()
        if "from 127.0.0.2" in session_answers[-1]:
            break
        assert session_answers[:2] == ["535 5.7.8 Authentication credentials invalid"] * 2
        assert session_answers[2] == "421 4.7.0 mta.test Error: too many authentication failures"
        assert sessions < 6
    # The address is now blocked: even the right password is refused, at once.
    assert answers[-1] == (
        "421 4.7.0 mta.test Error: too many authentication failures from 127.0.0.2, try again later"
    )
    failures = len(answers)
    client = RawSmtp(mta.port, source=OUTSIDER)
    client.hello()
    starttls(client)
    assert client.command(f"AUTH PLAIN {plain('app1', secret)}").startswith("421 4.7.0")
    client.close()
    # Another address with the right password is not affected.
    client = RawSmtp(mta.port, source="127.0.0.3")
    client.hello()
    starttls(client)
    assert client.command(f"AUTH PLAIN {plain('app1', secret)}").startswith("235 2.7.0")
    assert client.command("MAIL FROM:<app@example.test>").startswith("250")
    assert client.command("RCPT TO:<user@example.net>").startswith("250")
    assert client.command("DATA").startswith("354")
    client.send(MESSAGE + b".\r\n")
    assert client.reply().startswith("250 2.0.0 Ok: queued as")
    client.close()
    mta.wait_for_no_sessions()
    limited = f'mta_messages_rejected_total{{reason="auth_rate_limited"}} {sessions + 1}.0'
    assert limited in mta.metrics()
    log = mta.log()
    mta.stop()
    for password in [secret, *guesses]:
        assert password not in log
        for form in (plain("app1", password), base64.b64encode(password.encode()).decode()):
            assert form not in log
    scenario.checked = (
        f"{failures} wrong passwords over {sessions} sessions from one address: 421 after "
        "3 failures a session, then the address is blocked even with the right password; "
        "another address logs in; no password in the log"
    )
    scenario.sent = scenario.accepted = 1


def test_injected_lines_in_auth_are_harmless(running_mta: Mta, scenario: Scenario) -> None:
    """AUTH LOGIN's answers are read as raw lines: a pipelined command is not a password."""
    client = RawSmtp(running_mta.port, source=OUTSIDER)
    client.hello()
    starttls(client)
    client.send(b"AUTH LOGIN\r\nMAIL FROM:<x@outsider.test>\r\n")
    assert client.reply().startswith("334 ")
    assert client.reply().startswith("501 5.5.2")  # not base64: refused, not run
    assert client.command("RCPT TO:<victim@example.net>").startswith("503")
    # A control character or bare LF in an AUTH answer: refused, and the session ends
    # (aiosmtpd would otherwise read the next command as the password).
    for answer, refusal in ((b"YXBwMQ==\x00", "500 5.5.2"), (b"YXBwMQ==\n", "521 5.5.2")):
        assert client.command("AUTH LOGIN").startswith("334 ")
        client.send(answer + b"\r\nMAIL FROM:<x@outsider.test>\r\n")
        assert client.reply().startswith(refusal), answer
        assert client.reply() == ""
        client.close()
        client = RawSmtp(running_mta.port, source=OUTSIDER)
        client.hello()
        starttls(client)
    client.close()
    assert running_mta.queue_list() == []
    scenario.checked = (
        "commands pipelined after AUTH LOGIN, and NUL or bare LF in an AUTH answer: "
        "refused (a bad answer ends the session), never run as commands"
    )
