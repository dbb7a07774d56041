"""MTA-STS's rules (mta.policy.mta_sts): the TXT record, the policy file, the
cache and the TLS policy a policy asks for."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.policy.mta_sts import (
    MAX_AGE,
    MIN_RECHECK,
    CachedPolicy,
    Decision,
    Mode,
    StsError,
    StsPolicy,
    decide,
    parse_policy,
    policy_id,
    recheck_in,
    tls_policy,
)
from mta.policy.tls import Level, TlsPolicy

NOW = 1_800_000_000.0
POLICY = StsPolicy(Mode.ENFORCE, ("mx.example.net", "*.example.org"), 86400)

# --- strategies ---

labels = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,10}[A-Za-z0-9])?", fullmatch=True)
host_names = st.lists(labels, min_size=1, max_size=4).map(".".join)
patterns = st.tuples(st.booleans(), host_names).map(lambda p: "*." * p[0] + p[1])
ids = st.from_regex(r"[A-Za-z0-9]{1,32}", fullmatch=True)
KNOWN = {"version", "mode", "max_age", "mx"}
field_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}", fullmatch=True)
extension_names = field_names.filter(lambda name: name not in KNOWN)
extension_values = st.from_regex(
    r"[\x21-\x7e\u00e9\u20ac](?:[\x20-\x7e\u00e9\u20ac]*[\x21-\x7e\u00e9\u20ac])?", fullmatch=True
)
white_space = st.sampled_from(["", " ", "\t", "  \t"])
line_ends = st.sampled_from(["\n", "\r\n"])


@st.composite
def policies(draw: st.DrawFn) -> StsPolicy:
    mode = draw(st.sampled_from(Mode))
    mx = draw(st.lists(patterns, min_size=0 if mode is Mode.NONE else 1, max_size=4))
    return StsPolicy(mode, tuple(p.lower() for p in mx), draw(st.integers(0, MAX_AGE)))


@st.composite
def policy_files(draw: st.DrawFn) -> tuple[StsPolicy, bytes]:
    """A policy, and a file that says it with the freedom RFC 8461 3.2 gives:
    any field order, extensions, white space, LF or CRLF, a last line break or not."""
    policy = draw(policies())
    fields = [("version", "STSv1"), ("mode", str(policy.mode)), ("max_age", str(policy.max_age))]
    fields += [("mx", draw(st.sampled_from([p, p.upper()]))) for p in policy.mx]
    fields += draw(st.lists(st.tuples(extension_names, extension_values), max_size=3))
    ordered = draw(st.permutations(fields))
    lines = [
        f"{name}:{draw(white_space)}{value}{draw(white_space)}{draw(line_ends)}"
        for name, value in ordered
    ]
    text = "".join(lines)
    if draw(st.booleans()):
        text = text.removesuffix("\n").removesuffix("\r")
    mx_in_file_order = tuple(value.lower() for name, value in ordered if name == "mx")
    return StsPolicy(policy.mode, mx_in_file_order, policy.max_age), text.encode()


cached_policies = st.builds(CachedPolicy, policies(), ids, st.floats(0, 2 * NOW, allow_nan=False))


def record(record_id: str, *extensions: str) -> bytes:
    return "; ".join(["v=STSv1", f"id={record_id}", *extensions]).encode()


# --- the TXT record ---


@given(ids, st.lists(st.from_regex(r"[a-z]{1,8}=[!-:<>-~]{1,8}", fullmatch=True), max_size=3))
def test_the_id_of_an_stsv1_record_is_found(record_id: str, extensions: list[str]) -> None:
    assert policy_id([b"v=spf1 -all", record(record_id, *extensions)]) == record_id


@pytest.mark.parametrize(
    "text",
    [
        "v=STSv1; id=20160831085700Z;",
        "v=STSv1;id=20160831085700Z",
        "v=STSv1;\tid=20160831085700Z ; ",
        "v=STSv1; ext=1; id=20160831085700Z; id=other",
    ],
)
def test_an_stsv1_record_may_be_spaced_and_extended(text: str) -> None:
    assert policy_id([text.encode()]) == "20160831085700Z"


@pytest.mark.parametrize(
    "records",
    [
        [],
        [b"v=spf1 -all"],
        [record("one"), record("two")],  # RFC 8461 3.1: exactly one, else none
        [b"v=STSv1; id=one", b"v=STSv1; id=one"],
        [b"v=STSv1;"],
        [b"v=STSv1; ext=1"],
        [b"v=STSv1; id=" + b"1" * 33],
        [b"v=STSv1; id=a-b"],
        [b"v=STSv1; id=one; bad"],
        [b"v=STSv1; id=\xc3\xa9"],
        [b"V=STSv1; id=one"],
        [b"v=STSv1 ; id=one"],  # does not start with "v=STSv1;": not an STS record
    ],
)
def test_no_single_valid_stsv1_record_announces_no_policy(records: list[bytes]) -> None:
    assert policy_id(records) is None


@given(st.lists(st.binary(max_size=80)), st.binary(max_size=80))
def test_any_txt_records_give_an_id_or_none(records: list[bytes], tail: bytes) -> None:
    found = policy_id([*records, b"v=STSv1;" + tail])
    assert found is None or isinstance(found, str)


# --- the policy file ---


@given(policies())
def test_a_policy_file_round_trips(policy: StsPolicy) -> None:
    assert parse_policy(policy.policy_file()) == policy


@given(policy_files())
def test_any_valid_policy_file_says_its_policy(policy_and_file: tuple[StsPolicy, bytes]) -> None:
    policy, body = policy_and_file
    assert parse_policy(body) == policy


def test_the_rfc_example_parses() -> None:
    body = (
        b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\n"
        b"mx: *.example.net\r\nmx: backupmx.example.com\r\nmax_age: 604800\r\n"
    )
    assert parse_policy(body) == StsPolicy(
        Mode.ENFORCE, ("mail.example.com", "*.example.net", "backupmx.example.com"), 604800
    )


def test_of_a_repeated_field_the_first_counts() -> None:
    body = b"version: STSv1\nmode: testing\nmode: enforce\nmx: a.test\nmax_age: 5\nmax_age: 9\n"
    assert parse_policy(body) == StsPolicy(Mode.TESTING, ("a.test",), 5)


def test_a_max_age_beyond_a_year_counts_as_a_year() -> None:
    body = b"version: STSv1\nmode: none\nmax_age: 9999999999\n"
    assert parse_policy(body) == StsPolicy(Mode.NONE, (), MAX_AGE)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "no version and no mode and no max_age"),
        (b"version: STSv1\nmode: enforce\nmax_age: 60\n", "mode enforce needs mx"),
        (b"version: STSv2\nmode: none\nmax_age: 60\n", "line 1: version"),
        (b"version: STSv1\nmode: Enforce\nmx: a.test\nmax_age: 60\n", "line 2: mode"),
        (b"version: STSv1\nmode: none\nmax_age: -1\n", "line 3: max_age"),
        (b"version: STSv1\nmode: none\nmax_age: 12345678901\n", "line 3: max_age"),
        (b"version: STSv1\nmode: testing\nmx: a.*.test\nmax_age: 1\n", "line 3: mx"),
        (b"version: STSv1\nmode: testing\nmx: *\nmax_age: 1\n", "line 3: mx"),
        (b"version: STSv1\nmode: testing\nmx: m\xc3\xa9.test\nmax_age: 1\n", "line 3: mx"),
        (b"version: STSv1\n\nmode: none\nmax_age: 1\n", "line 2 is not a field"),
        (b"version: STSv1\nmode: none\nmax_age: 1\n\n", "line 4 is not a field"),
        (b"version STSv1\nmode: none\nmax_age: 1\n", "line 1 is not a field"),
        (b"version: STSv1\nmode: none\rmax_age: 1\n", "line 2 is not a field"),
        (b"Version: STSv1\nmode: none\nmax_age: 1\n", "no version"),
        (b"version: STSv1\nmode: none\nmax_age: 1\n\xff\n", "not UTF-8"),
    ],
)
def test_a_policy_file_that_breaks_the_rules_is_refused(body: bytes, why: str) -> None:
    with pytest.raises(StsError, match=why):
        parse_policy(body)


@given(st.binary(max_size=200))
def test_garbage_raises_only_sts_error(body: bytes) -> None:
    with contextlib.suppress(StsError):
        parse_policy(body)


@given(policy_files(), st.data())
def test_a_damaged_policy_file_raises_only_sts_error(
    policy_and_file: tuple[StsPolicy, bytes], data: st.DataObject
) -> None:
    _, body = policy_and_file
    start = data.draw(st.integers(0, len(body)))
    end = data.draw(st.integers(start, min(len(body), start + 8)))
    damaged = body[:start] + data.draw(st.binary(max_size=8)) + body[end:]
    with contextlib.suppress(StsError):
        parse_policy(damaged)


# --- the cache record ---


@given(cached_policies)
def test_a_cache_record_round_trips(cached: CachedPolicy) -> None:
    assert CachedPolicy.from_json(cached.to_json()) == cached


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
policy_texts = policies().map(lambda policy: policy.policy_file().decode())
cache_like = st.fixed_dictionaries(
    {"id": json_values | ids, "fetched": json_values, "policy": json_values | policy_texts}
)


@given(st.binary(max_size=100) | (json_values | cache_like).map(lambda v: json.dumps(v).encode()))
def test_a_damaged_cache_record_raises_only_sts_error(raw: bytes) -> None:
    with contextlib.suppress(StsError):
        CachedPolicy.from_json(raw)


@pytest.mark.parametrize(
    "change",
    [{"id": "a-b"}, {"id": 1}, {"fetched": 10**400}, {"fetched": "soon"}, {"policy": "mode: none"}],
)
def test_a_cache_record_with_a_bad_field_is_refused(change: dict[str, object]) -> None:
    record = json.loads(CachedPolicy(POLICY, "one", NOW).to_json())
    with pytest.raises(StsError, match="not a cached MTA-STS policy"):
        CachedPolicy.from_json(json.dumps({**record, **change}).encode())


# --- what to do with a cached policy ---


def cached(record_id: str = "one", fetched: float = NOW - 100) -> CachedPolicy:
    return CachedPolicy(POLICY, record_id, fetched)


def test_no_txt_record_and_no_cached_policy_is_no_policy() -> None:
    assert decide(None, None, NOW) == Decision(None, None)


def test_an_announced_policy_is_fetched() -> None:
    assert decide(None, "one", NOW) == Decision(None, "one")


def test_a_cached_policy_with_the_announced_id_is_used() -> None:
    assert decide(cached(), "one", NOW) == Decision(cached(), None)


def test_a_new_id_is_fetched_and_the_cached_policy_holds_meanwhile() -> None:
    assert decide(cached(), "two", NOW) == Decision(cached(), "two")


def test_without_a_txt_record_the_cached_policy_holds_until_it_expires() -> None:
    assert decide(cached(), None, NOW) == Decision(cached(), None)
    expires = cached().expires
    assert decide(cached(), None, expires - 0.001) == Decision(cached(), None)
    assert decide(cached(), None, expires) == Decision(None, None)


def test_an_expired_policy_is_fetched_again_even_with_the_same_id() -> None:
    assert decide(cached(), "one", cached().expires) == Decision(None, "one")


@given(cached_policies, st.none() | ids, st.floats(0, 3 * NOW))
def test_a_policy_is_in_force_until_it_expires_whatever_the_dns_says(
    cache: CachedPolicy, record_id: str | None, now: float
) -> None:
    in_force = decide(cache, record_id, now).in_force
    assert in_force == (cache if now < cache.expires else None)


def test_the_txt_record_is_looked_at_again_after_the_interval() -> None:
    assert recheck_in(None, NOW, 300.0) == 300.0
    assert recheck_in(cached(), NOW, 300.0) == 300.0


def test_the_txt_record_is_looked_at_again_when_the_policy_expires() -> None:
    assert recheck_in(cached(), cached().expires - 10, 300.0) == 10
    assert recheck_in(cached(), cached().expires + 10, 300.0) == MIN_RECHECK


# --- what a delivery must do ---

CONFIGURED = TlsPolicy(Level.ENCRYPT, source="config")


def test_enforce_requires_verified_tls_to_the_listed_hosts() -> None:
    assert tls_policy(POLICY, "example.com", CONFIGURED) == TlsPolicy(
        Level.VERIFY, source="mta-sts", mx_patterns=POLICY.mx, policy_domain="example.com"
    )


def test_testing_checks_as_enforce_would_but_only_notes_failures() -> None:
    testing = StsPolicy(Mode.TESTING, POLICY.mx, 60)
    opportunistic = TlsPolicy()
    assert tls_policy(testing, "example.com", opportunistic) == TlsPolicy(
        Level.VERIFY, "mta-sts", POLICY.mx, testing=True, policy_domain="example.com"
    )


def test_testing_never_loosens_a_configured_level_that_requires_tls() -> None:
    testing = StsPolicy(Mode.TESTING, POLICY.mx, 60)
    assert tls_policy(testing, "example.com", CONFIGURED) == CONFIGURED


@pytest.mark.parametrize("policy", [None, StsPolicy(Mode.NONE, (), 60)])
def test_mode_none_or_no_policy_asks_nothing(policy: StsPolicy | None) -> None:
    assert tls_policy(policy, "example.com", CONFIGURED) is None
