"""TLS-RPT's pure part (mta.policy.tls_report): the _smtp._tls record, the report
document RFC 8460 4.4 describes, its file name and the mail that carries it."""

from __future__ import annotations

import datetime
import gzip
import json
import re
from collections import Counter
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.policy.tls import Failure, Level, Tlsa, TlsPolicy
from mta.policy.tls_report import (
    MAX_DESTINATIONS,
    MEDIA_TYPE,
    Destination,
    FailureDetail,
    PolicyType,
    Report,
    ReportedPolicy,
    Reporter,
    Scheme,
    Tally,
    build_report,
    decode_tally,
    encode_tally,
    parse_record,
    report_day,
    report_filename,
    report_mail,
    reported_policy,
)

REPORTER = Reporter("Example Sender Inc.", "tlsrpt-admin@sender.test", "mta.sender.test")
DAY = datetime.date(2027, 1, 15)
STS = ReportedPolicy(
    PolicyType.STS,
    "example.net",
    ("version: STSv1", "mode: enforce", "mx: *.example.net"),
    ("*.example.net",),
)
EXPIRED = FailureDetail(Failure.CERTIFICATE_EXPIRED, "192.0.2.1", "mx1.example.net", "198.51.100.7")
NO_STARTTLS = FailureDetail(Failure.STARTTLS_NOT_SUPPORTED, "192.0.2.2", "mx2.example.net")


def mailto(address: str) -> Destination:
    return Destination(Scheme.MAILTO, address)


def https(url: str) -> Destination:
    return Destination(Scheme.HTTPS, url)


# --- the _smtp._tls record (RFC 8460 3) ---


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ("v=TLSRPTv1; rua=mailto:reports@example.net", (mailto("reports@example.net"),)),
        (
            "v=TLSRPTv1;rua=mailto:a@example.net,https://rpt.example.net/v1;",
            (mailto("a@example.net"), https("https://rpt.example.net/v1")),
        ),
        (
            "v=TLSRPTv1 ; rua=https://rpt.example.net:8443/x?y=1 , mailto:b@example.net ;",
            (https("https://rpt.example.net:8443/x?y=1"), mailto("b@example.net")),
        ),
        ("v=TLSRPTv1; future=1; rua=mailto:a@example.net", (mailto("a@example.net"),)),
        ("v=TLSRPTv1; rua=mailto:tls%2Drpt@example.net", (mailto("tls-rpt@example.net"),)),
        ("v=TLSRPTv1; rua=MAILTO:a@example.net?subject=x", (mailto("a@example.net"),)),
        # Other schemes, bad addresses and an address for a host are skipped.
        (
            "v=TLSRPTv1; rua=ftp://x.example.net/,mailto:nobody,https://192.0.2.1/r,"
            "https://rpt.example.net:port/,mailto:ok@example.net",
            (mailto("ok@example.net"),),
        ),
        ("v=TLSRPTv1; rua=mailto:a@example.net,mailto:a@example.net", (mailto("a@example.net"),)),
    ],
)
def test_a_record_gives_its_destinations(record: str, expected: tuple[Destination, ...]) -> None:
    assert parse_record([record.encode()]) == expected


@pytest.mark.parametrize(
    "records",
    [
        [],
        ["v=spf1 -all"],
        ["v=TLSRPTv1; rua=mailto:a@example.net", "v=TLSRPTv1; rua=mailto:b@example.net"],
        ["v=TLSRPTv1"],  # no field at all
        ["v=TLSRPTv1; "],
        ["v=tlsrptv1; rua=mailto:a@example.net"],  # the version is case-sensitive
        ["v=TLSRPTv1; rua=mailto:a@example.net; rua=mailto:b@example.net"],
        ["v=TLSRPTv1; rua=mailto:a@example.net; broken"],
        ["v=TLSRPTv1; rua=mailto:a@example.net; x=a=b"],
        ["v=TLSRPTv1; rua=mailto:a@example.net,"],
        ["v=TLSRPTv1; rua=mailto:a @example.net"],
        ["v=TLSRPTv1; rua=ftp://example.net/"],
    ],
)
def test_no_single_wellformed_record_asks_for_nothing(records: list[str]) -> None:
    assert parse_record(record.encode() for record in records) == ()


def test_records_of_other_kinds_beside_it_are_ignored() -> None:
    records = [b"v=spf1 -all", b"v=TLSRPTv1; rua=mailto:a@example.net"]
    assert parse_record(records) == (mailto("a@example.net"),)


def test_only_the_first_destinations_of_a_long_list_are_served() -> None:
    addresses = [f"r{n}@example.net" for n in range(MAX_DESTINATIONS + 3)]
    record = "v=TLSRPTv1; rua=" + ",".join(f"mailto:{a}" for a in addresses)
    assert parse_record([record.encode()]) == tuple(map(mailto, addresses[:MAX_DESTINATIONS]))


def test_a_destination_prints_as_its_uri() -> None:
    assert str(mailto("a@example.net")) == "mailto:a@example.net"
    assert str(https("https://rpt.example.net/v1")) == "https://rpt.example.net/v1"


# --- the policy a report shows (RFC 8460 4.4 "policy") ---


def test_an_mta_sts_policy_shows_its_lines_and_patterns() -> None:
    enforce = TlsPolicy(
        Level.VERIFY, "mta-sts", mx_patterns=("*.example.net",), policy_domain="example.net"
    )
    assert reported_policy(enforce) == STS
    testing = TlsPolicy(mx_patterns=("mx.example.net",), testing=True, policy_domain="example.net")
    assert reported_policy(testing) == ReportedPolicy(
        PolicyType.STS,
        "example.net",
        ("version: STSv1", "mode: testing", "mx: mx.example.net"),
        ("mx.example.net",),
    )


def test_a_dane_policy_shows_its_tlsa_records_and_hosts() -> None:
    tlsa = {
        "mx2.example.net": (Tlsa(3, 1, 1, bytes.fromhex("ab" * 32)),),
        "mx1.example.net": (Tlsa(2, 0, 1, bytes.fromhex("0f" * 32)), Tlsa(3, 1, 1, b"\xab" * 32)),
    }
    policy = TlsPolicy(Level.DANE, "dane", tlsa=tlsa, policy_domain="example.net")
    assert reported_policy(policy) == ReportedPolicy(
        PolicyType.TLSA,
        "example.net",
        (f"2 0 1 {'0F' * 32}", f"3 1 1 {'AB' * 32}"),
        ("mx1.example.net", "mx2.example.net"),
    )


def test_any_other_policy_is_no_policy_found() -> None:
    policy = TlsPolicy(Level.ENCRYPT, "config", policy_domain="example.net")
    assert reported_policy(policy) == ReportedPolicy(PolicyType.NO_POLICY_FOUND, "example.net")
    assert reported_policy(policy).to_json() == {
        "policy-type": "no-policy-found",
        "policy-string": [],
        "policy-domain": "example.net",
        "mx-host": [],
    }


# --- the report document (RFC 8460 4.4) ---

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def check_document(document: dict[str, Any]) -> None:
    """Every field RFC 8460 4.4 requires, of its type, and nothing it does not define."""
    assert set(document) == {
        "organization-name",
        "date-range",
        "contact-info",
        "report-id",
        "policies",
    }
    assert all(isinstance(document[key], str) for key in ("organization-name", "report-id"))
    assert isinstance(document["contact-info"], str)
    date_range = document["date-range"]
    assert set(date_range) == {"start-datetime", "end-datetime"}
    assert all(RFC3339_UTC.fullmatch(value) for value in date_range.values())
    assert isinstance(document["policies"], list)
    for entry in document["policies"]:
        check_policy_entry(entry)


def check_policy_entry(entry: dict[str, Any]) -> None:
    assert set(entry) == {"policy", "summary", "failure-details"}
    policy = entry["policy"]
    assert policy["policy-type"] in {"sts", "tlsa", "no-policy-found"}
    assert isinstance(policy["policy-domain"], str)
    assert set(policy) == {"policy-type", "policy-domain", "policy-string", "mx-host"}
    for key in ("policy-string", "mx-host"):
        assert all(isinstance(item, str) for item in policy[key])
    summary = entry["summary"]
    assert set(summary) == {"total-successful-session-count", "total-failure-session-count"}
    assert all(isinstance(count, int) and count >= 0 for count in summary.values())
    for detail in entry["failure-details"]:
        assert set(detail) - {"receiving-ip"} == {
            "result-type",
            "sending-mta-ip",
            "receiving-mx-hostname",
            "failed-session-count",
        }
        assert detail["result-type"] in {failure.value for failure in Failure}
        assert isinstance(detail["failed-session-count"], int)
        assert detail["failed-session-count"] > 0


def unzipped(report: Report) -> Any:
    return json.loads(gzip.decompress(report.gzipped))


def test_a_report_says_what_was_counted() -> None:
    tally: Tally = Counter({(STS, None): 5326, (STS, EXPIRED): 100, (STS, NO_STARTTLS): 3})
    report = build_report(REPORTER, "example.net", DAY, "abc123", tally)

    assert unzipped(report) == report.document
    check_document(report.document)
    assert report.document == {
        "organization-name": "Example Sender Inc.",
        "date-range": {
            "start-datetime": "2027-01-15T00:00:00Z",
            "end-datetime": "2027-01-15T23:59:59Z",
        },
        "contact-info": "tlsrpt-admin@sender.test",
        "report-id": "abc123@mta.sender.test",
        "policies": [
            {
                "policy": {
                    "policy-type": "sts",
                    "policy-domain": "example.net",
                    "policy-string": ["version: STSv1", "mode: enforce", "mx: *.example.net"],
                    "mx-host": ["*.example.net"],
                },
                "summary": {
                    "total-successful-session-count": 5326,
                    "total-failure-session-count": 103,
                },
                "failure-details": [
                    {
                        "result-type": "certificate-expired",
                        "sending-mta-ip": "192.0.2.1",
                        "receiving-mx-hostname": "mx1.example.net",
                        "receiving-ip": "198.51.100.7",
                        "failed-session-count": 100,
                    },
                    {
                        "result-type": "starttls-not-supported",
                        "sending-mta-ip": "192.0.2.2",
                        "receiving-mx-hostname": "mx2.example.net",
                        "failed-session-count": 3,
                    },
                ],
            }
        ],
    }


def test_a_report_is_the_same_bytes_on_every_try() -> None:
    tally: Tally = Counter({(STS, None): 1})
    first = build_report(REPORTER, "example.net", DAY, "abc123", tally)
    assert build_report(REPORTER, "example.net", DAY, "abc123", tally) == first


def test_the_file_name_is_rfc_8460_5_1s() -> None:
    begin = int(datetime.datetime(2027, 1, 15, tzinfo=datetime.UTC).timestamp())
    name = report_filename("mta.sender.test", "example.net", DAY, "abc123")
    assert name == f"mta.sender.test!example.net!{begin}!{begin + 86399}!abc123.json.gz"


def test_the_report_day_is_the_utc_day() -> None:
    midnight = datetime.datetime(2027, 1, 15, tzinfo=datetime.UTC).timestamp()
    assert report_day(midnight) == DAY
    assert report_day(midnight - 1) == DAY - datetime.timedelta(days=1)
    assert report_day(midnight + 86399.9) == DAY


# --- any counts give a consistent report ---

names = st.from_regex(r"[a-z]{1,8}(\.[a-z]{1,8}){1,2}", fullmatch=True)
addresses = st.ip_addresses().map(str)
policies = st.builds(
    ReportedPolicy,
    st.sampled_from(PolicyType),
    st.just("example.net"),
    st.lists(st.text(max_size=30), max_size=4).map(tuple),
    st.lists(names, max_size=3).map(tuple),
)
details = st.none() | st.builds(
    FailureDetail, st.sampled_from(Failure), addresses, names, st.just("") | addresses
)
tallies = st.dictionaries(st.tuples(policies, details), st.integers(1, 2**40), max_size=12).map(
    Counter
)


@given(tallies)
def test_any_counts_give_a_parseable_consistent_report(tally: Tally) -> None:
    report = build_report(REPORTER, "example.net", DAY, "u1", tally)
    document = unzipped(report)
    check_document(document)

    successes = sum(sessions for (_, detail), sessions in tally.items() if detail is None)
    failures = sum(sessions for (_, detail), sessions in tally.items() if detail is not None)
    summaries = [entry["summary"] for entry in document["policies"]]
    assert sum(s["total-successful-session-count"] for s in summaries) == successes
    assert sum(s["total-failure-session-count"] for s in summaries) == failures
    for entry in document["policies"]:
        counted = sum(detail["failed-session-count"] for detail in entry["failure-details"])
        assert entry["summary"]["total-failure-session-count"] == counted
    shown = [ReportedPolicy.from_json(entry["policy"]) for entry in document["policies"]]
    assert len(shown) == len(set(shown))


@given(tallies)
def test_a_tally_comes_back_from_its_json_form(tally: Tally) -> None:
    stored = json.loads(json.dumps(encode_tally(tally)))
    assert decode_tally(stored) == tally


# --- the mail (RFC 8460 5.3) ---


def test_the_mail_carries_the_gzipped_report() -> None:
    tally: Tally = Counter({(STS, None): 7, (STS, EXPIRED): 2})
    report = build_report(REPORTER, "example.net", DAY, "abc123", tally)
    raw = report_mail(
        report,
        REPORTER,
        sender="tlsrpt@sender.test",
        recipient="reports@example.net",
        now=1_800_000_000,
        message_id="<m1@mta.sender.test>",
    )

    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    assert max(map(len, raw.split(b"\r\n"))) <= 998
    # One quoted file name, not RFC 2231 pieces that simple report parsers miss.
    assert f'filename="{report.filename}"'.encode() in raw
    message = message_from_bytes(raw, policy=default)
    assert isinstance(message, EmailMessage)
    assert message["From"] == "tlsrpt@sender.test"
    assert message["To"] == "reports@example.net"
    assert message["Subject"] == (
        "Report Domain: example.net Submitter: mta.sender.test Report-ID: <abc123@mta.sender.test>"
    )
    assert message["TLS-Report-Domain"] == "example.net"
    assert message["TLS-Report-Submitter"] == "mta.sender.test"
    assert message["Message-ID"] == "<m1@mta.sender.test>"
    assert message["Date"] == "Fri, 15 Jan 2027 08:00:00 +0000"
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"

    text, attachment = message.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert "aggregate TLS report" in text.get_content()
    assert attachment.get_content_type() == MEDIA_TYPE
    assert attachment.get_filename() == report.filename
    assert json.loads(gzip.decompress(attachment.get_content())) == report.document
