"""Header sanity for a received message: pure functions, no I/O.

What the listener checks and adds before signing and spooling:

- Line endings: every line must end in CRLF. A bare LF or bare CR is how SMTP
  smuggling (CVE-2023-51764 and kin) hides a second message inside the first
  for a receiver that reads line endings differently, so such data is refused
  as a whole; it is never "repaired".
- The header section must have exactly one From field (RFC 5322 3.6): DKIM
  signs by its domain and the big mailbox providers refuse mail without one.
- A Received field goes on top; Message-ID and Date are added when missing
  (RFC 5322 requires Date; receivers score mail without Message-ID as spam).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from mta.inbound.reply_texts import BARE_LINE_ENDING

CRLF = b"\r\n"
# A header field's first line: a name of printable ASCII other than ":", a colon.
_FIELD_START = re.compile(rb"^[!-9;-~]+[ \t]*:")
_UNSAFE_IN_HEADER = re.compile(r"[^!-~ ]")


class Rejected(Exception):
    """The message cannot be accepted; str() is the SMTP reply."""


@dataclass(frozen=True)
class Prepared:
    data: bytes  # the message as it will be signed and stored
    message_id: str  # its Message-ID field's value
    instructed: str | None = None  # the value of the instruction field, which was removed


def has_bare_line_ending(data: bytes) -> bool:
    """True if any CR or LF is not part of a CRLF pair."""
    pairs = data.count(CRLF)
    return data.count(b"\n") != pairs or data.count(b"\r") != pairs


def split_header(data: bytes) -> tuple[list[bytes], bytes]:
    """The header section as a list of field lines (with their CRLF), and the
    rest. The header section ends at the first blank line, or at the first
    line that is neither a field nor a field's continuation; the rest then
    starts at that line (so no data is dropped)."""
    lines: list[bytes] = []
    position = 0
    while position < len(data):
        end = data.find(CRLF, position)
        end = len(data) if end < 0 else end + 2
        line = data[position:end]
        if line == CRLF:
            return lines, data[end:]
        continuation = line[:1] in (b" ", b"\t") and bool(lines)
        if not continuation and not _FIELD_START.match(line):
            break
        lines.append(line if line.endswith(CRLF) else line + CRLF)
        position = end
    return lines, data[position:]


def field_name(line: bytes) -> bytes:
    return line.split(b":", 1)[0].strip().lower()


def field_values(lines: list[bytes], name: bytes) -> list[bytes]:
    """The unfolded values of every field called ``name`` (lower case)."""
    values: list[list[bytes]] = []
    collecting = False
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if collecting:
                values[-1].append(line.rstrip(CRLF))
            continue
        collecting = field_name(line) == name
        if collecting:
            values.append([line.split(b":", 1)[1].rstrip(CRLF)])
    return [b"".join(parts).strip() for parts in values]


def header_safe(text: str) -> str:
    """``text`` fit for a header we write: printable ASCII, no line breaks."""
    return _UNSAFE_IN_HEADER.sub("?", text)[:200]


def rfc5322_date(seconds: float) -> str:
    return format_datetime(datetime.fromtimestamp(int(seconds), UTC))


def received_field(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipients: list[str],
    now: float,
) -> bytes:
    # "for <address>" only names a lone recipient: listing many would
    # disclose Bcc recipients to every other recipient.
    for_part = f"\r\n\tfor <{header_safe(recipients[0])}>" if len(recipients) == 1 else ""
    return (
        f"Received: from {header_safe(helo)} ([{client_ip}])\r\n"
        f"\tby {hostname} (mta) with {protocol} id {queue_id}{for_part};\r\n"
        f"\t{rfc5322_date(now)}\r\n"
    ).encode()


def prepare(
    data: bytes,
    *,
    received: bytes,
    queue_id: str,
    hostname: str,
    now: float | None = None,
    instruction: str | None = None,
) -> Prepared:
    """The message to sign and store, or Rejected with the SMTP reply.

    ``instruction`` names a header field that instructs us rather than the
    recipient (the egress pool header): it is removed, and its value returned.
    """
    if has_bare_line_ending(data):
        raise Rejected(BARE_LINE_ENDING)
    lines, body = split_header(data)
    senders = field_values(lines, b"from")
    if len(senders) != 1:
        problem = "has no From header" if not senders else "has more than one From header"
        raise Rejected(f"550 5.6.0 Error: message {problem} (RFC 5322 3.6)")
    instructed = None
    if instruction is not None:
        lines, values = remove_field(lines, instruction.lower().encode())
        instructed = values[-1].decode("ascii", "replace") if values else None
    added = []
    message_ids = [value for value in field_values(lines, b"message-id") if value]
    if message_ids:
        message_id = message_ids[0].decode("ascii", "replace")
    else:
        lines, _ = remove_field(lines, b"message-id")  # an empty field is no Message-ID
        message_id = f"<{queue_id}@{hostname}>"
        added.append(f"Message-ID: {message_id}\r\n".encode())
    if not field_values(lines, b"date"):
        stamp = time.time() if now is None else now
        added.append(f"Date: {rfc5322_date(stamp)}\r\n".encode())
    data = received + b"".join(lines) + b"".join(added) + CRLF + body
    return Prepared(data, message_id, instructed)


def remove_field(lines: list[bytes], name: bytes) -> tuple[list[bytes], list[bytes]]:
    """The header lines without any field called ``name``, and that field's values."""
    values = field_values(lines, name)
    kept: list[bytes] = []
    dropping = False
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = field_name(line) == name
        if not dropping:
            kept.append(line)
    return kept, values
