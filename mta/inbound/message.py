"""Header sanity for a received message: pure functions, no I/O.

What the listener checks and adds before signing and spooling:

- Line endings: every line must end in CRLF. A bare LF or bare CR is how SMTP
  smuggling (CVE-2023-51764 and kin) hides a second message inside the first
  for a receiver that reads line endings differently, so such data is refused
  as a whole; it is never "repaired".
- The header section must have exactly one From field (RFC 5322 3.6): DKIM
  signs by its domain and the big mailbox providers refuse mail without one.
- A Received field goes on top; Message-ID and Date are added when missing
  (RFC 5322 requires Date; receivers score mail without Message-ID as spam).
  The client chooses its EHLO name, so the field shows it only in a form its
  parsers read unambiguously (``received_field``).
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mta.inbound.reply_texts import BARE_LINE_ENDING
from mta.mail.address import is_address_literal
from mta.mail.domain import is_domain_name
from mta.mail.header import (
    CRLF,
    field_values,
    remove_field,
    rfc5322_date,
    split_header,
)

# What of an EHLO name that is neither a domain nor an address literal is shown,
# in a comment: letters, digits, ".", "-", "_", ":"; anything else becomes "?".
# No parenthesis or backslash (they would end or escape the comment), no ";"
# (parsers find the date after it), no quotes, no "[" "]" (a fake address literal).
_NOT_SHOWN_OF_HELO = re.compile(r"[^A-Za-z0-9._:-]")
HELO_SHOWN_MAX = 64
# Instruction fields (besides the configured pool header): a message's
# priority and campaign, removed before signing.
PRIORITY_HEADER = "X-MTA-Priority"
CAMPAIGN_HEADER = "X-MTA-Campaign"
# The address in "for <...>" is shown with its local part in dot-atom
# characters and its domain in those of a name or address literal; anything
# else (a quoted local part's quotes, ";", parentheses, a second "@") is "?".
_NOT_IN_LOCAL_PART = re.compile(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]")
_NOT_IN_DOMAIN = re.compile(r"[^A-Za-z0-9.:\[\]-]")


class Rejected(Exception):
    """The message cannot be accepted; str() is the SMTP reply."""


@dataclass(frozen=True)
class Prepared:
    data: bytes  # the message as it will be signed and stored
    message_id: str  # its Message-ID field's value
    author: str  # the From field's value (unfolded), for the tenant's check
    # The values of the instruction fields found, by lower-case name; the fields were removed.
    instructed: Mapping[str, str] = field(default_factory=dict)


def has_bare_line_ending(data: bytes) -> bool:
    """True if any CR or LF is not part of a CRLF pair."""
    pairs = data.count(CRLF)
    return data.count(b"\n") != pairs or data.count(b"\r") != pairs


def received_field(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipients: list[str],
    now: float,
) -> bytes:
    """The Received field (RFC 5321 4.4) we put on top of a message.

    ``from`` names the EHLO name when it is a domain or an address literal
    (RFC 5321 4.1.1.1), else ``unknown`` with what can be shown of the name in
    a comment, as ``from unknown (HELO bad?name) ([192.0.2.1])``; the client
    address follows as an address literal (``[IPv6:...]`` for IPv6). A lone
    recipient is named in ``for <...>`` with any character that is not plain
    in an address shown as "?". Nothing a client sent can add a "(", ")",
    ";", quote or line break to the field.
    """
    # "for <address>" only names a lone recipient: listing many would
    # disclose Bcc recipients to every other recipient.
    lone = _shown_address(recipients[0]) if len(recipients) == 1 else ""
    for_part = f"\r\n\tfor <{lone}>" if lone else ""
    return (
        f"Received: from {received_from(helo, client_ip)}\r\n"
        f"\tby {hostname} (mta) with {protocol} id {queue_id}{for_part};\r\n"
        f"\t{rfc5322_date(now)}\r\n"
    ).encode()


def received_from(helo: str, client_ip: str) -> str:
    """The part of a Received field after "from": EHLO name and client address."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:  # not from a TCP socket (tests talk over memory)
        literal = f"[{_NOT_SHOWN_OF_HELO.sub('?', client_ip)}]"
    else:
        literal = f"[IPv6:{address}]" if address.version == 6 else f"[{address}]"
    if is_domain_name(helo) or is_address_literal(helo):
        return f"{helo} ({literal})"
    if not helo:
        return f"unknown ({literal})"
    shown = _NOT_SHOWN_OF_HELO.sub("?", helo[:HELO_SHOWN_MAX])
    return f"unknown (HELO {shown}) ({literal})"


def _shown_address(address: str) -> str:
    """``address`` as "for <...>" shows it, or "" for none (a valid one always has a "@")."""
    local, _, domain = address.rpartition("@")
    if not local or not domain:
        return ""
    return f"{_NOT_IN_LOCAL_PART.sub('?', local)}@{_NOT_IN_DOMAIN.sub('?', domain)}"


def prepare(
    data: bytes,
    *,
    received: bytes,
    queue_id: str,
    hostname: str,
    now: float | None = None,
    instructions: Iterable[str] = (),
) -> Prepared:
    """The message to sign and store, or Rejected with the SMTP reply.

    ``instructions`` name header fields that instruct us rather than the
    recipient (the egress pool header, X-MTA-Priority): they are removed, and
    their values returned (the last one of each, stripped).
    """
    if has_bare_line_ending(data):
        raise Rejected(BARE_LINE_ENDING)
    lines, body = split_header(data)
    senders = field_values(lines, b"from")
    if len(senders) != 1:
        problem = "has no From header" if not senders else "has more than one From header"
        raise Rejected(f"550 5.6.0 Error: message {problem} (RFC 5322 3.6)")
    instructed = {}
    for name in instructions:
        lines, values = remove_field(lines, name.lower().encode())
        if values:
            instructed[name.lower()] = values[-1].decode("ascii", "replace").strip()
    added = []
    message_ids = [value for value in field_values(lines, b"message-id") if value]
    if message_ids:
        message_id = message_ids[0].decode("ascii", "replace")
    else:
        lines, _ = remove_field(lines, b"message-id")  # an empty field is no Message-ID
        message_id = f"<{queue_id}@{hostname}>"
        added.append(f"Message-ID: {message_id}\r\n".encode())
    if not field_values(lines, b"date"):
        stamp = time.time() if now is None else now
        added.append(f"Date: {rfc5322_date(stamp)}\r\n".encode())
    data = received + b"".join(lines) + b"".join(added) + CRLF + body
    return Prepared(data, message_id, senders[0].decode("utf-8", "replace"), instructed)
