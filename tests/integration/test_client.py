"""The SMTP client (mta.outbound.smtp_client) against real servers on loopback.

What needs a real peer: sockets, failing over between addresses, timeouts,
TLS, the connection pool. What is sent for a message and what each reply
means (pipelining, RSET, the 421 rules) is tested without sockets in
tests/unit/test_smtp_transaction.py.

Receiving MXes are Postfix's smtp-sink (tests/harness/sink.py) on
127.0.0.10 and 127.0.0.11. What smtp-sink cannot do (STARTTLS, let a test
close a session from the server's side) is done by a small aiosmtpd server
on 127.0.0.12, and servers that hang by a few lines of asyncio. Every test
is bounded with asyncio.wait_for.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiosmtpd.controller import Controller

from mta.mail.reply import Reply
from mta.outbound.routes import MxHost, Route
from mta.outbound.smtp_client import OPPORTUNISTIC, ClientSettings, Deliverer, Delivery
from mta.policy.tls import Level, TlsPolicy
from tests.harness.mta import make_certificate
from tests.harness.poll import eventually as wait_until
from tests.harness.sink import Sink, free_port

pytestmark = pytest.mark.integration

T = TypeVar("T")
MX1, MX2, PEER = "127.0.0.10", "127.0.0.11", "127.0.0.12"
BOUND = 10.0  # seconds any one test's client work may take
ENCRYPT = TlsPolicy(Level.ENCRYPT, "config")

MESSAGE = (
    b"From: App <app@example.test>\r\n"
    b"To: user@example.net\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b"\r\n"
    b"  indented line\r\n"
    b"last line\r\n"
)

# Lines a naive sender would end the data at, or unstuff wrongly; and no
# line break at the very end (the client must add one before the dot).
DOTS = (
    b"From: App <app@example.test>\r\n"
    b"Subject: dots\r\n"
    b"\r\n"
    b".\r\n"
    b"..x\r\n"
    b".\r\n"
    b"...\r\n"
    b"a line\r\n"
    b". \r\n"
    b".\r\n"
    b"."
)


def run(coroutine: Awaitable[T], bound: float = BOUND) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, bound)

    return asyncio.run(bounded())


def route(*hosts: tuple[str, str, int], domain: str = "example.net") -> Route:
    """A route over (name, address, port) hosts, in order."""
    return Route(
        domain,
        tuple(
            MxHost(name, 10 * index, (address,), port)
            for index, (name, address, port) in enumerate(hosts)
        ),
    )


def sink_route(*sinks: Sink, domain: str = "example.net") -> Route:
    return route(
        *((f"mx{n}.example.test", s.host, s.port) for n, s in enumerate(sinks, 1)), domain=domain
    )


def settings(**overrides: Any) -> ClientSettings:
    base: dict[str, Any] = {
        "helo": "client.example.test",
        "connect_timeout": 2.0,
        "command_timeout": 3.0,
        "data_timeout": 3.0,
    }
    return ClientSettings(**(base | overrides))


async def deliver_once(
    target: Route,
    sender: str = "app@example.test",
    recipients: tuple[str, ...] = ("user@example.net",),
    data: bytes = MESSAGE,
    tls: TlsPolicy = OPPORTUNISTIC,
    **overrides: Any,
) -> Delivery:
    deliverer = Deliverer(settings(**overrides))
    try:
        return await deliverer.deliver(target, sender, recipients, data, tls=tls)
    finally:
        await deliverer.close()


@pytest.fixture
def sinks(tmp_path: Path) -> Iterator[Callable[..., Sink]]:
    """Start smtp-sinks: sinks(host, *options); all are stopped at the end."""
    started: list[Sink] = []

    def start(host: str = MX1, *options: str) -> Sink:
        sink = Sink(tmp_path / f"sink{len(started)}", host=host, options=options)
        started.append(sink.start())
        return sink

    yield start
    for sink in started:
        sink.stop()


def refused_port(host: str) -> tuple[str, int]:
    return host, free_port(host)


# --- an aiosmtpd peer for what smtp-sink cannot do ---


@dataclass
class Received:
    sender: str
    recipients: list[str]
    options: list[str]
    data: bytes
    tls: bool
    peer: tuple[str, int]


@dataclass
class PeerHandler:
    """Refuses senders and recipients whose local part starts with "bad"
    (tests/integration/test_delivery.py and test_suppression.py rely on it);
    records every message and every session."""

    messages: list[Received] = field(default_factory=list)
    sessions: list[Any] = field(default_factory=list)  # aiosmtpd SMTP objects, one per connection

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        if server not in self.sessions:
            self.sessions.append(server)
        session.host_name = hostname
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address.split("@")[0].startswith("bad"):
            return f"550 5.7.1 <{address}>: Sender address rejected: not today"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address.split("@")[0].startswith("bad"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                list(envelope.mail_options),
                envelope.original_content,
                session.ssl is not None,
                session.peer,
            )
        )
        return "250 2.0.0 Ok: queued"


class Peer:
    """aiosmtpd in its own thread on PEER:port, optionally offering STARTTLS."""

    def __init__(self, tls_context: ssl.SSLContext | None = None) -> None:
        self.handler = PeerHandler()
        self.port = free_port(PEER)
        extra: dict[str, Any] = {}
        if tls_context is not None:
            extra = {"tls_context": tls_context, "require_starttls": False}
        self.controller = Controller(
            self.handler, hostname=PEER, port=self.port, server_hostname="peer.test", **extra
        )

    def __enter__(self) -> Peer:
        self.controller.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.controller.stop()

    def route(self, domain: str = "example.net") -> Route:
        return route(("peer.example.test", PEER, self.port), domain=domain)

    def close_sessions(self) -> list[tuple[str, int]]:
        """Close every open session from the server's side; the clients' (addr, port)."""
        closed: list[tuple[str, int]] = []
        done = threading.Event()

        def close() -> None:
            for server in self.handler.sessions:
                if server.transport is not None:
                    closed.append(server.session.peer)
                    server.transport.close()
            done.set()

        self.controller.loop.call_soon_threadsafe(close)
        assert done.wait(5)
        wait_until(
            lambda: all(server.transport is None for server in self.handler.sessions),
            5,
            "the peer to close its sessions",
        )
        return closed


def tcp_state(local: tuple[str, int]) -> str | None:
    """The kernel's state of the IPv4 TCP socket bound to ``local`` (hex, "08" = CLOSE_WAIT)."""
    packed = socket.inet_aton(local[0])
    wanted = f"{int.from_bytes(packed, 'little'):08X}:{local[1]:04X}"
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == wanted:
                return fields[3]
    return None


# --- delivering ---


def test_message_arrives_byte_for_byte(sinks: Callable[..., Sink]) -> None:
    sink = sinks(MX1)
    attempt = run(deliver_once(sink_route(sink)))
    assert attempt.relay == f"mx1.example.test[{MX1}]:{sink.port}"
    assert str(attempt.replies["user@example.net"]).startswith("250 2.0.0")
    (dumped,) = sink.wait_for_messages(1)
    assert dumped.data == MESSAGE
    assert dumped.sender == "app@example.test"
    assert dumped.recipients == ("user@example.net",)
    assert dumped.helo == "client.example.test"


def test_dot_stuffing_is_exact(sinks: Callable[..., Sink]) -> None:
    sink = sinks(MX1)
    starts_with_dot = b".\r\n..\r\n.x\r\n"  # dots from the very first byte of the data

    async def both() -> tuple[Delivery, Delivery]:
        return await asyncio.gather(
            deliver_once(sink_route(sink), recipients=("dots@example.net",), data=DOTS),
            deliver_once(sink_route(sink), recipients=("start@example.net",), data=starts_with_dot),
        )

    attempts = run(both())
    assert all(reply.code == 250 for a in attempts for reply in a.replies.values())
    by_rcpt = {d.recipients[0]: d.data for d in sink.wait_for_messages(2)}
    # What was sent, plus the CRLF that must precede the final dot.
    assert by_rcpt["dots@example.net"] == DOTS + b"\r\n"
    assert by_rcpt["start@example.net"] == starts_with_dot


def test_dot_stuffing_is_exact_for_aiosmtpd_too() -> None:
    with Peer() as peer:
        attempt = run(deliver_once(peer.route(), data=DOTS))
        assert attempt.replies["user@example.net"].code == 250
        assert peer.handler.messages[0].data == DOTS + b"\r\n"


def test_8bitmime_to_smtp_sink_and_source_address(sinks: Callable[..., Sink]) -> None:
    sink = sinks(MX1)  # smtp-sink offers 8BITMIME, not SIZE
    eight_bit = MESSAGE.replace(b"Hello,", "Grüße,".encode())
    attempt = run(deliver_once(sink_route(sink), data=eight_bit, source_address="127.0.0.5"))
    assert attempt.replies["user@example.net"].code == 250
    (dumped,) = sink.wait_for_messages(1)
    assert dumped.mail_args == "<app@example.test> BODY=8BITMIME"
    assert dumped.client_addr == "127.0.0.5"
    assert dumped.data == eight_bit


# --- which server, and what when none ---


def test_first_mx_down_second_used(sinks: Callable[..., Sink]) -> None:
    sink = sinks(MX2)
    down = refused_port(MX1)
    target = route(("mx1.example.test", *down), ("mx2.example.test", sink.host, sink.port))
    attempt = run(deliver_once(target))
    assert attempt.relay == f"mx2.example.test[{MX2}]:{sink.port}"
    assert attempt.replies["user@example.net"].code == 250
    assert len(sink.wait_for_messages(1)) == 1


def test_all_mx_down_is_temporary_for_every_recipient() -> None:
    down1, down2 = refused_port(MX1), refused_port(MX2)
    target = route(("mx1.example.test", *down1), ("mx2.example.test", *down2))
    attempt = run(deliver_once(target, recipients=("a@example.net", "b@example.net")))
    assert attempt.relay == "none"
    expected = Reply(
        451, f"4.4.1 connect to mx2.example.test[{MX2}]:{down2[1]}: Connection refused"
    )
    assert attempt.replies == {"a@example.net": expected, "b@example.net": expected}


@pytest.mark.parametrize(
    "options",
    [
        ("-f", "CONNECT"),  # 5xx greeting
        ("-r", "EHLO,HELO"),  # 4xx to EHLO and to HELO
        ("-Q", "MAIL"),  # 421 and hang up at MAIL
        ("-Q", "RCPT"),
        ("-Q", "DATA"),
        ("-q", "RCPT"),  # hang up without a reply
    ],
)
def test_unavailable_server_fails_over(
    sinks: Callable[..., Sink], options: tuple[str, ...]
) -> None:
    bad, good = sinks(MX1, *options), sinks(MX2)
    attempt = run(deliver_once(sink_route(bad, good)))
    assert attempt.relay == f"mx2.example.test[{MX2}]:{good.port}"
    assert attempt.replies["user@example.net"].code == 250
    assert len(good.wait_for_messages(1)) == 1


def test_unavailable_last_server_is_temporary(sinks: Callable[..., Sink]) -> None:
    bad = sinks(MX1, "-Q", "MAIL")
    attempt = run(deliver_once(sink_route(bad)))
    reply = attempt.replies["user@example.net"]
    assert attempt.relay == f"mx1.example.test[{MX1}]:{bad.port}"
    assert reply.code == 451 and reply.status.startswith("4.")
    assert f"host mx1.example.test[{MX1}]:{bad.port} said: 421" in reply.text
    assert "MAIL FROM" in reply.text


def test_ehlo_refused_falls_back_to_helo(sinks: Callable[..., Sink]) -> None:
    sink = sinks(MX1, "-f", "EHLO")
    attempt = run(deliver_once(sink_route(sink)))
    assert attempt.replies["user@example.net"].code == 250
    (dumped,) = sink.wait_for_messages(1)
    assert dumped.data == MESSAGE


# --- servers that hang ---


def test_silent_server_times_out() -> None:
    async def scenario() -> Delivery:
        async def accept_and_sleep(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await asyncio.sleep(BOUND)

        server = await asyncio.start_server(accept_and_sleep, PEER, 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await deliver_once(route(("slow.example.test", PEER, port)), command_timeout=0.3)

    attempt = run(scenario())
    reply = attempt.replies["user@example.net"]
    assert reply.code == 451 and reply.status == "4.4.2"
    assert "timed out while receiving the initial server greeting" in reply.text


def scripted(
    script: dict[bytes, bytes | None], pipelining: bool = False
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A server answering each verb (b"CONNECT" for the greeting, b"." for the
    end of data) as ``script`` says, None meaning never; 250 to the rest.
    Offers PIPELINING if asked."""
    offer = b"250-PIPELINING\r\n" if pipelining else b""
    defaults: dict[bytes, bytes | None] = {
        b"CONNECT": b"220 scripted.test ESMTP\r\n",
        b"EHLO": b"250-scripted.test\r\n" + offer + b"250 8BITMIME\r\n",
        b"DATA": b"354 go ahead\r\n",
        b"QUIT": b"221 2.0.0 bye\r\n",
    }

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def say(verb: bytes) -> bytes:
            reply = script.get(verb, defaults.get(verb, b"250 2.0.0 ok\r\n"))
            if reply is None:
                await asyncio.sleep(BOUND)
                return b""
            writer.write(reply)
            return reply

        await say(b"CONNECT")
        in_data = False
        while line := await reader.readline():
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    await say(b".")
                continue
            verb = line.split(b":")[0].split()[0].upper() if line.strip() else b""
            reply = await say(verb)
            in_data = verb == b"DATA" and reply.startswith(b"354")

    return serve


async def serving(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    scenario: Callable[[Route], Awaitable[T]],
) -> T:
    """Run ``scenario`` with a route to ``handler`` served on PEER."""
    server = await asyncio.start_server(handler, PEER, 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        return await scenario(route(("odd.example.test", PEER, port)))


@pytest.mark.parametrize("pipelining", [False, True])
@pytest.mark.parametrize(
    ("script", "failover", "status", "words"),
    [
        ({b"CONNECT": b"hello there\r\n"}, True, "", ""),  # garbled greeting
        ({b"RCPT": None}, True, "", ""),  # never answers RCPT
        ({b".": None}, False, "4.4.2", "timed out while sending the message"),
    ],
)
def test_misbehaving_server(
    sinks: Callable[..., Sink],
    script: dict[bytes, bytes | None],
    failover: bool,
    status: str,
    words: str,
    pipelining: bool,
) -> None:
    """Before the message data, the next MX; after it (it may have arrived),
    temporary. The other ways to misbehave are in tests/unit/test_smtp_transaction.py."""
    second = sinks(MX2)

    async def scenario() -> tuple[Delivery, int]:
        server = await asyncio.start_server(scripted(script, pipelining), PEER, 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            target = route(
                ("odd.example.test", PEER, port), ("mx2.example.test", second.host, second.port)
            )
            attempt = await deliver_once(target, command_timeout=0.3, data_timeout=0.3)
            return attempt, port

    attempt, port = run(scenario())
    reply = attempt.replies["user@example.net"]
    if failover:
        assert attempt.relay == f"mx2.example.test[{MX2}]:{second.port}"
        assert reply.code == 250
        assert len(second.wait_for_messages(1)) == 1
    else:
        assert attempt.relay == f"odd.example.test[{PEER}]:{port}"
        assert reply.code == 451 and reply.status == status
        assert words in reply.text
        assert second.messages() == []


@pytest.mark.parametrize("delay", [0.0, 0.2])
def test_a_reply_nobody_asked_for_retires_the_connection(delay: float) -> None:
    """A server that says more than it was asked (right after the final reply,
    or later while the connection is pooled) is out of step: the next message
    goes over a new connection, never pairing the stray reply with MAIL."""
    sessions: list[int] = []

    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sessions.append(1)
        writer.write(b"220 chatty.test ESMTP\r\n")
        while line := await reader.readline():
            if line.startswith(b"EHLO"):
                writer.write(b"250-chatty.test\r\n250 PIPELINING\r\n")
            elif line.startswith(b"DATA"):
                writer.write(b"354 go ahead\r\n")
                await reader.readuntil(b"\r\n.\r\n")
                writer.write(b"250 2.0.0 queued\r\n")
                await asyncio.sleep(delay)
                writer.write(b"250 2.0.0 and again\r\n")
            elif line.startswith(b"QUIT"):
                writer.write(b"221 bye\r\n")
            else:
                writer.write(b"250 ok\r\n")

    async def twice(target: Route) -> list[Delivery]:
        deliverer = Deliverer(settings())
        attempts = []
        for _ in range(2):
            attempts.append(await deliverer.deliver(target, "a@x.test", ["b@x.test"], MESSAGE))
            await asyncio.sleep(2 * delay)
        await deliverer.close()
        return attempts

    attempts = run(serving(chatty, twice))
    assert [str(a.replies["b@x.test"]) for a in attempts] == ["250 2.0.0 queued"] * 2
    assert len(sessions) == 2


# --- connection reuse ---


def test_connection_reused(sinks: Callable[..., Sink]) -> None:
    sink = sinks(MX1)

    async def scenario() -> None:
        deliverer = Deliverer(settings())
        for n in range(5):
            attempt = await deliverer.deliver(
                sink_route(sink), "a@x.test", [f"{n}@x.test"], MESSAGE
            )
            assert attempt.replies[f"{n}@x.test"].code == 250
        # Three at once need three connections (one is pooled, two are new);
        # three more at once reuse them.
        for batch in range(2):
            await asyncio.gather(
                *(
                    deliverer.deliver(sink_route(sink), "a@x.test", [f"{batch}{n}@x.test"], MESSAGE)
                    for n in range(3)
                )
            )
        await deliverer.close()

    run(scenario())
    counters = sink.wait_for_counters(lambda c: c.quits >= 3 and c.messages >= 11)
    assert (counters.sessions, counters.quits, counters.messages) == (3, 3, 11)


def test_max_messages_per_connection(sinks: Callable[..., Sink]) -> None:
    sink = sinks(MX1)

    async def scenario() -> None:
        deliverer = Deliverer(settings(max_messages_per_connection=2))
        for n in range(5):
            await deliverer.deliver(sink_route(sink), "a@x.test", [f"{n}@x.test"], MESSAGE)
        await deliverer.close()

    run(scenario())
    counters = sink.wait_for_counters(lambda c: c.quits >= 3 and c.messages >= 5)
    assert (counters.sessions, counters.quits, counters.messages) == (3, 3, 5)


def test_idle_connection_is_closed(sinks: Callable[..., Sink]) -> None:
    sink = sinks(MX1)

    async def scenario() -> None:
        deliverer = Deliverer(settings(idle_timeout=0.1))
        await deliverer.deliver(sink_route(sink), "a@x.test", ["b@x.test"], MESSAGE)
        # Not closed by us: the idle timer must QUIT it.
        await asyncio.to_thread(sink.wait_for_counters, lambda c: c.quits >= 1)
        await deliverer.close()

    run(scenario())
    assert sink.counters().sessions == 1


def test_pool_is_bounded(sinks: Callable[..., Sink]) -> None:
    sink = sinks(MX1)

    async def scenario() -> None:
        deliverer = Deliverer(settings(max_idle_per_address=1))
        await asyncio.gather(
            *(
                deliverer.deliver(sink_route(sink), "a@x.test", [f"{n}@x.test"], MESSAGE)
                for n in range(3)
            )
        )
        # Only one of the three may stay: the other two QUIT without close().
        await asyncio.to_thread(sink.wait_for_counters, lambda c: c.quits >= 2)
        await deliverer.close()

    run(scenario())
    assert sink.wait_for_counters(lambda c: c.quits >= 3).sessions == 3


def test_server_closed_idle_connection_noticed() -> None:
    with Peer() as peer:

        async def scenario() -> Delivery:
            deliverer = Deliverer(settings())
            await deliverer.deliver(peer.route(), "a@x.test", ["one@x.test"], MESSAGE)
            (client,) = peer.close_sessions()
            # Let our event loop see the close before the next delivery.
            while tcp_state(client) not in (None, "06"):  # gone, or TIME_WAIT
                await asyncio.sleep(0.01)
            attempt = await deliverer.deliver(peer.route(), "a@x.test", ["two@x.test"], MESSAGE)
            await deliverer.close()
            return attempt

        attempt = run(scenario())
        assert attempt.replies["two@x.test"].code == 250
        assert len(peer.handler.sessions) == 2
        assert len(peer.handler.messages) == 2


def test_server_closed_idle_connection_found_on_first_command(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mta.outbound.client")
    with Peer() as peer:

        async def scenario() -> Delivery:
            deliverer = Deliverer(settings())
            await deliverer.deliver(peer.route(), "a@x.test", ["one@x.test"], MESSAGE)
            (client,) = peer.close_sessions()
            # Block this event loop (no await) until the kernel has the server's
            # FIN: the pooled connection still looks open to the client, and
            # the next MAIL finds it closed.
            wait_until(lambda: tcp_state(client) == "08", 5, "CLOSE_WAIT")
            attempt = await deliverer.deliver(peer.route(), "a@x.test", ["two@x.test"], MESSAGE)
            await deliverer.close()
            return attempt

        attempt = run(scenario())
        assert attempt.replies["two@x.test"].code == 250
        assert len(peer.handler.sessions) == 2
        assert [m.recipients for m in peer.handler.messages] == [["one@x.test"], ["two@x.test"]]
    assert "stale: closed by the server while pooled" in caplog.text


def test_pooled_connection_tried_first(sinks: Callable[..., Sink]) -> None:
    mx1, mx2 = sinks(MX1), sinks(MX2)

    async def scenario() -> list[Delivery]:
        deliverer = Deliverer(settings())
        # A route through mx2 only leaves a connection to mx2 in the pool...
        first = await deliverer.deliver(sink_route(mx2), "a@x.test", ["b@x.test"], MESSAGE)
        # ...which a route listing mx1 first uses rather than connecting to mx1.
        second = await deliverer.deliver(sink_route(mx1, mx2), "a@x.test", ["b@x.test"], MESSAGE)
        await deliverer.close()
        return [first, second]

    attempts = run(scenario())
    assert [a.relay.split("[")[1] for a in attempts] == [f"{MX2}]:{mx2.port}"] * 2
    assert mx1.counters().sessions == 0
    assert mx2.wait_for_counters(lambda c: c.quits >= 1).sessions == 1


# --- TLS ---


@pytest.fixture(scope="module")
def server_tls(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    cert, key = make_certificate(tmp_path_factory.mktemp("tls"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def test_opportunistic_starttls(server_tls: ssl.SSLContext) -> None:
    with Peer(server_tls) as peer:
        attempt = run(deliver_once(peer.route()))
        (received,) = peer.handler.messages
    assert attempt.replies["user@example.net"].code == 250
    assert received.tls
    assert received.data == MESSAGE


def test_require_tls_with_tls(server_tls: ssl.SSLContext) -> None:
    with Peer(server_tls) as peer:
        attempt = run(deliver_once(peer.route(), tls=ENCRYPT))
        assert attempt.replies["user@example.net"].code == 250
        assert peer.handler.messages[0].tls


def test_require_tls_without_starttls_fails_over(
    sinks: Callable[..., Sink], server_tls: ssl.SSLContext
) -> None:
    sink = sinks(MX1)  # smtp-sink offers no STARTTLS
    with Peer(server_tls) as peer:
        target = route(
            ("mx1.example.test", sink.host, sink.port), ("peer.example.test", PEER, peer.port)
        )
        attempt = run(deliver_once(target, tls=ENCRYPT))
        assert attempt.relay == f"peer.example.test[{PEER}]:{peer.port}"
        assert peer.handler.messages[0].tls
        # Without that policy, the same route may go in plaintext to mx1.
        plain = run(deliver_once(target))
        assert plain.relay.startswith("mx1.example.test")
    alone = run(deliver_once(sink_route(sink), tls=ENCRYPT))
    reply = alone.replies["user@example.net"]
    assert reply.code == 451 and reply.status == "4.7.4"
    assert "TLS is required, but was not offered" in reply.text
    assert sink.wait_for_messages(1)[0].recipients == ("user@example.net",)


def test_tls_handshake_failure(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    broken = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    broken.load_cert_chain(cert, key)
    broken.set_ciphers("aNULL")  # nothing a client would accept
    broken.maximum_version = ssl.TLSVersion.TLSv1_2
    with Peer(broken) as peer:
        # Opportunistic: the same server again, in plaintext.
        attempt = run(deliver_once(peer.route()))
        assert attempt.replies["user@example.net"].code == 250
        assert not peer.handler.messages[0].tls
        # Required: a temporary failure.
        required = run(deliver_once(peer.route(), tls=ENCRYPT))
    reply = required.replies["user@example.net"]
    assert reply.code == 451 and reply.status == "4.7.5"
