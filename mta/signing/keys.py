"""DKIM keys: loading, generating and publishing the private keys we sign with.

Keys are PEM files (RSA 1024..4096 bits, or Ed25519 per RFC 8463) loaded once
into `cryptography` key objects, each published in DNS at
<selector>._domainkey.<domain>. Every problem with a key file is a
`SigningError` whose text names the file and says what is wrong with it.
"""

from __future__ import annotations

import base64
import os
import pathlib
from dataclasses import dataclass, field

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mta.mail.domain import MAX_LABEL_LENGTH, is_domain_name, normalize_domain

RSA_SHA256 = "rsa-sha256"
ED25519_SHA256 = "ed25519-sha256"
MIN_RSA_BITS = 1024
MAX_RSA_BITS = 4096

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
StrPath = str | os.PathLike[str]


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
        if dkim_domain(self.domain) != self.domain or not _is_selector(self.selector):
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


def _algorithm_of(private_key: object) -> str | None:
    if isinstance(private_key, rsa.RSAPrivateKey):
        return RSA_SHA256
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return ED25519_SHA256
    return None


def dkim_domain(domain: str) -> str | None:
    """The domain as a d= tag holds it (see mta.mail.domain), or None if it is not a DNS name."""
    return normalize_domain(domain, underscore=True)


def _is_selector(selector: str) -> bool:
    return len(selector) <= MAX_LABEL_LENGTH and is_domain_name(selector, underscore=True)


def _key_error(path: StrPath, domain: str, selector: str, reason: str) -> SigningError:
    return SigningError(f"DKIM key file {os.fspath(path)} for {domain}/{selector}: {reason}.")


def _checked_names(path: StrPath, domain: str, selector: str) -> str:
    """Normalized domain; refuses names that would make a bad d=/s= or file name."""
    normalized = dkim_domain(domain)
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
