"""DKIM signing, checked the way a receiver checks it: with dkimpy's verifier.

Public keys reach the verifier only through DkimKey.txt_record(), as DNS would
deliver them, so these tests also prove the published records are right.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import hashlib
import re
import secrets
import stat
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from email.utils import getaddresses
from pathlib import Path

import dkim
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from dkim.canonicalization import Relaxed, Simple, strip_trailing_lines
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mta.mail.address import mailbox_domain
from mta.signing import rules
from mta.signing.keys import (
    ED25519_SHA256,
    RSA_SHA256,
    DkimKey,
    SigningError,
    dns_record_line,
    generate_key,
    load_key,
    write_key,
)
from mta.signing.rules import (
    SIGNED_HEADERS,
    canonicalize_body_relaxed,
    canonicalize_body_simple,
    canonicalize_header_relaxed,
)
from mta.signing.signer import Signer

NOW = 1_700_000_123.75

MESSAGE = (
    b"Received: from app1.internal by mta.example.com; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Return-Path: <bounces@example.com>\r\n"
    b'From: "Example Shop" <news@example.com>\r\n'
    b"To: customer@example.org\r\n"
    b"Subject: Your weekly\r\n newsletter\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <abc.123@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"X-Campaign: 42\r\n"
    b"List-Unsubscribe: <https://example.com/u/123>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b"\r\n"
    b"this week:  some  news.   \r\n"
    b"\r\n"
)


# --- helpers --------------------------------------------------------------


def dns_for(*keys: DkimKey) -> Callable[..., bytes | None]:
    """A dkimpy dnsfunc serving the TXT records of the given keys."""
    records = {
        f"{k.selector}._domainkey.{k.domain}.".encode(): k.txt_record().encode() for k in keys
    }

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(name)

    return lookup


def verify(message: bytes, keys: Iterable[DkimKey], idx: int = 0) -> bool:
    """dkimpy's verdict on signature number idx (0 = topmost)."""
    try:
        return bool(dkim.DKIM(message).verify(idx=idx, dnsfunc=dns_for(*keys)))
    except dkim.DKIMException:
        return False


def literal_verify(message: bytes, key: DkimKey) -> bool:
    """RFC 6376 verification of the topmost signature hashing exactly the h= list.

    dkimpy's verifier quietly adds one more "from" to h= (its bug #644046), so
    it rejects an added From even when the signer did not oversign; verifiers
    such as OpenDKIM do not.  This one follows h= literally, like they do.
    """
    headers, body = dkim.rfc822_parse(message)
    sig_header = next((n, v) for n, v in headers if n.lower() == b"dkim-signature")
    fields = dkim.util.parse_tag_value(sig_header[1])
    policy = dkim.CanonicalizationPolicy.from_c_value(fields[b"c"])
    body_hash = hashlib.sha256(policy.canonicalize_body(body)).digest()
    if base64.b64encode(body_hash) != re.sub(rb"\s+", b"", fields[b"bh"]):
        return False
    names = [n.lower() for n in re.split(rb"\s*:\s*", fields[b"h"].strip())]
    hasher = hashlib.sha256()
    canonical = policy.canonicalize_headers(headers)
    dkim.hash_headers(hasher, policy, canonical, names, sig_header, fields)
    signature = base64.b64decode(re.sub(rb"\s+", b"", fields[b"b"]))
    public = base64.b64decode(key.txt_record().split("p=")[1])
    try:
        if key.algorithm == RSA_SHA256:
            rsa_public = serialization.load_der_public_key(public)
            assert isinstance(rsa_public, rsa.RSAPublicKey)
            prehashed = utils.Prehashed(hashes.SHA256())
            rsa_public.verify(signature, hasher.digest(), padding.PKCS1v15(), prehashed)
        else:
            ed_public = ed25519.Ed25519PublicKey.from_public_bytes(public)
            ed_public.verify(signature, hasher.digest())
    except InvalidSignature:
        return False
    return True


class OpenDkim:
    """OpenDKIM's verifier: libopendkim, the library opendkim-testmsg runs, via ctypes.

    Public keys come from a file (libopendkim's DKIM_QUERY_FILE test method)
    instead of DNS, so no socket is opened.  Constants are from its dkim.h.
    """

    SETOPT, OPT_FLAGS, OPT_QUERYMETHOD, OPT_QUERYINFO = 1, 0, 6, 7
    QUERY_FILE = 1
    FLAG_PASSED, BH_MATCH = 0x04, 0

    def __init__(self, path: str, keys_file: Path) -> None:
        lib = ctypes.CDLL(path)
        handle, void_p, size_t = ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t
        lib.dkim_init.restype = handle
        lib.dkim_init.argtypes = [void_p, void_p]
        lib.dkim_options.argtypes = [handle, ctypes.c_int, ctypes.c_int, void_p, size_t]
        lib.dkim_verify.restype = handle
        lib.dkim_verify.argtypes = [handle, ctypes.c_char_p, void_p, ctypes.POINTER(ctypes.c_int)]
        lib.dkim_chunk.argtypes = [handle, ctypes.c_char_p, size_t]
        lib.dkim_eom.argtypes = [handle, void_p]
        lib.dkim_getsiglist.argtypes = [
            handle,
            ctypes.POINTER(ctypes.POINTER(handle)),
            ctypes.POINTER(ctypes.c_int),
        ]
        lib.dkim_sig_getflags.argtypes = [handle]
        lib.dkim_sig_getflags.restype = ctypes.c_uint
        lib.dkim_sig_getbh.argtypes = [handle]
        lib.dkim_sig_geterror.argtypes = [handle]
        lib.dkim_free.argtypes = [handle]
        self.lib = lib
        self.handle = lib.dkim_init(None, None)
        method = ctypes.c_int(self.QUERY_FILE)
        self._option(self.OPT_QUERYMETHOD, ctypes.byref(method), ctypes.sizeof(method))
        # libopendkim keeps this pointer: the buffer must live as long as we do.
        self._keys_file = ctypes.create_string_buffer(bytes(keys_file))
        self._option(self.OPT_QUERYINFO, self._keys_file, len(bytes(keys_file)))
        no_flags = ctypes.c_uint(0)
        self._option(self.OPT_FLAGS, ctypes.byref(no_flags), ctypes.sizeof(no_flags))

    def _option(self, option: int, value: object, size: int) -> None:
        assert self.lib.dkim_options(self.handle, self.SETOPT, option, value, size) == 0

    def verify(self, message: bytes) -> list[bool]:
        """One verdict per DKIM-Signature, topmost first: header signature and bh= both good."""
        status = ctypes.c_int()
        dkim_handle = self.lib.dkim_verify(self.handle, b"test", None, ctypes.byref(status))
        assert dkim_handle and status.value == 0
        try:
            self.lib.dkim_chunk(dkim_handle, message, len(message))
            self.lib.dkim_chunk(dkim_handle, None, 0)
            self.lib.dkim_eom(dkim_handle, None)
            sigs = ctypes.POINTER(ctypes.c_void_p)()
            count = ctypes.c_int()
            if self.lib.dkim_getsiglist(dkim_handle, ctypes.byref(sigs), ctypes.byref(count)):
                return []
            return [
                bool(self.lib.dkim_sig_getflags(sigs[i]) & self.FLAG_PASSED)
                and self.lib.dkim_sig_getbh(sigs[i]) == self.BH_MATCH
                and self.lib.dkim_sig_geterror(sigs[i]) == 0
                for i in range(count.value)
            ]
        finally:
            self.lib.dkim_free(dkim_handle)


def on_the_wire(message: bytes) -> bytes:
    """The message as SMTP carries it: every line ending CRLF."""
    return message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def tags(message: bytes, idx: int = 0) -> dict[bytes, bytes]:
    """The tag=value pairs of the idx-th DKIM-Signature header, unfolded."""
    headers, _ = dkim.rfc822_parse(message)
    values = [v for n, v in headers if n.lower() == b"dkim-signature"]
    unfolded = re.sub(rb"\r\n", b"", values[idx])
    return dkim.util.parse_tag_value(unfolded)


def h_names(message: bytes, idx: int = 0) -> list[bytes]:
    return [n.strip().lower() for n in tags(message, idx)[b"h"].split(b":")]


def with_header(message: bytes, line: bytes) -> bytes:
    """The message with a header line inserted just before the blank line."""
    head, sep, body = message.partition(b"\r\n\r\n")
    return head + b"\r\n" + line + sep + body


def _is_probable_prime(n: int) -> bool:
    if n % 2 == 0:
        return n == 2
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(30):
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime(bits: int) -> int:
    while True:
        candidate = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        if (candidate - 1) % 65537 and _is_probable_prime(candidate):
            return candidate


def weak_rsa_pem(bits: int = 512) -> bytes:
    """A too-small RSA key; cryptography refuses to generate one, so build it."""
    p, q = _prime(bits // 2), _prime(bits // 2)
    e = 65537
    d = pow(e, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, p * q)
    )
    return numbers.private_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


# --- fixtures: keys are generated once per module (RSA keygen is slow) ----


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dkim")


@pytest.fixture(scope="module")
def rsa_key(keydir: Path) -> DkimKey:
    return write_key("example.com", "rsa1", keydir, "rsa", 2048)[1]


@pytest.fixture(scope="module")
def ed_key(keydir: Path) -> DkimKey:
    return write_key("example.com", "ed1", keydir, "ed25519")[1]


@pytest.fixture(scope="module")
def news_key(keydir: Path) -> DkimKey:
    return write_key("news.example.com", "n1", keydir, "rsa", 1024)[1]


@pytest.fixture(scope="module")
def rsa_signer(rsa_key: DkimKey) -> Signer:
    return Signer([rsa_key], clock=lambda: NOW)


@pytest.fixture(scope="module")
def opendkim(keydir: Path, rsa_key: DkimKey, ed_key: DkimKey, news_key: DkimKey) -> OpenDkim:
    """OpenDKIM's verifier knowing the module's keys; skipped where libopendkim is missing."""
    path = ctypes.util.find_library("opendkim")
    if path is None:
        pytest.skip("libopendkim is not installed (apt-get install opendkim-tools)")
    keys_file = keydir / "opendkim-keys"
    keys_file.write_text(
        "".join(
            f"{k.selector}._domainkey.{k.domain} {k.txt_record()}\n"
            for k in (rsa_key, ed_key, news_key)
        )
    )
    return OpenDkim(path, keys_file)


# --- signatures verify ----------------------------------------------------


def test_rsa_signature_verifies(rsa_signer: Signer, rsa_key: DkimKey, opendkim: OpenDkim) -> None:
    result = rsa_signer.sign(MESSAGE)
    assert result.domain == "example.com"
    assert result.selectors == ("rsa1",)
    assert result.message.endswith(MESSAGE)
    assert dkim.verify(result.message, dnsfunc=dns_for(rsa_key))
    assert opendkim.verify(result.message) == [True]
    assert tags(result.message)[b"a"] == b"rsa-sha256"


def test_ed25519_signature_verifies(ed_key: DkimKey, opendkim: OpenDkim) -> None:
    result = Signer([ed_key], clock=lambda: NOW).sign(MESSAGE)
    assert result.selectors == ("ed1",)
    assert dkim.verify(result.message, dnsfunc=dns_for(ed_key))
    assert opendkim.verify(result.message) == [True]
    assert tags(result.message)[b"a"] == b"ed25519-sha256"


def test_two_keys_for_a_domain_give_two_signatures_that_both_verify(
    rsa_key: DkimKey, ed_key: DkimKey, opendkim: OpenDkim
) -> None:
    result = Signer([ed_key, rsa_key], clock=lambda: NOW).sign(MESSAGE)
    assert result.selectors == ("rsa1", "ed1")  # RSA first
    assert result.message.count(b"DKIM-Signature:") == 2
    assert [tags(result.message, i)[b"s"] for i in (0, 1)] == [b"rsa1", b"ed1"]
    assert verify(result.message, [rsa_key, ed_key], idx=0)
    assert verify(result.message, [rsa_key, ed_key], idx=1)
    assert opendkim.verify(result.message) == [True, True]


def test_relaxed_canonicalization_survives_refolding(rsa_signer: Signer, rsa_key: DkimKey) -> None:
    signed = rsa_signer.sign(MESSAGE).message
    refolded = signed.replace(
        b"Subject: Your weekly\r\n newsletter", b"Subject:  Your weekly newsletter"
    )
    assert refolded != signed
    assert dkim.verify(refolded, dnsfunc=dns_for(rsa_key))


def test_lf_only_message_still_verifies(
    rsa_signer: Signer, rsa_key: DkimKey, opendkim: OpenDkim
) -> None:
    signed = rsa_signer.sign(MESSAGE.replace(b"\r\n", b"\n")).message
    assert dkim.verify(signed, dnsfunc=dns_for(rsa_key))
    assert opendkim.verify(on_the_wire(signed)) == [True]


def test_concurrent_signing_from_threads(rsa_signer: Signer, rsa_key: DkimKey) -> None:
    messages = [MESSAGE + b"message %d\r\n" % i for i in range(32)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(rsa_signer.sign, messages))
    for original, result in zip(messages, results, strict=True):
        assert result.message.endswith(original)
        assert dkim.verify(result.message, dnsfunc=dns_for(rsa_key))


# --- what the signature header says ---------------------------------------


def test_h_tag_lists_signable_headers_and_oversigns_from(rsa_signer: Signer) -> None:
    message = with_header(MESSAGE, b"Cc: a@example.net\r\nCC: b@example.net\r\n")
    names = h_names(rsa_signer.sign(message).message)
    assert names.count(b"from") == 2  # one From header, signed one extra time
    assert names.count(b"cc") == 2  # once per occurrence, case-insensitive
    assert set(names) == {
        b"from",
        b"to",
        b"subject",
        b"date",
        b"message-id",
        b"mime-version",
        b"content-type",
        b"list-unsubscribe",
        b"list-unsubscribe-post",
        b"cc",
    }


def test_never_signs_trace_or_other_signature_headers(rsa_signer: Signer) -> None:
    once = rsa_signer.sign(MESSAGE).message
    names = h_names(rsa_signer.sign(once).message, idx=0)  # topmost = the newest
    assert b"received" not in names
    assert b"return-path" not in names
    assert b"dkim-signature" not in names
    assert b"x-campaign" not in names


def test_relaxed_relaxed_and_no_length_tag(rsa_signer: Signer, rsa_key: DkimKey) -> None:
    fields = tags(rsa_signer.sign(MESSAGE).message)
    assert fields[b"c"] == b"relaxed/relaxed"
    assert b"l" not in fields
    assert fields[b"d"] == b"example.com"
    assert fields[b"s"] == b"rsa1"
    assert fields.get(b"i", b"@example.com") == b"@example.com"


ALL_SIGNED = [
    "From",
    "Sender",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "To",
    "Cc",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-Disposition",
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Feedback-ID",
]


def test_long_h_tag_folds_into_short_lines_and_verifies(
    rsa_key: DkimKey, ed_key: DkimKey, opendkim: OpenDkim
) -> None:
    head = "".join(f"{name.upper()}: value of {name}\r\n" for name in ALL_SIGNED[1:])
    message = f"From: a@example.com\r\n{head}\r\nbody\r\n".encode("ascii")
    result = Signer([rsa_key, ed_key], clock=lambda: NOW).sign(message)
    assert h_names(result.message) == [n.lower().encode() for n in ALL_SIGNED + ["From"]]
    added = result.message[: -len(message)]
    assert all(len(line) <= 78 for line in added.split(b"\r\n"))
    assert verify(result.message, [rsa_key, ed_key], idx=0)
    assert verify(result.message, [rsa_key, ed_key], idx=1)
    assert opendkim.verify(result.message) == [True, True]


def test_t_tag_is_the_injected_clock(rsa_key: DkimKey) -> None:
    result = Signer([rsa_key], clock=lambda: 1_234_567_890.9).sign(MESSAGE)
    assert tags(result.message)[b"t"] == b"1234567890"


# --- tampering breaks the signature ---------------------------------------


@pytest.mark.parametrize("key_name", ["rsa_key", "ed_key"])
def test_adding_a_second_from_breaks_the_signature(
    request: pytest.FixtureRequest, key_name: str, opendkim: OpenDkim
) -> None:
    key = request.getfixturevalue(key_name)
    signed = Signer([key], clock=lambda: NOW).sign(MESSAGE).message
    assert dkim.verify(signed, dnsfunc=dns_for(key))
    assert literal_verify(signed, key)
    for forged in (
        with_header(signed, b"From: ceo@example.com\r\n"),
        signed.replace(b"From: ", b"From: ceo@example.com\r\nFrom: ", 1),
    ):
        assert not dkim.verify(forged, dnsfunc=dns_for(key))
        # The oversigned "from" is what breaks it for a verifier that follows h=.
        assert not literal_verify(forged, key)
        assert opendkim.verify(forged) == [False]


def test_literal_verifier_catches_a_missing_oversign(rsa_key: DkimKey) -> None:
    # Guards the test above: without the extra "from" in h=, a From added above
    # the signed one (verifiers hash the bottom-most instance first) passes a
    # literal verifier, while dkimpy's still rejects it.
    pkcs1 = rsa_key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    header = dkim.sign(
        MESSAGE,
        b"rsa1",
        b"example.com",
        pkcs1,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"subject"],
    )
    signed = header + MESSAGE
    assert literal_verify(signed, rsa_key)
    forged = signed.replace(b"From: ", b"From: ceo@example.com\r\nFrom: ", 1)
    assert literal_verify(forged, rsa_key)
    assert not dkim.verify(forged, dnsfunc=dns_for(rsa_key))


def test_modified_body_breaks_the_signature(
    rsa_signer: Signer, rsa_key: DkimKey, opendkim: OpenDkim
) -> None:
    signed = rsa_signer.sign(MESSAGE).message
    for forged in (signed.replace(b"some", b"more"), signed + b"P.S. appended\r\n"):
        assert not dkim.verify(forged, dnsfunc=dns_for(rsa_key))
        assert opendkim.verify(forged) == [False]


def test_modified_subject_breaks_the_signature(rsa_signer: Signer, rsa_key: DkimKey) -> None:
    signed = rsa_signer.sign(MESSAGE).message
    assert not dkim.verify(signed.replace(b"weekly", b"weakly"), dnsfunc=dns_for(rsa_key))


# --- choosing the key -----------------------------------------------------


def test_subdomain_from_uses_parent_domain_key(rsa_signer: Signer, rsa_key: DkimKey) -> None:
    message = MESSAGE.replace(b"news@example.com", b"a@mail.news.Example.COM")
    result = rsa_signer.sign(message)
    assert result.domain == "example.com"
    assert tags(result.message)[b"d"] == b"example.com"
    assert dkim.verify(result.message, dnsfunc=dns_for(rsa_key))


def test_exact_domain_wins_over_parent(rsa_key: DkimKey, news_key: DkimKey) -> None:
    signer = Signer([rsa_key, news_key], clock=lambda: NOW)
    result = signer.sign(MESSAGE.replace(b"news@example.com", b"a@news.example.com"))
    assert (result.domain, result.selectors) == ("news.example.com", ("n1",))
    assert dkim.verify(result.message, dnsfunc=dns_for(news_key))
    assert signer.sign(MESSAGE).domain == "example.com"


def test_uppercase_from_domain_matches(rsa_signer: Signer, rsa_key: DkimKey) -> None:
    result = rsa_signer.sign(MESSAGE.replace(b"news@example.com", b"News@EXAMPLE.com"))
    assert result.domain == "example.com"
    assert dkim.verify(result.message, dnsfunc=dns_for(rsa_key))


@pytest.mark.parametrize(
    "from_value",
    [
        b'"Shop, The" <news@example.com>',
        b"=?utf-8?q?J=C3=B6rg?= <news@example.com>",
        "Jörg <news@example.com>".encode(),
        b"news@example.com (the shop)",
        b"<news@example.com>",
        b'"Example Shop"\r\n <news@example.com>',
    ],
    ids=["quoted-comma", "encoded-word", "utf8", "comment", "angle-only", "folded"],
)
def test_from_header_forms(rsa_signer: Signer, rsa_key: DkimKey, from_value: bytes) -> None:
    message = MESSAGE.replace(b'"Example Shop" <news@example.com>', from_value)
    result = rsa_signer.sign(message)
    assert result.domain == "example.com"
    assert dkim.verify(result.message, dnsfunc=dns_for(rsa_key))


def test_idn_from_domain_uses_a_label_key(keydir: Path) -> None:
    key = write_key("bücher.example", "s1", keydir, "ed25519")[1]
    assert key.domain == "xn--bcher-kva.example"
    message = MESSAGE.replace(b"news@example.com", "news@Bücher.example".encode())
    result = Signer([key], clock=lambda: NOW).sign(message)
    assert result.domain == "xn--bcher-kva.example"
    assert dkim.verify(result.message, dnsfunc=dns_for(key))


def test_first_from_address_decides(rsa_signer: Signer) -> None:
    message = MESSAGE.replace(b"<news@example.com>", b"<x@other.test>, news@example.com")
    result = rsa_signer.sign(message)
    assert result.domain is None
    assert result.message == message


@pytest.mark.parametrize(
    "message",
    [
        MESSAGE.replace(b"news@example.com", b"news@example.org"),  # no key for domain
        MESSAGE.replace(b"news@example.com", b"news@notexample.com"),  # not a subdomain
        MESSAGE.replace(b'From: "Example Shop" <news@example.com>\r\n', b""),  # no From
        MESSAGE.replace(b"news@example.com", b"undisclosed"),  # From without a domain
        b" folded continuation first\r\nFrom: a@example.com\r\n\r\nbody\r\n",  # unparsable
        b"From: a@example.com\r\nbad header line\r\n\r\nbody\r\n",  # unparsable
        b"",
    ],
)
def test_unsignable_messages_come_back_unchanged(rsa_signer: Signer, message: bytes) -> None:
    result = rsa_signer.sign(message)
    assert result.message is message
    assert result.domain is None
    assert result.selectors == ()
    assert not result.signed
    assert result.reason


@pytest.mark.parametrize(
    ("domain", "selector"),
    [("Example.com", "s1"), ("example.com", "s1; x=1"), ("example.com", "s1\r\nBcc: x")],
)
def test_dkim_key_refuses_names_that_cannot_go_into_the_header(
    ed_key: DkimKey, domain: str, selector: str
) -> None:
    with pytest.raises(SigningError, match="DNS name"):
        DkimKey(domain, selector, ED25519_SHA256, ed_key.private_key)


def test_dkim_key_refuses_algorithm_mismatch(ed_key: DkimKey) -> None:
    with pytest.raises(SigningError, match="declared rsa-sha256"):
        DkimKey("example.com", "s1", RSA_SHA256, ed_key.private_key)


def test_duplicate_selector_is_rejected(rsa_key: DkimKey) -> None:
    with pytest.raises(SigningError, match="example.com/rsa1"):
        Signer([rsa_key, rsa_key])


# --- loading keys ---------------------------------------------------------


def test_load_key_detects_algorithm_and_accepts_pkcs1(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pkcs1 = tmp_path / "pkcs1.pem"
    pkcs1.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    assert pkcs1.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    loaded = load_key("Example.TEST.", "s1", pkcs1)
    assert (loaded.domain, loaded.selector, loaded.algorithm) == ("example.test", "s1", RSA_SHA256)
    ed = tmp_path / "ed.pem"
    ed.write_bytes(generate_key("ed25519"))
    assert load_key("example.test", "s2", ed).algorithm == ED25519_SHA256


def _public_key_pem() -> bytes:
    return (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "does not exist"),
        (b"this is not a key\n", "not a PEM private key"),
        (b"", "empty"),
        (_public_key_pem(), "public key"),
        (weak_rsa_pem(512), "512 bits"),
    ],
    ids=["missing", "garbage", "empty", "public-key", "rsa-512"],
)
def test_load_key_errors_name_the_file(tmp_path: Path, content: bytes | None, reason: str) -> None:
    path = tmp_path / "x.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SigningError) as caught:
        load_key("example.test", "s1", path)
    message = str(caught.value)
    assert message.startswith(f"DKIM key file {path} for example.test/s1: ")
    assert reason in message


def test_load_key_rejects_encrypted_and_unsupported_keys(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    encrypted = tmp_path / "enc.pem"
    encrypted.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(SigningError, match="encrypted"):
        load_key("example.test", "s1", encrypted)
    ec_file = tmp_path / "ec.pem"
    ec_file.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(SigningError, match="unsupported key type"):
        load_key("example.test", "s1", ec_file)


@pytest.mark.parametrize(("domain", "selector"), [("exa mple.com", "s1"), ("example.com", "../x")])
def test_load_key_rejects_bad_names(tmp_path: Path, domain: str, selector: str) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(generate_key("ed25519"))
    with pytest.raises(SigningError, match="not a valid DNS name"):
        load_key(domain, selector, path)


# --- generating and publishing keys ---------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "marker"), [("rsa", b"MII"), ("ed25519", b"MC4CAQAwBQYDK2Vw")]
)
def test_generate_key_gives_pkcs8_pem(algorithm: str, marker: bytes) -> None:
    pem = generate_key(algorithm, 1024)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n" + marker)
    key = serialization.load_pem_private_key(pem, password=None)
    expected = rsa.RSAPrivateKey if algorithm == "rsa" else ed25519.Ed25519PrivateKey
    assert isinstance(key, expected)


@pytest.mark.parametrize(("algorithm", "bits"), [("dsa", 2048), ("rsa", 512), ("rsa", 8192)])
def test_generate_key_rejects_bad_parameters(algorithm: str, bits: int) -> None:
    with pytest.raises(SigningError):
        generate_key(algorithm, bits)


def test_write_key_file_mode_and_no_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "new" / "keys"
    path, key = write_key("Example.TEST", "s1", out, "ed25519")
    assert path == out / "example.test.s1.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert (key.domain, key.selector, key.algorithm) == ("example.test", "s1", ED25519_SHA256)
    before = path.read_bytes()
    with pytest.raises(SigningError, match="already exists") as caught:
        write_key("example.test", "s1", out, "ed25519")
    assert str(path) in str(caught.value)
    assert path.read_bytes() == before


def test_txt_record_formats(rsa_key: DkimKey, ed_key: DkimKey) -> None:
    assert rsa_key.txt_record().startswith("v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A")
    ed_txt = ed_key.txt_record()
    assert ed_txt.startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(ed_txt.split("p=")[1])) == 32


@pytest.mark.parametrize("bits", [2048, 4096])
def test_dns_record_line_splits_p_into_255_char_strings(bits: int) -> None:
    key = DkimKey(
        "example.com",
        "big",
        RSA_SHA256,
        rsa.generate_private_key(public_exponent=65537, key_size=bits),
    )
    line = dns_record_line(key)
    assert line.startswith("big._domainkey.example.com. IN TXT ( ")
    assert line.endswith(" )")
    strings = re.findall(r'"([^"]*)"', line)
    assert all(len(s) <= 255 for s in strings)
    assert len(strings) >= 3  # v/k, and a p= longer than one string
    assert "".join(strings) == key.txt_record()
    p_value = key.txt_record().split("p=")[1]
    assert "".join(strings).endswith("p=" + p_value)


def test_dns_record_line_ed25519(ed_key: DkimKey) -> None:
    line = dns_record_line(ed_key)
    assert line.startswith("ed1._domainkey.example.com. IN TXT ( ")
    assert "".join(re.findall(r'"([^"]*)"', line)) == ed_key.txt_record()


# --- property: anything printable signs and verifies ----------------------

_printable = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=120)
_body_line = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=90)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    subject=_printable,
    to=_printable,
    extra=st.lists(
        st.tuples(st.sampled_from(["Cc", "Reply-To", "X-Tag", "References", "From"]), _printable),
        max_size=4,
    ),
    body=st.lists(_body_line, max_size=30),
    trailing_blank_lines=st.integers(min_value=0, max_value=3),
)
def test_property_signed_messages_verify(
    rsa_key: DkimKey,
    ed_key: DkimKey,
    subject: str,
    to: str,
    extra: list[tuple[str, str]],
    body: list[str],
    trailing_blank_lines: int,
) -> None:
    lines = ["From: Sender <sender@example.com>", f"Subject:{subject}", f"To: {to}"]
    lines += [f"{name}: {value}" for name, value in extra]
    text = "\r\n".join(lines) + "\r\n\r\n" + "".join(f"{b}\r\n" for b in body)
    message = (text + "\r\n" * trailing_blank_lines).encode("ascii")
    result = Signer([rsa_key, ed_key], clock=lambda: NOW).sign(message)
    assert result.domain == "example.com"
    assert result.message.endswith(message)
    assert verify(result.message, [rsa_key, ed_key], idx=0)  # RSA
    assert verify(result.message, [rsa_key, ed_key], idx=1)  # Ed25519
    from_count = sum(1 for line in lines if line.lower().startswith("from:"))
    assert h_names(result.message).count(b"from") == from_count + 1


# --- our canonicalisation is dkimpy's, byte for byte ----------------------

# Pieces that exercise every rule: whitespace runs, tabs, line ends (CRLF,
# bare CR, bare LF), empty lines, long lines, 8-bit bytes.
_body_piece = st.sampled_from(
    [b"a", b"word", b" ", b"  ", b"\t", b" \t ", b"\r\n", b"\r\n\r\n", b"\r", b"\n"]
    + [b"x" * 998, b"\x00", b"\xff", b"\x0b", b"\x0c"]
)
_bodies = st.one_of(st.lists(_body_piece, max_size=40).map(b"".join), st.binary(max_size=300))


@given(body=_bodies)
@example(body=b"")
@example(body=b"\r\n")
@example(body=b"\r\n\r\n\r\n")
@example(body=b"text\r\n\r\r\n\r\n")
@example(body=b"text \t \r\n \r\n\t\r\n")
@example(body=b"no final line end  ")
def test_body_canonicalisation_equals_dkimpy(body: bytes) -> None:
    assert rules._strip_trailing_lines(body) == strip_trailing_lines(body)
    assert canonicalize_body_simple(body) == Simple.canonicalize_body(body)
    assert canonicalize_body_relaxed(body) == Relaxed.canonicalize_body(body)


_value_piece = st.sampled_from(
    [b"v", b"x y", b" ", b"  ", b"\t", b"\r\n ", b"\r\n\t", b":", b";", b"\xc3\xa9"]
    + [b"\x0b", b"\x0c", b"\r", b"\n"]
)
_header_values = st.lists(_value_piece, max_size=20).map(lambda p: b"".join(p) + b"\r\n")
_header_names = st.sampled_from([b"Subject", b"FROM", b"to", b"X-Tag", b"Cc", b"MIME-Version"])


@given(name=_header_names, value=_header_values)
@example(name=b"Subject", value=b" \t folded\r\n  \t line \t\r\n")
def test_header_canonicalisation_equals_dkimpy(name: bytes, value: bytes) -> None:
    [(expected_name, expected_value)] = Relaxed.canonicalize_headers([(name, value)])
    assert canonicalize_header_relaxed(name, value) == expected_name + b":" + expected_value


def _dkimpy_parse(message: bytes) -> tuple[list[list[bytes]], bytes] | None:
    try:
        return dkim.rfc822_parse(message)  # type: ignore[no-any-return]
    except (dkim.MessageFormatError, IndexError):
        return None


_header_line = st.one_of(
    st.tuples(_header_names, st.lists(_value_piece.filter(lambda p: b"\n" not in p))).map(
        lambda nv: nv[0] + b":" + b"".join(nv[1])
    ),
    st.sampled_from(
        [b" continued", b"\tcontinued", b"From mbox line", b"no colon", b"Bad Name: x"]
        + [b":odd:name", b"::", b"X-Empty:", b""]
    ),
)
_line_end = st.sampled_from([b"\r\n", b"\n"])


@given(
    lines=st.lists(_header_line, max_size=12),
    body=_bodies,
    header_end=_line_end,
    separator=st.sampled_from([b"\r\n\r\n", b"\n\n", b"\r\n\n", b""]),
)
def test_message_split_equals_dkimpy(
    lines: list[bytes], body: bytes, header_end: bytes, separator: bytes
) -> None:
    message = header_end.join(lines) + separator + body
    ours = rules.split_message(message)
    expected = _dkimpy_parse(message)
    if expected is None:
        assert ours is None
    else:
        assert ours is not None
        assert [list(h) for h in ours[0]] == expected[0]
        assert ours[1] == expected[1]


_field = st.tuples(
    st.sampled_from([b"From", b"from", b"To", b"CC", b"cc", b"Subject", b"X-Other", b"Received"]),
    _header_values,
)


@given(fields=st.lists(_field, max_size=12))
def test_hashed_fields_equal_dkimpys_selection(fields: list[tuple[bytes, bytes]]) -> None:
    headers = [[name, value] for name, value in fields]
    names, hashed = rules.select_headers(headers)
    assert names == [n.lower() for n, _ in fields if n.lower() in SIGNED_HEADERS] + [b"from"]
    selected = dkim.select_headers(Relaxed.canonicalize_headers(fields), names)
    assert hashed == b"".join(name + b":" + value for name, value in selected)


def _getaddresses_domain(text: str) -> str | None:
    """The From domain the way the signer found it before its plain-mailbox fast path."""
    addresses = getaddresses([text])
    local, at, domain = addresses[0][1].rpartition("@") if addresses else ("", "", "")
    return domain if local and at else None


_address_piece = st.sampled_from(
    ["Name", "Q.", " ", "\t", '"', "<", ">", "@", ".", "..", ",", "(", ")", ":", ";", "\\"]
    + ["a", "news", "example.com", "-", "_", "é", "=?utf-8?q?J=C3=B6rg?=", "[1.2.3.4]", "'"]
)
_address_text = st.lists(_address_piece, max_size=12).map("".join)
# Local and domain parts: mostly well-formed dot-atoms (the fast path), some not.
_local_part = st.one_of(
    st.lists(st.sampled_from(["a", "news", "b+c", "x-y", "o'k", "_"]), min_size=1, max_size=3).map(
        ".".join
    ),
    st.lists(st.sampled_from(["a", ".", "+", " ", "é", '"', "("]), max_size=5).map("".join),
)
_domain_part = st.one_of(
    st.lists(st.sampled_from(["example", "com", "x-1", "_dmarc"]), min_size=1, max_size=3).map(
        ".".join
    ),
    st.lists(st.sampled_from(["example", ".", "-", "é", "[1.2.3.4]", " "]), max_size=5).map(
        "".join
    ),
)
_plain_mailbox = st.tuples(
    st.sampled_from(["", " ", "Name ", '"Shop" ', ' "A, B" ', "J. Q. ", "x\t", "\t"]),
    _local_part,
    _domain_part,
    st.sampled_from(["<{}@{}>", "{}@{}", " <{}@{}> ", "<{}@{}>,x@y", "{}@{} (c)"]),
).map(lambda p: p[0] + p[3].format(p[1], p[2]))


@given(text=st.one_of(_address_text, _plain_mailbox))
@example(text=' "Example Shop" <news@example.com>')
@example(text="news@example.com")
@example(text="a..b@example.com")
@example(text="<.a@example.com.>")
def test_from_domain_fast_path_equals_getaddresses(text: str) -> None:
    assert mailbox_domain(text) == _getaddresses_domain(text)


# --- property: messages with awkward bodies verify with dkimpy and OpenDKIM --

_body_text = st.lists(
    st.sampled_from(list("abc xyz.=-") + ["  ", "\t", " \t", "é"]), max_size=60
).map("".join)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lines=st.lists(st.one_of(_body_text, st.just(""), st.just("x" * 990)), max_size=25),
    trailing_blank_lines=st.integers(min_value=0, max_value=3),
    folded_subject=st.booleans(),
)
def test_property_awkward_bodies_verify_with_dkimpy_and_opendkim(
    rsa_key: DkimKey,
    ed_key: DkimKey,
    opendkim: OpenDkim,
    lines: list[str],
    trailing_blank_lines: int,
    folded_subject: bool,
) -> None:
    subject = "a\r\n\t  folded \t subject  " if folded_subject else "plain"
    head = f"From: Sender <sender@example.com>\r\nSubject: {subject}\r\nTo: x@example.org\r\n"
    body = "".join(f"{line}\r\n" for line in lines) + "\r\n" * trailing_blank_lines
    message = (head + "\r\n" + body).encode("utf-8")
    result = Signer([rsa_key, ed_key], clock=lambda: NOW).sign(message)
    assert result.message.endswith(message)
    assert verify(result.message, [rsa_key, ed_key], idx=0)
    assert verify(result.message, [rsa_key, ed_key], idx=1)
    assert opendkim.verify(result.message) == [True, True]


def test_large_message_verifies_with_dkimpy_and_opendkim(
    rsa_signer: Signer, rsa_key: DkimKey, opendkim: OpenDkim
) -> None:
    line = b"Lorem ipsum  dolor\tsit amet, consectetur adipiscing elit, sed do eiusmod. \r\n"
    message = MESSAGE + line * 1300 + b"\r\n\r\n"
    signed = rsa_signer.sign(message).message
    assert dkim.verify(signed, dnsfunc=dns_for(rsa_key))
    assert opendkim.verify(signed) == [True]


def test_signature_field_layout(rsa_signer: Signer) -> None:
    added = rsa_signer.sign(MESSAGE).message[: -len(MESSAGE)]
    lines = added.split(b"\r\n")
    assert lines[0].startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert lines[-1] == b""  # ends with CRLF
    assert all(line.startswith(b" ") for line in lines[1:-1])  # folded, never a new field
    assert any(line.startswith(b" b=") for line in lines)  # b= starts its own line
    assert all(len(line) <= 78 for line in lines)
