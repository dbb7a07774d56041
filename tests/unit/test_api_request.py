"""The injection API's request checked field by field (mta.inbound.api_request).

Every problem is one RequestError whose sentence starts with the field's
path; hypothesis checks that no JSON document, however odd, gets anything
else out of the parser.
"""

from __future__ import annotations

import base64
import contextlib
import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.inbound.api_request import (
    METADATA_KEYS_MAX,
    Attachment,
    Contact,
    InjectRequest,
    MediaType,
    Parts,
    Recipient,
    RequestError,
    parse_request,
)

LIMIT = 100


def request(**changes: Any) -> dict[str, Any]:
    """A valid request with every field, changed by ``changes``."""
    document: dict[str, Any] = {
        "envelope_sender": "app@shop.test",
        "recipients": [
            {"email": "a@dest.test", "name": "Ann", "substitutions": {"code": 1}},
            {"email": "b@dest.test"},
        ],
        "substitutions": {"shop": "Shop"},
        "content": {
            "from": {"email": "app@shop.test", "name": "Shop"},
            "subject": "Code {{ code }}",
            "text_body": "Hello {{ name }}",
            "html_body": "<p>Hello {{ name }}</p>",
            "headers": {"X-Order": "{{ code }}"},
            "attachments": [
                {
                    "data": base64.b64encode(b"\x89PNG").decode(),
                    "base64": True,
                    "content_type": "image/png",
                    "file_name": "logo.png",
                    "content_id": "logo",
                },
                {"data": "a,b\n", "content_type": "text/csv; charset=utf-8"},
            ],
            "reply_to": {"email": "help@shop.test"},
        },
        "metadata": {"campaign": "spring", "customer": "42"},
        "priority": "transactional",
        "pool": "otp",
    }
    document.update(changes)
    return document


def error_of(document: Any, limit: int = LIMIT) -> str:
    with pytest.raises(RequestError) as raised:
        parse_request(document, limit)
    return str(raised.value)


def test_a_whole_request_becomes_its_dataclasses() -> None:
    parsed = parse_request(request(), LIMIT)
    assert parsed == InjectRequest(
        envelope_sender="app@shop.test",
        recipients=(
            Recipient("a@dest.test", "Ann", {"code": 1}),
            Recipient("b@dest.test"),
        ),
        content=Parts(
            sender=Contact("app@shop.test", "Shop"),
            subject="Code {{ code }}",
            text_body="Hello {{ name }}",
            html_body="<p>Hello {{ name }}</p>",
            headers=(("X-Order", "{{ code }}"),),
            attachments=(
                Attachment(b"\x89PNG", MediaType("image", "png"), "logo.png", "logo"),
                Attachment(b"a,b\n", MediaType("text", "csv", {"charset": "utf-8"})),
            ),
            reply_to=Contact("help@shop.test"),
        ),
        substitutions={"shop": "Shop"},
        metadata={"campaign": "spring", "customer": "42"},
        priority="transactional",
        pool="otp",
    )
    assert parsed.campaign == "spring"


def test_the_smallest_request_and_content_as_a_string() -> None:
    parsed = parse_request(
        {
            "envelope_sender": "app@shop.test",
            "recipients": [{"email": "a@dest.test"}],
            "content": "Subject: hi\n\nHello",
        },
        LIMIT,
    )
    assert parsed.content == "Subject: hi\n\nHello"
    assert (parsed.priority, parsed.pool, parsed.campaign) == (None, None, None)


def test_null_is_absent_as_in_kumomta() -> None:
    parsed = parse_request(request(priority=None, pool=None, metadata=None), LIMIT)
    assert (parsed.priority, parsed.pool, parsed.metadata) == (None, None, {})


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (["colour"], "red", "colour: unknown field"),
        (["content", "bcc"], "x@y.test", "content.bcc: unknown field"),
        (["recipients", 0, "cc"], "x", "recipients[0].cc: unknown field"),
        (["content", "from", "title"], "x", "content.from.title: unknown field"),
        (["content", "attachments", 1, "size"], 3, "content.attachments[1].size: unknown field"),
        (["deferred_generation"], True, "deferred_generation: unknown field"),
    ],
)
def test_unknown_fields_at_any_level(path: list[Any], value: Any, expected: str) -> None:
    assert error_of(changed(request(), path, value)) == expected


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (["recipients"], {"email": "a@dest.test"}, "recipients: expected an array, got an object"),
        (["recipients", 1], "b@dest.test", "recipients[1]: expected an object, got a string"),
        (["recipients", 0, "email"], 7, "recipients[0].email: expected a string, got a number"),
        (["substitutions"], "x", "substitutions: expected an object, got a string"),
        (
            ["recipients", 0, "substitutions"],
            [1],
            "recipients[0].substitutions: expected an object, got an array",
        ),
        (["content"], 5, "content: expected an object, got a number"),
        (["content", "subject"], True, "content.subject: expected a string, got a boolean"),
        (["content", "headers", "X-Order"], 5, "content.headers.X-Order: expected a string"),
        (
            ["content", "attachments", 0, "base64"],
            "yes",
            "content.attachments[0].base64: expected true or false, got a string",
        ),
        (["metadata", "customer"], 42, "metadata.customer: expected a string, got a number"),
    ],
)
def test_wrong_types_name_the_field(path: list[Any], value: Any, expected: str) -> None:
    assert error_of(changed(request(), path, value)).startswith(expected)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (["envelope_sender"], "envelope_sender: required"),
        (["recipients", 0, "email"], "recipients[0].email: required"),
        (["content", "from", "email"], "content.from.email: required"),
        (["content", "attachments", 0, "content_type"], "content.attachments[0].content_type"),
    ],
)
def test_missing_required_fields(path: list[Any], expected: str) -> None:
    assert error_of(changed(request(), path, None)).startswith(expected)


def test_the_body_must_be_an_object() -> None:
    assert error_of([1, 2]) == "the request: expected an object, got an array"


def test_content_needs_a_body() -> None:
    content = {"from": {"email": "app@shop.test"}, "subject": "hi"}
    assert error_of(request(content=content)) == "content: give text_body, html_body or both"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (["envelope_sender"], "no-at-sign", 'envelope_sender: not a valid address: "no-at-sign"'),
        (["content", "from", "email"], "a@@b", 'content.from.email: not a valid address: "a@@b"'),
        (["recipients", 0, "name"], "Ann\r\nBcc: x", "recipients[0].name: a line break"),
        (["content", "attachments", 0, "data"], "not base64!", "[0].data: not valid base64"),
        (["content", "attachments", 1, "content_type"], "csv", "[1].content_type: expected a"),
        (["content", "headers", "Bad Name"], "x", "content.headers.Bad Name: not a header"),
        (["content", "headers", "Content-Type"], "x", "Content-Type: set by the MTA"),
        (["priority"], "urgent", 'priority: expected "transactional" or "bulk", got "urgent"'),
        (["metadata", "note"], "x" * 1025, "metadata.note: keys are 1 to 64 characters"),
    ],
)
def test_values_that_cannot_be(path: list[Any], value: Any, expected: str) -> None:
    assert expected in error_of(changed(request(), path, value))


def test_recipients_between_one_and_the_limit() -> None:
    assert error_of(request(recipients=[])) == "recipients: give at least one recipient"
    many = [{"email": f"u{n}@dest.test"} for n in range(LIMIT + 1)]
    assert error_of(request(recipients=many)) == (
        "recipients: 101 recipients, more than the 100 a request may have"
    )
    assert len(parse_request(request(recipients=many[:LIMIT]), LIMIT).recipients) == LIMIT


def test_a_recipients_address_is_not_checked_here() -> None:
    """A bad recipient address is a failed recipient in the answer, not a bad request."""
    parsed = parse_request(request(recipients=[{"email": "not an address"}]), LIMIT)
    assert parsed.recipients[0].email == "not an address"


def test_metadata_has_a_bounded_number_of_keys() -> None:
    many = {f"k{n}": "v" for n in range(METADATA_KEYS_MAX + 1)}
    assert error_of(request(metadata=many)) == "metadata: more than 32 keys"


def changed(document: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    """A copy of ``document`` with the value at ``path`` replaced (None: removed)."""
    copied = copy.deepcopy(document)
    holder: Any = copied
    for step in path[:-1]:
        holder = holder[step]
    if value is None:
        del holder[path[-1]]
    else:
        holder[path[-1]] = value
    return copied


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=10,
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value where another value could go."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths(item, (*prefix, index))
    return found


@given(st.data(), JSON)
def test_any_value_anywhere_is_taken_or_a_request_error(data: st.DataObject, value: Any) -> None:
    """Replace any part of a valid request by any JSON value: the parser returns a
    request or raises RequestError naming where, and nothing else escapes it."""
    path = data.draw(st.sampled_from(paths(request())))
    document = changed(request(), list(path), value if value is not None else "")
    try:
        parse_request(document, LIMIT)
    except RequestError as error:
        first = str(path[0])
        assert str(error).startswith((first, "the request")), (path, str(error))


@given(JSON)
def test_any_document_is_taken_or_a_request_error(document: Any) -> None:
    with contextlib.suppress(RequestError):  # anything else fails the test
        parse_request(document, LIMIT)
