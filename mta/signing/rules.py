"""The DKIM rules we sign by (RFC 6376): canonicalisation, header selection and
the DKIM-Signature field with its hash over an empty b=.

They are computed with whole-buffer bytes operations, because dkimpy's
per-call regexes cost more than the RSA operation itself on a 100 KB body.
They are checked against dkimpy's reference functions and verifier (and
OpenDKIM's) by the tests; dkimpy still parses the rare message with bare LF
line ends. Signatures are always c=relaxed/relaxed, never carry l= (a length
limit lets anyone append content), and oversign From so that adding a From
header later breaks them.

The header section is parsed here, not with mta.mail.header, because a
signature only verifies if we read the message exactly as dkimpy's verifier
does (an mbox "From " line, what a field name is, where parsing gives up).
"""

from __future__ import annotations

import base64
import hashlib
import re

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from mta.signing.keys import DkimKey, PrivateKey

# Header fields we sign when present (lowercase).  Trace and transport fields
# (Received, Return-Path) and other DKIM-Signature headers are never signed:
# they legitimately change or get added in transit.
SIGNED_HEADERS = frozenset(
    {
        b"from",
        b"sender",
        b"reply-to",
        b"subject",
        b"date",
        b"message-id",
        b"to",
        b"cc",
        b"mime-version",
        b"content-type",
        b"content-transfer-encoding",
        b"content-disposition",
        b"in-reply-to",
        b"references",
        b"list-id",
        b"list-unsubscribe",
        b"list-unsubscribe-post",
        b"feedback-id",
    }
)

_HEADER_NAME = b"DKIM-Signature"
# Longest line we fold the DKIM-Signature field to, CRLF not counted (RFC 5322's
# recommended 78, with room to spare); only a d= or s= value this long is longer.
_WIDTH = 76
# Immutable and shared by all threads; building them per signature is waste.
_PKCS1V15 = padding.PKCS1v15()
_PREHASHED_SHA256 = utils.Prehashed(hashes.SHA256())

# --- canonicalisation (RFC 6376 section 3.4) ------------------------------
#
# Whole-buffer bytes operations instead of dkimpy's per-call regexes: a
# literal search (bytes.find, or re with a literal prefix) runs at about a
# byte per nanosecond, a character-class regex such as [\t ]+ ten times
# slower, and a 100 KB body is almost all of a message's work.  Each function
# equals dkimpy's reference (dkim.canonicalization) for every input; the unit
# tests check that with hypothesis.

# Two or more spaces.  Written so that re sees a two-byte literal prefix and
# scans for it quickly; " {2,}" or "  +" would stop at every single space.
_SPACE_RUN = re.compile(b"   *")
_SPACE_CRLF = re.compile(b" \r\n")
# dkimpy's (and RFC 5322's) field name: printable ASCII up to the first colon.
_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")


def _strip_trailing_lines(body: bytes) -> bytes:
    """The body with its trailing empty lines removed and one CRLF at the end."""
    if not body.endswith(b"\r\n"):
        return body + b"\r\n"
    if not body.endswith(b"\r\n\r\n"):
        return body  # the common case: exactly one line end
    # The trailing run of CR and LF bytes, then its longest suffix of CRLF
    # pairs: the pairs alternate, so they start after the last "\r\r" or "\n\n".
    tail = body[len(body.rstrip(b"\r\n")) :]
    last_break = max(tail.rfind(b"\r\r"), tail.rfind(b"\n\n"))
    pairs = (len(tail) - last_break - 1) // 2
    return body[: len(body) - 2 * (pairs - 1)]


def canonicalize_body_simple(body: bytes) -> bytes:
    """RFC 6376 "simple" body canonicalisation of a CRLF body."""
    return _strip_trailing_lines(body)


def canonicalize_body_relaxed(body: bytes) -> bytes:
    """RFC 6376 "relaxed" body canonicalisation of a CRLF body.

    dkimpy strips [\\t ]+ before CRLF, then compresses [\\t ]+ to one space;
    turning tabs into spaces, compressing space runs and then dropping the one
    space left before each CRLF gives the same bytes.
    """
    if b"\t" in body:
        body = body.replace(b"\t", b" ")
    if b" " in body:  # base64 and many encoded bodies have none: nothing to scan for
        body = _SPACE_CRLF.sub(b"\r\n", _SPACE_RUN.sub(b" ", body))
    body = _strip_trailing_lines(body)
    return b"" if body == b"\r\n" else body


def canonicalize_header_relaxed(name: bytes, value: bytes) -> bytes:
    """One header field in RFC 6376 "relaxed" form: b"name:value\\r\\n".

    value is as parsed (after the colon, with its folds and final CRLF).
    """
    value = value.replace(b"\r\n", b"")  # unfold; dkimpy removes \r?\n
    if b"\n" in value:
        value = value.replace(b"\n", b"")
    if b"\t" in value:
        value = value.replace(b"\t", b" ")
    while b"  " in value:
        value = value.replace(b"  ", b" ")
    return name.lower().rstrip() + b":" + value.strip() + b"\r\n"


# --- the signature -------------------------------------------------------

Headers = list[list[bytes]]  # dkimpy's [name, value] pairs, value with CRLF


def _parse_header_section(section: bytes) -> Headers | None:
    """dkim.rfc822_parse's headers for a header section; None if unparsable.

    section: CRLF-separated lines, none of them empty, no bare LF.
    """
    headers: Headers = []
    for line in section.split(b"\r\n"):
        if line[0] in (0x09, 0x20):
            if not headers:
                return None  # a continuation line with nothing to continue
            headers[-1][1] += line + b"\r\n"
            continue
        match = _FIELD_NAME.match(line)
        if match is not None:
            headers.append([match.group(1), line[match.end() :] + b"\r\n"])
        elif not line.startswith(b"From "):  # dkimpy skips an mbox "From " line
            return None
    return headers


def _crlf_only(data: bytes) -> bool:
    """No bare LF: every line ends in CRLF (two C-speed scans, no copy)."""
    return data.count(b"\n") == data.count(b"\r\n")


def split_message(message: bytes) -> tuple[Headers, bytes] | None:
    """Headers and body exactly as dkimpy's verifier sees them; None if unparsable."""
    end = message.find(b"\r\n\r\n")
    if end > 0 and not message.startswith(b"\r\n"):  # else the header section is empty
        section, body = message[:end], message[end + 4 :]
        # Fast path: with no bare LF the body is the bytes after the first
        # empty line, which is what rfc822_parse would rebuild line by line.
        if _crlf_only(section) and _crlf_only(body):
            headers = _parse_header_section(section)
            return None if headers is None else (headers, body)
    try:
        parsed, body = dkim.rfc822_parse(message)
    except (dkim.MessageFormatError, IndexError):  # IndexError: leading continuation line
        return None
    return parsed, body


def select_headers(headers: Headers) -> tuple[list[bytes], bytes]:
    """h= names (From oversigned) and the canonical fields a verifier hashes for them.

    A verifier takes, for each name in h=, the bottom-most instance it has not
    used yet (RFC 6376 section 5.4.2); a name with no instance left adds
    nothing.  Our h= lists the present fields top to bottom, so repeated
    fields are hashed bottom-up.
    """
    names: list[bytes] = []
    by_name: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        lowered = name.lower()
        if lowered in SIGNED_HEADERS:
            names.append(lowered)
            by_name.setdefault(lowered, []).append(canonicalize_header_relaxed(name, value))
    # One "from" more than present: a verifier hashes an empty field for it, so a
    # From added later fills that slot and breaks the signature.
    names.append(b"from")
    hashed = [by_name[name].pop() for name in names if by_name.get(name)]
    return names, b"".join(hashed)


def _sign_digest(private_key: PrivateKey, digest: bytes) -> bytes:
    if isinstance(private_key, rsa.RSAPrivateKey):
        return private_key.sign(digest, _PKCS1V15, _PREHASHED_SHA256)
    # RFC 8463 (and dkimpy) sign the SHA-256 digest with Ed25519, not the headers.
    return private_key.sign(digest)


def _fold(tokens: list[bytes]) -> bytes:
    """The tags after "DKIM-Signature:", one space or one fold before each.

    Lines stay within _WIDTH columns where a token allows it.  A fold (CRLF
    and a space) stands where a space would, so relaxed canonicalisation turns
    the header back into the tokens joined by single spaces.
    """
    parts: list[bytes] = []
    column = len(_HEADER_NAME) + 1
    for token in tokens:
        if column + 1 + len(token) > _WIDTH:
            parts.append(b"\r\n")
            column = 0
        parts.append(b" " + token)
        column += 1 + len(token)
    return b"".join(parts)


def _fold_base64(value: bytes) -> bytes:
    """b= on its own line, its base64 folded (FWS is allowed anywhere in it)."""
    first = _WIDTH - len(b" b=")
    rest = range(first, len(value), _WIDTH - 1)
    return b"\r\n b=" + value[:first] + b"".join(b"\r\n " + value[i : i + _WIDTH - 1] for i in rest)


def signature_header(
    key: DkimKey, names: list[bytes], hashed_fields: bytes, body_hash: bytes, timestamp: int
) -> bytes:
    """One complete 'DKIM-Signature: ...' header field ending in CRLF."""
    # h= may be folded after each colon (RFC 6376 allows FWS around them).
    h_tag = [name + b":" for name in names]
    h_tag[0] = b"h=" + h_tag[0]
    h_tag[-1] = h_tag[-1][:-1] + b";"
    tokens = [
        b"v=1;",
        b"a=" + key.algorithm.encode("ascii") + b";",
        b"c=relaxed/relaxed;",
        b"d=" + key.domain.encode("ascii") + b";",
        b"s=" + key.selector.encode("ascii") + b";",
        b"t=%d;" % timestamp,
        *h_tag,
        b"bh=" + body_hash + b";",
    ]
    # The verifier hashes this field relaxed, with b= empty and no final CRLF:
    # the tokens joined by single spaces (they hold no whitespace, folds
    # count as one space), then " b=".
    canonical = b"dkim-signature:" + b" ".join(tokens) + b" b="
    digest = hashlib.sha256(hashed_fields + canonical).digest()
    signature = base64.b64encode(_sign_digest(key.private_key, digest))
    return _HEADER_NAME + b":" + _fold(tokens) + _fold_base64(signature) + b"\r\n"
