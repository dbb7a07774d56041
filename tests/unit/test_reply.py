"""SMTP replies from remote servers: parsing, enhanced status codes, delivery outcome."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.mail.reply import Reply, parse_reply
from mta.policy.outcome import Outcome, outcome

STATUS_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
CLASS_OF = {Outcome.DELIVERED: "2", Outcome.DEFERRED: "4", Outcome.BOUNCED: "5"}


@pytest.mark.parametrize(
    ("raw", "code", "text"),
    [
        ("250 2.0.0 Ok: queued as 4Xy", 250, "2.0.0 Ok: queued as 4Xy"),
        ("550 5.1.1 no such user", 550, "5.1.1 no such user"),
        ("550 5.1.1 no such user\r\n", 550, "5.1.1 no such user"),
        ("250", 250, ""),
        ("250 ", 250, ""),
        ("421-mx.example.net\r\n421 4.7.0 try later\r\n", 421, "mx.example.net 4.7.0 try later"),
        (
            "550-5.1.1 The email account that you tried to reach does not exist.\n"
            "550-5.1.1 Please try double-checking the recipient's email address.\n"
            "550 5.1.1 https://support.google.com/mail/?p=NoSuchUser",
            550,
            "5.1.1 The email account that you tried to reach does not exist. "
            "5.1.1 Please try double-checking the recipient's email address. "
            "5.1.1 https://support.google.com/mail/?p=NoSuchUser",
        ),
        ("452-a\r452 b", 452, "a b"),  # bare CR separates lines too
        ("250-\r\n250 ok", 250, "ok"),  # an empty line's text adds nothing
        ("550  padded\t text  ", 550, "padded  text"),
        ("550 evil\x1b[31m\x00bytes", 550, "evil?[31m?bytes"),
        ("651 what", 651, "what"),
    ],
)
def test_parse_reply(raw: str, code: int, text: str) -> None:
    assert parse_reply(raw) == Reply(code, text)


@pytest.mark.parametrize(
    "raw",
    [
        "hello",
        "55 short code",
        "5500 long code",
        "550x no separator",
        "050 leading zero",
        " 550 leading space",
        "\u0665\u0665\u0660 arabic digits",
        "550-first\r\n450 second",  # codes of one reply must agree
        "550-first\r\nno code here",
    ],
)
def test_garbled_replies_defer_with_a_readable_note(raw: str) -> None:
    reply = parse_reply(raw)
    assert reply.code == 451
    assert reply.text.startswith("4.5.0 garbled reply: ")
    assert repr(raw)[:20] in reply.text
    assert outcome(reply) is Outcome.DEFERRED


@pytest.mark.parametrize("raw", ["", "   ", "\r\n", "\r\n\r\n"])
def test_empty_replies_defer(raw: str) -> None:
    assert parse_reply(raw) == Reply(451, "4.5.0 empty reply from server")


def test_garbled_note_is_bounded() -> None:
    assert len(parse_reply("x" * 100_000).text) < 250


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        (Reply(550, "5.1.1 <x@y>: user unknown"), "5.1.1"),
        (Reply(550, "5.7.26 unauthenticated"), "5.7.26"),
        (Reply(250, "2.0.0 Ok"), "2.0.0"),
        (Reply(421, "4.7.0 try later"), "4.7.0"),
        (Reply(550, "4.2.2 mailbox full"), "5.0.0"),  # text disagrees with the code: code wins
        (Reply(450, "5.1.1 whatever"), "4.0.0"),
        (Reply(550, "user unknown"), "5.0.0"),
        (Reply(250, "Ok"), "2.0.0"),
        (Reply(451, ""), "4.0.0"),
        (Reply(550, "5.1.1"), "5.1.1"),
        (Reply(550, "5.1.1: x"), "5.0.0"),  # not followed by a space: not a code
        (Reply(550, "5.1234.1 x"), "5.0.0"),
        (Reply(354, "End data with <CR><LF>.<CR><LF>"), "4.5.0"),
        (Reply(354, "5.1.1 odd"), "4.5.0"),
        (Reply(150, "hmm"), "4.5.0"),
        (Reply(651, "6.0.0 future"), "4.5.0"),
    ],
)
def test_status(reply: Reply, status: str) -> None:
    assert reply.status == status


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (250, Outcome.DELIVERED),
        (251, Outcome.DELIVERED),
        (421, Outcome.DEFERRED),
        (452, Outcome.DEFERRED),
        (550, Outcome.BOUNCED),
        (554, Outcome.BOUNCED),
        (150, Outcome.DEFERRED),
        (354, Outcome.DEFERRED),
        (651, Outcome.DEFERRED),
        (999, Outcome.DEFERRED),
    ],
)
def test_outcome(code: int, expected: Outcome) -> None:
    assert outcome(Reply(code, "x")) is expected


def test_str() -> None:
    assert str(Reply(550, "5.1.1 <x@y>: user unknown")) == "550 5.1.1 <x@y>: user unknown"
    assert str(Reply(250)) == "250"


def test_text_from_a_client_library_is_made_one_line() -> None:
    # The client's wire joins the lines of a multi-line reply with "\n".
    reply = Reply(550, "5.1.1 first line\n5.1.1 second line\r\nthird\u2028fourth")
    assert reply.text == "5.1.1 first line 5.1.1 second line third?fourth"
    assert reply.status == "5.1.1"


@pytest.mark.parametrize("code", [0, 99, 1000, -550])
def test_codes_outside_three_digits_are_refused(code: int) -> None:
    with pytest.raises(ValueError, match="three digits"):
        Reply(code, "x")


def test_non_integer_codes_are_refused() -> None:
    with pytest.raises(ValueError, match="integer"):
        Reply("550", "x")  # type: ignore[arg-type]


# --- properties -------------------------------------------------------------

ANY_TEXT = st.text(st.characters(codec="utf-8"), max_size=300)
REPLY_LINES = st.lists(
    st.tuples(
        st.sampled_from(["250", "251", "421", "450", "550", "554", "354", "999"]),
        st.sampled_from([" ", "-", ""]),
        ANY_TEXT,
    ),
    max_size=4,
).map(lambda lines: "\r\n".join(code + sep + text for code, sep, text in lines))
REPLIES = st.builds(Reply, st.integers(min_value=100, max_value=999), ANY_TEXT)


@given(st.one_of(ANY_TEXT, REPLY_LINES, st.text()))
def test_parse_reply_never_raises_and_status_agrees_with_outcome(raw: str) -> None:
    reply = parse_reply(raw)
    assert STATUS_RE.match(reply.status)
    assert reply.status[0] == CLASS_OF[outcome(reply)]
    assert "\r" not in str(reply) and "\n" not in str(reply)


@given(REPLIES)
def test_str_round_trips(reply: Reply) -> None:
    assert parse_reply(str(reply)) == reply
    assert str(parse_reply(str(reply))) == str(reply)


@given(
    code=st.sampled_from([250, 421, 450, 550, 554]),
    subject=st.integers(min_value=0, max_value=999),
    detail=st.integers(min_value=0, max_value=999),
    rest=st.text(st.characters(codec="ascii", categories=["L", "N", "P", "Zs"]), max_size=40),
)
def test_a_consistent_enhanced_code_is_taken_from_the_text(
    code: int, subject: int, detail: int, rest: str
) -> None:
    enhanced = f"{str(code)[0]}.{subject}.{detail}"
    reply = parse_reply(f"{code} {enhanced} {rest}")
    assert reply.status == enhanced
