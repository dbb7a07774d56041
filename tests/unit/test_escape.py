"""The one escaping rule for values from outside in logs and `mta queue` (mta.observe.escape),
and the log formatters that apply it (mta.observe.logs)."""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback

from hypothesis import given
from hypothesis import strategies as st

from mta.observe.escape import escape_controls, field, printable, unquote
from mta.observe.logs import JsonFormatter, TextFormatter, fields_of

# The Message-ID that forged a "status=queued" line for another queue ID (issue 20).
FORGED_MESSAGE_ID = (
    "<x@y> id=06H00000000000000 from=<ceo@bank.test> status=queued \x1b[31mRED\x1b[0m"
)
QUEUED = "id=%s from=%s size=%d nrcpt=%d client=[%s] message-id=%s dkim=%s status=queued"

BARE = re.compile(r'[^\s="\\]+')
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
# Every kind of character the rule must handle, in any mix.
hostile_text = st.text(
    st.one_of(
        st.characters(),  # all of Unicode, surrogates included
        st.sampled_from(' ="\\<>\n\r\t\x00\x1b\x7f\x85\x9b\u2028\u202e\xa0'),
    )
)


def no_control_character(text: str) -> bool:
    return text.isprintable()


def record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("mta.smtpd", logging.INFO, __file__, 1, message, args, None)


# --- the rule ---


@given(hostile_text)
def test_a_field_is_one_printable_token_that_unquotes_to_the_original(text: str) -> None:
    value = field(text)
    assert no_control_character(value)
    # Either bare (no space, "=", quote or backslash) or one quoted string whose
    # quotes inside are escaped: nothing in it can start another field.
    assert BARE.fullmatch(value) or QUOTED.fullmatch(value), value
    assert unquote(value) == text


@given(hostile_text)
def test_printable_has_no_control_character_and_can_be_undone(text: str) -> None:
    shown = printable(text)
    assert no_control_character(shown)
    assert unquote('"' + shown.replace('"', '\\"') + '"') == text


@given(hostile_text)
def test_escape_controls_leaves_a_field_as_it_is(text: str) -> None:
    assert escape_controls(field(text)) == field(text)
    assert no_control_character(escape_controls(text))


def test_plain_values_are_written_as_they_are() -> None:
    for plain in ("<app@example.test>", "<>", "<receipt-42@app.example.test>", "mx[10.0.0.1]:25"):
        assert field(plain) == plain
    assert field("<caf\u00e9@example.test>") == "<caf\u00e9@example.test>"  # printable


def test_values_that_could_read_as_fields_are_quoted() -> None:
    assert field("") == '""'
    assert field("<a b@c>") == '"<a b@c>"'
    assert field("<SRS0=ab=cd=x.test=u@y.test>") == '"<SRS0=ab=cd=x.test=u@y.test>"'
    assert field('say "hi"') == '"say \\"hi\\""'
    assert field("C:\\dir") == '"C:\\\\dir"'
    assert field(FORGED_MESSAGE_ID) == (
        '"<x@y> id=06H00000000000000 from=<ceo@bank.test> status=queued \\x1b[31mRED\\x1b[0m"'
    )


def test_non_printable_characters_are_backslash_escapes() -> None:
    assert printable("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert printable("\x00\x1b\x7f\x85\x9b") == "\\x00\\x1b\\x7f\\x85\\x9b"
    assert printable("\u2028\u202e\udcff") == "\\u2028\\u202e\\udcff"
    assert printable("\U000e0001") == "\\U000e0001"
    assert printable("Subject: hi \x1b]0;owned\x07") == "Subject: hi \\x1b]0;owned\\x07"


def test_fields_of_a_line_with_a_forged_message_id() -> None:
    message = QUEUED % (
        "06H13HS0N80M1W00AAAAAA",
        field("<app@example.test>"),
        919,
        1,
        "127.0.0.1",
        field(FORGED_MESSAGE_ID),
        "example.test/s1",
    )
    fields, reply = fields_of(message)
    assert fields["id"] == "06H13HS0N80M1W00AAAAAA"
    assert fields["from"] == "app@example.test"
    assert fields["message-id"] == printable(FORGED_MESSAGE_ID)
    assert fields["status"] == "queued" and reply is None
    assert "06H00000000000000" not in fields.values()


@given(hostile_text, hostile_text)
def test_no_value_adds_or_changes_a_field(sender: str, message_id: str) -> None:
    message = QUEUED % ("REAL", field(f"<{sender}>"), 1, 1, "127.0.0.1", field(message_id), "none")
    fields, reply = fields_of(message)
    assert list(fields) == ["id", "from", "size", "nrcpt", "client", "message-id", "dkim", "status"]
    assert fields["id"] == "REAL" and fields["status"] == "queued" and reply is None
    assert fields["from"] == printable(sender)
    shown = printable(message_id)
    if len(shown) > 1 and shown[0] == "<" and shown[-1] == ">":
        shown = shown[1:-1]
    assert fields["message-id"] == shown


def test_a_remote_reply_after_status_is_not_read_as_fields() -> None:
    fields, reply = fields_of("id=A to=<a@b.test> status=deferred (451 try later id=B from=<x>)")
    assert fields == {"id": "A", "to": "a@b.test", "status": "deferred"}
    assert reply == "451 try later id=B from=<x>"


# --- the formatters ---


def test_text_lines_hold_no_control_character_whatever_the_message() -> None:
    formatter = TextFormatter("%(levelname)s: %(message)s")
    line = formatter.format(record("free text: %s", "a\nFAKE: id=X status=queued \x1b[31m\x85"))
    assert "\n" not in line and no_control_character(line)
    assert line == "INFO: free text: a\\nFAKE: id=X status=queued \\x1b[31m\\x85"


def test_a_text_line_with_a_forged_message_id_has_one_id_and_no_escape() -> None:
    message_id = field(FORGED_MESSAGE_ID)
    line = TextFormatter("%(message)s").format(
        record(QUEUED, "REAL", "<a@b.test>", 1, 1, "127.0.0.1", message_id, "none")
    )
    assert no_control_character(line)
    fields, _ = fields_of(line)
    assert fields["id"] == "REAL" and fields["status"] == "queued"
    assert fields["message-id"] == printable(FORGED_MESSAGE_ID)
    # A reader who splits at spaces without minding quotes is still fooled
    # (docs/operations.md says how to grep); one who minds them is not.
    assert line.count("id=06H00000000000000") == 1
    assert line.count('"') == 2


def test_a_traceback_keeps_its_lines_but_no_control_character() -> None:
    try:
        raise ValueError("bad \x1b]0;owned\x07 input")
    except ValueError:
        line = logging.LogRecord(
            "mta.smtpd", logging.ERROR, __file__, 1, "boom", (), sys.exc_info()
        )
    text = TextFormatter("%(message)s").format(line)
    assert text.startswith("boom\nTraceback")
    assert "\x1b" not in text and "\x07" not in text
    assert "ValueError: bad \\x1b]0;owned\\x07 input" in text


def test_json_fields_are_the_values_and_the_line_holds_no_control_character() -> None:
    sender, message_id = field("<a b@c.test>"), field(FORGED_MESSAGE_ID)
    line = JsonFormatter().format(
        record(QUEUED, "REAL", sender, 1, 1, "127.0.0.1", message_id, "x")
    )
    assert no_control_character(line)
    fields = json.loads(line)
    assert fields["id"] == "REAL" and fields["status"] == "queued"
    assert fields["from"] == "a b@c.test"
    assert fields["message-id"] == printable(FORGED_MESSAGE_ID)
    assert "\x1b" not in fields["message-id"] and "\x1b" not in fields["message"]


@given(hostile_text)
def test_any_json_line_is_one_printable_line_of_json(text: str) -> None:
    error = RuntimeError(text)
    try:
        raise error
    except RuntimeError:
        exc_info = sys.exc_info()
    line = logging.LogRecord("mta.smtpd", logging.ERROR, __file__, 1, "%s", (text,), exc_info)
    formatted = JsonFormatter().format(line)
    assert no_control_character(formatted)
    fields = json.loads(formatted)
    assert fields["message"] == escape_controls(text)
    last = "".join(traceback.format_exception_only(RuntimeError, error))[:-1]
    assert fields["exception"].endswith(last)  # exact, JSON-escaped
