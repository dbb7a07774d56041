"""TLS-RPT (RFC 8460): where a domain wants its TLS reports, and the daily report we send it.

- ``parse_record(records)``: the destinations of the domain's one
  ``v=TLSRPTv1`` TXT record at ``_smtp._tls.<domain>`` (3): ``mailto:``
  addresses and ``https:`` URLs; () when there is no such record, more than
  one, or it is malformed. Unknown fields and other URI schemes are ignored.
- ``reported_policy(policy)``: how a delivery's ``TlsPolicy`` (mta.policy.tls)
  appears in a report (4.4): ``sts``, ``tlsa`` or ``no-policy-found``.
- A ``Tally`` counts sessions by (policy, failure detail); a success has no
  detail. ``encode_tally``/``decode_tally`` are its JSON form for the spool.
- ``build_report(...)``: the report (4.4) as JSON, gzipped, with its file
  name (5.1: ``submitter!policy-domain!begin!end!unique-id.json.gz``).
- ``report_mail(...)``: the message that carries it to a ``mailto:`` address
  (5.3): multipart/report; report-type="tlsrpt", the gzip attached as
  application/tlsrpt+gzip, TLS-Report-Domain and TLS-Report-Submitter.

Pure: no I/O; time and unique ids are arguments.
"""

from __future__ import annotations

import datetime
import email.policy
import gzip
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from enum import StrEnum
from typing import Any
from urllib.parse import unquote, urlsplit

from mta.mail.address import address_is_valid, parse_ip
from mta.mail.domain import is_domain_name
from mta.mail.header import rfc5322_date
from mta.policy.tls import Failure, Tlsa, TlsPolicy

MEDIA_TYPE = "application/tlsrpt+gzip"  # of the attachment and of the HTTPS POST (5.3, 5.4)
# A domain names where its reports go, so a record with a long list would make
# us send mail for it to many addresses: only the first few are served.
MAX_DESTINATIONS = 5
_DAY = datetime.timedelta(days=1)
# Header lines written up to RFC 5322's hard limit: folded at 78, the file name
# would be split into RFC 2231 continuations that simple report parsers miss.
_UNFOLDED = email.policy.SMTP.clone(max_line_length=998)

# RFC 8460 3's grammar (case-sensitive): the version first, then fields
# separated by ";" with optional white space, the last ";" optional.
_VERSION = "v=TLSRPTv1"
_RECORD_START = re.compile(rf"{_VERSION}[ \t]*;")
_FIELD_DELIMITER = re.compile(r"[ \t]*;[ \t]*")
_URI_DELIMITER = re.compile(r"[ \t]*,[ \t]*")
_EXTENSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}=[\x21-\x3a\x3c\x3e-\x7e]+")
_URI = re.compile(r"[\x21-\x2b\x2d-\x3a\x3c-\x7e]+")  # printable, no "," nor ";"


class Scheme(StrEnum):
    MAILTO = "mailto"
    HTTPS = "https"


@dataclass(frozen=True)
class Destination:
    """Where a report goes: an address (mailto:) or a URL (https:)."""

    scheme: Scheme
    target: str

    def __str__(self) -> str:
        return f"mailto:{self.target}" if self.scheme is Scheme.MAILTO else self.target


def parse_record(records: Iterable[bytes]) -> tuple[Destination, ...]:
    """The report destinations of a domain's ``_smtp._tls`` TXT records (each the
    concatenation of its strings); () if it asks for no reports we can send."""
    texts = [record.decode("ascii", "replace") for record in records]
    candidates = [text for text in texts if _RECORD_START.match(text)]
    if len(candidates) != 1:  # 3: anything but exactly one record means no TLS-RPT
        return ()
    fields = _fields(candidates[0])
    rua = [value for name, value in fields or () if name == "rua"]
    if len(rua) != 1:
        return ()
    uris = _URI_DELIMITER.split(rua[0])
    if not all(_URI.fullmatch(uri) for uri in uris):
        return ()
    destinations = [found for uri in uris if (found := _destination(uri)) is not None]
    return tuple(dict.fromkeys(destinations))[:MAX_DESTINATIONS]


def _fields(record: str) -> list[tuple[str, str]] | None:
    """The (name, value) fields after the version; None if one is malformed."""
    parts = _FIELD_DELIMITER.split(record.removeprefix(_VERSION))
    if parts[-1] == "":  # the optional final delimiter
        parts.pop()
    fields = []
    for part in parts[1:]:  # parts[0] is what stood before the first ";": nothing
        name, _, value = part.partition("=")
        # rua's URIs may hold "=", which an extension's value may not.
        if not ((name == "rua" and value) or _EXTENSION.fullmatch(part)):
            return None
        fields.append((name, value))
    return fields


def _destination(uri: str) -> Destination | None:
    scheme, colon, rest = uri.partition(":")
    if not colon:
        return None
    if scheme.lower() == Scheme.MAILTO:
        address = unquote(rest.partition("?")[0])
        return Destination(Scheme.MAILTO, address) if address_is_valid(address) else None
    if scheme.lower() == Scheme.HTTPS:
        return Destination(Scheme.HTTPS, uri) if _usable_url(uri) else None
    return None


def _usable_url(url: str) -> bool:
    """An https URL naming its host (not an address: the check that keeps reports
    off private networks works on the names it resolves) and a valid port."""
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port raises ValueError for a port that is no number
    except ValueError:
        return False
    return host is not None and parse_ip(host) is None and is_domain_name(host)


# --- what is counted ---


class PolicyType(StrEnum):
    STS = "sts"
    TLSA = "tlsa"
    NO_POLICY_FOUND = "no-policy-found"


@dataclass(frozen=True, order=True)
class ReportedPolicy:
    """A policy as a report shows it (4.4 "policy")."""

    type: PolicyType
    domain: str
    strings: tuple[str, ...] = ()  # the policy's lines (sts) or TLSA records (tlsa)
    mx_hosts: tuple[str, ...] = ()  # the MX patterns (sts) or the hosts with TLSA records

    def to_json(self) -> dict[str, Any]:
        return {
            "policy-type": self.type.value,
            "policy-string": list(self.strings),
            "policy-domain": self.domain,
            "mx-host": list(self.mx_hosts),
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> ReportedPolicy:
        return cls(
            PolicyType(document["policy-type"]),
            document["policy-domain"],
            tuple(document["policy-string"]),
            tuple(document["mx-host"]),
        )


def reported_policy(policy: TlsPolicy) -> ReportedPolicy:
    """``policy`` as its domain's report shows it."""
    if policy.source == "dane":
        records = sorted(
            {_tlsa_string(record) for records in policy.tlsa.values() for record in records}
        )
        return ReportedPolicy(
            PolicyType.TLSA, policy.policy_domain, tuple(records), tuple(sorted(policy.tlsa))
        )
    if policy.source == "mta-sts" or policy.testing:
        # The policy file's lines but max_age, which a TlsPolicy does not carry.
        lines = (
            "version: STSv1",
            f"mode: {'testing' if policy.testing else 'enforce'}",
            *(f"mx: {pattern}" for pattern in policy.mx_patterns),
        )
        return ReportedPolicy(PolicyType.STS, policy.policy_domain, lines, policy.mx_patterns)
    return ReportedPolicy(PolicyType.NO_POLICY_FOUND, policy.policy_domain)


def _tlsa_string(record: Tlsa) -> str:
    """A TLSA record's data in presentation form (RFC 6698 2.2): "3 1 1 4A5B..."."""
    return f"{record.usage} {record.selector} {record.matching_type} {record.data.hex().upper()}"


@dataclass(frozen=True, order=True)
class FailureDetail:
    """What a failed session is counted under (4.4 "failure-details")."""

    result: Failure
    sending_ip: str
    receiving_mx: str
    receiving_ip: str = ""  # "" when unknown: left out of the report

    def to_json(self) -> dict[str, Any]:
        document = {
            "result-type": self.result.value,
            "sending-mta-ip": self.sending_ip,
            "receiving-mx-hostname": self.receiving_mx,
        }
        if self.receiving_ip:
            document["receiving-ip"] = self.receiving_ip
        return document

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> FailureDetail:
        return cls(
            Failure(document["result-type"]),
            document["sending-mta-ip"],
            document["receiving-mx-hostname"],
            document.get("receiving-ip", ""),
        )


Session = tuple[ReportedPolicy, FailureDetail | None]  # a success has no failure detail
Tally = Counter[Session]


def encode_tally(tally: Tally) -> list[list[Any]]:
    """The JSON form of a tally: [policy, failure detail or null, sessions] each."""
    return [
        [policy.to_json(), None if detail is None else detail.to_json(), sessions]
        for (policy, detail), sessions in sorted(tally.items(), key=_session_order)
    ]


def decode_tally(entries: Iterable[list[Any]]) -> Tally:
    tally: Tally = Counter()
    for policy, detail, sessions in entries:
        failure = None if detail is None else FailureDetail.from_json(detail)
        tally[(ReportedPolicy.from_json(policy), failure)] += int(sessions)
    return tally


def _session_order(item: tuple[Session, int]) -> tuple[ReportedPolicy, bool, Any]:
    (policy, detail), _ = item
    return policy, detail is not None, detail


# --- the report ---


def report_day(now: float) -> datetime.date:
    """The UTC day ``now`` falls in: a report covers one (4.4 "date-range")."""
    return datetime.datetime.fromtimestamp(now, datetime.UTC).date()


def _day_start(day: datetime.date) -> datetime.datetime:
    return datetime.datetime.combine(day, datetime.time(), datetime.UTC)


@dataclass(frozen=True)
class Reporter:
    """Who we are in a report."""

    organization: str  # "organization-name"
    contact: str  # "contact-info": an address
    submitter: str  # our domain: TLS-Report-Submitter, the file name's and report id's


@dataclass(frozen=True)
class Report:
    policy_domain: str
    report_id: str  # "<unique-id>@<submitter>", as the mail's Subject shows it in <>
    document: dict[str, Any]
    gzipped: bytes
    filename: str


def build_report(
    reporter: Reporter, policy_domain: str, day: datetime.date, unique_id: str, tally: Tally
) -> Report:
    """The report of ``day``'s sessions with ``policy_domain``; ``unique_id`` letters
    and digits only (5.1), the same on every try so a receiver can spot a resend."""
    report_id = f"{unique_id}@{reporter.submitter}"
    start = _day_start(day)
    document = {
        "organization-name": reporter.organization,
        "date-range": {
            "start-datetime": _rfc3339(start),
            "end-datetime": _rfc3339(start + _DAY - datetime.timedelta(seconds=1)),
        },
        "contact-info": reporter.contact,
        "report-id": report_id,
        "policies": _policies(tally),
    }
    # mtime 0: the same report gzips to the same bytes on every try.
    gzipped = gzip.compress(json.dumps(document).encode(), mtime=0)
    filename = report_filename(reporter.submitter, policy_domain, day, unique_id)
    return Report(policy_domain, report_id, document, gzipped, filename)


def report_filename(submitter: str, policy_domain: str, day: datetime.date, unique_id: str) -> str:
    begin = int(_day_start(day).timestamp())
    end = begin + int(_DAY.total_seconds()) - 1
    return f"{submitter}!{policy_domain}!{begin}!{end}!{unique_id}.json.gz"


def _rfc3339(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _policies(tally: Tally) -> list[dict[str, Any]]:
    successes: Counter[ReportedPolicy] = Counter()
    failures: dict[ReportedPolicy, list[dict[str, Any]]] = {}  # every policy, in order
    for (policy, detail), sessions in sorted(tally.items(), key=_session_order):
        failures.setdefault(policy, [])
        if detail is None:
            successes[policy] += sessions
        else:
            failures[policy].append({**detail.to_json(), "failed-session-count": sessions})
    return [
        {
            "policy": policy.to_json(),
            "summary": {
                "total-successful-session-count": successes[policy],
                "total-failure-session-count": sum(d["failed-session-count"] for d in details),
            },
            "failure-details": details,
        }
        for policy, details in failures.items()
    ]


# --- the mail that carries it ---


def report_mail(
    report: Report,
    reporter: Reporter,
    *,
    sender: str,
    recipient: str,
    now: float,
    message_id: str,
) -> bytes:
    """The message (5.3) that takes ``report`` from ``sender`` to ``recipient``;
    CRLF line ends, not yet DKIM-signed."""
    message = EmailMessage(policy=email.policy.SMTP)  # base64 lines of 76 (RFC 2045)
    message["From"] = sender
    message["To"] = recipient
    message["Date"] = rfc5322_date(now)
    message["Subject"] = (
        f"Report Domain: {report.policy_domain} Submitter: {reporter.submitter} "
        f"Report-ID: <{report.report_id}>"
    )
    message["Message-ID"] = message_id
    message["TLS-Report-Domain"] = report.policy_domain
    message["TLS-Report-Submitter"] = reporter.submitter
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no autoresponder answers it
    message.set_content(
        f"This is an aggregate TLS report from {reporter.submitter}.\n", charset="us-ascii"
    )
    maintype, subtype = MEDIA_TYPE.split("/")
    message.add_attachment(
        report.gzipped, maintype=maintype, subtype=subtype, filename=report.filename
    )
    # add_attachment made it multipart/mixed; the boundary stays, the type is 5.3's.
    message.set_type("multipart/report")
    message.set_param("report-type", "tlsrpt")
    return message.as_bytes(policy=_UNFOLDED)
