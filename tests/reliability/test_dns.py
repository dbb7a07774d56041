"""DNS that misbehaves, end to end through the running daemon.

The daemon asks one name server: a small proxy in this test (UDP and TCP on
one port, dnspython building the messages) in front of two NSD servers. By
default it forwards to the first NSD, whose zones have what the tests need,
including SERVFAIL zones. Per name (and everything under it) the test can
tell it to:

- ``drop``: read the query and never answer (a name server that times out);
- ``truncate``: answer over UDP with TC=1 and nothing else, so the resolver
  must ask again over TCP, which the proxy forwards;
- ``truncate_no_tcp``: the same, but close TCP connections without a word;
- ``healed``: forward to the second NSD, which serves the SERVFAIL zones'
  records (the broken zone has been fixed).

Routing rules checked (docs/architecture.md: temporary failures wait and
retry, permanent ones bounce with a DSN): a DNS timeout or SERVFAIL, for the MX records or
for an MX host's addresses, defers (4.4.3) and never bounces, and mail
flows once the DNS recovers; a truncated answer is asked again over TCP and
delivered at once; MX hosts that do not exist (NXDOMAIN) bounce with 5.1.2
and a DSN to the sender, unless another MX host works; an MX host where
nothing listens defers (4.4.1) until something does. Meanwhile, mail for
healthy domains is resolved and delivered without waiting for a stalled
lookup.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import threading
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from tests.harness.client import send
from tests.harness.dns_server import DnsServer, free_udp_and_tcp_port
from tests.harness.mta import Mta
from tests.harness.poll import eventually
from tests.harness.sink import Dumped, Sink, free_port
from tests.reliability.conftest import Scenario

pytestmark = pytest.mark.integration

MX, BOUNCES, DEAD = "127.0.4.1", "127.0.4.2", "127.0.4.3"
RETRY = 0.5  # retry_first = retry_max
DNS_TIMEOUT = 5.0  # the resolver's lifetime for one lookup (not configurable)

MX_RECORDS = {
    "example.test": [(10, "mx.example.test")],  # where bounces go
    "ok.test": [(10, "mx.ok.test")],
    "stall.test": [(10, "mx.ok.test")],  # the proxy drops its queries
    # One MX host does not exist, the other's lookups are dropped (another
    # zone, so NSD sends no additional addresses and it is asked for).
    "mixed.test": [(10, "nothere.mixed.test"), (20, "mx.slow.invalid")],
    "hostsf.test": [(10, "mx.brokenzone.invalid")],  # the MX host's zone: SERVFAIL
    "halfsf.test": [(10, "mx.brokenzone.invalid"), (20, "mx.ok.test")],
    "tc.test": [(10, "mx.ok.test")],
    "tcfail.test": [(10, "mx.ok.test")],
    "ghost.test": [(10, "nothere.ghost.test")],
    "halfghost.test": [(10, "nothere.halfghost.test"), (20, "mx.ok.test")],
    "dead.test": [(10, "mx.dead.test")],
}
A_RECORDS = {
    "mx.example.test": BOUNCES,
    "mx.ok.test": MX,
    "mx.slow.invalid": MX,
    "mx.dead.test": DEAD,
}
# What the first NSD cannot load (SERVFAIL); the second serves these records.
SERVFAIL = ["broken.test", "brokenzone.invalid"]
HEALED_MX = {"broken.test": [(10, "mx.ok.test")]}
HEALED_A = {"mx.brokenzone.invalid": MX}


class DnsProxy:
    """A name server on 127.0.0.1 (UDP and TCP) that forwards to NSD, or misbehaves."""

    def __init__(self, upstream: int, healed: int) -> None:
        self.upstream = upstream
        self.healed = healed
        self.port = free_udp_and_tcp_port()
        self.rules: dict[str, str] = {}  # name -> what to do for it and below it
        self.seen: list[tuple[str, str, str]] = []  # (udp|tcp, name, type) of each query
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._tasks: set[asyncio.Task[None]] = set()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    def __enter__(self) -> DnsProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def queried(self, name: str, rdtype: str = "MX") -> set[str]:
        """The transports ``name`` was asked for over."""
        return {transport for transport, n, t in list(self.seen) if (n, t) == (name, rdtype)}

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        proxy = self

        class Udp(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
                proxy._spawn(proxy._udp_reply(data, addr))

        transport, _ = await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", self.port))
        self._udp = transport
        self._tcp = await asyncio.start_server(self._tcp_session, "127.0.0.1", self.port)

    async def _stop(self) -> None:
        assert self._udp is not None and self._tcp is not None
        self._udp.close()
        self._tcp.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coroutine: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _rule(self, name: str) -> str:
        for suffix, action in list(self.rules.items()):
            if name == suffix or name.endswith("." + suffix):
                return action
        return "forward"

    async def _answer(self, wire: bytes, transport: str) -> bytes | None:
        """The reply to one query, or None for none."""
        query = dns.message.from_wire(wire)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        self.seen.append((transport, name, dns.rdatatype.to_text(question.rdtype)))
        action = self._rule(name)
        if action == "drop":
            return None
        if action in ("truncate", "truncate_no_tcp"):
            if transport == "udp":
                truncated = dns.message.make_response(query)
                truncated.flags |= dns.flags.TC
                return truncated.to_wire()
            if action == "truncate_no_tcp":
                return None
        port = self.healed if action == "healed" else self.upstream
        if transport == "udp":
            response = await dns.asyncquery.udp(query, "127.0.0.1", timeout=2, port=port)
        else:
            response = await dns.asyncquery.tcp(query, "127.0.0.1", timeout=2, port=port)
        return response.to_wire()

    async def _udp_reply(self, wire: bytes, addr: tuple[str | object, int]) -> None:
        reply = await self._answer(wire, "udp")
        if reply is not None and self._udp is not None:
            self._udp.sendto(reply, addr)

    async def _tcp_session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                length = int.from_bytes(await reader.readexactly(2), "big")
                reply = await self._answer(await reader.readexactly(length), "tcp")
                if reply is None:
                    break
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@dataclass
class World:
    mta: Mta
    proxy: DnsProxy
    mx: Sink
    bounces: Sink
    port: int  # every MX host's SMTP port
    root: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("dns")
    port = free_port(MX)
    broken = DnsServer(mx=MX_RECORDS, a=A_RECORDS, servfail=SERVFAIL, ttl=60)
    fixed = DnsServer(mx=MX_RECORDS | HEALED_MX, a=A_RECORDS | HEALED_A, ttl=60)
    with (
        broken,
        fixed,
        DnsProxy(broken.port, fixed.port) as proxy,
        Sink(root / "mx", MX, port) as mx,
        Sink(root / "bounces", BOUNCES, port) as bounces,
    ):
        mta = Mta(tmp_path_factory.mktemp("mta"))
        mta.server["hostname"] = "mta.example.test"
        mta.park_mail = False
        mta.delivery |= {
            "nameservers": [f"127.0.0.1:{proxy.port}"],
            "smtp_port": port,
            "allow_private_mx": True,
            "connect_timeout": 1,
            "command_timeout": 2,
            "retry_first": RETRY,
            "retry_max": RETRY,
            "connection_idle_timeout": 1,
        }
        mta.start()
        try:
            yield World(mta, proxy, mx, bounces, port, root)
            mta.wait_for_empty_spool()
        finally:
            if mta.process is not None:
                code = mta.stop()
                assert code == 0, mta.log()


def message(subject: str) -> bytes:
    return (
        f"From: App <app@example.test>\r\nTo: someone\r\nSubject: {subject}\r\n\r\nHello.\r\n"
    ).encode()


def unique() -> str:
    return f"reliability {uuid.uuid4().hex}"


def copies(sink: Sink, subject: str) -> list[Dumped]:
    return [dumped for dumped in sink.messages() if f"Subject: {subject}".encode() in dumped.data]


def arrives(sink: Sink, subject: str, timeout: float = 20.0) -> Dumped:
    return eventually(lambda: next(iter(copies(sink, subject)), None), timeout, repr(subject))


def attempted(
    mta: Mta, queue_id: str, attempts: int = 1, timeout: float = 20.0
) -> dict[str, object]:
    """The job's queue-list row once it has been attempted ``attempts`` times."""

    def row() -> dict[str, object] | None:
        for listed in mta.queue_list():
            if listed["id"] == queue_id and int(listed["attempts"]) >= attempts:
                return listed
        return None

    return eventually(row, timeout, f"{attempts} attempt(s) of {queue_id}")


def gone(mta: Mta, *queue_ids: str, timeout: float = 20.0) -> None:
    def none_left() -> bool:
        return not any(row["id"] in queue_ids for row in mta.queue_list())

    eventually(none_left, timeout, f"{queue_ids} to leave the spool")


def statuses(mta: Mta, queue_id: str) -> list[str]:
    """The status= of each delivery log line of the message, in order."""
    lines = [line for line in mta.log().splitlines() if f"id={queue_id} to=<" in line]
    return [line.rsplit("status=", 1)[1].split()[0] for line in lines]


def no_bounce(world: World, subject: str) -> None:
    assert copies(world.bounces, subject) == []


def healthy_meanwhile(world: World) -> None:
    subject = unique()
    send(world.mta, message(subject), ["fine@ok.test"])
    arrives(world.mx, subject, timeout=DNS_TIMEOUT - 1)


# --- the scenarios ---


def test_dns_timeout_defers_then_delivers(world: World, scenario: Scenario) -> None:
    mta, proxy = world.mta, world.proxy
    proxy.rules = {"stall.test": "drop", "slow.invalid": "drop"}
    stalled, mixed = unique(), unique()
    stalled_id = send(mta, message(stalled), ["u@stall.test"])
    mixed_id = send(mta, message(mixed), ["u@mixed.test"])
    eventually(lambda: proxy.queried("stall.test"), 5, "the MX query of stall.test")
    eventually(lambda: proxy.queried("mx.slow.invalid", "A"), 5, "the A query of the MX host")

    # The lookups hang for DNS_TIMEOUT; other domains resolve and deliver meanwhile.
    healthy_meanwhile(world)
    assert statuses(mta, stalled_id) == statuses(mta, mixed_id) == [], "healthy mail waited"

    row = attempted(mta, stalled_id)
    assert str(row["last_reply"]) == (
        f"451 4.4.3 cannot look up the MX records of stall.test: no answer within {DNS_TIMEOUT:g} s"
    )
    row = attempted(mta, mixed_id)
    # One MX host does not exist, the other's lookup timed out: temporary, not a bounce.
    assert str(row["last_reply"]).startswith(
        "451 4.4.3 cannot look up the addresses of the MX hosts of mixed.test: mx.slow.invalid: "
    ), row

    proxy.rules = {}
    arrives(world.mx, stalled)
    arrives(world.mx, mixed)
    gone(mta, stalled_id, mixed_id)
    for queue_id, subject in ((stalled_id, stalled), (mixed_id, mixed)):
        history = statuses(mta, queue_id)
        assert history[-1] == "sent" and set(history[:-1]) == {"deferred"}, history
        assert len(copies(world.mx, subject)) == 1
        no_bounce(world, subject)
    scenario.sent = scenario.accepted = scenario.delivered = 3
    scenario.checked = (
        "name server never answers (MX query; an MX host's A query beside an NXDOMAIN host): "
        "deferred 4.4.3, never bounced, healthy domain delivered during the stalled lookup, "
        "delivered once DNS answers"
    )


def test_servfail_defers_never_bounces_then_delivers(world: World, scenario: Scenario) -> None:
    mta, proxy = world.mta, world.proxy
    subjects = {domain: unique() for domain in ("broken.test", "hostsf.test", "halfsf.test")}
    ids = {domain: send(mta, message(s), [f"u@{domain}"]) for domain, s in subjects.items()}

    # One MX host's zone fails, another MX host works: delivered at once.
    arrives(world.mx, subjects["halfsf.test"])
    # The MX records, or the only MX host's addresses, SERVFAIL: deferred, again and again.
    for domain, what in (
        ("broken.test", "the MX records of broken.test"),
        ("hostsf.test", "the addresses of the MX hosts of hostsf.test"),
    ):
        row = attempted(mta, ids[domain], attempts=2)
        reply = str(row["last_reply"])
        assert reply.startswith(f"451 4.4.3 cannot look up {what}"), reply
        assert "answered SERVFAIL" in reply, reply

    proxy.rules = {"broken.test": "healed", "brokenzone.invalid": "healed"}
    try:
        for domain in ("broken.test", "hostsf.test"):
            arrives(world.mx, subjects[domain])
        gone(mta, *ids.values())
    finally:
        proxy.rules = {}
    assert statuses(mta, ids["halfsf.test"]) == ["sent"]
    for domain in ("broken.test", "hostsf.test"):
        history = statuses(mta, ids[domain])
        assert history[-1] == "sent" and set(history[:-1]) == {"deferred"}, history
    for subject in subjects.values():
        assert len(copies(world.mx, subject)) == 1
        no_bounce(world, subject)
    scenario.sent = scenario.accepted = scenario.delivered = 3
    scenario.checked = (
        "NSD SERVFAIL for the MX records, and for the only MX host's zone: deferred 4.4.3 over "
        "several attempts, never bounced, delivered once the zone loads; a domain with one "
        "SERVFAIL MX host and one good one delivered at once"
    )


def test_truncated_answer_is_asked_again_over_tcp(world: World, scenario: Scenario) -> None:
    mta, proxy = world.mta, world.proxy
    proxy.rules = {"tc.test": "truncate", "tcfail.test": "truncate_no_tcp"}
    good, failing = unique(), unique()
    good_id = send(mta, message(good), ["u@tc.test"])
    failing_id = send(mta, message(failing), ["u@tcfail.test"])

    arrives(world.mx, good)
    assert proxy.queried("tc.test") == {"udp", "tcp"}
    row = attempted(mta, failing_id)
    server = f"127.0.0.1@{proxy.port}"
    assert str(row["last_reply"]) == (
        f"451 4.4.3 cannot look up the MX records of tcfail.test: {server} answered truncated "
        f"(TC) over UDP; {server} closed the TCP connection without an answer"
    ), row
    assert proxy.queried("tcfail.test") == {"udp", "tcp"}

    proxy.rules = {}
    arrives(world.mx, failing)
    gone(mta, good_id, failing_id)
    assert statuses(mta, good_id) == ["sent"]
    history = statuses(mta, failing_id)
    assert history[-1] == "sent" and set(history[:-1]) == {"deferred"}, history
    for subject in (good, failing):
        assert len(copies(world.mx, subject)) == 1
        no_bounce(world, subject)
    scenario.sent = scenario.accepted = scenario.delivered = 2
    scenario.checked = (
        "UDP answer with TC=1: asked again over TCP and delivered at the first attempt; "
        "when TCP fails too, deferred 4.4.3, delivered once DNS answers"
    )


def test_mx_host_without_address_bounces_with_a_dsn(world: World, scenario: Scenario) -> None:
    mta = world.mta
    ghost, half = unique(), unique()
    ghost_id = send(mta, message(ghost), ["u@ghost.test"])
    half_id = send(mta, message(half), ["u@halfghost.test"])

    # Another MX host has an address: delivered there.
    arrives(world.mx, half)
    # The only MX host does not exist (NXDOMAIN): a permanent failure, a DSN.
    [dsn] = eventually(lambda: copies(world.bounces, ghost), 20, "the DSN")
    assert dsn.sender == "" and dsn.recipients == ("app@example.test",)
    parsed = email.message_from_bytes(dsn.data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    [status] = [p for p in parsed.walk() if p.get_content_type() == "message/delivery-status"]
    fields = str(status)
    assert "Final-Recipient: rfc822; u@ghost.test" in fields
    assert "Action: failed" in fields and "Status: 5.1.2" in fields
    assert "MX hosts of ghost.test have no addresses" in fields
    gone(mta, ghost_id, half_id)
    assert statuses(mta, ghost_id) == ["bounced"]
    assert statuses(mta, half_id) == ["sent"]
    assert copies(world.mx, ghost) == [] and len(copies(world.mx, half)) == 1
    scenario.sent = scenario.accepted = 2
    scenario.delivered = 1
    scenario.checked = (
        "the only MX host is NXDOMAIN: bounced at the first attempt, 5.1.2 DSN to the sender "
        "delivered, spool empty; with a second MX host that resolves: delivered there"
    )


def test_mx_where_nothing_listens_defers_then_delivers(world: World, scenario: Scenario) -> None:
    mta = world.mta
    subject = unique()
    queue_id = send(mta, message(subject), ["u@dead.test"])
    row = attempted(mta, queue_id)
    assert str(row["last_reply"]) == (
        f"451 4.4.1 connect to mx.dead.test[{DEAD}]:{world.port}: Connection refused"
    )
    healthy_meanwhile(world)
    with Sink(world.root / "dead", DEAD, world.port) as revived:
        arrives(revived, subject)
        gone(mta, queue_id)
        assert len(copies(revived, subject)) == 1
    history = statuses(mta, queue_id)
    assert history[-1] == "sent" and set(history[:-1]) == {"deferred"}, history
    no_bounce(world, subject)
    scenario.sent = scenario.accepted = scenario.delivered = 2
    scenario.checked = (
        "MX host's address has nothing listening: deferred 4.4.1 (connection refused), "
        "healthy mail delivered meanwhile, delivered once a server listens"
    )
