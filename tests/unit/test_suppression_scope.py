"""The suppression list's entries: which bounces suppress, for whom, and for how long.

Keys and lookups run against a real spool; every moment is given, never read
from a clock. The Redis side is in test_suppression_sync.py and
tests/integration/test_fleet_suppression.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta import config
from mta.mail.reply import Reply, parse_reply
from mta.spool import suppression
from mta.spool.store import Spool
from mta.spool.suppression import BOUNCE, OPERATOR, Entry, Suppression
from tests.unit.test_attempt import NOW, run_attempt

DAY = 86400.0
BOUNCED = suppression.new(BOUNCE, "550 5.1.1 no such user", now=NOW, lifetime=10 * DAY)
FOR_EVER = suppression.new(OPERATOR, "asked us to stop", now=NOW)


# --- which bounces suppress ---

NO_SUCH_USER_TEXTS = [
    "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n"
    "550 5.1.1 double-checking the recipient's email address for typos",
    "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
    "550 5.0.0 RESOLVER.ADR.RecipNotFound; not found",
    "550 Recipient not found by SMTP address lookup",
    "554 delivery error: dd This user doesn't have a yahoo.com account (x@yahoo.com) [0]",
    "550 5.1.1 <x@example.net>: Recipient address rejected: User unknown in local table",
    "550 user unknown",
    "550 No such user here",
]


@pytest.mark.parametrize(
    ("raw", "suppresses"),
    [(text, True) for text in NO_SUCH_USER_TEXTS]
    + [
        ("550 5.1.1 <x@example.net>: bad destination mailbox", True),
        ("550 5.1.10 gone", True),
        ("550 5.1.2 bad destination system: no such domain", True),
        ("553 5.1.2 Host unknown", True),
        ("550 5.2.1 <x@example.net>: mailbox unavailable", False),
        ("550 Requested action not taken: mailbox unavailable", False),
        ("550 5.2.1 The email account that you tried to reach is disabled", False),
        ("550 5.2.1 no such user", False),  # the status says disabled: it wins over the words
        ("552 5.2.2 The email account that you tried to reach is over quota", False),
        ("550 5.7.1 user unknown", False),  # policy: may be about us, not the address
        ("550 5.7.1 Service unavailable; client host [192.0.2.1] blocked using zen", False),
        ("550 5.7.26 unauthenticated email is not accepted", False),
        ("550 5.4.1 Recipient address rejected: Access denied", False),
        ("553 5.1.3 bad destination mailbox address syntax", False),
        ("550 5.1.0 sender rejected", False),
        ("450 4.1.1 <x@example.net>: Recipient address rejected: User unknown", False),
        ("451 4.2.1 no such user (try again later)", False),
        ("421 4.7.0 try again later", False),
        ("250 2.1.5 Ok", False),
    ],
)
def test_only_unambiguous_hard_bounces_suppress(raw: str, suppresses: bool) -> None:
    assert suppression.is_hard_bounce(parse_reply(raw)) is suppresses


@given(
    code=st.integers(400, 499),
    text=st.one_of(st.text(), st.sampled_from(NO_SUCH_USER_TEXTS)),
    status=st.sampled_from(["", "4.1.1 ", "5.1.1 ", "4.1.10 ", "5.1.2 ", "4.0.0 "]),
)
def test_no_4xx_ever_suppresses(code: int, text: str, status: str) -> None:
    assert not suppression.is_hard_bounce(Reply(code, status + text))


# --- keys ---


def test_keys_are_the_entry_alone_for_every_sender_else_entry_space_sender_domain() -> None:
    assert suppression.entry_key("Gone@Example.NET") == "gone@example.net"
    assert suppression.entry_key("@Closed.example") == "@closed.example"
    assert (
        suppression.entry_key("gone@example.net", "Shop.Example") == "gone@example.net shop.example"
    )
    read = Entry.read("gone@example.net shop.example", BOUNCED.encode())
    assert (read.target, read.scope, read.why) == ("gone@example.net", "shop.example", BOUNCED)
    assert Entry.read("@closed.example", FOR_EVER.encode()).scope == suppression.EVERY_SENDER


def test_the_rcpt_check_looks_under_at_most_three_keys() -> None:
    assert suppression.lookup_keys("Gone@Example.net", "app@Shop.example") == (
        "gone@example.net",
        "@example.net",
        "gone@example.net shop.example",
    )
    for null_sender in ("", "<>"):  # no domain: only the entries for every sender
        keys = suppression.lookup_keys("gone@example.net", null_sender)
        assert keys == ("gone@example.net", "@example.net")


def test_entries_and_sender_domains_are_checked() -> None:
    assert suppression.parse_sender_domain(" Shop.Example ") == "shop.example"
    assert suppression.parse_sender_domain("[192.0.2.1]") == "[192.0.2.1]"
    for bad in ("", "shop example", "a@shop.example", "@shop.example", "-shop-.example"):
        with pytest.raises(ValueError, match="not a domain"):
            suppression.parse_sender_domain(bad)
    with pytest.raises(ValueError, match="neither an address"):
        suppression.entry("gone@example.net shop.example")


# --- lookups ---


def listed_in(spool: Spool, *entries: tuple[str, Suppression, str]) -> Spool:
    with spool.write() as txn:
        for target, why, scope in entries:
            suppression.add(spool, txn, target, why, scope)
    return spool


def stops(spool: Spool, recipient: str, sender: str, now: float = NOW) -> Entry | None:
    with spool.read() as txn:
        return suppression.lookup(spool, txn, recipient, sender, now).entry


def test_a_scoped_entry_stops_only_mail_from_its_sender_domain(spool: Spool) -> None:
    listed_in(spool, ("gone@example.net", BOUNCED, "shop.example"))
    found = stops(spool, "Gone@example.net", "app@Shop.Example")
    assert found == Entry("gone@example.net", "shop.example", BOUNCED)
    assert "for mail from shop.example" in found.summary()
    assert stops(spool, "gone@example.net", "app@other.example") is None
    assert stops(spool, "gone@example.net", "<>") is None
    assert stops(spool, "other@example.net", "app@shop.example") is None


def test_entries_for_every_sender_stop_everyone_the_null_sender_too(spool: Spool) -> None:
    listed_in(spool, ("gone@example.net", FOR_EVER, ""), ("@closed.example", FOR_EVER, ""))
    for sender in ("app@shop.example", "app@other.example", "<>", ""):
        assert stops(spool, "gone@example.net", sender) is not None
        assert stops(spool, "anyone@closed.example", sender) is not None
    assert stops(spool, "anyone@example.net", "app@shop.example") is None


def test_entries_written_before_scopes_and_expiry_still_read(spool: Spool) -> None:
    old_operator = b'{"source":"operator","reason":"asked","added":"2020-01-01T00:00:00+00:00"}'
    with spool.write() as txn:
        spool.suppress(txn, "gone@example.net", old_operator)
    found = stops(spool, "gone@example.net", "app@shop.example", now=NOW + 100 * 365 * DAY)
    assert found is not None and found.why.expires is None  # an operator's: for ever


def test_an_address_entries_are_its_own_and_no_neighbours(spool: Spool) -> None:
    listed_in(
        spool,
        ("gone@example.net", FOR_EVER, ""),
        ("gone@example.net", BOUNCED, "a.example"),
        ("gone@example.net", BOUNCED, "b.example"),
        ("gone@example.net.other", FOR_EVER, ""),
        ("gone@example.netx", BOUNCED, "a.example"),
        ("@example.net", FOR_EVER, ""),
    )
    with spool.read() as txn:
        found = suppression.entries(spool, txn, "gone@example.net")
        assert [(e.target, e.scope) for e in found] == [
            ("gone@example.net", ""),
            ("gone@example.net", "a.example"),
            ("gone@example.net", "b.example"),
        ]
        assert suppression.entries(spool, txn, "never@example.net") == []
        assert len(suppression.entries(spool, txn)) == 6


# --- expiry ---


def test_an_entry_stops_mail_until_it_expires_then_the_check_names_it(spool: Spool) -> None:
    listed_in(spool, ("gone@example.net", BOUNCED, "shop.example"))
    assert stops(spool, "gone@example.net", "app@shop.example", NOW + 10 * DAY - 1) is not None
    with spool.read() as txn:
        found = suppression.lookup(
            spool, txn, "gone@example.net", "app@shop.example", NOW + 10 * DAY
        )
    assert found == suppression.Lookup(None, ("gone@example.net shop.example",))


def test_expired_entries_are_removed_and_the_removal_is_shared(spool: Spool) -> None:
    with spool.write() as txn:
        suppression.share(spool, txn, True)
    listed_in(spool, ("gone@example.net", BOUNCED, "shop.example"))
    key = "gone@example.net shop.example"
    with spool.write() as txn:
        assert suppression.remove_expired(spool, txn, [key], NOW + DAY) == 0  # not yet
        assert (
            suppression.remove_expired(spool, txn, [key, "never@example.net"], NOW + 10 * DAY) == 1
        )
        assert suppression.entries(spool, txn) == []
        assert [(c.key, c.why) for c in suppression.unpushed(spool, txn)][-1] == (key, None)


def test_an_entry_added_anew_since_it_was_found_expired_stays(spool: Spool) -> None:
    listed_in(spool, ("gone@example.net", BOUNCED, "shop.example"))
    later = NOW + 10 * DAY
    bounced_again = suppression.new(BOUNCE, "550 5.1.1 still gone", now=later, lifetime=10 * DAY)
    listed_in(spool, ("gone@example.net", bounced_again, "shop.example"))
    with spool.write() as txn:
        assert suppression.remove_expired(spool, txn, ["gone@example.net shop.example"], later) == 0
    assert stops(spool, "gone@example.net", "app@shop.example", later) is not None


def test_operator_entries_expire_only_when_given_a_lifetime(spool: Spool) -> None:
    for_a_day = suppression.new(OPERATOR, "a day", now=NOW, lifetime=DAY)
    listed_in(spool, ("forever@example.net", FOR_EVER, ""), ("day@example.net", for_a_day, ""))
    far = NOW + 100 * 365 * DAY
    assert stops(spool, "forever@example.net", "app@shop.example", far) is not None
    assert stops(spool, "day@example.net", "app@shop.example", NOW + DAY - 1) is not None
    assert stops(spool, "day@example.net", "app@shop.example", NOW + DAY) is None


def test_old_bounce_entries_expire_180_days_after_they_were_added(spool: Spool) -> None:
    added = "2027-01-15T08:00:00+00:00"
    old_bounce = json.dumps({"source": "bounce", "reason": "550 5.1.1", "added": added})
    with spool.write() as txn:
        spool.suppress(txn, "gone@example.net", old_bounce.encode())  # for every sender, as then
    then = suppression.Suppression.decode(old_bounce.encode())
    assert then.expires == "2027-07-14T08:00:00+00:00"
    start = 1_800_000_000.0  # 2027-01-15T08:00:00Z
    assert stops(spool, "gone@example.net", "<>", start + 180 * DAY - 1) is not None
    assert stops(spool, "gone@example.net", "<>", start + 180 * DAY) is None


def test_listing_removes_the_expired_entries(spool: Spool) -> None:
    listed_in(
        spool,
        ("gone@example.net", BOUNCED, "shop.example"),
        ("kept@example.net", FOR_EVER, ""),
    )
    with spool.write() as txn:
        assert [e.target for e in suppression.current(spool, txn, NOW)] == [
            "gone@example.net",
            "kept@example.net",
        ]
        assert [e.target for e in suppression.current(spool, txn, NOW + 10 * DAY)] == [
            "kept@example.net"
        ]
        assert [e.target for e in suppression.entries(spool, txn)] == ["kept@example.net"]


def test_an_entry_that_never_expires_is_stored_as_before_expiry_existed() -> None:
    assert json.loads(FOR_EVER.encode()) == {
        "source": "operator",
        "reason": "asked us to stop",
        "added": "2027-01-15T08:00:00+00:00",
    }
    assert json.loads(BOUNCED.encode())["expires"] == "2027-01-25T08:00:00+00:00"
    newer = json.dumps(json.loads(BOUNCED.encode()) | {"tenant": "t1"}).encode()
    assert Suppression.decode(newer) == BOUNCED  # a field from a newer node is left out


# --- hard bounces in delivery ---


def suppressed_after_attempt(tmp_path: Path, sender: str) -> list[tuple[str, str, str | None]]:
    spool, _ = run_attempt(
        tmp_path, ("gone@example.net", "blocked@example.net", "busy@example.net"), sender
    )
    with spool.read() as txn:
        return [(e.target, e.scope, e.why.expires) for e in suppression.entries(spool, txn)]


def test_a_hard_bounce_suppresses_for_the_sender_domain_for_bounce_expiry(tmp_path: Path) -> None:
    assert suppressed_after_attempt(tmp_path, "App@Shop.Example") == [
        ("gone@example.net", "shop.example", "2027-07-14T08:00:00+00:00")  # NOW + 180 days
    ]


def test_a_bounce_of_the_null_sender_suppresses_nothing(tmp_path: Path) -> None:
    assert suppressed_after_attempt(tmp_path, "") == []


def test_bounce_expiry_is_seconds_and_positive() -> None:
    assert config.SuppressionConfig().bounce_expiry == 180 * DAY
    parsed = config.parse({"suppression": {"bounce_expiry": 86400}})
    assert parsed.suppression.bounce_expiry == DAY
    with pytest.raises(config.ConfigError, match="bounce_expiry: must be greater than 0"):
        config.parse({"suppression": {"bounce_expiry": 0}})
