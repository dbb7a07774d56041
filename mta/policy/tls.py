"""Outbound TLS policy: how a delivery to a domain must be protected, and on whose word.

Levels, in the spirit of Postfix's smtp_tls_security_level:

- ``none``: never STARTTLS;
- ``may``: STARTTLS when offered, any certificate; a failed handshake is
  retried in plaintext (opportunistic TLS, the default);
- ``encrypt``: TLS required, any certificate;
- ``verify``: TLS required, the certificate chain valid (``[delivery]
  ca_file`` or the system's store) and issued to the MX host's name;
- ``dane``: TLS required, the presented chain matching the MX host's
  DNSSEC-validated TLSA records (RFC 7672).

A required level never falls back to plaintext: the delivery waits (4.7.4
when STARTTLS is not offered, 4.7.5 when the handshake or the certificate
fails). The level comes from the configuration, or from the domain's own
word: a DANE TLSA record set, or an MTA-STS policy in ``enforce`` mode
(``verify`` plus the policy's MX patterns). ``source`` says which, for the
log line, ``mta queue show`` and the metrics.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class Level(StrEnum):
    NONE = "none"
    MAY = "may"
    ENCRYPT = "encrypt"
    VERIFY = "verify"
    DANE = "dane"


REQUIRED = frozenset({Level.ENCRYPT, Level.VERIFY, Level.DANE})


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record (RFC 6698): what the server's chain must match."""

    usage: int  # 2 DANE-TA (a trust anchor in the chain), 3 DANE-EE (the server's own)
    selector: int  # 0 the whole certificate, 1 its SubjectPublicKeyInfo
    matching_type: int  # 0 exact, 1 SHA-256, 2 SHA-512
    data: bytes


@dataclass(frozen=True)
class TlsPolicy:
    level: Level = Level.MAY
    source: str = "default"  # "default", "config", "mta-sts", "dane"
    # MTA-STS enforce: the only MX hosts mail may go to (RFC 8461 4.1 patterns).
    mx_patterns: tuple[str, ...] = ()
    # DANE: the usable TLSA records of each MX host (by host name, lower case).
    tlsa: Mapping[str, tuple[Tlsa, ...]] = field(default_factory=dict)
    # MTA-STS testing: deliver as under `may`, but count what enforce would refuse.
    testing: bool = False
    policy_domain: str = ""  # the domain whose policy this is (TLS-RPT)

    @property
    def required(self) -> bool:
        return self.level in REQUIRED


def mx_matches(host: str, pattern: str) -> bool:
    """RFC 8461 4.1: "mail.example.net" matches itself; "*.example.net" matches one
    label more (not example.net, not a.b.example.net); case and final dots ignored."""
    host, pattern = host.lower().rstrip("."), pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return host == pattern


class Failure(StrEnum):
    """Why a TLS policy could not be met: RFC 8460 4.3 result types."""

    STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
    CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
    CERTIFICATE_EXPIRED = "certificate-expired"
    CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
    VALIDATION_FAILURE = "validation-failure"
    TLSA_INVALID = "tlsa-invalid"
    DNSSEC_INVALID = "dnssec-invalid"
    DANE_REQUIRED = "dane-required"
    STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
    STS_POLICY_INVALID = "sts-policy-invalid"
    STS_WEBPKI_INVALID = "sts-webpki-invalid"
