"""Measure DKIM signing per message: mta.signing.Signer against stock dkimpy.

Usage: .venv/bin/python tools/bench_signing.py [--seconds N] [--sizes 4096,102400]
           [--repeat N] [--body text|base64] [--profile]

Generates throwaway RSA-2048 and Ed25519 keys, builds a realistic newsletter
message of each size, and signs it in a loop on one thread.  For every
variant it prints messages/s (wall clock) and CPU microseconds per message
(this thread's CPU time, so another process on the machine does not inflate
it), the best of --repeat runs.  "rules only" is our signer with the
private-key operation stubbed out: the Python work that holds the GIL.

Every measured variant is checked once with dkimpy's verifier first, so a
fast but wrong signer cannot look good.  Prints figures only; it asserts
nothing about timing.  --profile prints cProfile's top functions of our
RSA signer instead.

Bodies: "text" is prose with a double space and a trailing space on every
line (the relaxed canonicalisation's worst realistic case); "base64" is an
attachment-like body without spaces.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import os
import pathlib
import pstats
import sys
import tempfile
import time
from collections.abc import Callable

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

# Allow running from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from mta.signing import rules as signing  # noqa: E402
from mta.signing.keys import DkimKey, write_key  # noqa: E402
from mta.signing.signer import Signer  # noqa: E402

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


def make_message(size: int, body: str = "text") -> bytes:
    """Headers plus body lines, `size` bytes long (or just the headers and one line)."""
    room = max(0, size - len(HEADERS))
    if body == "base64":
        encoded = base64.encodebytes(os.urandom(max(1, room * 57 // 78)))
        return HEADERS + encoded.replace(b"\n", b"\r\n")
    lines, rest = divmod(room, len(LINE))
    tail = b"x" * (rest - 2) + b"\r\n" if rest >= 2 else b""
    return HEADERS + LINE * max(lines, 1) + tail


def measure(sign: Callable[[], bytes], seconds: float) -> tuple[float, float]:
    """(messages/s of wall time, CPU microseconds of this thread per message)."""
    count = 0
    start, cpu_start = time.perf_counter(), time.thread_time()
    deadline = start + seconds
    while True:
        for _ in range(10):  # check the clock rarely; it is not free
            sign()
        count += 10
        now = time.perf_counter()
        if now >= deadline:
            cpu = time.thread_time() - cpu_start
            return count / (now - start), cpu / count * 1e6


def best_of(sign: Callable[[], bytes], seconds: float, repeat: int) -> tuple[float, float]:
    """The best rate and the lowest CPU per message over `repeat` runs (noise only slows)."""
    runs = [measure(sign, seconds) for _ in range(repeat)]
    return max(r[0] for r in runs), min(r[1] for r in runs)


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


def rules_only(message: bytes, keys: list[DkimKey]) -> Callable[[], bytes]:
    """Our signer with the private-key operation replaced by a constant."""
    sign = our_signer(message, keys)
    real = signing._sign_digest
    fake = bytes(256)

    def stubbed() -> bytes:
        signing._sign_digest = lambda private_key, digest: fake  # type: ignore[assignment]
        try:
            return sign()
        finally:
            signing._sign_digest = real  # type: ignore[assignment]

    return stubbed


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


def profile(message: bytes, key: DkimKey, seconds: float) -> None:
    sign = our_signer(message, [key])
    profiler = cProfile.Profile()
    profiler.enable()
    measure(sign, seconds)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant; best is shown")
    parser.add_argument("--sizes", default="4096,102400", help="approximate message sizes")
    parser.add_argument("--size", type=int, help="one size (overrides --sizes)")
    parser.add_argument("--body", choices=["text", "base64"], default="text")
    parser.add_argument("--stock", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--profile", action="store_true", help="cProfile our RSA signer")
    args = parser.parse_args(argv)
    sizes = [args.size] if args.size else [int(s) for s in args.sizes.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        rsa_key = write_key("example.com", "rsa2048", tmp, "rsa", 2048)[1]
        ed_key = write_key("example.com", "ed", tmp, "ed25519")[1]

    for size in sizes:
        message = make_message(size, args.body)
        if args.profile:
            profile(message, rsa_key, args.seconds)
            continue
        variants: list[tuple[str, Callable[[], bytes], bool]] = []
        for key in (rsa_key, ed_key):
            variants.append((f"mta.signing  {key.algorithm}", our_signer(message, [key]), True))
            if args.stock:
                variants.append((f"stock dkimpy {key.algorithm}", stock_signer(message, key), True))
        both = our_signer(message, [rsa_key, ed_key])
        variants.append(("mta.signing  rsa+ed25519 (2 sigs)", both, True))
        stubbed = rules_only(message, [rsa_key])
        variants.append(("mta.signing  rules only (no key op)", stubbed, False))

        print(
            f"\nmessage {len(message)} bytes ({args.body} body), one thread, "
            f"best of {args.repeat} x {args.seconds:g} s; one signature per message unless noted"
        )
        print(f"{'':38} {'messages/s':>10} {'CPU us/msg':>11}")
        for name, sign, checked in variants:
            if checked:
                check(sign(), [rsa_key, ed_key], name)
            per_second, cpu = best_of(sign, args.seconds, args.repeat)
            print(f"{name:38} {per_second:10.0f} {cpu:11.1f}", flush=True)


if __name__ == "__main__":
    main()
