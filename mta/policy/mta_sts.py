"""MTA-STS (RFC 8461): a domain's word that its mail must go over verified TLS to its MX hosts.

The domain announces a policy with a TXT record at ``_mta-sts.<domain>``
(``v=STSv1; id=...;``, the id changing with every new policy) and serves it
at ``https://mta-sts.<domain>/.well-known/mta-sts.txt``. The rules here; the
DNS lookup, the fetch and the cache are in mta.outbound.mta_sts.

- ``policy_id(records)``: the id of the domain's one STSv1 TXT record, or None
  when there is none, more than one, or it is malformed (3.1).
- ``parse_policy(body)``: the policy file (3.2): ``version: STSv1``, ``mode``,
  ``max_age`` and ``mx`` patterns (one or more unless the mode is ``none``),
  lines ending in LF or CRLF; unknown fields are ignored, and of a repeated
  field other than ``mx`` the first counts. A ``max_age`` beyond a year counts
  as a year. Anything else raises ``StsError``.
- ``decide(cached, record_id, now)``: the cached policy in force (until
  ``max_age`` seconds after its fetch) and whether to fetch a new one (when
  the TXT id is not that policy's). A fetch that fails leaves the policy in
  force as it was: a failed fetch is never a downgrade. Without a TXT record
  the cached policy stays in force until it expires (5.1).
- ``tls_policy(...)``: what a policy asks of a delivery (mta.policy.tls).

Pure: no I/O; time is an argument.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from mta.mail.domain import is_domain_name
from mta.policy.tls import Level, TlsPolicy

MAX_AGE = 31_557_600  # RFC 8461 3.2: a year
# An answer is kept this long at least, however short max_age is: a domain
# with max_age 0 must not cost a TXT lookup and a fetch per message.
MIN_RECHECK = 1.0

# RFC 8461 3.1's grammar of the TXT record (case-sensitive).
_RECORD_DELIMITER = r"[ \t]*;[ \t]*"
_RECORD_FIELD = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}=[\x21-\x3a\x3c\x3e-\x7e]+"
_RECORD = re.compile(rf"v=STSv1(?:{_RECORD_DELIMITER}{_RECORD_FIELD})+(?:{_RECORD_DELIMITER})?")
_ID = re.compile(r"[A-Za-z0-9]{1,32}")

# RFC 8461 3.2's grammar of a policy line: a field name, ":", a value of
# printable characters (UTF-8 allowed) with inner spaces, and white space.
_VCHARS = r"\x21-\x7e\x80-\U0010ffff"
_POLICY_VALUE = rf"[{_VCHARS}](?:[ {_VCHARS}]*[{_VCHARS}])?"
_POLICY_LINE = re.compile(rf"([A-Za-z0-9][A-Za-z0-9_.-]{{0,31}}):[ \t]*({_POLICY_VALUE})[ \t]*")
_KNOWN_VALUES = {
    "version": re.compile("STSv1"),
    "mode": re.compile("enforce|testing|none"),
    "max_age": re.compile("[0-9]{1,10}"),
}
_REQUIRED = ("version", "mode", "max_age")


class StsError(ValueError):
    """A policy file (or a cached policy) that RFC 8461 does not allow; str() says why."""


class Mode(StrEnum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


@dataclass(frozen=True)
class StsPolicy:
    mode: Mode
    mx: tuple[str, ...]  # RFC 8461 4.1 patterns, lower case: "mx.example.net", "*.example.net"
    max_age: int  # seconds the policy may be cached, at most MAX_AGE

    def policy_file(self) -> bytes:
        """The policy file that says this policy."""
        lines = [
            "version: STSv1",
            f"mode: {self.mode}",
            *(f"mx: {pattern}" for pattern in self.mx),
            f"max_age: {self.max_age}",
        ]
        return "".join(line + "\n" for line in lines).encode()


@dataclass(frozen=True)
class CachedPolicy:
    policy: StsPolicy
    id: str  # the TXT record's id the policy was fetched for
    fetched: float  # seconds since the epoch: the cache outlives the process

    @property
    def expires(self) -> float:
        return self.fetched + self.policy.max_age

    def to_json(self) -> bytes:
        """The cache record: the policy as a policy file, so reading it back checks it again."""
        policy = self.policy.policy_file().decode()
        return json.dumps({"fetched": self.fetched, "id": self.id, "policy": policy}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> CachedPolicy:
        """A cache record ``to_json`` wrote; StsError for anything else."""
        try:
            record = json.loads(raw)
            policy = parse_policy(record["policy"].encode())
            return cls(policy, _checked_id(record["id"]), float(record["fetched"]))
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as error:
            raise StsError(f"not a cached MTA-STS policy: {error}") from None


@dataclass(frozen=True)
class Decision:
    in_force: CachedPolicy | None  # what applies now, and still if the fetch fails
    fetch: str | None  # the TXT id of a policy to fetch, if the domain announces a new one


# --- the TXT record ---


def policy_id(records: Iterable[bytes]) -> str | None:
    """RFC 8461 3.1: the id of the one TXT record that starts with "v=STSv1;" (the
    others are not MTA-STS's); None when there is no such record, more than one,
    or it is malformed: the domain then announces no policy."""
    announced = [record for record in records if record.startswith(b"v=STSv1;")]
    if len(announced) != 1:
        return None
    text = announced[0].decode("ascii", "replace")  # non-ASCII fails the grammar anyway
    if _RECORD.fullmatch(text) is None:
        return None
    fields = (field.partition("=") for field in re.split(_RECORD_DELIMITER, text)[1:] if field)
    ids = [value for name, _, value in fields if name == "id"]
    return ids[0] if ids and _ID.fullmatch(ids[0]) else None


def _checked_id(value: str) -> str:
    if _ID.fullmatch(value) is None:
        raise ValueError("the id is not 1 to 32 letters and digits")
    return value


# --- the policy file ---


def parse_policy(body: bytes) -> StsPolicy:
    """RFC 8461 3.2: the policy a policy file says; StsError if it breaks the rules."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise StsError("the policy is not UTF-8") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the last line's own line break
    fields: dict[str, str] = {}
    patterns: list[str] = []
    for number, line in enumerate(lines, 1):
        name, value = _field(line.removesuffix("\r"), number)
        if name == "mx":
            patterns.append(_mx_pattern(value, number))
        else:
            fields.setdefault(name, value)  # RFC 8461 3.2: a repeated field's first counts
    return _policy(fields, tuple(patterns))


def _field(line: str, number: int) -> tuple[str, str]:
    match = _POLICY_LINE.fullmatch(line)
    if match is None:
        raise StsError(f"line {number} is not a field")
    name, value = match.group(1, 2)
    known = _KNOWN_VALUES.get(name)
    if known is not None and known.fullmatch(value) is None:
        raise StsError(f"line {number}: {name} has a value RFC 8461 does not allow")
    return name, value


def _mx_pattern(value: str, number: int) -> str:
    if not is_domain_name(value.removeprefix("*.")):
        raise StsError(f"line {number}: mx is neither a host name nor *. and a domain")
    return value.lower()


def _policy(fields: dict[str, str], patterns: tuple[str, ...]) -> StsPolicy:
    missing = [name for name in _REQUIRED if name not in fields]
    if missing:
        raise StsError(f"the policy has no {' and no '.join(missing)} field")
    mode = Mode(fields["mode"])
    if not patterns and mode is not Mode.NONE:
        raise StsError(f"a policy in mode {mode} needs mx patterns")
    return StsPolicy(mode, patterns, min(int(fields["max_age"]), MAX_AGE))


# --- the cache ---


def decide(cached: CachedPolicy | None, record_id: str | None, now: float) -> Decision:
    """What to do with a domain's cached policy, given the id its TXT record
    announces now (None: no valid record, or the DNS did not answer)."""
    in_force = cached if cached is not None and now < cached.expires else None
    stale = in_force is None or in_force.id != record_id
    return Decision(in_force, record_id if record_id is not None and stale else None)


def recheck_in(in_force: CachedPolicy | None, now: float, interval: float) -> float:
    """Seconds until the domain's TXT record is looked at again: ``interval``, or
    when the policy in force expires if that is sooner (but not under MIN_RECHECK)."""
    if in_force is None:
        return interval
    return max(min(interval, in_force.expires - now), MIN_RECHECK)


# --- what a delivery must do ---


def tls_policy(policy: StsPolicy | None, domain: str, configured: TlsPolicy) -> TlsPolicy | None:
    """The TLS policy ``domain``'s MTA-STS policy asks for, or None when it asks
    for nothing (mode ``none``, or no policy). ``testing`` checks as ``enforce``
    does but only notes what it would refuse, for TLS-RPT; a configured level
    that requires TLS stays in force then (testing must not loosen it)."""
    if policy is None or policy.mode is Mode.NONE:
        return None
    testing = policy.mode is Mode.TESTING
    if testing and configured.required:
        return configured
    return TlsPolicy(Level.VERIFY, "mta-sts", policy.mx, testing=testing, policy_domain=domain)
