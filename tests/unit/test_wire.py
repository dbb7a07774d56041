"""The SMTP client's reply parser (mta.outbound.wire): replies from any split
of the byte stream, refusal of what is not a reply, bounded memory."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.outbound.wire import (
    MAX_LINE,
    MAX_REPLY,
    MAX_UNREAD,
    Garbled,
    ReplyParser,
    Response,
    Wire,
    extensions,
)

text = st.text(alphabet=st.sampled_from(["a", "Z", " ", ".", "-", "é", "1"]), max_size=20)
reply = st.builds(
    lambda code, lines: Response(code, tuple(line.strip(" ") for line in lines)),
    st.integers(100, 999),
    st.lists(text, min_size=1, max_size=4),
)


def encode(response: Response) -> bytes:
    """A reply on the wire: code and "-" on every line but the last, CRLF each."""
    *first, last = response.lines
    lines = [b"%d-%s\r\n" % (response.code, line.encode()) for line in first]
    return b"".join(lines) + b"%d %s\r\n" % (response.code, last.encode())


def feed_in_pieces(data: bytes, cuts: list[int]) -> list[Response]:
    parser = ReplyParser()
    replies = []
    start = 0
    for cut in sorted(cuts) + [len(data)]:
        replies += parser.feed(data[start:cut])
        start = max(start, cut)
    return replies


@given(st.lists(reply, max_size=5), st.lists(st.integers(0, 400), max_size=8))
def test_every_reply_from_any_split_of_the_stream(replies: list[Response], cuts: list[int]) -> None:
    stream = b"".join(encode(response) for response in replies)
    assert feed_in_pieces(stream, cuts) == replies


def test_pipelined_replies_in_one_segment() -> None:
    parser = ReplyParser()
    assert parser.feed(b"250 2.1.0 ok\r\n550 5.1.1 no\r\n354 go") == [
        Response(250, ("2.1.0 ok",)),
        Response(550, ("5.1.1 no",)),
    ]
    assert parser.feed(b" ahead\r\n") == [Response(354, ("go ahead",))]


def test_bare_code_and_bare_line_feed() -> None:
    assert ReplyParser().feed(b"250\r\n221 bye\n") == [
        Response(250, ("",)),
        Response(221, ("bye",)),
    ]


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


def test_multiline_text_joined_for_the_reply() -> None:
    (response,) = ReplyParser().feed(b"550-5.7.1 first\r\n550 5.7.1 second\r\n")
    assert response.text == "5.7.1 first\n5.7.1 second"


def test_extensions_from_ehlo() -> None:
    ehlo = Response(
        250, ("mx.example.net hello", "PIPELINING", "SIZE 10240000", "8bitmime", "STARTTLS")
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
