"""Certificates for TLS tests, made with ``cryptography``: a test CA (with
intermediates if wanted), the server certificates it issues, and self-signed ones.

    ca = CertificateAuthority()
    good = ca.issue("mx.example.test")          # valid from yesterday to next month
    late = ca.issue("mx.example.test", expired=True)
    alone = self_signed("mx.example.test")
    ca.write(tmp_path / "ca.pem")               # for [delivery] ca_file
    context = good.server_context(tmp_path)     # for a test server

A credential's chain is what its server sends: the leaf, then every CA up
to the root (DANE-TA needs its trust anchor in the chain, RFC 7672 3.1.2).
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Credential:
    """A certificate chain, leaf first, and the leaf's private key."""

    chain: tuple[x509.Certificate, ...]
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> list[bytes]:
        return [c.public_bytes(serialization.Encoding.DER) for c in self.chain]

    def pem(self, directory: Path) -> Path:
        """The key and the chain in one PEM file in ``directory``, as servers load them."""
        path = directory / f"server-{self.chain[0].serial_number:x}.pem"
        key = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.write_bytes(key + b"".join(_pem(c) for c in self.chain))
        return path

    def server_context(self, directory: Path) -> ssl.SSLContext:
        """A server's context that presents the chain (written to ``directory``)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.pem(directory))
        return context


class CertificateAuthority:
    """A CA that issues server certificates; ``parent`` makes it an intermediate."""

    def __init__(self, name: str = "Test CA", parent: CertificateAuthority | None = None) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(name)
        if parent is None:
            self.certificate = _certificate(
                subject, subject, self.key.public_key(), self.key, ca=True
            )
            self.chain: tuple[x509.Certificate, ...] = (self.certificate,)
        else:
            issuer = parent.certificate.subject
            self.certificate = _certificate(
                subject, issuer, self.key.public_key(), parent.key, ca=True
            )
            self.chain = (self.certificate, *parent.chain)

    def issue(self, *names: str, expired: bool = False, san: bool = True) -> Credential:
        """A server certificate for the DNS ``names`` (without ``san``: only its
        subject's CN names the first), with the CA chain."""
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = _certificate(
            _name(names[0]),
            self.certificate.subject,
            key.public_key(),
            self.key,
            names if san else (),
            expired=expired,
        )
        return Credential((leaf, *self.chain), key)

    def write(self, path: Path) -> Path:
        """The CA's certificate as a PEM file (a ``ca_file``)."""
        path.write_bytes(_pem(self.certificate))
        return path


def self_signed(*names: str) -> Credential:
    """A server certificate for ``names`` that vouches for itself."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(names[0])
    return Credential((_certificate(subject, subject, key.public_key(), key, names),), key)


def _certificate(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    signing_key: ec.EllipticCurvePrivateKey,
    names: tuple[str, ...] = (),
    ca: bool = False,
    expired: bool = False,
) -> x509.Certificate:
    """A certificate; ``names`` go in its subjectAltName."""
    now = datetime.datetime.now(datetime.UTC)
    start, end = (now - 30 * DAY, now - DAY) if expired else (now - DAY, now + 30 * DAY)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        san = x509.SubjectAlternativeName([x509.DNSName(name) for name in names])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)
