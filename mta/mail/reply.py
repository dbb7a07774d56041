"""An SMTP reply: its code, its text, its enhanced status code.

The one reply type of the MTA: what a remote server answered
(``parse_reply`` reads the raw text, one line or an RFC 5321 multi-line
reply) and what we record for a recipient. ``Reply.status`` gives the
RFC 3463 enhanced status code, taken from the text when the server sent a
consistent one and derived from the reply code otherwise.

Remote text is untrusted: it ends up in log lines and in DSNs, so a Reply's
text is always a single line without control characters, however it was
built. The one exception is explicit: ``lines``, the raw text of each line as
mta.outbound.wire read it, kept for reading the keywords of an EHLO reply and
used for nothing else. Nothing here raises on what a server sends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# C0 and C1 controls (tab is turned into a space first) and the Unicode line
# and paragraph separators: a log viewer or mail client may act on any of them.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# ASCII digits only: \d would also accept other scripts' digits.
_REPLY_LINE = re.compile(r"([1-9][0-9]{2})(?:[ -](.*))?", re.DOTALL)
_ENHANCED = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}(?=\s|$)")
_GARBLED_SNIPPET = 200  # characters of a garbled reply kept for the logs and the DSN


def _one_line(text: str) -> str:
    """Lines joined by single spaces, controls replaced by '?', no outer whitespace."""
    if text.isprintable():
        return text.strip()  # no line break and nothing unsafe: the common case, cheaply
    pieces = (_UNSAFE.sub("?", line.replace("\t", " ")).strip() for line in _LINE_BREAK.split(text))
    return " ".join(piece for piece in pieces if piece)


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: its 3-digit code and the text after it.

    The text may be given as several lines (mta.outbound.wire joins those of
    a multi-line reply with "\\n"): it is stored as one line, lines joined
    by single spaces, control characters replaced by '?', outer whitespace
    removed.
    """

    code: int  # 100..999, e.g. 550
    text: str = ""  # e.g. "5.1.1 <x@example.net>: user unknown"
    # As received, untrusted and not normalised: for EHLO's keywords only,
    # never for logs or DSNs. Not part of the reply's value (equality, repr).
    lines: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.code, bool) or not isinstance(self.code, int):
            raise ValueError(f"An SMTP reply code must be an integer, got {self.code!r}.")
        if not 100 <= self.code <= 999:
            raise ValueError(f"An SMTP reply code has three digits, got {self.code}.")
        # Frozen, so normalise through object.__setattr__; this is the one
        # place every Reply passes, however it was made.
        object.__setattr__(self, "text", _one_line(self.text))

    @property
    def status(self) -> str:
        """RFC 3463 enhanced status code, always "[245].x.y" with the outcome's class.

        The code at the start of the text when its class agrees with the reply
        code's (RFC 3463: the classes must match; a server that sends
        "550 4.2.2" has contradicted itself, and the reply code wins), else
        2.0.0 / 4.0.0 / 5.0.0 by the reply's class. A reply that is not final
        (1xx, 3xx) or not SMTP (6xx and up) gets 4.5.0, "other protocol
        status", matching its deferred outcome.
        """
        found = _ENHANCED.match(self.text)
        klass = str(self.code)[0]
        if found is not None and found.group(1) == klass:
            return found.group(0)
        if klass in "245":
            return f"{klass}.0.0"
        return "4.5.0"

    def __str__(self) -> str:
        return f"{self.code} {self.text}" if self.text else str(self.code)


def _garbled(raw: str) -> Reply:
    # 451 4.5.0: a reply we cannot read is a protocol problem, not the
    # recipient's; defer and keep (a printable repr of) what was said.
    if not raw.strip():
        return Reply(451, "4.5.0 empty reply from server")
    return Reply(451, f"4.5.0 garbled reply: {raw[:_GARBLED_SNIPPET]!r}")


def parse_reply(raw: str) -> Reply:
    """Parse "550 5.1.1 no such user" or a multi-line "550-first\\r\\n550 second"; never raises.

    Lines may end in CRLF, LF or CR; blank lines are ignored. The texts of a
    multi-line reply are joined by single spaces. Continuation markers ('-')
    are not checked (the client already found the reply's end). Anything
    else (no line, a line without a 3-digit code, or lines whose codes
    differ) is a garbled reply: Reply(451, "4.5.0 garbled reply: '...'"),
    deferred like any protocol error.
    """
    code: str | None = None
    texts: list[str] = []
    for line in _LINE_BREAK.split(raw):
        if not line.strip():
            continue
        found = _REPLY_LINE.fullmatch(line)
        if found is None or (code is not None and found.group(1) != code):
            return _garbled(raw)
        code = found.group(1)
        texts.append(found.group(2) or "")
    if code is None:
        return _garbled(raw)
    return Reply(int(code), "\n".join(texts))
