"""The header section of a message (RFC 5322 2.2, 3.3): fields, their values, dates.

Pure functions over CRLF-separated bytes. The header section ends at the
first empty line, or at the first line that is neither a field nor a field's
continuation; what follows is the body. Inbound uses these to check and add
fields, bounces to quote the original's header section, and `mta queue` to
show a message's fields. DKIM signing parses on its own (mta.signing.rules),
because it must read a message exactly as a verifier does.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import format_datetime

CRLF = b"\r\n"
# A header field's first line: a name of printable ASCII other than ":", a colon.
_FIELD_START = re.compile(rb"^[!-9;-~]+[ \t]*:")
_UNSAFE_IN_HEADER = re.compile(r"[^!-~ ]")


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


def header_safe(text: str) -> str:
    """``text`` fit for a header we write: printable ASCII, no line breaks."""
    return _UNSAFE_IN_HEADER.sub("?", text)[:200]


def rfc5322_date(seconds: float) -> str:
    """The date-time of a Date field, in UTC: "Tue, 14 Nov 2023 22:13:20 +0000"."""
    return format_datetime(datetime.fromtimestamp(int(seconds), UTC))
