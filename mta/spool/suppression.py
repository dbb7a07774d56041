"""The suppression list: addresses (and whole domains) we must not mail.

An address lands on the list when it hard-bounced (the receiving server said
it does not exist, `add_hard_bounces`) or when an operator adds it with
`mta suppress add`. Mail to a listed address is refused at RCPT with a
5.1.1 reply, or accepted and dropped with a log line, as `[suppression]
action` says: applications learn at once, and our sending reputation is
spared the bounces that mailing dead addresses causes.

Entries live in the spool's `suppress` database, keyed by the address or by
`@domain`, so the daemon and `mta suppress` share them without a restart.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from mta.mail.address import address_is_valid

OPERATOR = "operator"
BOUNCE = "bounce"


@dataclass(frozen=True)
class Suppression:
    source: str  # OPERATOR or BOUNCE
    reason: str  # the operator's words, or the bounce's reply
    added: str  # ISO 8601 UTC

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Suppression:
        return cls(**json.loads(data))

    def summary(self) -> str:
        """For a 550 reply and a log line: printable ASCII, short."""
        text = f"{self.source} {self.added[:10]}: {self.reason}"
        return "".join(c if " " <= c <= "~" else "?" for c in text)[:120]


def new(source: str, reason: str, now: float | None = None) -> Suppression:
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return Suppression(source, reason, stamp.isoformat(timespec="seconds"))


def entry(text: str) -> str:
    """An address or "@domain", lower case; ValueError for anything else."""
    value = text.strip().lower()
    if value.startswith("@"):
        valid = address_is_valid("postmaster" + value)
    else:
        valid = address_is_valid(value)
    if not valid:
        raise ValueError(f'"{text}" is neither an address nor "@domain"')
    return value
