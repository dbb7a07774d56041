"""Receivers that misbehave, end to end through the running daemon.

A scripted SMTP server (``Receiver``, asyncio in its own thread) stands in
for a broken MX: it never answers, answers byte by byte, hangs up after the
data, says 421 mid-session, breaks the TLS handshake, refuses some
recipients for now, or answers garbage. The daemon reaches it over a static
route, with small timeouts and a half-second retry. For each behaviour:

- the job is deferred with the right reply (``mta queue list`` shows its
  attempts and last reply) and never bounced;
- meanwhile mail to a healthy destination still arrives promptly (for the
  stalls: while the stalled session is still open), with only two delivery
  slots in the daemon, so no attempt hangs or keeps its slot;
- once the receiver behaves, a retry delivers the message, the spool ends
  empty, and every copy the receiver kept is counted: a server that took the
  data and then went silent or hung up may get the message again (at least
  once), exactly once per attempt that reached the end of the data.

tests/integration/test_client.py tests the SMTP client alone against such
servers; here it is the whole daemon: scheduler, retries, spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import pytest

from tests.harness.client import message, send, unique
from tests.harness.mta import Mta, make_certificate
from tests.harness.poll import eventually
from tests.harness.threaded_server import ThreadedServer
from tests.reliability.conftest import Scenario

pytestmark = pytest.mark.integration

BAD, GOOD = "127.0.3.1", "127.0.3.2"
COMMAND_TIMEOUT = 1.5  # the daemon's [delivery] command_timeout here
RETRY = 0.5  # retry_first = retry_max: a deferred job is tried again after ~0.5 s

OK = b"250 2.0.0 Ok\r\n"
GREETING = b"220 recv.test ESMTP\r\n"
QUEUED = b"250 2.0.0 Ok: queued\r\n"


@dataclass(frozen=True)
class Script:
    """How a receiver behaves in one session (read when the session starts)."""

    silent: bool = False  # accept the connection, never say a word
    byte_delay: float = 0.0  # seconds between the bytes of every reply
    greeting: bytes = GREETING
    replies: Mapping[bytes, bytes] = field(default_factory=dict)  # verb (b"." = end of data)
    hang_at: bytes = b""  # never answer this verb (b"." = the end of data)
    drop_at: bytes = b""  # hang up without a word at this verb (b"." = after the data)
    starttls: str = ""  # "" none offered, "good", or "broken" (garbage instead of a handshake)
    # RCPT of local parts starting with this get 450. A mailbox's state, not
    # the session's: read at each RCPT (the daemon reuses the connection).
    defer_rcpt: str = ""


HEALTHY = Script()


@dataclass
class Kept:
    """One transaction's data the receiver kept (it may have been delivered)."""

    sender: str
    recipients: list[str]
    data: bytes
    acknowledged: bool  # answered 250
    tls: bool


@dataclass
class Session:
    opened: float
    closed: float | None = None


class Receiver(ThreadedServer):
    """A scripted SMTP server on ``host``; set ``script`` to change how new sessions go."""

    def __init__(self, host: str, tls_context: ssl.SSLContext | None = None) -> None:
        super().__init__(host)
        self.script = HEALTHY
        self.tls_context = tls_context
        self.kept: list[Kept] = []
        self.sessions: list[Session] = []

    @property
    def hop(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def relay(self) -> str:
        return f"{self.host}[{self.host}]:{self.port}"

    def copies(self, subject: str) -> list[Kept]:
        return [kept for kept in list(self.kept) if f"Subject: {subject}".encode() in kept.data]

    def wait_for(self, subject: str, timeout: float = 15.0) -> Kept:
        """The first acknowledged copy of the message with ``subject``."""

        def arrived() -> Kept | None:
            return next((kept for kept in self.copies(subject) if kept.acknowledged), None)

        return eventually(arrived, timeout, f"{subject!r} at {self.host}")

    def open_session(self, timeout: float = 10.0) -> Session:
        """A session that is open now (the daemon's attempt under way)."""

        def open_now() -> Session | None:
            return next((s for s in list(self.sessions) if s.closed is None), None)

        return eventually(open_now, timeout, f"a session open at {self.host}")

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(time.monotonic())
        self.sessions.append(session)
        try:
            await self._converse(self.script, reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass  # ssl.SSLError is an OSError
        except asyncio.CancelledError:
            pass  # shutting down: end quietly (asyncio's stream callback asks for the result)
        finally:
            session.closed = time.monotonic()
            writer.close()

    async def _converse(
        self, script: Script, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        async def say(text: bytes) -> None:
            if not script.byte_delay:
                writer.write(text)
                await writer.drain()
                return
            for index in range(len(text)):
                writer.write(text[index : index + 1])
                await writer.drain()
                await asyncio.sleep(script.byte_delay)

        async def until_the_client_leaves() -> None:
            while await reader.read(65536):
                pass

        if script.silent:
            return await until_the_client_leaves()
        await say(script.greeting)
        tls = False
        sender, recipients = "", list[str]()
        while line := await reader.readline():
            words = line.split(b":", 1)[0].split()
            verb = words[0].upper() if words else b""
            argument = line.partition(b":")[2].strip().partition(b" ")[0].strip(b"<>").decode()
            if verb == script.hang_at:
                return await until_the_client_leaves()
            if verb == script.drop_at:
                return
            reply = script.replies.get(verb, OK)
            if verb == b"EHLO":
                offered = b"250-STARTTLS\r\n" if script.starttls and not tls else b""
                reply = script.replies.get(
                    verb, b"250-recv.test\r\n" + offered + b"250 8BITMIME\r\n"
                )
            elif verb == b"STARTTLS" and script.starttls and not tls:
                await say(b"220 2.0.0 Ready to start TLS\r\n")
                if script.starttls == "broken":
                    writer.write(b"this is not a TLS server hello\r\n" * 8)
                    await writer.drain()
                    return
                assert self.tls_context is not None
                await writer.start_tls(self.tls_context)
                tls, sender, recipients = True, "", []
                continue
            elif verb == b"MAIL":
                sender, recipients = argument, []
                reply = script.replies.get(verb, b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                if verb in script.replies:
                    pass
                elif (busy := self.script.defer_rcpt) and argument.startswith(busy):
                    reply = b"450 4.2.1 <%s>: mailbox busy, try again later\r\n" % argument.encode()
                else:
                    recipients.append(argument)
                    reply = b"250 2.1.5 Ok\r\n"
            elif verb == b"DATA":
                reply = script.replies.get(verb, b"354 End data with <CR><LF>.<CR><LF>\r\n")
                if reply.startswith(b"354") and recipients:
                    await say(reply)
                    reply = await self._data(script, reader, sender, recipients, tls)
                    if not reply:
                        return await until_the_client_leaves()  # hung up or hangs
                    sender, recipients = "", []
            elif verb == b"RSET":
                sender, recipients = "", []
            elif verb == b"QUIT":
                await say(b"221 2.0.0 Bye\r\n")
                return
            await say(reply)
            if reply.startswith(b"421"):
                return

    async def _data(
        self,
        script: Script,
        reader: asyncio.StreamReader,
        sender: str,
        recipients: list[str],
        tls: bool,
    ) -> bytes:
        """Read the data; the reply to send, or b"" when the script says hang or hang up."""
        lines = []
        while (line := await reader.readline()) != b".\r\n":
            if not line:
                raise ConnectionResetError("the client left during the data")
            lines.append(line[1:] if line.startswith(b".") else line)
        reply = (
            b"" if b"." in (script.hang_at, script.drop_at) else script.replies.get(b".", QUEUED)
        )
        # A server that said nothing, or garbage, may well have stored the
        # message; one that answered 4xx/5xx did not.
        if reply[:1] not in (b"4", b"5"):
            acknowledged = reply.startswith(b"250")
            self.kept.append(Kept(sender, list(recipients), b"".join(lines), acknowledged, tls))
        if script.drop_at == b".":
            raise ConnectionResetError("hung up after the data")
        return reply


# --- the daemon and its peers ---


@dataclass
class World:
    """One daemon for the module; each scenario has its own receiver(s) and domain."""

    mta: Mta
    good: Receiver  # every other domain (and any bounce) goes here
    receivers: dict[str, Receiver]


def domain(key: str) -> str:
    return key.replace("_", "-") + ".test"


def secure(key: str) -> str:
    """A domain in require_tls, routed to the same receiver as ``domain(key)``."""
    return "secure-" + domain(key)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    cert, key = make_certificate(tmp_path_factory.mktemp("tls"))
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    with contextlib.ExitStack() as stack:
        good = stack.enter_context(Receiver(GOOD))
        receivers = {key: stack.enter_context(Receiver(BAD, server_tls)) for key in RECEIVERS}
        mta = Mta(tmp_path_factory.mktemp("mta"))
        mta.park_mail = False
        mta.routes = {domain(key): receiver.hop for key, receiver in receivers.items()}
        mta.routes |= {secure(key): receivers[key].hop for key in TLS_KEYS}
        mta.routes["*"] = good.hop
        mta.delivery |= {
            "connect_timeout": 1,
            "command_timeout": COMMAND_TIMEOUT,
            "retry_first": RETRY,
            "retry_max": RETRY,
            "connection_idle_timeout": 1,
            "require_tls": [secure(key) for key in TLS_KEYS],
            # Two delivery slots: a stalled attempt holds one, other mail gets
            # the other, and a slot that a stall never gave back would starve
            # the scenarios after it.
            "max_concurrent": 2,
        }
        mta.start()
        try:
            yield World(mta, good, receivers)
            mta.wait_for_empty_spool()
            no_bounces(good)
        finally:
            if mta.process is not None:
                code = mta.stop()
                assert code == 0, mta.log()


def attempted(mta: Mta, queue_id: str, timeout: float = 15.0) -> dict[str, object]:
    """The job's queue-list row once it has been attempted (deferred)."""

    def row() -> dict[str, object] | None:
        for listed in mta.queue_list():
            if listed["id"] == queue_id and listed["attempts"]:
                return listed
        return None

    return eventually(row, timeout, f"an attempt of {queue_id}")


def gone(mta: Mta, *queue_ids: str, timeout: float = 15.0) -> None:
    """Until the spool has no job of these messages left."""

    def none_left() -> bool:
        return not any(row["id"] in queue_ids for row in mta.queue_list())

    eventually(none_left, timeout, f"{queue_ids} to leave the spool")


def outcomes(mta: Mta, queue_id: str, recipient: str) -> list[tuple[int, str]]:
    """(attempts, status) of each delivery log line for one recipient."""
    pattern = rf"id={queue_id} to=<{re.escape(recipient)}> .*? attempts=(\d+) .*?status=(\w+)"
    return [(int(n), status) for n, status in re.findall(pattern, mta.log())]


def healthy_meanwhile(world: World) -> float:
    """Send to a healthy destination; the monotonic time it arrived."""
    subject = unique()
    queue_id = send(world.mta, message(subject), ["fine@healthy.test"])
    world.good.wait_for(subject, timeout=10)
    arrived = time.monotonic()
    gone(world.mta, queue_id)
    return arrived


def no_bounces(good: Receiver) -> None:
    assert [kept for kept in good.kept if kept.sender == ""] == []


# --- stalls, hang-ups, 421, garbage: deferred, then delivered ---


@dataclass(frozen=True)
class Case:
    what: str  # the misbehaviour, for the report
    script: Script
    status: str  # the enhanced status in the deferral's last_reply
    words: str  # and words it contains
    stall: bool = False  # the attempt hangs until our timeout: check others go on meanwhile
    data_sent: bool = False  # the server may have kept the message: a retry may duplicate it


SHUTTING_DOWN = b"421 4.3.2 Service shutting down\r\n"
CASES = {
    "never_answers": Case(
        "accepts the connection, never answers",
        Script(silent=True),
        "4.4.2",
        "timed out while receiving the initial server greeting",
        stall=True,
    ),
    "dribbles_slower_than_the_timeout": Case(
        "greets one byte per 0.3 s (slower than command_timeout)",
        Script(byte_delay=0.3),
        "4.4.2",
        "timed out while receiving the initial server greeting",
        stall=True,
    ),
    "hangs_at_rcpt": Case(
        "never answers RCPT",
        Script(hang_at=b"RCPT"),
        "4.4.2",
        "timed out while sending RCPT TO",
        stall=True,
    ),
    "hangs_after_the_data": Case(
        "takes the data, never answers the final dot",
        Script(hang_at=b"."),
        "4.4.2",
        "timed out while sending the message",
        stall=True,
        data_sent=True,
    ),
    "drops_at_data": Case("hangs up at DATA", Script(drop_at=b"DATA"), "4.4.2", "lost connection"),
    "drops_after_the_data": Case(
        "takes the data, hangs up without a reply",
        Script(drop_at=b"."),
        "4.4.2",
        "lost connection",
        data_sent=True,
    ),
    "421_at_mail": Case(
        "421 at MAIL",
        Script(replies={b"MAIL": SHUTTING_DOWN}),
        "4.3.2",
        "said: 421 4.3.2 Service shutting down (in reply to MAIL FROM)",
    ),
    "421_at_rcpt": Case(
        "421 at RCPT",
        Script(replies={b"RCPT": SHUTTING_DOWN}),
        "4.3.2",
        "(in reply to RCPT TO)",
    ),
    "421_after_the_data": Case(
        "421 after the data",
        Script(replies={b".": SHUTTING_DOWN}),
        "4.3.2",
        "(in reply to DATA)",
    ),
    "garbage_greeting": Case(
        "greeting without a code",
        Script(greeting=b"hello there\r\n"),
        "4.5.0",
        "malformed reply (in reply to the greeting)",
    ),
    "binary_greeting": Case(
        "binary junk as greeting",
        Script(greeting=b"\x00\xff\xfe\x80junk\x1b[0m\r\n"),
        "4.5.0",
        "malformed reply",
    ),
    "endless_greeting_line": Case(
        "100 kB greeting line without an end",
        Script(greeting=b"2" * 100_000),
        "4.5.0",
        "malformed reply",
    ),
    "endless_multiline_ehlo": Case(
        "20,000-line EHLO reply",
        Script(replies={b"EHLO": b"250-more\r\n" * 20_000 + b"250 done\r\n"}),
        "4.5.0",
        "malformed reply",
    ),
    "garbage_reply_to_mail": Case(
        "garbled reply to MAIL",
        Script(replies={b"MAIL": b"2x0 what\r\n"}),
        "4.5.0",
        "(in reply to MAIL FROM)",
    ),
    "garbage_after_the_data": Case(
        "takes the data, answers garbage",
        Script(replies={b".": b"what?\r\n"}),
        "4.5.0",
        "(in reply to DATA)",
        data_sent=True,
    ),
}


RECEIVERS = [*CASES, "slow", "partial", "tls_broken", "tls_none"]
TLS_KEYS = ["tls_broken", "tls_none"]


@pytest.mark.parametrize("name", list(CASES))
def test_misbehaving_receiver_defers_then_delivers(
    world: World, scenario: Scenario, name: str
) -> None:
    case, mta, bad = CASES[name], world.mta, world.receivers[name]
    recipient = f"user@{domain(name)}"
    bad.script = case.script
    subject = unique()
    queue_id = send(mta, message(subject), [recipient])
    scenario.sent = scenario.accepted = 1

    # Others are served meanwhile; for a stall, while the stalled session is open.
    if case.stall:
        stalled = bad.open_session()
    arrived = healthy_meanwhile(world)
    scenario.sent += 1
    scenario.accepted += 1
    if case.stall:
        assert stalled.closed is None or stalled.closed > arrived, "healthy mail waited"

    row = attempted(mta, queue_id)
    assert row["state"] == "ready"
    last_reply = str(row["last_reply"])
    assert last_reply.startswith(f"451 {case.status} "), last_reply
    assert case.words in last_reply, last_reply
    assert bad.relay in last_reply, last_reply

    bad.script = HEALTHY
    bad.wait_for(subject)
    gone(mta, queue_id)

    history = outcomes(mta, queue_id, recipient)
    deferrals = [n for n, status in history if status == "deferred"]
    assert deferrals and history[-1] == (len(deferrals) + 1, "sent"), history
    assert all(status in ("deferred", "sent") for _, status in history), history
    copies = bad.copies(subject)
    if case.data_sent:
        # One copy per attempt that got through the data: at least once, never lost.
        assert len(copies) == len(deferrals) + 1, (copies, history)
    else:
        assert len(copies) == 1, copies
    no_bounces(world.good)
    scenario.delivered = 2
    scenario.duplicated = len(copies) - 1
    extra = (
        f", {len(copies) - 1} extra copy(ies) from attempts that reached the end of the data"
        if case.data_sent
        else ""
    )
    scenario.checked = (
        f"receiver {case.what}: deferred {case.status} ({len(deferrals)} attempt(s)), other "
        f"mail delivered meanwhile, delivered once it behaves{extra}"
    )


def test_slow_receiver_within_the_timeouts_delivers_first_time(
    world: World, scenario: Scenario
) -> None:
    # Every reply byte by byte: each reply well within command_timeout, the
    # whole session longer than it.
    mta, bad = world.mta, world.receivers["slow"]
    bad.script = Script(byte_delay=0.015)
    subject = unique()
    recipient = f"slow@{domain('slow')}"
    queue_id = send(mta, message(subject), [recipient])
    session = bad.open_session()
    healthy_meanwhile(world)
    kept = bad.wait_for(subject, timeout=20)
    gone(mta, queue_id)
    assert outcomes(mta, queue_id, recipient) == [(1, "sent")]
    assert kept.recipients == [recipient] and len(bad.copies(subject)) == 1
    # The session (greeting to the end of data) took longer than one command_timeout.
    assert bad.kept[-1] is kept and time.monotonic() - session.opened > COMMAND_TIMEOUT
    scenario.sent = scenario.accepted = scenario.delivered = 2
    scenario.checked = (
        "replies sent byte by byte (each within command_timeout, the session longer): "
        "delivered on the first attempt, healthy mail delivered meanwhile"
    )


def test_4xx_for_some_recipients_retries_only_those(world: World, scenario: Scenario) -> None:
    mta, bad = world.mta, world.receivers["partial"]
    bad.script = Script(defer_rcpt="later")
    subject = unique()
    ok = [f"ok1@{domain('partial')}", f"ok2@{domain('partial')}"]
    later = [f"later1@{domain('partial')}", f"later2@{domain('partial')}"]
    queue_id = send(mta, message(subject), [ok[0], later[0], ok[1], later[1]])
    first = bad.wait_for(subject)
    assert first.recipients == ok

    row = attempted(mta, queue_id)
    assert row["recipients"] == later
    assert str(row["last_reply"]).startswith(f"450 4.2.1 <{later[0]}>"), row

    bad.script = HEALTHY
    eventually(lambda: len(bad.copies(subject)) >= 2, 15, "the retry of the deferred recipients")
    gone(mta, queue_id)
    assert [kept.recipients for kept in bad.copies(subject)] == [ok, later]
    for recipient in ok:
        assert outcomes(mta, queue_id, recipient) == [(1, "sent")]
    for recipient in later:
        history = outcomes(mta, queue_id, recipient)
        assert history[0] == (1, "deferred") and history[-1][1] == "sent", history
    no_bounces(world.good)
    scenario.sent = scenario.accepted = scenario.delivered = 1
    scenario.checked = (
        "450 for 2 of 4 recipients: the other 2 delivered once at the first attempt, "
        "only the 2 deferred ones retried and delivered once, no bounce"
    )


@pytest.mark.parametrize(
    ("key", "status", "words"),
    [
        ("tls_broken", "4.7.5", "TLS handshake with"),
        ("tls_none", "4.7.4", "TLS is required, but was not offered"),
    ],
    ids=["handshake_fails", "not_offered"],
)
def test_tls_failure_plaintext_unless_required(
    world: World, scenario: Scenario, key: str, status: str, words: str
) -> None:
    mta, bad = world.mta, world.receivers[key]
    bad.script = Script(starttls="broken" if key == "tls_broken" else "")
    plain, secured = unique(), unique()
    plain_id = send(mta, message(plain), [f"user@{domain(key)}"])
    secure_id = send(mta, message(secured), [f"user@{secure(key)}"])

    # Opportunistic TLS: the same server again, in plaintext, at once.
    assert not bad.wait_for(plain).tls
    # Required TLS: deferred.
    row = attempted(mta, secure_id)
    assert str(row["last_reply"]).startswith(f"451 {status} "), row
    assert words in str(row["last_reply"]), row
    assert bad.copies(secured) == []

    bad.script = Script(starttls="good")
    assert bad.wait_for(secured).tls
    gone(mta, plain_id, secure_id)
    assert outcomes(mta, plain_id, f"user@{domain(key)}") == [(1, "sent")]
    history = outcomes(mta, secure_id, f"user@{secure(key)}")
    assert history[0] == (1, "deferred") and history[-1][1] == "sent", history
    assert len(bad.copies(plain)) == len(bad.copies(secured)) == 1
    no_bounces(world.good)
    scenario.sent = scenario.accepted = scenario.delivered = 2
    scenario.checked = (
        f"STARTTLS {'handshake fails' if key == 'tls_broken' else 'not offered'}: delivered "
        f"in plaintext at once; the require_tls domain deferred with {status}, "
        "delivered over TLS once it works"
    )
