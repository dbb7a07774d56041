"""Domain names in the one form we compare, look up and sign them.

The rule: surrounding whitespace and the root's final dot go, letters become
lower case, and an internationalised name becomes its ASCII A-labels (IDNA),
the form DNS and DKIM's d= use. What is valid after that depends on the use:
a mail domain or host name has letter-digit-hyphen labels (RFC 5321 2.3.5),
while a DKIM domain or selector may also hold "_" as DNS itself allows.
"""

from __future__ import annotations

import re

MAX_NAME_LENGTH = 253  # RFC 1035 2.3.4, without the final dot
MAX_LABEL_LENGTH = 63

_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*")
_DNS_NAME = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")


def lowercase_name(text: str) -> str:
    """``text`` without surrounding whitespace or final dots, in lower case (no IDNA)."""
    return text.strip().rstrip(".").lower()


def is_domain_name(name: str, *, underscore: bool = False) -> bool:
    """True if ``name`` is dot-separated labels of 1-63 letters, digits and inner
    hyphens (and "_" anywhere when ``underscore``), 253 characters at most."""
    pattern = _DNS_NAME if underscore else _HOST_NAME
    return len(name) <= MAX_NAME_LENGTH and pattern.fullmatch(name) is not None


def normalize_domain(text: str, *, underscore: bool = False) -> str | None:
    """The lowercase ASCII form of a domain (IDNs as A-labels), or None if that
    is not a valid name (``underscore`` as in ``is_domain_name``)."""
    name = lowercase_name(text)
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return name if is_domain_name(name, underscore=underscore) else None
