"""The one way a value from outside is written where people read it: logs and `mta queue`.

Clients choose their EHLO name, envelope addresses and Message-ID, and every
header a message carries; remote servers choose their reply texts. Written
verbatim, such a value could hold a line break (a forged log line), a
terminal escape (``\\x1b]0;owned\\x07`` retitles the operator's terminal), or
`` id=... status=queued`` (a forged field that ``grep id=...`` finds). The
rule, like logfmt's quoting and Postfix's printable():

- ``printable(text)``: every character that is not printable, by
  ``str.isprintable()`` (C0 controls, DEL, C1 controls, line and paragraph
  separators, format characters such as bidi overrides, spaces other than
  " ", surrogates left by undecodable bytes), becomes a backslash escape:
  ``\\n``, ``\\r``, ``\\t``, else ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``; a
  backslash becomes ``\\\\``, so the escaping can be undone. The result is one
  line with no control character. `mta queue show` prints values this way.
- ``field(text)``: a value of a ``key=value`` log field. ``printable(text)``
  as it is when that is non-empty and holds no space, ``=``, ``"`` or
  backslash; otherwise in double quotes, with ``"`` written ``\\"``. A quoted
  value holds no unescaped quote, so it ends at its closing quote: whatever
  it contains, it can never be read as another field or start another line.
  ``unquote`` reads a field back.
- ``escape_controls(text)``: the log formatters' last line of defence for
  text that did not come through ``field`` (our own sentences, library
  messages): non-printable characters escaped as above, backslashes left
  alone (a value already escaped stays as it is).
"""

from __future__ import annotations

import re

# A field value written as is: printable ASCII other than space, '"', '=' and '\'.
_PLAIN = re.compile(r"[!#-<>-\[\]-~]+")
# What makes an escaped value need quotes.
_QUOTED_IF = re.compile(r'[ ="\\]')
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPE = re.compile(r'\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|[nrt"\\])')
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_UNNAMED = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}


def _escaped(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` with every non-printable character and every backslash escaped."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(
        "\\\\" if char == "\\" else char if char.isprintable() else _escaped(char) for char in text
    )


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with non-printable characters escaped, backslashes as they are;
    line feeds kept when ``keep_newlines`` (a traceback's lines)."""
    if text.isprintable():
        return text
    return "".join(
        char if char.isprintable() or (keep_newlines and char == "\n") else _escaped(char)
        for char in text
    )


def field(text: str) -> str:
    """``text`` as the value of a ``key=value`` log field: bare, or quoted."""
    if _PLAIN.fullmatch(text):
        return text  # the usual address, Message-ID or host name, at the cost of one match
    escaped = printable(text)
    if escaped and not _QUOTED_IF.search(escaped):
        return escaped
    return '"' + escaped.replace('"', '\\"') + '"'


def unquote(value: str) -> str:
    """The text a ``field`` value was written from (a bare value is itself)."""
    quoted = _QUOTED.fullmatch(value)
    if quoted is None:
        return value
    return _ESCAPE.sub(_unescaped, quoted.group(1))


def _unescaped(match: re.Match[str]) -> str:
    sequence = match.group(1)
    if sequence in _UNNAMED:
        return _UNNAMED[sequence]
    code = int(sequence[1:], 16)
    return chr(code) if code <= 0x10FFFF else match.group(0)


def tenant_fields(tenant: str, campaign: str) -> str:
    """ " tenant=T campaign=C" for a message's log lines; what is unset is left out."""
    shown = f" tenant={tenant}" if tenant else ""  # a configured name: never needs quoting
    return shown + (f" campaign={field(campaign)}" if campaign else "")
