"""Header sanity for received messages: smuggling refused, one From, fields added, body kept."""

from __future__ import annotations

from email.utils import parsedate_to_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.inbound.message import Rejected, has_bare_line_ending, prepare, received_field
from mta.inbound.reply_texts import BARE_LINE_ENDING
from mta.mail.header import field_values, header_safe, split_header

QID = "0123456789ABCDEF"
HOST = "mta.example.test"
NOW = 1_700_000_000.0
RECEIVED = received_field(
    helo="app1.internal",
    client_ip="10.0.0.5",
    hostname=HOST,
    protocol="ESMTP",
    queue_id=QID,
    recipients=["a@example.org"],
    now=NOW,
)


def run(data: bytes, now: float | None = NOW) -> bytes:
    return prepare(data, received=RECEIVED, queue_id=QID, hostname=HOST, now=now).data


def header_of(data: bytes) -> list[bytes]:
    return split_header(data)[0]


# --- line endings ---


@pytest.mark.parametrize(
    "data",
    [
        b"From: a@b\r\n\r\nhi\n.\nMAIL FROM:<x@y>\r\n",  # \n.\n
        b"From: a@b\r\n\r\nhi\n.\r\nMAIL FROM:<x@y>\r\n",  # \n.\r\n
        b"From: a@b\r\n\r\nhi\r\n.\nMAIL FROM:<x@y>\r\n",  # \r\n.\n
        b"From: a@b\r\n\r\nhi\r.\r\nMAIL FROM:<x@y>\r\n",  # \r.\r\n
        b"From: a@b\r\n\r\nbare\rcr\r\n",
        b"From: a@b\r\n\r\nbare\nlf\r\n",
        b"From: a@b\r\n\r\nends with bare lf\n",
        b"From: a@b\r\n\r\nends with bare cr\r",
        b"From: a@b\r\n\r\n\n\r",  # LF CR: two bytes, but not a pair
        b"From: a@b\r\n\r\n\r\r\n\n",  # CR, CRLF, LF: a pair between two bare ones
    ],
)
def test_bare_line_endings_are_detected_and_refused(data: bytes) -> None:
    assert has_bare_line_ending(data)
    with pytest.raises(Rejected) as caught:
        run(data)
    assert str(caught.value) == BARE_LINE_ENDING
    assert str(caught.value).startswith("550 5.5.2 ")


@pytest.mark.parametrize(
    "data", [b"", b"From: a@b\r\n\r\nline one\r\n.line two\r\n\r\n", b"\r\n\r\n\r\n"]
)
def test_clean_crlf_is_not_a_bare_line_ending(data: bytes) -> None:
    assert not has_bare_line_ending(data)


@given(st.lists(st.binary().map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))))
def test_crlf_joined_lines_never_count_as_bare(lines: list[bytes]) -> None:
    data = b"".join(line + b"\r\n" for line in lines)
    assert not has_bare_line_ending(data)


@given(st.binary(), st.sampled_from([b"\r", b"\n"]), st.binary())
def test_one_extra_cr_or_lf_anywhere_is_bare(before: bytes, extra: bytes, after: bytes) -> None:
    data = (
        before.replace(b"\r", b"").replace(b"\n", b"")
        + extra
        + after.replace(b"\r", b"").replace(b"\n", b"")
    )
    assert has_bare_line_ending(data)


# --- split_header ---


def test_split_header_keeps_folded_fields_and_stops_at_the_blank_line() -> None:
    data = b"Subject: a long\r\n subject\r\n\tline\r\nFrom: a@b\r\n\r\nBody: not a header\r\n"
    lines, rest = split_header(data)
    assert lines == [b"Subject: a long\r\n", b" subject\r\n", b"\tline\r\n", b"From: a@b\r\n"]
    assert rest == b"Body: not a header\r\n"


def test_split_header_stops_at_a_line_that_is_not_a_field() -> None:
    data = b"From: a@b\r\nHello there, no blank line\r\nSecond line\r\n"
    lines, rest = split_header(data)
    assert lines == [b"From: a@b\r\n"]
    assert rest == b"Hello there, no blank line\r\nSecond line\r\n"


def test_split_header_with_a_body_looking_first_line_has_no_header() -> None:
    data = b"Dear customer,\r\nFrom: a@b\r\n\r\n"
    assert split_header(data) == ([], data)


def test_split_header_does_not_take_a_leading_continuation_as_header() -> None:
    data = b" indented\r\nFrom: a@b\r\n"
    assert split_header(data) == ([], data)


def test_split_header_without_a_blank_line_takes_everything_as_header() -> None:
    lines, rest = split_header(b"From: a@b\r\nTo: c@d\r\n")
    assert (lines, rest) == ([b"From: a@b\r\n", b"To: c@d\r\n"], b"")


def test_split_header_of_a_last_line_without_crlf_adds_one() -> None:
    assert split_header(b"From: a@b") == ([b"From: a@b\r\n"], b"")


def test_split_header_of_nothing() -> None:
    assert split_header(b"") == ([], b"")
    assert split_header(b"\r\n") == ([], b"")
    assert split_header(b"\r\nbody\r\n") == ([], b"body\r\n")


# --- field_values ---


def test_field_values_unfolds_and_matches_names_case_insensitively() -> None:
    lines = header_of(
        b"FROM: Someone\r\n <a@example.com>\r\n"
        b"To: x@y\r\n"
        b"Subject:\tfirst\r\n\tsecond\r\n"
        b"from : second@example.com\r\n"
        b"\r\n"
    )
    assert field_values(lines, b"from") == [b"Someone <a@example.com>", b"second@example.com"]
    assert field_values(lines, b"subject") == [b"first\tsecond"]
    assert field_values(lines, b"cc") == []


def test_field_values_does_not_confuse_similar_names() -> None:
    lines = header_of(b"From-Address: x\r\nX-From: y\r\nResent-From: z\r\n\r\n")
    assert field_values(lines, b"from") == []


# --- prepare ---


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"To: a@b\r\nSubject: hi\r\n\r\nbody\r\n", "has no From header"),
        (b"Hello, no header at all\r\n", "has no From header"),
        (b"From: a@b\r\nfrom: c@d\r\n\r\nbody\r\n", "has more than one From header"),
    ],
)
def test_prepare_wants_exactly_one_from(data: bytes, problem: str) -> None:
    with pytest.raises(Rejected) as caught:
        run(data)
    assert str(caught.value) == f"550 5.6.0 Error: message {problem} (RFC 5322 3.6)"


def test_a_from_in_the_body_does_not_count() -> None:
    data = b"Subject: x\r\n\r\nFrom: a@b\r\n"
    with pytest.raises(Rejected, match="has no From header"):
        run(data)


def test_prepare_adds_message_id_and_date_when_missing() -> None:
    prepared = prepare(
        b"From: a@example.com\r\n\r\nhi\r\n",
        received=RECEIVED,
        queue_id=QID,
        hostname=HOST,
        now=NOW,
    )
    lines = header_of(prepared.data)
    assert prepared.message_id == f"<{QID}@{HOST}>"
    assert field_values(lines, b"message-id") == [f"<{QID}@{HOST}>".encode()]
    (date,) = field_values(lines, b"date")
    assert parsedate_to_datetime(date.decode()).timestamp() == NOW


def test_prepare_keeps_an_existing_message_id_and_date() -> None:
    data = (
        b"From: a@example.com\r\n"
        b"Message-ID: <app.42@example.com>\r\n"
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"\r\nhi\r\n"
    )
    prepared = prepare(data, received=RECEIVED, queue_id=QID, hostname=HOST, now=NOW)
    assert prepared.message_id == "<app.42@example.com>"
    assert prepared.data == RECEIVED + data  # nothing added but the Received field
    lines = header_of(prepared.data)
    assert field_values(lines, b"message-id") == [b"<app.42@example.com>"]
    assert field_values(lines, b"date") == [b"Mon, 1 Jan 2024 00:00:00 +0000"]


def test_prepare_adds_only_what_is_missing() -> None:
    with_id = b"From: a@example.com\r\nMessage-Id: <x@y>\r\n\r\nhi\r\n"
    lines = header_of(run(with_id))
    assert field_values(lines, b"message-id") == [b"<x@y>"]
    assert len(field_values(lines, b"date")) == 1
    with_date = b"From: a@example.com\r\nDATE: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nhi\r\n"
    lines = header_of(run(with_date))
    assert field_values(lines, b"date") == [b"Mon, 1 Jan 2024 00:00:00 +0000"]
    assert field_values(lines, b"message-id") == [f"<{QID}@{HOST}>".encode()]


def test_prepare_uses_the_clock_when_no_time_is_given() -> None:
    (date,) = field_values(header_of(run(b"From: a@b\r\n\r\n", now=None)), b"date")
    assert parsedate_to_datetime(date.decode()).timestamp() > NOW  # "now", not the epoch


def test_received_field_goes_first() -> None:
    data = (
        b"Received: from older.hop\r\n\tby x; Mon, 1 Jan 2024 00:00:00 +0000\r\nFrom: a@b\r\n\r\n"
    )
    prepared = run(data)
    assert prepared.startswith(RECEIVED)
    assert header_of(prepared)[: len(header_of(RECEIVED))] == header_of(RECEIVED)
    assert len(field_values(header_of(prepared), b"received")) == 2


def test_body_starting_without_a_blank_line_is_kept_and_separated() -> None:
    data = b"From: a@b\r\nMessage-ID: <m@b>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nHello\r\n"
    prepared = run(data)
    assert prepared == (
        RECEIVED
        + b"From: a@b\r\nMessage-ID: <m@b>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        + b"\r\nHello\r\n"
    )


_ascii_line = st.text(
    alphabet=st.characters(min_codepoint=0, max_codepoint=127, exclude_characters="\r\n"),
    max_size=80,
)
_header_line = st.sampled_from(
    [
        b"To: someone@example.org\r\n",
        b"Subject: Your order\r\n has shipped\r\n",
        b"Message-ID: <abc@example.com>\r\n",
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n",
        b"X-Campaign: 42\r\n",
    ]
)


@given(st.lists(_header_line, max_size=4), st.lists(_ascii_line, max_size=20))
def test_body_is_preserved_byte_for_byte(extra: list[bytes], body_lines: list[str]) -> None:
    body = b"".join(line.encode() + b"\r\n" for line in body_lines)
    header = b"From: a@example.com\r\n" + b"".join(extra)
    prepared = run(header + b"\r\n" + body)
    lines, rest = split_header(prepared)
    assert rest == body
    assert prepared.endswith(b"\r\n\r\n" + body)
    # Every original field is still there, in order, after what was added.
    original = header_of(header + b"\r\n")
    assert [line for line in lines if line in original] == original
    assert not has_bare_line_ending(prepared)


@given(st.lists(_ascii_line, min_size=1, max_size=20))
def test_nothing_is_dropped_when_there_is_no_blank_line(body_lines: list[str]) -> None:
    # Whatever the message is, prepare() only inserts: the original bytes all
    # appear, in order, as the tail of the result after the Received field.
    data = b"From: a@example.com\r\n" + b"".join(line.encode() + b"\r\n" for line in body_lines)
    prepared = run(data)
    _, rest = split_header(data)
    assert prepared.endswith(rest)
    assert prepared.startswith(RECEIVED)


# --- received_field and header_safe ---


def test_received_field_names_a_lone_recipient() -> None:
    field = received_field(
        helo="app1.internal",
        client_ip="10.0.0.5",
        hostname=HOST,
        protocol="ESMTPSA",
        queue_id=QID,
        recipients=["only@example.org"],
        now=NOW,
    )
    lines = field.split(b"\r\n")
    assert lines[0] == b"Received: from app1.internal ([10.0.0.5])"
    assert lines[1] == f"\tby {HOST} (mta) with ESMTPSA id {QID}".encode()
    assert lines[2] == b"\tfor <only@example.org>;"
    assert parsedate_to_datetime(lines[3].strip().decode()).timestamp() == NOW
    assert lines[4] == b""  # ends with CRLF
    assert header_of(field + b"\r\n") == [line + b"\r\n" for line in lines[:4]]


@pytest.mark.parametrize("recipients", [["a@example.org", "bcc@example.net"], []])
def test_received_field_names_no_recipient_unless_there_is_one(recipients: list[str]) -> None:
    field = received_field(
        helo="h",
        client_ip="10.0.0.5",
        hostname=HOST,
        protocol="ESMTP",
        queue_id=QID,
        recipients=recipients,
        now=NOW,
    )
    assert b" for " not in field and b"\tfor " not in field
    assert b"bcc@example.net" not in field
    assert field.split(b"\r\n")[1].endswith(f"id {QID};".encode())


def test_received_field_cannot_be_used_to_inject_headers() -> None:
    field = received_field(
        helo="evil\r\nBcc: victim@example.com",
        client_ip="10.0.0.5",
        hostname=HOST,
        protocol="ESMTP",
        queue_id=QID,
        recipients=["x@y\r\nX-Injected: 1"],
        now=NOW,
    )
    lines, rest = split_header(field + b"\r\n")
    assert rest == b""
    assert field_values(lines, b"bcc") == []
    assert field_values(lines, b"x-injected") == []
    assert [line[:1] in (b" ", b"\t") for line in lines] == [False, True, True, True]


def test_header_safe_keeps_printable_ascii_and_replaces_the_rest() -> None:
    assert header_safe("mail.example.com [ok] (x)") == "mail.example.com [ok] (x)"
    assert header_safe("a\r\nb") == "a??b"
    assert header_safe("tab\there") == "tab?here"
    assert header_safe("caf\u00e9\x00") == "caf??"
    assert len(header_safe("x" * 1000)) == 200


@given(st.text())
def test_header_safe_output_never_breaks_a_line(text: str) -> None:
    safe = header_safe(text)
    assert "\r" not in safe and "\n" not in safe
    assert all(" " <= char <= "~" for char in safe)
    assert len(safe) <= 200


def test_an_empty_message_id_is_replaced() -> None:
    prepared = prepare(
        b"From: a@example.test\r\nMessage-ID:\r\n\r\nbody\r\n",
        received=b"",
        queue_id="06H13HS0N80M1W00",
        hostname="mta.test",
        now=0,
    )
    assert prepared.message_id == "<06H13HS0N80M1W00@mta.test>"
    assert prepared.data.count(b"Message-ID:") == 1
