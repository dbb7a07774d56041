"""DANE for SMTP (RFC 7672): does the chain a server presented match its TLSA records?

The rules of RFC 7672 section 3.1:

- usage 3, DANE-EE: the server's own certificate (the leaf) matches a record;
  nothing else is checked, neither the names nor the dates;
- usage 2, DANE-TA: a certificate of the chain other than the leaf (a trust
  anchor the server must send, RFC 7672 3.1.2) matches a record, the leaf
  chains to it (each certificate signed by the next, up to it), and the leaf
  is issued to the MX host's name: a DNS name of its subjectAltName, a
  wildcard standing for one leftmost label, or its subject's CN when it has
  no DNS names;
- usages 0 and 1 (PKIX-TA, PKIX-EE) are unusable in SMTP (RFC 7672 3.1.3),
  as are unknown selectors and matching types: such records are ignored.

A record selects the whole certificate (selector 0) or its
SubjectPublicKeyInfo (1), both DER, and compares it as it is (matching type
0) or by its SHA-256 (1) or SHA-512 (2).

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from mta.policy.tls import Failure, Tlsa, mx_matches

DANE_TA, DANE_EE = 2, 3
SELECTORS = (0, 1)  # the full certificate, its SubjectPublicKeyInfo
DIGESTS: dict[int, str | None] = {0: None, 1: "sha256", 2: "sha512"}  # by matching type


def usable(records: Sequence[Tlsa]) -> tuple[Tlsa, ...]:
    """The records RFC 7672 lets an SMTP client use."""
    return tuple(
        record
        for record in records
        if record.usage in (DANE_TA, DANE_EE)
        and record.selector in SELECTORS
        and record.matching_type in DIGESTS
    )


def check(chain_der: Sequence[bytes], records: Sequence[Tlsa], host: str) -> Failure | None:
    """None when a record authenticates the chain (leaf first, DER) for ``host``; else
    why not: certificate-host-mismatch when a trust anchor matched but the leaf is not
    issued to ``host``, tlsa-invalid when no record matches."""
    records = usable(records)
    if not chain_der:
        return Failure.TLSA_INVALID
    leaf = chain_der[0]
    if any(_matches(record, leaf) for record in records if record.usage == DANE_EE):
        return None
    anchors = [record for record in records if record.usage == DANE_TA]
    if not anchors or not _chains_to_anchor(chain_der, anchors):
        return Failure.TLSA_INVALID
    return None if _issued_to(_parse(leaf), host) else Failure.CERTIFICATE_HOST_MISMATCH


def _matches(record: Tlsa, der: bytes) -> bool:
    selected = der if record.selector == 0 else _public_key(der)
    if selected is None:
        return False
    digest = DIGESTS[record.matching_type]
    return (selected if digest is None else hashlib.new(digest, selected).digest()) == record.data


def _public_key(der: bytes) -> bytes | None:
    """The certificate's SubjectPublicKeyInfo, DER; None if it cannot be read."""
    certificate = _parse(der)
    if certificate is None:
        return None
    try:
        return certificate.public_key().public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, UnsupportedAlgorithm):
        return None


def _chains_to_anchor(chain_der: Sequence[bytes], anchors: Sequence[Tlsa]) -> bool:
    """Does the leaf chain, through the certificates the server sent, to one an anchor
    record matches?"""
    current = _parse(chain_der[0])
    unused = list(chain_der[1:])
    while current is not None:
        issuer = next((der for der in unused if _issued_by(current, der)), None)
        if issuer is None:
            return False
        if any(_matches(anchor, issuer) for anchor in anchors):
            return True
        unused.remove(issuer)
        current = _parse(issuer)
    return False


def _issued_by(certificate: x509.Certificate, issuer_der: bytes) -> bool:
    issuer = _parse(issuer_der)
    if issuer is None:
        return False
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _issued_to(certificate: x509.Certificate | None, host: str) -> bool:
    """Is the certificate issued to ``host`` (RFC 7672 3.2.3, RFC 6125 6.4)?"""
    if certificate is None:
        return False
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = extension.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    except ValueError:  # a malformed extension: no name can be trusted
        return False
    if not names:
        names = [
            str(attribute.value)
            for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    return any(mx_matches(host, name) for name in names)


def _parse(der: bytes) -> x509.Certificate | None:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None
