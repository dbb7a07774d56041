"""Bounce messages: RFC 3464 delivery status notifications for failed recipients.

``build_dsn`` writes the complete message (RFC 6522 multipart/report) that
tells a sender which recipients could not be reached and why: a human
explanation in Postfix's style, the machine-readable message/delivery-status,
and the original message's header section (not its body: the sender has it,
and it may be large or private). The caller DKIM-signs the result and queues
it with the null sender <>, so that a DSN can never cause another DSN.

Everything that reaches this module from outside (remote reply texts,
recipient addresses) is made safe here: the human and machine parts are
7-bit US-ASCII, so any other character becomes '?', and every run of
whitespace, CR and LF included, becomes one space, so no diagnostic can
start a header field or a part of its own. (RFC 6533's internationalized
DSNs would keep non-ASCII addresses exactly; until SMTPUTF8 is accepted on
the way in, such addresses cannot reach the spool.) Lines end in CRLF only.
"""

from __future__ import annotations

import re
import secrets
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from mta.mail.header import rfc5322_date, split_header

ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})  # RFC 3464 2.3.3

_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_SMTP_REPLY = re.compile(r"[0-9]{3}(?: |$)")
_FOLD_BEFORE = re.compile(r"(?= [^ ])")  # a space followed by text: a place to fold
_FOLD_WIDTH = 78  # RFC 5322 2.1.1: SHOULD
_LINE_LIMIT = 998  # RFC 5322 2.1.1: MUST


@dataclass(frozen=True)
class Failure:
    """One recipient that could not be delivered, and why."""

    recipient: str
    status: str  # RFC 3463 enhanced code, e.g. "5.1.1"
    diagnostic: str  # the remote reply, "550 5.1.1 <x@example.net>: user unknown", or our reason
    remote_mta: str | None  # host that answered; None when none was reached (DNS, expiry)
    action: str = "failed"  # RFC 3464 Action; "delayed" for a future warning DSN

    def __post_init__(self) -> None:
        # status and action go into the report verbatim; refuse what would not parse.
        if not _STATUS.fullmatch(self.status):
            raise ValueError(f"A DSN status must look like 5.1.1, got {self.status!r}.")
        if self.action not in ACTIONS:
            raise ValueError(
                f"A DSN action must be one of {', '.join(sorted(ACTIONS))}, got {self.action!r}."
            )


def _safe(text: str) -> str:
    """One line of printable US-ASCII: whitespace runs -> one space, anything else -> '?'."""
    return _UNPRINTABLE.sub("?", " ".join(text.split()))


def _field(name: str, value: str) -> str:
    """'Name: value' folded before spaces to about 78 columns, every line under 998; CRLF-ended.

    Folding only inserts CRLF before an existing space, so unfolding gives
    the value back exactly. A single word longer than the 998-character line
    limit has to be split, and unfolding then shows a space at the split.
    """
    pieces = _FOLD_BEFORE.split(f"{name}: {value}")
    lines = [pieces[0]]
    for piece in pieces[1:]:
        if len(lines[-1]) + len(piece) > _FOLD_WIDTH:
            lines.append(piece)
        else:
            lines[-1] += piece
    limited: list[str] = []
    for line in lines:
        while len(line) > _LINE_LIMIT:
            limited.append(line[:_LINE_LIMIT])
            line = " " + line[_LINE_LIMIT:]
        limited.append(line)
    return "\r\n".join(limited) + "\r\n"


def _header_section(original: bytes) -> bytes:
    """The original's header fields, each line CRLF-ended."""
    fields, _ = split_header(original)
    # Spooled mail is CRLF-only (inbound refuses bare CR and LF), so this is a
    # no-op there; it guarantees the DSN is CRLF-only whatever it is given.
    return re.sub(rb"\r\n|\r|\n", b"\r\n", b"".join(fields))


def _human_part(reporting_mta: str, failures: Sequence[Failure]) -> str:
    lines = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients. The headers of your",
        "message are attached below.",
        "",
        "For further assistance, please send mail to postmaster.",
        "",
        "If you do so, please include this problem report.",
        "",
        "                   The mail system",
    ]
    for failure in failures:
        said = f"host {_safe(failure.remote_mta)} said: " if failure.remote_mta else ""
        entry = f"<{_safe(failure.recipient)}>: {said}{_safe(failure.diagnostic)}"
        # break_long_words keeps even a space-less diagnostic under the line limit.
        wrapped = textwrap.wrap(
            entry, width=_FOLD_WIDTH, subsequent_indent="    ", break_on_hyphens=False
        )
        lines += ["", *wrapped]
    return "\r\n".join(lines) + "\r\n"


def _diagnostic_code(diagnostic: str) -> str:
    # RFC 3464 2.3.6: type "smtp" says the text is an SMTP reply. Our own
    # reasons (no MX found, expired in the queue) are not, and get a private
    # "X-" type as Postfix's "X-Postfix; ..." does.
    text = _safe(diagnostic)
    kind = "smtp" if _SMTP_REPLY.match(text) else "X-MTA"
    return f"{kind}; {text}"


def _status_part(
    reporting_mta: str, queue_id: str, arrived: float, failures: Sequence[Failure]
) -> str:
    blocks = [
        _field("Reporting-MTA", f"dns; {reporting_mta}")
        + _field("X-Queue-ID", queue_id)
        + _field("Arrival-Date", rfc5322_date(arrived))
    ]
    for failure in failures:
        block = (
            _field("Final-Recipient", f"rfc822; {_safe(failure.recipient)}")
            + _field("Action", failure.action)
            + _field("Status", failure.status)
        )
        if failure.remote_mta:
            block += _field("Remote-MTA", f"dns; {_safe(failure.remote_mta)}")
        block += _field("Diagnostic-Code", _diagnostic_code(failure.diagnostic))
        blocks.append(block)
    # RFC 3464 2.1: the per-message block and each per-recipient block are
    # separated by an empty line.
    return "\r\n".join(blocks)


def _random_token() -> str:
    return secrets.token_hex(8)


def _boundary(queue_id: str, contents: Sequence[bytes]) -> str:
    """A multipart boundary that occurs in none of the parts (compared case-insensitively)."""
    prefix = re.sub(r"[^A-Za-z0-9]", "", queue_id)[:32] or "dsn"
    lowered = [content.lower() for content in contents]
    while True:
        boundary = f"{prefix}.{_random_token()}"
        needle = boundary.lower().encode("ascii")
        if not any(needle in content for content in lowered):
            return boundary


def build_dsn(
    *,
    original: bytes,
    message_queue_id: str,
    sender: str,
    arrived: float,
    failures: Sequence[Failure],
    reporting_mta: str,
    now: float,
    dsn_message_id: str,
) -> bytes:
    """A complete CRLF-only RFC 5322 message reporting `failures` to `sender`.

    original: the message as stored (signed), CRLF line endings; only its
    header section is returned. sender: the original envelope sender, to whom
    the DSN goes; it must not be empty (never bounce a bounce). The result is
    7bit unless the original's header section holds 8-bit bytes, which are
    kept as they were and labelled 8bit.
    """
    if not sender:
        raise ValueError("A DSN is never sent to the null sender <> (RFC 5321 4.5.5).")
    if not failures:
        raise ValueError("A DSN needs at least one recipient to report.")
    host = _safe(reporting_mta)
    queue_id = _safe(message_queue_id)

    human = _human_part(host, failures).encode("ascii")
    status = _status_part(host, queue_id, arrived, failures).encode("ascii")
    headers = _header_section(original)
    boundary = _boundary(queue_id, [human, status, headers])
    encoding = "7bit" if headers.isascii() else "8bit"

    top = (
        _field("From", f"Mail Delivery System <MAILER-DAEMON@{host}>")
        + _field("To", f"<{_safe(sender)}>")
        + _field("Subject", "Undelivered Mail Returned to Sender")
        + _field("Date", rfc5322_date(now))
        + _field("Message-ID", _safe(dsn_message_id))
        # RFC 3834: autoresponders must not answer this.
        + _field("Auto-Submitted", "auto-replied")
        + _field("MIME-Version", "1.0")
        + "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        + f'\tboundary="{boundary}"\r\n'
        + _field("Content-Transfer-Encoding", encoding)
    ).encode("ascii")
    delimiter = b"--" + boundary.encode("ascii")

    # Each delimiter's leading CRLF belongs to the delimiter (RFC 2046 5.1.1),
    # so a part's content keeps its own final CRLF.
    return b"".join(
        [
            top,
            b"\r\nThis is a MIME-encapsulated message.\r\n\r\n",
            delimiter + b"\r\n",
            b"Content-Description: Notification\r\n",
            b"Content-Type: text/plain; charset=us-ascii\r\n\r\n",
            human,
            b"\r\n" + delimiter + b"\r\n",
            b"Content-Description: Delivery report\r\n",
            b"Content-Type: message/delivery-status\r\n\r\n",
            status,
            b"\r\n" + delimiter + b"\r\n",
            b"Content-Description: Undelivered Message Headers\r\n",
            b"Content-Type: text/rfc822-headers\r\n",
            b"Content-Transfer-Encoding: " + encoding.encode("ascii") + b"\r\n\r\n",
            headers,
            b"\r\n" + delimiter + b"--\r\n",
        ]
    )
