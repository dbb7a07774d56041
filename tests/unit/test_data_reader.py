"""The listener's fast paths against aiosmtpd's own code: DATA read in chunks
(mta.inbound.server.DataParser), and MAIL/RCPT addresses
(mta.inbound.aiosmtpd_compat.parse_address).

The reference is aiosmtpd 1.4's ``SMTP.smtp_DATA`` itself, run on a small
stand-in session over a real ``asyncio.StreamReader``: for any data, cut into
any chunks, the parser must give the same reply (500 line too long, 552 too
much data, or the handler's), the same content after dot-unstuffing, and leave
the same bytes (pipelined commands) for the next command. Coroutines are
stepped by hand, one chunk per step: no event loop runs, nothing sleeps.

MAIL and RCPT arguments are compared with aiosmtpd's ``_getaddr``, which
parses every address with the email package's header parser.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from itertools import pairwise
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mta.inbound.aiosmtpd_compat import ChunkedStreamReader, parse_address
from mta.inbound.server import DATA_BUFFER, LINE_TOO_LONG, TOO_MUCH_DATA, DataParser

CRLF = b"\r\n"
END = b"\r\n.\r\n"
NEXT = b"QUIT\r\n"  # a command pipelined behind the data


@contextmanager
def idle_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()  # never run: futures only need one to exist
    try:
        yield loop
    finally:
        loop.close()


def step(
    coroutine: Coroutine[Any, Any, None], reader: asyncio.StreamReader, chunks: list[bytes]
) -> bytes:
    """Run ``coroutine`` to its end, feeding ``reader`` a chunk each time it
    waits for data; the bytes it left unread."""
    pending = list(chunks)
    while True:
        try:
            coroutine.send(None)
        except StopIteration:
            break
        assert pending, "the reader wants more data than the client sent"
        reader.feed_data(pending.pop(0))
    return bytes(reader._buffer) + b"".join(pending)  # type: ignore[attr-defined]


class Reference:
    """Just enough of a session for aiosmtpd's ``SMTP.smtp_DATA`` to run on."""

    _decode_data = False
    transport = object()

    def __init__(self, reader: asyncio.StreamReader, size_limit: int | None, line_limit: int):
        self._reader = reader
        self.data_size_limit = size_limit
        self.line_length_limit = line_limit
        self.envelope = Envelope()
        self.envelope.rcpt_tos = ["user@example.net"]
        self._handle_hooks = {"DATA": None}
        self.replies: list[str] = []
        self.content: bytes | None = None

    async def check_helo_needed(self) -> bool:
        return False

    async def check_auth_needed(self, caller: str) -> bool:
        return False

    async def push(self, status: str) -> None:
        self.replies.append(status)

    async def _call_handler_hook(self, command: str) -> str:
        self.content = self.envelope.original_content
        return "250 queued"

    def _set_post_data_state(self) -> None:
        pass


Outcome = tuple[str, bytes | None, bytes]  # reply, content, what is left for the next command


def reference(chunks: list[bytes], size_limit: int | None, line_limit: int) -> Outcome:
    with idle_loop() as loop:
        reader = asyncio.StreamReader(limit=line_limit, loop=loop)
        session = Reference(reader, size_limit, line_limit)
        left = step(SMTP.smtp_DATA(session, ""), reader, chunks)  # type: ignore[arg-type]
    assert session.replies[0].startswith("354")
    return session.replies[-1], session.content, left


def parsed(chunks: list[bytes], size_limit: int | None, line_limit: int) -> Outcome:
    """The parser fed as the session's reader feeds it: the buffer, then more."""
    parser = DataParser(size_limit, line_limit)
    buffer = bytearray()
    pending = list(chunks)
    while not parser.done:
        assert pending, "the parser wants more data than the client sent"
        buffer += pending.pop(0)
        del buffer[: parser.feed(buffer)]
    left = bytes(buffer) + b"".join(pending)
    if parser.refusal is not None:
        return parser.refusal, None, left
    return "250 queued", parser.content(), left


def read(chunks: list[bytes], size_limit: int | None, line_limit: int) -> Outcome:
    """The same through the session's stream reader (``ChunkedStreamReader.read_data``)."""
    with idle_loop() as loop:
        reader = ChunkedStreamReader(limit=line_limit, loop=loop)
        parser = DataParser(size_limit, line_limit)
        left = step(reader.read_data(parser, DATA_BUFFER), reader, chunks)
    assert reader._limit == line_limit  # restored after DATA
    if parser.refusal is not None:
        return parser.refusal, None, left
    return "250 queued", parser.content(), left


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` in chunks, cut at ``points`` (non-empty chunks only)."""
    edges = sorted({0, len(data), *(point % (len(data) + 1) for point in points)})
    return [data[start:end] for start, end in pairwise(edges) if end > start]


def same_as_aiosmtpd(
    data: bytes, points: list[int], size_limit: int | None, line_limit: int
) -> Outcome:
    chunks = cut(data, points)
    expected = reference(chunks, size_limit, line_limit)
    assert parsed(chunks, size_limit, line_limit) == expected
    assert read(chunks, size_limit, line_limit) == expected
    return expected


# --- strategies ----------------------------------------------------------------

# Lines made of the octets that matter: dots, CR, LF, and filler.
_LINE = st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b" ", b"\x00"]), max_size=40).map(
    b"".join
)
_ENDING = st.sampled_from([CRLF, CRLF, CRLF, b"\n", b"\r", b"", b"\r\r\n", b"\n\r"])


@st.composite
def texts(draw: st.DrawFn, long: bool = False) -> bytes:
    """Message text: lines (some long, some starting with dots) and odd endings,
    then the end of data and a pipelined command."""
    parts = []
    for _ in range(draw(st.integers(0, 12))):
        line = draw(_LINE)
        if draw(st.integers(0, 3)) == 0:
            line = b"." * draw(st.integers(1, 3)) + line
        if long and draw(st.booleans()):
            line = b"x" * draw(st.sampled_from([996, 997, 998, 999, 1000, 1001, 1002, 5000]))
        parts.append(line + draw(_ENDING))
    return b"".join(parts) + END + NEXT


_CUTS = st.lists(st.integers(0, 20_000), max_size=8)


# --- properties ----------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(
    texts(),
    _CUTS,
    st.sampled_from([None, 0, 10_000]) | st.integers(1, 300),
    st.integers(3, 40),
)
@example(b"..\r\n.\r\n" + NEXT, [], None, 10)
@example(b"abc\r\n.\r\n" + NEXT, [4], None, 10)  # the end split after its first CRLF
@example(b"abc" + END + NEXT, [4, 5, 6], None, 10)
@example(b"x" * 30 + b"\r\n" + END + NEXT, [], 10, 10)  # too long and too much: too long first
@example(b"x" * 9 + b"\r\n" + END + NEXT, [], 5, 10)  # within the stream limit: too much first
@example(b"x" * 10 + b"\r\n" + END + NEXT, [11], 5, 10)  # so is a line cut after its CR
@example(b"abc\r\n" + b"x" * 20 + b"\r\n" + END + NEXT, [], 5, 10)  # at the size limit, not over
def test_small_limits_give_aiosmtpds_replies_and_content(
    data: bytes, points: list[int], size_limit: int | None, line_limit: int
) -> None:
    same_as_aiosmtpd(data, points, size_limit, line_limit)


@settings(max_examples=150, deadline=None)
@given(texts(long=True), _CUTS, st.sampled_from([None, 2_000, 5_000, 30_000]))
def test_the_sessions_limits_give_aiosmtpds_replies_and_content(
    data: bytes, points: list[int], size_limit: int | None
) -> None:
    same_as_aiosmtpd(data, points, size_limit, 1000)


@given(st.lists(st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))))
def test_dot_stuffing_is_undone(lines: list[bytes]) -> None:
    """What a client sends for ``lines`` (RFC 5321 4.5.2) comes back as ``lines``."""
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + CRLF for line in lines)
    reply, content, left = same_as_aiosmtpd(stuffed + END[2:] + NEXT, [], None, 1000)
    assert (reply, left) == ("250 queued", NEXT)
    assert content == b"".join(line + CRLF for line in lines)


# --- the limits, by example --------------------------------------------------


def test_a_line_of_1000_octets_is_kept_and_one_more_is_refused() -> None:
    assert parsed([b"x" * 998 + CRLF + b".\r\n"], None, 1000)[:2] == (
        "250 queued",
        b"x" * 998 + CRLF,
    )
    assert parsed([b"x" * 999 + CRLF + b".\r\n"], None, 1000)[0] == LINE_TOO_LONG


def test_the_size_limit_counts_the_lines_but_not_the_end() -> None:
    message = b"x" * 8 + CRLF  # 10 octets
    assert parsed([message + b".\r\n"], 10, 1000)[0] == "250 queued"
    assert parsed([message + b"y\r\n.\r\n"], 10, 1000)[0] == TOO_MUCH_DATA


def test_smuggled_ends_of_data_are_not_the_end() -> None:
    for fake in (b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r.\n"):
        data = b"Subject: x\r\n\r\nbody" + fake + b"MAIL FROM:<x@y>\r\n"
        reply, content, left = same_as_aiosmtpd(data + END + NEXT, [], None, 1000)
        unstuffed = (data + CRLF).replace(b"\r\n.", b"\r\n")  # a line may start with the dot
        assert (reply, content, left) == ("250 queued", unstuffed, NEXT), fake


def test_an_endless_line_is_dropped_as_it_comes() -> None:
    """After a refusal, memory holds at most a few octets of what follows."""
    parser = DataParser(None, 1000)
    buffer = bytearray()
    for _ in range(100):
        buffer += b"x" * 65_536
        del buffer[: parser.feed(buffer)]
        assert len(buffer) <= 2
        assert not parser._parts
    assert parser.refusal == LINE_TOO_LONG
    buffer += b"\r\n.\r\n" + NEXT
    del buffer[: parser.feed(buffer)]
    assert parser.done and bytes(buffer) == NEXT


def test_an_unfinished_line_waits_for_the_rest_of_it() -> None:
    parser = DataParser(None, 1000)
    assert parser.feed(b"abc\r\nde") == 5  # the complete line only
    assert parser.feed(b"de") == 0
    assert parser.feed(b"def\r\n.") == 5
    assert parser.feed(b".") == 0  # perhaps the end: wait
    assert parser.feed(b".\r\nQUIT") == 3
    assert parser.done and parser.content() == b"abc\r\ndef\r\n"


def test_a_message_over_the_size_limit_is_not_kept() -> None:
    parser = DataParser(1000, 1000)
    line = b"x" * 98 + CRLF
    for _ in range(9):
        assert parser.feed(line * 1) == 100
    assert parser.refusal is None
    parser.feed(line * 2)
    assert parser.refusal == TOO_MUCH_DATA and not parser._parts


# --- MAIL and RCPT addresses -------------------------------------------------


class _NoLimit:
    local_part_limit = 0


def aiosmtpds_getaddr(arg: str) -> tuple[str | None, str | None]:
    try:
        return SMTP._getaddr(_NoLimit(), arg)  # type: ignore[arg-type]
    except (IndexError, AttributeError):  # cut-off input: now refused as malformed
        return None, None


# RFC 5322's specials, and every printable ASCII character, and some that are not.
_ODD = st.sampled_from(list('\\"(),.:;<>@[] ')) | st.sampled_from(
    [chr(code) for code in range(32, 127)] + ["\t", "\x00", "\x7f", "é"]
)
_PLAIN_PART = st.from_regex(r"[a-z0-9]{1,8}(\.[a-z0-9+_-]{1,8}){0,3}", fullmatch=True)


@st.composite
def _address_parts(draw: st.DrawFn) -> str:
    """Mostly a usual local part or domain, sometimes with odd characters in it."""
    part = draw(_PLAIN_PART)
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(part)))
        part = part[:at] + draw(_ODD) + part[at:]
    return part


@st.composite
def mail_arguments(draw: st.DrawFn) -> str:
    """MAIL/RCPT arguments, most of them near the usual <local@domain> SIZE=n."""
    local = draw(_address_parts())
    domain = draw(_address_parts())
    rest = draw(
        st.sampled_from(["", " SIZE=100", "SIZE=1", "  X", " (c) X", "\tX", " ", ">", ",x"])
        | _address_parts()
    )
    start, end = draw(st.sampled_from([("<", ">"), ("<", ">"), ("<", ""), ("", ""), (" <", ">")]))
    return f"{start}{local}@{domain}{end}{rest}"


@settings(max_examples=1000)
@given(mail_arguments() | st.text(max_size=30))
@example("<user@example.net>")
@example("<user@example.net> SIZE=100 BODY=8BITMIME")
@example("<a.b@c.d>  SIZE=1")
@example("<a@b.>")
@example("<a..b@c>")
@example("<>")
@example("<a\\b@c>")  # a quoted-pair: the parser quotes the local part
@example('<"a"@c>')
def test_addresses_are_aiosmtpds(arg: str) -> None:
    assert parse_address(arg) == aiosmtpds_getaddr(arg)


def test_cut_off_addresses_are_malformed_not_an_error() -> None:
    for arg in ("<", "<a@", "<@", "<a@["):
        assert parse_address(arg) == (None, None), arg
