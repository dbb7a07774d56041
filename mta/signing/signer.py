"""DKIM signing of outgoing mail, with keys chosen per From domain and selector.

Keys are PEM files (RSA 1024..4096 bits, or Ed25519 per RFC 8463) loaded once
into `cryptography` key objects.  A `Signer` picks the keys for the domain of
the From address (or its closest configured parent domain, which still aligns
under relaxed DMARC) and prepends one DKIM-Signature header per key.

The DKIM rules (relaxed canonicalisation, header selection, the
DKIM-Signature field and the hash over it with an empty b=) are computed here
with whole-buffer bytes operations, because dkimpy's per-call regexes cost
more than the RSA operation itself on a 100 KB body.  They are checked
against dkimpy's reference functions and verifier (and OpenDKIM's) by the
tests; dkimpy still parses the rare message with bare LF line ends.  The
private-key operation is OpenSSL's through `cryptography`, which releases the
GIL.

Signatures are always c=relaxed/relaxed, never carry l= (a length limit lets
anyone append content), and oversign From so that adding a From header
later breaks them.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pathlib
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.utils import getaddresses

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

RSA_SHA256 = "rsa-sha256"
ED25519_SHA256 = "ed25519-sha256"
MIN_RSA_BITS = 1024
MAX_RSA_BITS = 4096

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
StrPath = str | os.PathLike[str]

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

# One DNS label; underscores are tolerated because DNS itself allows them.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_NAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


class SigningError(Exception):
    """A key cannot be loaded or used; str() is one clear sentence naming the file."""


@dataclass(frozen=True)
class DkimKey:
    """A parsed private key and where it is published: <selector>._domainkey.<domain>."""

    domain: str  # lowercase, ASCII (A-label)
    selector: str
    algorithm: str  # RSA_SHA256 or ED25519_SHA256
    private_key: PrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        # Both names go verbatim into the d=/s= tags: anything but a DNS name
        # could break the header (or inject into it) and never verify.
        if normalize_domain(self.domain) != self.domain or not _is_selector(self.selector):
            raise SigningError(
                f"DKIM key {self.domain}/{self.selector}: the domain must be a lowercase "
                "ASCII DNS name and the selector a DNS name."
            )
        # A mismatch would produce signatures that can never verify.
        if self.algorithm != _algorithm_of(self.private_key):
            raise SigningError(
                f"DKIM key {self.domain}/{self.selector} is declared {self.algorithm} "
                f"but holds a {type(self.private_key).__name__}."
            )

    def txt_record(self) -> str:
        """The DNS TXT value to publish at <selector>._domainkey.<domain>."""
        public = self.private_key.public_key()
        if isinstance(public, ed25519.Ed25519PublicKey):
            # RFC 8463: p= is the raw 32-byte key, not a SubjectPublicKeyInfo.
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            kind = "ed25519"
        else:
            raw = public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            kind = "rsa"
        return f"v=DKIM1; k={kind}; p={base64.b64encode(raw).decode('ascii')}"


@dataclass(frozen=True)
class SignResult:
    """The message to send on, and which signatures (if any) were added."""

    message: bytes  # DKIM-Signature header(s) prepended to the original bytes
    domain: str | None  # d= used, None when unsigned
    selectors: tuple[str, ...]  # selectors used, empty when unsigned
    reason: str = ""  # why the message was left unsigned, for logs

    @property
    def signed(self) -> bool:
        return self.domain is not None


# --- keys -----------------------------------------------------------------


def _algorithm_of(private_key: object) -> str | None:
    if isinstance(private_key, rsa.RSAPrivateKey):
        return RSA_SHA256
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return ED25519_SHA256
    return None


def normalize_domain(domain: str) -> str | None:
    """Lowercase ASCII form of a domain (IDNs as A-labels), or None if it is not a DNS name."""
    name = domain.strip().rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if len(name) > 253 or not _NAME_RE.fullmatch(name):
        return None
    return name


def _is_selector(selector: str) -> bool:
    return len(selector) <= 63 and _NAME_RE.fullmatch(selector) is not None


def _key_error(path: StrPath, domain: str, selector: str, reason: str) -> SigningError:
    return SigningError(f"DKIM key file {os.fspath(path)} for {domain}/{selector}: {reason}.")


def _checked_names(path: StrPath, domain: str, selector: str) -> str:
    """Normalized domain; refuses names that would make a bad d=/s= or file name."""
    normalized = normalize_domain(domain)
    if normalized is None:
        raise _key_error(path, domain, selector, "the domain is not a valid DNS name")
    if not _is_selector(selector):
        raise _key_error(path, domain, selector, "the selector is not a valid DNS name")
    return normalized


def _read_key_file(path: StrPath, domain: str, selector: str) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except FileNotFoundError:
        reason = "the file does not exist"
    except PermissionError:
        reason = "the file is not readable (permission denied)"
    except IsADirectoryError:
        reason = "it is a directory, not a file"
    except OSError as exc:
        reason = f"the file cannot be read ({exc.strerror or exc})"
    raise _key_error(path, domain, selector, reason)


def _parse_private_key(data: bytes) -> PrivateKey | str:
    """The key, or a reason why these bytes are not a usable DKIM private key."""
    if not data.strip():
        return "the file is empty"
    if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        return "it holds a public key, not a private key"
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        return "the key is encrypted; DKIM keys must be stored without a passphrase"
    except (ValueError, UnsupportedAlgorithm):
        return "it is not a PEM private key"
    if isinstance(key, rsa.RSAPrivateKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            return (
                f"the RSA key has {key.key_size} bits; "
                f"{MIN_RSA_BITS} to {MAX_RSA_BITS} are supported"
            )
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    return f"unsupported key type {type(key).__name__}; use RSA or Ed25519"


def load_key(domain: str, selector: str, path: StrPath) -> DkimKey:
    """Load and check a PEM private key (PKCS#8 or PKCS#1) once, for reuse on every message."""
    normalized = _checked_names(path, domain, selector)
    parsed = _parse_private_key(_read_key_file(path, domain, selector))
    if isinstance(parsed, str):
        raise _key_error(path, domain, selector, parsed)
    algorithm = _algorithm_of(parsed)
    assert algorithm is not None  # _parse_private_key only returns supported keys
    return DkimKey(normalized, selector, algorithm, parsed)


def generate_key(algorithm: str = "rsa", bits: int = 2048) -> bytes:
    """A new unencrypted PKCS#8 PEM private key; algorithm "rsa" or "ed25519" (bits ignored)."""
    key: PrivateKey
    if algorithm == "rsa":
        if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
            raise SigningError(
                f"Cannot generate a {bits}-bit RSA DKIM key: "
                f"{MIN_RSA_BITS} to {MAX_RSA_BITS} bits are supported."
            )
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    elif algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise SigningError(f"Unknown DKIM key algorithm {algorithm!r}: use 'rsa' or 'ed25519'.")
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _make_private_dir(directory: pathlib.Path, domain: str, selector: str) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        return  # an existing directory keeps the permissions its owner chose
    except OSError as exc:
        raise _key_error(
            directory, domain, selector, f"cannot create the directory ({exc})"
        ) from None
    directory.chmod(0o700)  # mkdir's mode is filtered by the umask


def write_key(
    domain: str,
    selector: str,
    out_dir: StrPath,
    algorithm: str = "rsa",
    bits: int = 2048,
) -> tuple[pathlib.Path, DkimKey]:
    """Generate a key into out_dir/<domain>.<selector>.pem (mode 0600), never overwriting."""
    directory = pathlib.Path(out_dir)
    normalized = _checked_names(directory, domain, selector)
    path = directory / f"{normalized}.{selector}.pem"
    exists = f"the file already exists; refusing to overwrite {path.name}"
    if path.exists():  # fail before a slow key generation; O_EXCL below is the real guard
        raise _key_error(path, domain, selector, exists)
    pem = generate_key(algorithm, bits)
    _make_private_dir(directory, domain, selector)
    try:
        # O_EXCL: an existing key (possibly published in DNS) must never be replaced.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise _key_error(path, domain, selector, exists) from None
    except OSError as exc:
        raise _key_error(path, domain, selector, f"cannot create the file ({exc})") from None
    try:
        os.fchmod(fd, 0o600)  # exact mode whatever the umask
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise _key_error(path, domain, selector, f"cannot write the file ({exc})") from None
    return path, load_key(normalized, selector, path)


def dns_record_line(key: DkimKey) -> str:
    """A zone-file line publishing the key; TXT strings are limited to 255 characters."""
    head, _, p_value = key.txt_record().partition("p=")
    p_tag = "p=" + p_value
    chunks = [head] + [p_tag[i : i + 255] for i in range(0, len(p_tag), 255)]
    strings = " ".join(f'"{chunk}"' for chunk in chunks)
    return f"{key.selector}._domainkey.{key.domain}. IN TXT ( {strings} )"


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


# --- signing --------------------------------------------------------------

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


def _split_message(message: bytes) -> tuple[Headers, bytes] | None:
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


# A From value that is one plain mailbox: 'Name <local@domain>', '"Name"
# <local@domain>', '<local@domain>' or 'local@domain'.  getaddresses finds the
# same domain in these; it costs 8 us, this regex 0.3 us.  No alternative can
# backtrack more than linearly (the parts' character sets do not overlap).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_DOMAIN_PART = r"([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*)"
_PHRASE = r"""(?:[ \t]*"[^"\\@,;:<>()\r\n]*"[ \t]*|[A-Za-z0-9!#$%&'*+/=?^_`{|}~. \t-]*)"""
_PLAIN_MAILBOX = re.compile(
    rf"(?:{_PHRASE}<{_DOT_ATOM}@{_DOMAIN_PART}>|[ \t]*{_DOT_ATOM}@{_DOMAIN_PART})[ \t]*"
)


def _address_domain(text: str) -> str | None:
    """The domain of the first address in an unfolded From value, as getaddresses sees it."""
    plain = _PLAIN_MAILBOX.fullmatch(text)
    if plain is not None:
        return plain.group(1) or plain.group(2)
    addresses = getaddresses([text])
    local, at, domain = addresses[0][1].rpartition("@") if addresses else ("", "", "")
    return domain if local and at else None


def _from_domain(headers: Headers) -> str | None:
    """Normalized domain of the first address of the first From header."""
    for name, value in headers:
        if name.lower() == b"from":
            # Header bytes may be UTF-8 (SMTPUTF8); unfold before address parsing.
            domain = _address_domain(value.decode("utf-8", "replace").replace("\r\n", ""))
            return None if domain is None else normalize_domain(domain)
    return None


def _select_headers(headers: Headers) -> tuple[list[bytes], bytes]:
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


def _signature_header(
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


class Signer:
    """Signs messages with every key configured for the From domain; thread-safe."""

    def __init__(self, keys: Iterable[DkimKey], clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        by_domain: dict[str, list[DkimKey]] = {}
        for key in keys:
            same_domain = by_domain.setdefault(key.domain.lower(), [])
            if any(other.selector.lower() == key.selector.lower() for other in same_domain):
                raise SigningError(f"DKIM key {key.domain}/{key.selector} is configured twice.")
            same_domain.append(key)
        # Immutable after construction, so concurrent sign() calls share it safely.
        # RSA first: receivers that stop at the first signature mostly know RSA.
        self._keys: dict[str, tuple[DkimKey, ...]] = {
            domain: tuple(sorted(found, key=lambda k: k.algorithm != RSA_SHA256))
            for domain, found in by_domain.items()
        }

    def keys_for(self, domain: str) -> tuple[DkimKey, ...]:
        """Keys for the domain itself, else for its closest configured parent domain."""
        normalized = normalize_domain(domain)
        labels = normalized.split(".") if normalized else []
        for start in range(len(labels)):
            found = self._keys.get(".".join(labels[start:]))
            if found:
                return found
        return ()

    def sign(self, message: bytes) -> SignResult:
        """Prepend one DKIM-Signature per key of the From domain; unsigned if none applies."""
        parsed = _split_message(message)
        if parsed is None:
            return SignResult(message, None, (), "the header section cannot be parsed")
        headers, body = parsed
        domain = _from_domain(headers)
        if domain is None:
            return SignResult(message, None, (), "no From header with a domain")
        keys = self.keys_for(domain)
        if not keys:
            return SignResult(message, None, (), f"no DKIM key for {domain}")
        body_hash = base64.b64encode(hashlib.sha256(canonicalize_body_relaxed(body)).digest())
        names, hashed_fields = _select_headers(headers)
        timestamp = int(self._clock())
        added = b"".join(
            _signature_header(key, names, hashed_fields, body_hash, timestamp) for key in keys
        )
        return SignResult(added + message, keys[0].domain, tuple(k.selector for k in keys))
