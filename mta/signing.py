"""DKIM signing of outgoing mail, with keys chosen per From domain and selector.

Keys are PEM files (RSA 1024..4096 bits, or Ed25519 per RFC 8463) loaded once
into `cryptography` key objects.  A `Signer` picks the keys for the domain of
the From address (or its closest configured parent domain, which still aligns
under relaxed DMARC) and prepends one DKIM-Signature header per key.

The DKIM rules themselves (header parsing, relaxed canonicalization, header
selection, folding, the empty b= in the hashed signature header) come from
dkimpy's helpers so that we compute exactly what dkimpy verifies.  Only the
private-key operation is ours: dkimpy's RSA is pure Python, OpenSSL through
`cryptography` is several times faster.

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
from collections.abc import Callable, Iterable, Sequence
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
# dkim.fold counts namelen against its 72-column limit; the real prefix is "Name: ".
_PREFIX_LEN = len(_HEADER_NAME) + 2
_RELAXED = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
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


# --- signing --------------------------------------------------------------

Headers = Sequence[Sequence[bytes]]  # dkimpy's [name, value] pairs, value with CRLF


def _split_message(message: bytes) -> tuple[Headers, bytes] | None:
    """Headers and body exactly as dkimpy's verifier sees them; None if unparsable."""
    end = message.find(b"\r\n\r\n")
    # Fast path: in a CRLF-only message the body is the bytes after the first
    # empty line, which is what rfc822_parse would rebuild line by line, so
    # only the header section goes through the (slower) parser.
    fast = end > 0 and message.count(b"\n") == message.count(b"\r\n")
    try:
        headers, body = dkim.rfc822_parse(message[: end + 2] if fast else message)
    except (dkim.MessageFormatError, IndexError):  # IndexError: leading continuation line
        return None
    return headers, (message[end + 4 :] if fast else body)


def _from_domain(headers: Headers) -> str | None:
    """Normalized domain of the first address of the first From header."""
    for name, value in headers:
        if name.lower() == b"from":
            # Header bytes may be UTF-8 (SMTPUTF8); unfold before address parsing.
            text = value.decode("utf-8", "replace").replace("\r\n", "")
            addresses = getaddresses([text])
            local, at, domain = addresses[0][1].rpartition("@") if addresses else ("", "", "")
            return normalize_domain(domain) if local and at else None
    return None


def _select_headers(headers: Headers) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    """h= names (From oversigned) and the relaxed-canonical headers they can match."""
    names: list[bytes] = []
    chosen: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered in SIGNED_HEADERS:
            names.append(lowered)
            chosen.append((name, value))
    # One "from" more than present: a verifier hashes an empty field for it, so a
    # From added later fills that slot and breaks the signature.
    names.append(b"from")
    # Only signed fields are canonicalized; hash_headers never looks at the rest.
    return names, _RELAXED.canonicalize_headers(chosen)


def _sign_digest(private_key: PrivateKey, digest: bytes) -> bytes:
    if isinstance(private_key, rsa.RSAPrivateKey):
        return private_key.sign(digest, _PKCS1V15, _PREHASHED_SHA256)
    # RFC 8463 (and dkimpy) sign the SHA-256 digest with Ed25519, not the headers.
    return private_key.sign(digest)


def _signature_header(
    key: DkimKey,
    names: list[bytes],
    canonical: list[tuple[bytes, bytes]],
    body_hash: bytes,
    timestamp: int,
) -> bytes:
    """One complete 'DKIM-Signature: ...' header line ending in CRLF."""
    tags = b"; ".join(
        [
            b"v=1",
            b"a=" + key.algorithm.encode("ascii"),
            b"c=relaxed/relaxed",
            b"d=" + key.domain.encode("ascii"),
            b"s=" + key.selector.encode("ascii"),
            b"t=%d" % timestamp,
            # Spaces give dkim.fold places to break; it never splits at ':'.
            b"h=" + b": ".join(names),
            b"bh=" + body_hash,
        ]
    )
    # b= starts its own line, so appending the signature afterwards cannot
    # change how the tags before it were folded (and hashed).
    unsigned = dkim.fold(tags + b";", namelen=_PREFIX_LEN) + b"\r\n b="
    hasher = hashlib.sha256()
    dkim.hash_headers(hasher, _RELAXED, canonical, names, (_HEADER_NAME, b" " + unsigned), {})
    signature = base64.b64encode(_sign_digest(key.private_key, hasher.digest()))
    # fold() only refolds text after the last existing fold: here, the b= value.
    return _HEADER_NAME + b": " + dkim.fold(unsigned + signature, namelen=1) + b"\r\n"


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
        body_hash = base64.b64encode(hashlib.sha256(_RELAXED.canonicalize_body(body)).digest())
        names, canonical = _select_headers(headers)
        timestamp = int(self._clock())
        added = b"".join(
            _signature_header(key, names, canonical, body_hash, timestamp) for key in keys
        )
        return SignResult(added + message, keys[0].domain, tuple(k.selector for k in keys))
