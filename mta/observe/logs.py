"""Logging: one line per event, Postfix-style text or JSON lines.

Every event line the daemon writes is ``key=value`` pairs (``id=... to=<...>
relay=... status=sent (250 ...)``), so that ``grep id=<queue id>`` finds a
message's story. A value from outside (a client's EHLO name, addresses,
Message-ID; a remote reply) is written with ``mta.observe.escape.field``:
quoted, with backslash escapes, when it holds a space, ``=``, a quote or a
character that is not printable, so it can never read as another field or
start another line. A delivery line may end with the remote reply in
parentheses after ``status=``: free text, never read as fields.

With ``[log] format = "json"`` each line is instead a JSON object holding the
same pairs as fields (and the whole text line as ``message``), for log
pipelines that index fields. A field holds the value unquoted, its
non-printable characters still escaped (``mta.observe.escape.printable``),
and ``<...>`` around an address dropped.

Whatever a line holds, both formatters escape its non-printable characters
(``escape.escape_controls``), so no log line carries a raw control
character or breaks in two; only a traceback keeps its own line breaks.
Credentials and message bodies are never part of any line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from types import TracebackType

from mta.observe.escape import escape_controls, printable, unquote
from mta.observe.timefmt import iso_time

# One token of a line: a key=value pair (the value quoted or bare), or a word.
# A quoted value ends at its closing quote followed by a space or the end.
_QUOTED = r'"(?:[^"\\]|\\.)*"(?=\s|$)'
_TOKEN = re.compile(rf"\s*(?:([a-z][a-z0-9_-]*)=({_QUOTED}|\S*)|{_QUOTED}|\S+)")
_REPLY = re.compile(r" \((.*)\)$")
_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def fields_of(message: str) -> tuple[dict[str, str], str | None]:
    """The ``key=value`` pairs of a text line (the first of a key wins), each
    value as ``escape.printable`` writes it; and the reply after ``status=``."""
    fields: dict[str, str] = {}
    position = 0
    while position < len(message):
        token = _TOKEN.match(message, position)
        if token is None:  # only trailing spaces
            break
        position = token.end()
        key, value = token.group(1, 2)
        if key is None:
            continue
        text = printable(unquote(value))
        if len(text) > 1 and text[0] == "<" and text[-1] == ">":
            text = text[1:-1]
        fields.setdefault(key, text)
        if key == "status":
            reply = _REPLY.match(message, position)
            if reply:
                return fields, reply.group(1)
    return fields, None


class TextFormatter(logging.Formatter):
    """The Postfix-style line, stamped as every time we write is."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return iso_time(record.created)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei: _ExcInfo) -> str:  # noqa: N802
        return escape_controls(super().formatException(ei), keep_newlines=True)

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return escape_controls(super().formatStack(stack_info), keep_newlines=True)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = escape_controls(record.getMessage())
        fields: dict[str, object] = {
            "time": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
        }
        pairs, reply = fields_of(message)
        for key, value in pairs.items():
            fields.setdefault(key, value)
        if reply is not None:
            fields["reply"] = reply
        fields["message"] = message
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return _json_escape_rest(json.dumps(fields, ensure_ascii=False))


def _json_escape_rest(line: str) -> str:
    """``line`` with what json.dumps leaves raw though not printable (DEL, C1
    controls, line separators, surrogates ...) as \\u escapes: same JSON, one
    clean line."""
    if line.isprintable():
        return line
    return "".join(char if char.isprintable() else _json_escape(char) for char in line)


def _json_escape(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def setup(level: str, style: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if style == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            TextFormatter("%(asctime)s %(name)s[%(process)d]: %(levelname)s: %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # aiosmtpd logs every command at INFO; our own lines say what matters.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
