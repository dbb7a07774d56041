"""What follows DATA on the wire: our dot-stuffing against aiosmtplib's own,
for the CRLF-only messages the spool holds (hypothesis)."""

from __future__ import annotations

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from mta.outbound.smtp_transaction import dot_stuffed

# Lines of text, dots and empty lines, joined with CRLF only.
line = st.text(alphabet=st.sampled_from(["a", ".", " ", "é"]), max_size=6).map(str.encode)
crlf_message = st.lists(line, max_size=8).map(b"\r\n".join)
ended = st.tuples(crlf_message, st.booleans()).map(lambda m: m[0] + (b"\r\n" if m[1] else b""))


def aiosmtplib_wire(message: bytes) -> bytes:
    """What aiosmtplib's execute_data_command writes for ``message``."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"


@given(ended)
def test_the_same_bytes_as_aiosmtplib_for_crlf_only_mail(message: bytes) -> None:
    assert dot_stuffed(message) == aiosmtplib_wire(message)


def test_examples() -> None:
    assert dot_stuffed(b"") == b"\r\n.\r\n"
    assert dot_stuffed(b".a\r\n..b\r\nc.\r\n.\r\n") == b"..a\r\n...b\r\nc.\r\n..\r\n.\r\n"
    assert dot_stuffed(b"no end") == b"no end\r\n.\r\n"
