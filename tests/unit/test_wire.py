"""The SMTP client's reply parser (mta.outbound.wire): replies from any split
of the byte stream, refusal of what is not a reply, bounded memory."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.mail.reply import Reply
from mta.outbound.wire import (
    MAX_LINE,
    MAX_REPLY,
    MAX_UNREAD,
    Garbled,
    ReplyParser,
    Wire,
    extensions,
)

Raw = tuple[int, tuple[str, ...]]  # a reply's code and its lines as received

text = st.text(alphabet=st.sampled_from(["a", "Z", " ", ".", "-", "é", "1"]), max_size=20)
reply = st.tuples(
    st.integers(100, 999),
    st.lists(text, min_size=1, max_size=4).map(lambda lines: tuple(li.strip(" ") for li in lines)),
)


def encode(code: int, lines: tuple[str, ...]) -> bytes:
    """A reply on the wire: code and "-" on every line but the last, CRLF each."""
    *first, last = lines
    encoded = [b"%d-%s\r\n" % (code, line.encode()) for line in first]
    return b"".join(encoded) + b"%d %s\r\n" % (code, last.encode())


def raw(replies: list[Reply]) -> list[Raw]:
    return [(reply.code, reply.lines) for reply in replies]


def feed_in_pieces(data: bytes, cuts: list[int]) -> list[Raw]:
    parser = ReplyParser()
    replies = []
    start = 0
    for cut in sorted(cuts) + [len(data)]:
        replies += parser.feed(data[start:cut])
        start = max(start, cut)
    return raw(replies)


@given(st.lists(reply, max_size=5), st.lists(st.integers(0, 400), max_size=8))
def test_every_reply_from_any_split_of_the_stream(replies: list[Raw], cuts: list[int]) -> None:
    stream = b"".join(encode(code, lines) for code, lines in replies)
    assert feed_in_pieces(stream, cuts) == replies


def test_pipelined_replies_in_one_segment() -> None:
    parser = ReplyParser()
    assert parser.feed(b"250 2.1.0 ok\r\n550 5.1.1 no\r\n354 go") == [
        Reply(250, "2.1.0 ok"),
        Reply(550, "5.1.1 no"),
    ]
    assert parser.feed(b" ahead\r\n") == [Reply(354, "go ahead")]


def test_bare_code_and_bare_line_feed() -> None:
    assert raw(ReplyParser().feed(b"250\r\n221 bye\n")) == [(250, ("",)), (221, ("bye",))]


@pytest.mark.parametrize(
    "line", [b"hello there\r\n", b"2x0 what\r\n", b" 25 x\r\n", b"000 zero\r\n", b"250x\r\n"]
)
def test_not_a_reply(line: bytes) -> None:
    with pytest.raises(Garbled):
        ReplyParser().feed(line)


def test_a_line_without_end_is_bounded() -> None:
    parser = ReplyParser()
    parser.feed(b"250 " + b"x" * (MAX_LINE - 10))
    with pytest.raises(Garbled, match="too long"):
        parser.feed(b"x" * 20)


def test_endless_continuation_lines_are_bounded() -> None:
    parser = ReplyParser()
    with pytest.raises(Garbled, match="reply too long"):
        for _ in range(MAX_REPLY // 10 + 1):
            parser.feed(b"250-more\r\n")


def test_multiline_reply_is_one_line_of_text_and_keeps_its_lines() -> None:
    (reply,) = ReplyParser().feed(b"550-5.7.1 first\r\n550 5.7.1 second\x1b[2J\r\n")
    assert reply.text == "5.7.1 first 5.7.1 second?[2J"  # what logs and DSNs get
    assert reply.lines == ("5.7.1 first", "5.7.1 second\x1b[2J")  # as received


def test_extensions_from_ehlo() -> None:
    (ehlo,) = ReplyParser().feed(
        b"250-mx.example.net hello\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n"
        b"250-8bitmime\r\n250 STARTTLS\r\n"
    )
    assert extensions(ehlo) == {
        "pipelining": "",
        "size": "10240000",
        "8bitmime": "",
        "starttls": "",
    }


def test_a_server_flooding_replies_is_cut_off() -> None:
    wire = Wire()
    wire.data_received(b"250 ok\r\n" * MAX_UNREAD)
    assert wire.has_unread
    wire.data_received(b"250 one too many\r\n")
    assert not wire.has_unread and not wire.is_connected
