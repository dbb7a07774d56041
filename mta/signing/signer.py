"""DKIM signing of outgoing mail, with keys chosen per From domain and selector.

A `Signer` picks the keys (mta.signing.keys) for the domain of the From
address (or its closest configured parent domain, which still aligns under
relaxed DMARC) and prepends one DKIM-Signature header per key, made by the
rules in mta.signing.rules. The private-key operation is OpenSSL's through
`cryptography`, which releases the GIL, so one Signer serves many threads.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mta.mail.address import mailbox_domain
from mta.signing.keys import RSA_SHA256, DkimKey, SigningError, dkim_domain
from mta.signing.rules import (
    Headers,
    canonicalize_body_relaxed,
    select_headers,
    signature_header,
    split_message,
)


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


def _from_domain(headers: Headers) -> str | None:
    """Normalized domain of the first address of the first From header."""
    for name, value in headers:
        if name.lower() == b"from":
            # Header bytes may be UTF-8 (SMTPUTF8); unfold before address parsing.
            domain = mailbox_domain(value.decode("utf-8", "replace").replace("\r\n", ""))
            return None if domain is None else dkim_domain(domain)
    return None


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
        normalized = dkim_domain(domain)
        labels = normalized.split(".") if normalized else []
        for start in range(len(labels)):
            found = self._keys.get(".".join(labels[start:]))
            if found:
                return found
        return ()

    def sign(self, message: bytes) -> SignResult:
        """Prepend one DKIM-Signature per key of the From domain; unsigned if none applies."""
        parsed = split_message(message)
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
        names, hashed_fields = select_headers(headers)
        timestamp = int(self._clock())
        added = b"".join(
            signature_header(key, names, hashed_fields, body_hash, timestamp) for key in keys
        )
        return SignResult(added + message, keys[0].domain, tuple(k.selector for k in keys))
