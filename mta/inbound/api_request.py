"""The HTTP injection API's request: JSON checked field by field into dataclasses. Pure.

The field names are KumoMTA's (``/api/inject/v1``), so that its clients can
switch; ``metadata``, ``priority`` and ``pool`` are ours. Every problem is a
``RequestError`` whose text starts with the field's path
(``recipients[3].substitutions: expected an object, got a string``): unknown
fields at any level, wrong types, missing required fields. ``null`` counts
as absent, as in KumoMTA. Whether a recipient's address is one we relay to
is not checked here: a bad one is a failed recipient, not a bad request.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from mta.config import PRIORITIES
from mta.mail.address import address_is_valid

# A header field's name: printable ASCII but the colon (RFC 5322 2.2).
_FIELD_NAME = re.compile(r"[!-9;-~]+")
# What ends a line for the email package (str.splitlines): none may be in a header field.
LINE_BREAK = re.compile(r"[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
# Fields the MTA writes from the bodies and attachments; a client's would contradict them.
MIME_FIELDS = frozenset(
    {"mime-version", "content-type", "content-transfer-encoding", "content-disposition"}
)
METADATA_KEYS_MAX = 32
METADATA_KEY_MAX = 64
METADATA_VALUE_MAX = 1024


class RequestError(Exception):
    """A request the API does not take; str() is one sentence starting with the field."""


@dataclass(frozen=True)
class Contact:
    email: str
    name: str = ""


@dataclass(frozen=True)
class MediaType:
    maintype: str
    subtype: str
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Attachment:
    data: bytes
    media_type: MediaType
    file_name: str | None = None
    content_id: str | None = None  # an inline part (multipart/related) when set


@dataclass(frozen=True)
class Parts:
    """``content`` as an object: the message the MTA builds."""

    sender: Contact | None = None  # the From field ("from" in the JSON)
    subject: str | None = None
    text_body: str | None = None
    html_body: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    attachments: tuple[Attachment, ...] = ()
    reply_to: Contact | None = None


@dataclass(frozen=True)
class Recipient:
    email: str
    name: str = ""
    substitutions: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InjectRequest:
    envelope_sender: str
    recipients: tuple[Recipient, ...]
    content: str | Parts  # a string is a whole RFC 5322 message
    substitutions: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)
    priority: str | None = None
    pool: str | None = None

    @property
    def campaign(self) -> str | None:
        return self.metadata.get("campaign")


def parse_request(document: Any, max_recipients: int) -> InjectRequest:
    """The request in ``document`` (parsed JSON), or RequestError."""
    fields = _object(
        document,
        "",
        allowed={
            "envelope_sender",
            "recipients",
            "content",
            "substitutions",
            "metadata",
            "priority",
            "pool",
        },
        required={"envelope_sender", "recipients", "content"},
    )
    return InjectRequest(
        envelope_sender=_address(fields["envelope_sender"], "envelope_sender"),
        recipients=_recipients(fields["recipients"], max_recipients),
        content=_content(fields["content"]),
        substitutions=_object(fields.get("substitutions", {}), "substitutions"),
        metadata=_metadata(fields.get("metadata", {})),
        priority=_priority(fields.get("priority")),
        pool=_optional_text(fields.get("pool"), "pool"),
    )


# --- the request's parts


def _recipients(value: Any, limit: int) -> tuple[Recipient, ...]:
    items = _array(value, "recipients")
    if not items:
        raise RequestError("recipients: give at least one recipient")
    if len(items) > limit:
        raise RequestError(
            f"recipients: {len(items)} recipients, more than the {limit} a request may have"
        )
    return tuple(_recipient(item, f"recipients[{index}]") for index, item in enumerate(items))


def _recipient(value: Any, where: str) -> Recipient:
    fields = _object(value, where, allowed={"email", "name", "substitutions"}, required={"email"})
    return Recipient(
        email=_string(fields["email"], _at(where, "email")),
        name=_one_line(fields.get("name", ""), _at(where, "name")),
        substitutions=_object(fields.get("substitutions", {}), _at(where, "substitutions")),
    )


def _content(value: Any) -> str | Parts:
    if isinstance(value, str):
        return value
    fields = _object(
        value,
        "content",
        allowed={
            "from",
            "subject",
            "text_body",
            "html_body",
            "headers",
            "attachments",
            "reply_to",
        },
    )
    if "text_body" not in fields and "html_body" not in fields:
        raise RequestError("content: give text_body, html_body or both")
    return Parts(
        sender=_contact(fields["from"], "content.from") if "from" in fields else None,
        subject=_optional_text(fields.get("subject"), "content.subject"),
        text_body=_optional_text(fields.get("text_body"), "content.text_body"),
        html_body=_optional_text(fields.get("html_body"), "content.html_body"),
        headers=_headers(fields.get("headers", {})),
        attachments=_attachments(fields.get("attachments", [])),
        reply_to=_contact(fields["reply_to"], "content.reply_to") if "reply_to" in fields else None,
    )


def _contact(value: Any, where: str) -> Contact:
    fields = _object(value, where, allowed={"email", "name"}, required={"email"})
    return Contact(
        email=_address(fields["email"], _at(where, "email")),
        name=_one_line(fields.get("name", ""), _at(where, "name")),
    )


def _headers(value: Any) -> tuple[tuple[str, str], ...]:
    headers = []
    for name, text in _object(value, "content.headers").items():
        where = f"content.headers.{name}"
        if not _FIELD_NAME.fullmatch(name):
            raise RequestError(f"{where}: not a header field name (printable ASCII, no colon)")
        if name.lower() in MIME_FIELDS:
            raise RequestError(f"{where}: set by the MTA from the bodies and attachments")
        headers.append((name, _string(text, where)))
    return tuple(headers)


def _attachments(value: Any) -> tuple[Attachment, ...]:
    return tuple(
        _attachment(item, f"content.attachments[{index}]")
        for index, item in enumerate(_array(value, "content.attachments"))
    )


def _attachment(value: Any, where: str) -> Attachment:
    fields = _object(
        value,
        where,
        allowed={"data", "base64", "content_type", "file_name", "content_id"},
        required={"data", "content_type"},
    )
    encoded = _boolean(fields.get("base64", False), _at(where, "base64"))
    data = _string(fields["data"], _at(where, "data"))
    return Attachment(
        data=_decoded(data, _at(where, "data")) if encoded else data.encode(),
        media_type=_media_type(fields["content_type"], _at(where, "content_type")),
        file_name=_optional_line(fields.get("file_name"), _at(where, "file_name")),
        content_id=_optional_line(fields.get("content_id"), _at(where, "content_id")),
    )


def _decoded(data: str, where: str) -> bytes:
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: not valid base64") from None


def _media_type(value: Any, where: str) -> MediaType:
    """ "type/subtype; param=value", read by the email package's own parser."""
    text = _one_line(value, where)
    probe = EmailMessage()
    probe["Content-Type"] = text
    parsed = probe["Content-Type"]
    if parsed.defects or "/" not in text:
        raise RequestError(f'{where}: expected a media type such as "application/pdf"')
    return MediaType(parsed.maintype, parsed.subtype, dict(parsed.params))


def _metadata(value: Any) -> dict[str, str]:
    fields = _object(value, "metadata")
    if len(fields) > METADATA_KEYS_MAX:
        raise RequestError(f"metadata: more than {METADATA_KEYS_MAX} keys")
    for key, text in fields.items():
        where = f"metadata.{key}"
        _string(text, where)
        if not 0 < len(key) <= METADATA_KEY_MAX or len(text) > METADATA_VALUE_MAX:
            raise RequestError(
                f"{where}: keys are 1 to {METADATA_KEY_MAX} characters, "
                f"values up to {METADATA_VALUE_MAX}"
            )
    return fields


def _priority(value: Any) -> str | None:
    if value is None:
        return None
    if value not in PRIORITIES:
        raise RequestError(f'priority: expected "transactional" or "bulk", got {_shown(value)}')
    return str(value)


# --- JSON types


def _object(
    value: Any,
    where: str,
    allowed: set[str] | None = None,
    required: frozenset[str] | set[str] = frozenset(),
) -> dict[str, Any]:
    """``value`` as an object without its null fields; with ``allowed``, no other field."""
    if not isinstance(value, dict):
        raise RequestError(f"{where or 'the request'}: expected an object, got {_kind(value)}")
    present = {key: item for key, item in value.items() if item is not None}
    if allowed is not None:
        for key in value:
            if key not in allowed:
                raise RequestError(f"{_at(where, key)}: unknown field")
    missing = sorted(required - present.keys())
    if missing:
        raise RequestError(f"{_at(where, missing[0])}: required")
    return present


def _array(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise RequestError(f"{where}: expected an array, got {_kind(value)}")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{where}: expected a string, got {_kind(value)}")
    return value


def _boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"{where}: expected true or false, got {_kind(value)}")
    return value


def _optional_text(value: Any, where: str) -> str | None:
    return None if value is None else _string(value, where)


def _one_line(value: Any, where: str) -> str:
    """A string that goes into a header field as it is: no line break there."""
    text = _string(value, where)
    if LINE_BREAK.search(text):
        raise RequestError(f"{where}: a line break is not allowed here")
    return text


def _optional_line(value: Any, where: str) -> str | None:
    return None if value is None else _one_line(value, where)


def _address(value: Any, where: str) -> str:
    text = _string(value, where)
    if not address_is_valid(text):
        raise RequestError(f"{where}: not a valid address: {_shown(text)}")
    return text


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _shown(value: Any) -> str:
    """The client's value in an error: short, and as JSON would write it."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."
