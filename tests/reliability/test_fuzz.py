"""Fuzzing (hypothesis) of everything that parses what clients and servers send.

Pure: no sockets, no sleeps. Each property says what must hold for any
input: no exception escapes, and the output keeps its promises (body bytes
survive, a signature verifies, a DSN has no bare line ending, a reply is one
clean line). The SMTP session fuzz drives aiosmtpd's state machine through
our Session subclass and Handler over an in-memory transport, with a real
LMDB spool and signer, so the commands, DATA and the spool are exercised as
in the daemon, without a socket.

MTA_SOAK=1 runs many more examples per property.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dkim
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mta.config import Config, ServerConfig, parse_host_port
from mta.events.log import EventLog
from mta.inbound.handler import Handler
from mta.inbound.intake import Intake
from mta.inbound.message import Rejected, has_bare_line_ending, prepare
from mta.inbound.server import Session, Sessions
from mta.mail.address import address_is_valid
from mta.mail.header import split_header
from mta.mail.reply import parse_reply
from mta.outbound.dsn import ACTIONS, Failure, build_dsn
from mta.policy.outcome import Outcome, outcome
from mta.signing.keys import DkimKey, write_key
from mta.signing.signer import Signer
from mta.spool.commit import GroupCommitter
from mta.spool.ids import IdGenerator
from mta.spool.store import Spool
from tests.harness.memory_transport import MemoryTransport
from tests.reliability.conftest import Scenario, scaled

EXAMPLES = scaled(150, 3000)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CRLF = b"\r\n"
RECEIVED = b"Received: from client.test ([127.0.0.1])\r\n\tby mta.test; now\r\n"

# --- strategies -------------------------------------------------------------

_FIELD_NAMES = st.sampled_from(
    [b"From", b"from", b"To", b"Subject", b"Message-ID", b"Date", b"X-Pool", b"DKIM-Signature"]
) | st.binary(min_size=1, max_size=12)
_TEXT = st.binary(max_size=60) | st.sampled_from(
    [b"", b" ", b"app@example.com", b"App <app@example.com>", b"<x@y>", b"\xc3\xa9", b":"]
)
_ENDINGS = st.sampled_from([CRLF, CRLF, CRLF, b"\n", b"\r", b""])


@st.composite
def header_lines(draw: st.DrawFn, endings: st.SearchStrategy[bytes] = _ENDINGS) -> bytes:
    if draw(st.booleans()):
        line = draw(_FIELD_NAMES) + draw(st.sampled_from([b":", b": ", b" :", b""])) + draw(_TEXT)
    else:  # a continuation line
        line = draw(st.sampled_from([b" ", b"\t"])) + draw(_TEXT)
    line = line if endings is _ENDINGS else line.replace(b"\r", b"").replace(b"\n", b"")
    return line + draw(endings)


@st.composite
def messages(draw: st.DrawFn, clean: bool | None = None) -> bytes:
    """Message-like bytes: any bytes, or header-ish lines, maybe a blank line, a
    body; ``clean`` ones have CRLF endings only and often a From field."""
    kind = draw(st.integers(0, 4)) if clean is None else 4 if clean else 1
    if kind == 0:
        return draw(st.binary(max_size=300))
    endings = _ENDINGS if kind == 1 else st.just(CRLF)
    head = draw(st.lists(header_lines(endings), max_size=8))
    if kind >= 2 and draw(st.integers(0, 4)):
        head.insert(draw(st.integers(0, len(head))), b"From: App <app@example.com>\r\n")
    separator = draw(st.sampled_from([CRLF, CRLF, b"", b"\r\n\r\n"] + [b"\n"] * (kind == 1)))
    lines = draw(st.lists(_TEXT.map(lambda text: text.replace(b"\r", b"").replace(b"\n", b""))))
    body = CRLF.join(lines) + draw(st.sampled_from([CRLF, b""] + [b"\n"] * (kind == 1)))
    return b"".join(head) + separator + body


# --- message.split_header and prepare ---------------------------------------


@FUZZ
@given(data=messages())
def test_split_header_loses_no_byte(data: bytes, scenario: Scenario) -> None:
    scenario.checked = (
        "split_header on any bytes: field lines plus the rest give back every input byte"
    )
    scenario.sent += 1
    lines, rest = split_header(data)
    joined = b"".join(lines)
    assert all(line.endswith(CRLF) for line in lines)
    assert (
        data in (joined + rest, joined + CRLF + rest)
        or (rest == b"" and data + CRLF == joined)  # a last field line without CRLF
    )


def test_prepare_any_bytes_is_rejected_or_keeps_the_body(scenario: Scenario) -> None:
    outcomes = {"rejected": 0, "prepared": 0}

    @FUZZ
    @given(data=messages(), instructions=st.sampled_from([(), ("X-Pool", "X-MTA-Priority")]))
    def check(data: bytes, instructions: tuple[str, ...]) -> None:
        try:
            prepared = prepare(
                data,
                received=RECEIVED,
                queue_id="06H13ZYVFC2JH800",
                hostname="mta.test",
                now=1_700_000_000,
                instructions=instructions,
            )
        except Rejected as rejected:
            outcomes["rejected"] += 1
            assert re.fullmatch(r"5[0-9]{2} 5\.[0-9]\.[0-9]+ [ -~]+", str(rejected)), rejected
            return
        outcomes["prepared"] += 1
        _, body = split_header(data)
        assert prepared.data.startswith(RECEIVED)
        assert prepared.data.endswith(CRLF + body)
        assert not has_bare_line_ending(prepared.data)
        # (An empty "Message-ID:" field is kept as it is: message_id "" then.)
        assert "\r" not in prepared.message_id and "\n" not in prepared.message_id

    check()
    scenario.checked = (
        "prepare() on any bytes: a 5xx Rejected or a CRLF-only message ending in the "
        f"original body ({outcomes['rejected']} rejected, {outcomes['prepared']} prepared)"
    )
    scenario.sent = sum(outcomes.values())


# --- access.address_is_valid --------------------------------------------------

_ADDRESS_PIECES = st.sampled_from(
    ["user", "a.b", '"q u"', "x%y", "a!b", "@r1,@r2:", "[127.0.0.1]", "[IPv6:::1]", "\r\n", "\x00"]
)


@FUZZ
@given(
    address=st.text(max_size=80)
    | st.lists(_ADDRESS_PIECES | st.sampled_from(["@", ".", "example.net", "-"])).map("".join)
)
def test_address_is_valid_never_raises_and_refuses_routing_and_controls(
    address: str, scenario: Scenario
) -> None:
    scenario.checked = (
        "address_is_valid on any text never raises; what it takes has no controls, "
        "source route or %/! routing"
    )
    scenario.sent += 1
    valid = address_is_valid(address)
    assert isinstance(valid, bool)
    if valid:
        assert "@" in address and not address.startswith("@")
        assert len(address) <= 254
        assert not re.search(r"[\x00-\x1f\x7f]", address)
        local, _, domain = address.rpartition("@")
        if not local.startswith('"'):
            assert not set("%!,:;<>") & set(local)
        assert domain and " " not in domain


@FUZZ
@given(
    local=st.from_regex(r"[a-z0-9][a-z0-9.+_-]{0,20}", fullmatch=True),
    labels=st.lists(
        st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True), min_size=1, max_size=4
    ),
)
def test_address_is_valid_takes_plain_addresses(
    local: str, labels: list[str], scenario: Scenario
) -> None:
    scenario.checked = "address_is_valid takes every plain local@domain address"
    scenario.sent += 1
    assert address_is_valid(f"{local}@{'.'.join(labels)}")


# --- config.parse_host_port ---------------------------------------------------


@FUZZ
@given(
    text=st.text(max_size=40)
    | st.tuples(
        st.sampled_from(["", "host", "[::1]", "::1", "[", "]", "a b", "127.0.0.1"]),
        st.sampled_from([":", "", "::"]),
        st.sampled_from(["", "0", "25", "65535", "65536", "-1", "99999999999", "٢٥", "²"]),
    ).map("".join)
)
def test_parse_host_port_gives_a_port_in_range_or_a_value_error(
    text: str, scenario: Scenario
) -> None:
    scenario.checked = "parse_host_port on any text: a host and a port in 1-65535, or ValueError"
    scenario.sent += 1
    try:
        parsed = parse_host_port(text)
    except ValueError as error:
        assert str(error)
        return
    assert parsed.host and 0 < parsed.port < 65536


@FUZZ
@given(
    host=st.from_regex(r"[a-z0-9.-]{1,30}|\[[0-9a-f:]{2,20}\]", fullmatch=True),
    port=st.integers(1, 65535),
)
def test_parse_host_port_round_trips(host: str, port: int, scenario: Scenario) -> None:
    scenario.checked = (
        "parse_host_port gives back the host (IPv6 unbracketed) and port it was given"
    )
    scenario.sent += 1
    parsed = parse_host_port(f"{host}:{port}")
    assert parsed.port == port
    assert parsed.host == host.strip("[]")


# --- signing.Signer.sign --------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[DkimKey]:
    directory = tmp_path_factory.mktemp("dkim")
    return [
        write_key("example.com", "rsa1", directory, "rsa", 1024)[1],
        write_key("example.com", "ed1", directory, "ed25519")[1],
    ]


def _dns(keys: list[DkimKey]) -> Any:
    records = {f"{k.selector}._domainkey.{k.domain}.".encode(): k.txt_record() for k in keys}

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        record = records.get(name)
        return record.encode() if record else None

    return lookup


def test_signer_never_raises_and_what_it_signs_verifies(
    keys: list[DkimKey], scenario: Scenario
) -> None:
    signer = Signer(keys, clock=lambda: 1_700_000_000)
    dns = _dns(keys)
    counts = {"signed": 0, "unsigned": 0}
    from_lines = st.sampled_from(
        [
            b"From: App <app@example.com>\r\n",
            b"From: app@EXAMPLE.com\r\n",
            b"From: a@news.example.com, b@other.test\r\n",
            b'From: "x" <a@example.com>\r\n (comment)\r\n',
            b"From: nobody\r\n",
        ]
    )

    @FUZZ
    @given(sender=from_lines, rest=messages(), crlf_only=st.booleans())
    def check(sender: bytes, rest: bytes, crlf_only: bool) -> None:
        message = sender + rest
        if crlf_only:  # what the listener hands the signer
            message = re.sub(rb"\r\n|\r|\n", CRLF, message)
        result = signer.sign(message)
        assert result.message.endswith(message)
        if result.domain is None:
            counts["unsigned"] += 1
            assert result.message == message
            return
        counts["signed"] += 1
        for index in range(len(result.selectors)):
            verdict = dkim.DKIM(result.message).verify(idx=index, dnsfunc=dns)
            assert verdict, (index, result.message[:600])

    check()
    scenario.checked = (
        "Signer.sign on generated messages never raises; each of its RSA and Ed25519 "
        f"signatures verifies with dkimpy ({counts['signed']} signed, "
        f"{counts['unsigned']} left unsigned)"
    )
    scenario.sent = sum(counts.values())


# --- mail.reply.parse_reply ----------------------------------------------------

_REPLY_LINES = st.lists(
    st.tuples(
        st.sampled_from(["250", "421", "451", "550", "554", "199", "999", "55", "٥٥٠", "abc"]),
        st.sampled_from([" ", "-", "", "\t"]),
        st.text(max_size=40),
    ).map("".join),
    max_size=4,
).map(lambda lines: "\r\n".join(lines))


@FUZZ
@given(raw=st.text(max_size=200) | _REPLY_LINES)
def test_parse_reply_never_raises_and_gives_one_clean_line(raw: str, scenario: Scenario) -> None:
    scenario.checked = (
        "parse_reply on any text never raises; one line without controls, "
        "status class agreeing with the outcome"
    )
    scenario.sent += 1
    reply = parse_reply(raw)
    assert 100 <= reply.code <= 999
    assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029]", reply.text)
    assert reply.status[0] in "245" and reply.status[0] == (
        str(reply.code)[0] if str(reply.code)[0] in "245" else "4"
    )
    assert outcome(reply) in set(Outcome)


# --- outbound.dsn.build_dsn ------------------------------------------------------

_failures = st.builds(
    Failure,
    recipient=st.text(max_size=60),
    status=st.from_regex(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}", fullmatch=True),
    diagnostic=st.text(max_size=300) | st.text(alphabet="x", min_size=900, max_size=2500),
    remote_mta=st.none() | st.text(max_size=40),
    action=st.sampled_from(sorted(ACTIONS)),
)


@FUZZ
@given(
    original=messages(),
    queue_id=st.text(max_size=20),
    sender=st.text(min_size=1, max_size=60),
    failures=st.lists(_failures, min_size=1, max_size=4),
    reporting_mta=st.text(max_size=40),
    arrived=st.floats(0, 4e9),
    now=st.floats(0, 4e9),
    message_id=st.text(max_size=40),
)
def test_build_dsn_never_raises_and_has_no_bare_line_ending(
    original: bytes,
    queue_id: str,
    sender: str,
    failures: list[Failure],
    reporting_mta: str,
    arrived: float,
    now: float,
    message_id: str,
    scenario: Scenario,
) -> None:
    scenario.checked = (
        "build_dsn on any valid failures and any original never raises; "
        "CRLF only, ASCII header, our lines under 998"
    )
    scenario.sent += 1
    dsn = build_dsn(
        original=original,
        message_queue_id=queue_id,
        sender=sender,
        arrived=arrived,
        failures=failures,
        reporting_mta=reporting_mta,
        now=now,
        dsn_message_id=message_id,
    )
    assert not has_bare_line_ending(dsn)
    head, _, _ = dsn.partition(b"\r\n\r\n")
    assert head.isascii()
    # Our own lines keep the RFC 5322 limit; only the copied original header may not.
    copied = split_header(re.sub(rb"\r\n|\r|\n", CRLF, original))[0]
    ours = set(dsn.split(CRLF)) - {line.rstrip(CRLF) for line in copied}
    assert all(len(line) <= 998 for line in ours)


# --- the SMTP session, without a socket --------------------------------------


@dataclasses.dataclass
class Listener:
    handler: Handler
    spool: Spool
    sessions: Sessions


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory, keys: list[DkimKey]) -> Iterator[Listener]:
    spool = Spool(tmp_path_factory.mktemp("spool"), max_size=2**30)
    committer = GroupCommitter(spool)
    pool = ThreadPoolExecutor(max_workers=2)
    server = dataclasses.replace(ServerConfig(), hostname="mta.test", max_recipients=5)
    config = Config(server=server)
    events = EventLog(config.events)
    intake = Intake(config, spool, committer, Signer(keys), pool, lambda message: None, events)
    handler = Handler(server, spool, intake, IdGenerator(node="test"))
    yield Listener(handler, spool, Sessions(max_total=1000, max_per_ip=1000))
    committer.close()
    pool.shutdown()
    spool.close()


_ADDRESSES = st.sampled_from(
    [
        "<app@example.com>",
        "<user@example.net>",
        "<>",
        "<a@b>",
        "<@r1,@r2:u@ext.test>",
        '<"u@ext"@example.net>',
        "<u%ext@example.net>",
        "<u@[127.0.0.1]>",
        "user@example.net",
        "<user@example.net>",
        "<other@example.org>",
        "<u@example.net> SIZE=100",
        "<u@example.net> BODY=8BITMIME",
        "<u@example.net> SIZE=99999999999",
        "<u@example.net> X=\x00",
        "<\xe9@example.net> SMTPUTF8",
        "<" + "a" * 600 + "@example.net>",
    ]
) | st.text(max_size=30)
_COMMANDS = st.one_of(
    st.builds(lambda name: f"EHLO {name}", st.sampled_from(["client.test", "", "x" * 300])),
    st.just("HELO client.test"),
    st.builds(lambda address: f"MAIL FROM:{address}", _ADDRESSES),
    st.builds(lambda address: f"RCPT TO:{address}", _ADDRESSES),
    st.sampled_from(
        ["DATA", "RSET", "NOOP", "HELP", "VRFY u@example.net", "STARTTLS", "AUTH PLAIN AAAA"]
    ),
    st.sampled_from(["BDAT 10", "mail from:<a@b>", "XCLIENT ADDR=1.2.3.4", "x" * 600]),
    st.text(max_size=40),
).map(lambda line: line.encode("utf-8", "surrogateescape"))
_DATA_LINES = st.sampled_from(
    [
        b"From: App <app@example.com>",
        b"Subject: fuzz",
        b"",
        b"body",
        b".",
        b"..dot",
        b".\n",
        b"\n.\n",
        b"\r.\r",
        b"MAIL FROM:<smuggled@example.com>",
        b"x" * 1200,
    ]
) | st.binary(max_size=40)


@st.composite
def transaction(draw: st.DrawFn) -> bytes:
    """A mostly valid mail transaction, dot-stuffed or not, as one chunk."""
    message = draw(messages(clean=True))
    if draw(st.integers(0, 3)):
        message = re.sub(rb"(?m)^\.", b"..", message)  # what a client must do
    if not message.endswith(CRLF):
        message += CRLF
    recipients = draw(st.lists(_ADDRESSES, min_size=1, max_size=7))
    commands = [b"MAIL FROM:<app@example.com>"] + [
        b"RCPT TO:" + address.encode("utf-8", "surrogateescape") for address in recipients
    ]
    return CRLF.join(commands) + CRLF + b"DATA\r\n" + message + b".\r\n"


@st.composite
def conversations(draw: st.DrawFn) -> list[bytes]:
    """Chunks a client might send: command lines, transactions, DATA content, odd endings."""
    chunks = [b"EHLO client.test\r\n"] if draw(st.integers(0, 3)) else []
    for _ in range(draw(st.integers(1, 10))):
        kind = draw(st.integers(0, 5))
        if kind == 0:
            lines = draw(st.lists(_DATA_LINES, max_size=8))
            chunks.append(b"".join(line + draw(_ENDINGS) for line in lines))
        elif kind == 1:
            chunks.append(draw(transaction()))
        else:
            chunks.append(draw(_COMMANDS) + draw(_ENDINGS))
    # Pipelining: sometimes everything arrives in one packet.
    return [b"".join(chunks)] if draw(st.booleans()) else chunks


# RFC 5321 4.2: Reply-code [ SP / "-" textstring ], textstring = 1*(HT / %d32-126).
_REPLY = re.compile(rb"[2-5][0-9]{2}([ -][\t\x20-\x7e]*)?")


async def converse(listener: Listener, chunks: list[bytes]) -> bytes:
    """Feed ``chunks`` to one Session, then end any DATA and QUIT; every byte it wrote."""
    loop = asyncio.get_running_loop()
    session = Session(
        listener.handler,
        listener.sessions,
        hostname="mta.test",
        ident="ESMTP",
        data_size_limit=64 * 1024,
        timeout=30,
        loop=loop,
    )
    transport = MemoryTransport(loop)
    transport.protocol = session
    session.connection_made(transport)
    for chunk in [*chunks, b"\r\n.\r\nQUIT\r\n"]:
        if transport.closed.is_set():
            break
        session.data_received(chunk)
        await asyncio.sleep(0)
    await asyncio.wait_for(transport.closed.wait(), timeout=20)  # no hang
    await asyncio.sleep(0)  # let connection_lost run
    return bytes(transport.written)


def test_smtp_session_fuzz_without_sockets(listener: Listener, scenario: Scenario) -> None:
    totals = {"conversations": 0, "data": 0, "queued": 0}

    @settings(FUZZ, max_examples=scaled(120, 2000))
    @given(chunks=conversations())
    def check(chunks: list[bytes]) -> None:
        written = asyncio.run(converse(listener, chunks))
        totals["conversations"] += 1
        assert written.endswith(CRLF), written[-200:]
        lines = written[:-2].split(CRLF)
        assert lines[0].startswith(b"220 mta.test")
        for line in lines:
            assert _REPLY.fullmatch(line), (line, written[-400:])
        assert b"451 4.3.0" not in written  # the handler never raised
        go_aheads = sum(line.startswith(b"354") for line in lines)
        queued = sum(line.startswith(b"250 2.0.0 Ok: queued") for line in lines)
        assert queued <= go_aheads  # no message smuggled in behind another
        totals["data"] += go_aheads
        totals["queued"] += queued

    check()
    assert not listener.sessions.open  # every session left
    with listener.spool.read() as txn:
        stored = [m.id for m in listener.spool.all_messages(txn)]
        bodies = [listener.spool.body(txn, queue_id) or b"" for queue_id in stored]
    assert not [body for body in bodies if has_bare_line_ending(body)]
    scenario.checked = (
        "random command/DATA streams (odd line endings, pipelining, smuggling dots, long "
        "lines) through Session+Handler in memory: only well-formed replies, no hang, "
        "never more 250 queued than DATA, no bare CR/LF in the spool"
    )
    scenario.sent = totals["conversations"]
    scenario.accepted = totals["queued"]
