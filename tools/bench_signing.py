"""Measure DKIM signatures per second: mta.signing.Signer against stock dkimpy.

Usage: .venv/bin/python tools/bench_signing.py [--seconds N] [--size BYTES]

Generates throwaway RSA-2048 and Ed25519 keys, builds a realistic newsletter
message of about --size bytes, and signs it in a loop for --seconds per
measurement on one thread.  Every measured variant is checked once with
dkimpy's verifier first, so a fast but wrong signer cannot look good.
Prints figures only; it asserts nothing about timing.
"""

from __future__ import annotations

import argparse
import base64
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

# Allow running from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from mta.signing import DkimKey, Signer, write_key  # noqa: E402

HEADERS = (
    b"Received: from app1.internal (app1.internal [10.0.0.5])\r\n"
    b"\tby mta.example.com with ESMTP id 4XyZ1; Mon, 1 Jan 2024 09:00:00 +0000\r\n"
    b'From: "Example Shop" <news@example.com>\r\n'
    b"To: customer.name@example.org\r\n"
    b"Subject: Your weekly newsletter: 20% off everything this week\r\n"
    b"Date: Mon, 1 Jan 2024 09:00:00 +0000\r\n"
    b"Message-ID: <20240101090000.4XyZ1.123456@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"List-Id: Example Shop News <news.example.com>\r\n"
    b"List-Unsubscribe: <https://example.com/unsubscribe/8f3a2c>, <mailto:u-8f3a2c@example.com>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"Feedback-ID: weekly:newsletter:example-shop\r\n"
    b"\r\n"
)
LINE = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do  eiusmod tempor. \r\n"


def make_message(size: int) -> bytes:
    """Headers plus body lines, `size` bytes long (or just the headers and one line)."""
    lines, rest = divmod(max(0, size - len(HEADERS)), len(LINE))
    tail = b"x" * (rest - 2) + b"\r\n" if rest >= 2 else b""
    return HEADERS + LINE * max(lines, 1) + tail


def rate(sign: Callable[[], bytes], seconds: float) -> float:
    """Signatures per second of `sign` over about `seconds` of wall time."""
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(20):  # check the clock rarely; it is not free
            sign()
        count += 20
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def dns_for(*keys: DkimKey) -> Callable[..., bytes | None]:
    records = {
        f"{k.selector}._domainkey.{k.domain}.".encode(): k.txt_record().encode() for k in keys
    }
    return lambda name, timeout=5: records.get(name)


def check(signed: bytes, keys: list[DkimKey], what: str) -> None:
    """Refuse to benchmark a signer whose output does not verify."""
    for idx in range(signed.count(b"DKIM-Signature:")):
        if not dkim.DKIM(signed).verify(idx=idx, dnsfunc=dns_for(*keys)):
            raise SystemExit(f"{what}: signature {idx} does not verify; not benchmarking it")


def stock_rsa_pem(key: DkimKey) -> bytes:
    """PKCS#1 PEM, the form dkimpy's own RSA parser reads."""
    return key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def stock_ed25519_seed(key: DkimKey) -> bytes:
    """Base64 of the 32-byte seed, the form dkimpy hands to PyNaCl."""
    assert isinstance(key.private_key, ed25519.Ed25519PrivateKey)
    raw = key.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(raw)


def our_signer(message: bytes, keys: list[DkimKey]) -> Callable[[], bytes]:
    signer = Signer(keys)
    return lambda: signer.sign(message).message


def stock_signer(message: bytes, key: DkimKey) -> Callable[[], bytes]:
    """dkim.sign with the same relaxed/relaxed policy; its private key input per algorithm."""
    secret = stock_rsa_pem(key) if key.algorithm == "rsa-sha256" else stock_ed25519_seed(key)
    algorithm = key.algorithm.encode("ascii")
    selector, domain = key.selector.encode(), key.domain.encode()

    def sign() -> bytes:
        header: bytes = dkim.sign(
            message,
            selector,
            domain,
            secret,
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=algorithm,
        )
        return header + message

    return sign


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--size", type=int, default=4096, help="approximate message size")
    args = parser.parse_args(argv)

    message = make_message(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        rsa_key = write_key("example.com", "rsa2048", tmp, "rsa", 2048)[1]
        ed_key = write_key("example.com", "ed", tmp, "ed25519")[1]

    variants: list[tuple[str, Callable[[], bytes]]] = []
    for key in (rsa_key, ed_key):
        variants.append((f"mta.signing  {key.algorithm}", our_signer(message, [key])))
        variants.append((f"stock dkimpy {key.algorithm}", stock_signer(message, key)))
    both = our_signer(message, [rsa_key, ed_key])
    variants.append(("mta.signing  rsa+ed25519 (2 sigs)", both))

    print(f"message {len(message)} bytes, {args.seconds:g} s per measurement, one thread;")
    print("one signature per message unless noted")
    for name, sign in variants:
        check(sign(), [rsa_key, ed_key], name)
        print(f"{name:36} {rate(sign, args.seconds):9.0f} messages/s", flush=True)


if __name__ == "__main__":
    main()
