"""Effective limits per (source, site): MX rollup into sites, layered precedence with
provenance, throttled scaling."""

from __future__ import annotations

import math
import random
import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from mta.policy.limits import UNLIMITED, Limits, Site, effective, layered, site_for

PROVIDERS = {
    "gmail": [".google.com", ".googlemail.com"],
    "yahoo": [".yahoodns.net"],
    "outlook": [".olc.protection.outlook.com"],
    "office365": [".mail.protection.outlook.com"],
}


def test_domains_on_googles_mx_share_the_gmail_site() -> None:
    gmail = site_for(
        "gmail.com", ["gmail-smtp-in.l.google.com", "alt1.gmail-smtp-in.l.google.com"], PROVIDERS
    )
    hosted = site_for("example.org", ["aspmx.l.google.com.", "alt1.aspmx.l.google.com."], PROVIDERS)
    assert gmail == hosted == Site("gmail", "gmail")


def test_an_unrelated_domain_is_its_own_site() -> None:
    assert site_for("Example.NET.", ["mx1.example.net"], PROVIDERS) == Site("example.net", None)
    assert site_for("example.net", [], PROVIDERS) == Site("example.net", None)  # implicit MX
    assert site_for("example.net", ["mx.example.net"], {}) == Site("example.net", None)


def test_matching_ignores_case_and_trailing_dots() -> None:
    assert site_for("a.test", ["MTA5.AM0.YahooDNS.NET."], PROVIDERS).name == "yahoo"
    assert site_for("a.test", ["mx.yahoodns.net"], {"yahoo": [".YahooDNS.net."]}).name == "yahoo"


def test_only_the_first_preference_mx_decides() -> None:
    # A domain that only uses Google as a backup MX is not Google's.
    site = site_for("example.org", ["mx1.example.org", "aspmx.l.google.com"], PROVIDERS)
    assert site == Site("example.org", None)


def test_suffixes_match_whole_labels() -> None:
    providers = {"google": ["google.com"]}
    assert site_for("a.test", ["google.com"], providers).name == "google"
    assert site_for("a.test", ["aspmx.l.google.com"], providers).name == "google"
    assert site_for("a.test", ["mx.evilgoogle.com"], providers).name == "a.test"
    assert site_for("a.test", ["mx.evilgoogle.com"], {"gmail": [".google.com"]}).name == "a.test"


def test_the_longest_matching_suffix_wins() -> None:
    providers = {"microsoft": [".outlook.com"], "office365": [".mail.protection.outlook.com"]}
    mx = ["example-org.mail.protection.outlook.com"]
    assert site_for("example.org", mx, providers) == Site("office365", "office365")
    assert site_for("hotmail.com", ["hotmail-com.olc.protection.outlook.com"], providers).name == (
        "microsoft"
    )


def test_empty_suffixes_match_nothing() -> None:
    assert site_for("a.test", ["mx.a.test"], {"all": ["", "."]}) == Site("a.test", None)


def test_a_single_suffix_string_is_one_suffix() -> None:
    providers = {"gmail": ".google.com"}
    assert site_for("a.test", ["aspmx.l.google.com"], providers).name == "gmail"  # type: ignore[dict-item]


# --- the MX host set fallback ---

GOOGLE_BACKUP = ["mx1.example.org", "aspmx.l.google.com"]
HOSTER = ["mx1.hoster.example", "mx2.hoster.example"]
SAFE_SITE_NAME = re.compile(r"[a-z0-9.+-]{1,253}")


def mx_site(domain: str, mx_hosts: list[str]) -> Site:
    return site_for(domain, mx_hosts, PROVIDERS, group_by_mx=True)


def test_domains_with_the_same_mx_hosts_share_a_site() -> None:
    one = mx_site("a.example", HOSTER)
    other = mx_site("b.example", ["MX2.Hoster.Example.", " mx1.hoster.example"])
    assert one == other
    assert one.provider is None


def test_domains_with_different_mx_hosts_do_not() -> None:
    sites = {
        mx_site("a.example", HOSTER).name,
        mx_site("a.example", HOSTER[:1]).name,
        mx_site("a.example", HOSTER[1:]).name,
        mx_site("a.example", [*HOSTER, "mx3.hoster.example"]).name,
        mx_site("a.example", ["mx1.hoster.example", "mx2.other.example"]).name,
    }
    assert len(sites) == 5


def test_the_mx_set_site_name_is_stable_and_readable() -> None:
    # Suspensions are stored by site name: the name must not change between versions.
    assert mx_site("a.example", HOSTER).name == "mx+mx1.hoster.example+579ed6b438"
    assert mx_site("a.example", ["mx.a.example"]).name == "mx+mx.a.example"


def test_a_host_name_outside_a_z_0_9_dot_hyphen_is_made_safe_and_keeps_a_digest() -> None:
    odd = mx_site("a.example", ["mx_1.a.example"]).name
    assert odd.startswith("mx+mx-1.a.example+")
    assert odd != mx_site("a.example", ["mx-1.a.example"]).name  # no clash with the lookalike


def test_a_long_mx_host_set_name_is_cut_to_253_characters() -> None:
    long_host = ".".join(["a" * 63] * 4)  # 255 characters
    name = mx_site("a.example", [long_host]).name
    assert len(name) == 253
    assert SAFE_SITE_NAME.fullmatch(name)
    assert name != mx_site("a.example", [long_host[:-1] + "b"]).name


def test_a_provider_match_wins_over_the_mx_set() -> None:
    assert mx_site("example.org", ["aspmx.l.google.com", "mx1.example.org"]) == Site(
        "gmail", "gmail"
    )


def test_a_backup_mx_at_a_provider_gives_an_mx_set_site_without_provider() -> None:
    site = mx_site("example.org", GOOGLE_BACKUP)
    assert site.provider is None
    assert site.name.startswith("mx+aspmx.l.google.com+")  # the set's first host by name
    assert site != mx_site("example.org", ["aspmx.l.google.com"])


def test_without_mx_hosts_the_domain_is_its_own_site() -> None:
    assert mx_site("Example.NET.", []) == Site("example.net", None)
    assert mx_site("example.net", ["", "."]) == Site("example.net", None)  # null MX


def test_without_group_by_mx_each_domain_stays_its_own_site() -> None:
    assert site_for("a.example", HOSTER, PROVIDERS) == Site("a.example", None)
    assert site_for("b.example", HOSTER, PROVIDERS, group_by_mx=False) == Site("b.example", None)
    assert site_for("example.org", GOOGLE_BACKUP, PROVIDERS) == Site("example.org", None)


host_names = st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9.-]{0,40}", fullmatch=True)


@given(st.lists(host_names, min_size=1, max_size=6), st.randoms())
def test_the_mx_set_site_ignores_order_case_and_trailing_dots(
    hosts: list[str], shuffler: random.Random
) -> None:
    shuffled = [f"{host.swapcase()}." for host in hosts]
    shuffler.shuffle(shuffled)
    assert mx_site("a.example", hosts) == mx_site("b.example", shuffled)


@given(st.lists(st.text(max_size=300), min_size=1, max_size=6))
def test_an_mx_set_site_name_is_safe_and_never_a_domain_or_provider(hosts: list[str]) -> None:
    site = mx_site("a.example", hosts)
    assume(site.provider is None and site.name != "a.example")
    assert SAFE_SITE_NAME.fullmatch(site.name)
    assert site.name.startswith("mx+")  # "+" is in no domain and no provider name


@given(
    st.sets(host_names.map(str.lower), min_size=1, max_size=4),
    st.sets(host_names.map(str.lower), min_size=1, max_size=4),
)
def test_different_mx_sets_have_different_site_names(first: set[str], second: set[str]) -> None:
    normalised = [{host.rstrip(".") for host in hosts} for hosts in (first, second)]
    assume(normalised[0] != normalised[1])
    assert mx_site("a.example", sorted(first)).name != mx_site("a.example", sorted(second)).name


DEFAULT = Limits(
    max_connections=20, max_messages_per_connection=100, max_rate=50.0, max_recipients=100
)
BY_PROVIDER = {"gmail": Limits(max_connections=5, max_rate=10.0)}
BY_DOMAIN = {"example.org": Limits(max_rate=1.0), "gmail.com": Limits(max_recipients=50)}
GMAIL = Site("gmail", "gmail")


def test_domain_over_provider_over_default() -> None:
    assert effective(DEFAULT, BY_PROVIDER, BY_DOMAIN, GMAIL, "example.org") == Limits(
        max_connections=5, max_messages_per_connection=100, max_rate=1.0, max_recipients=100
    )
    assert effective(DEFAULT, BY_PROVIDER, BY_DOMAIN, GMAIL, "gmail.com") == Limits(
        max_connections=5, max_messages_per_connection=100, max_rate=10.0, max_recipients=50
    )
    assert effective(DEFAULT, BY_PROVIDER, BY_DOMAIN, GMAIL, "other.test") == Limits(
        max_connections=5, max_messages_per_connection=100, max_rate=10.0, max_recipients=100
    )


def test_a_site_without_provider_gets_domain_over_default() -> None:
    site = Site("example.net", None)
    by_domain = {"example.net": Limits(max_connections=2)}
    assert effective(DEFAULT, BY_PROVIDER, by_domain, site, "example.net") == Limits(
        max_connections=2, max_messages_per_connection=100, max_rate=50.0, max_recipients=100
    )
    assert effective(DEFAULT, BY_PROVIDER, {}, site, "example.net") == DEFAULT
    assert effective(DEFAULT, {}, {}, Site("yahoo", "yahoo"), "yahoo.com") == DEFAULT


def test_domain_lookup_tolerates_case_and_trailing_dot() -> None:
    assert effective(DEFAULT, {}, BY_DOMAIN, GMAIL, "Example.ORG.").max_rate == 1.0


def test_unset_everywhere_is_unlimited() -> None:
    assert effective(Limits(), {}, {}, GMAIL, "gmail.com") == Limits()


# --- layers and where each limit comes from ---

FIVE_LAYERS = [
    ("shipped default", Limits(10, 100, 100.0, 100)),
    ("[policy.default]", Limits(max_connections=20, max_rate=50.0)),
    ("shipped gmail", Limits(max_connections=5, max_messages_per_connection=50)),
    ("[[policy.provider]] gmail", Limits(max_connections=8)),
    ('[policy.domain."example.org"]', Limits(max_rate=1.0)),
]


def test_each_limit_comes_from_the_most_specific_layer_that_sets_it() -> None:
    limits, origins = layered(FIVE_LAYERS)
    assert limits == Limits(
        max_connections=8, max_messages_per_connection=50, max_rate=1.0, max_recipients=100
    )
    assert origins == {
        "max_connections": "[[policy.provider]] gmail",
        "max_messages_per_connection": "shipped gmail",
        "max_rate": '[policy.domain."example.org"]',
        "max_recipients": "shipped default",
    }


@pytest.mark.parametrize(
    ("count", "connections", "per_connection", "rate"),
    [
        (1, "shipped default", "shipped default", "shipped default"),
        (2, "[policy.default]", "shipped default", "[policy.default]"),
        (3, "shipped gmail", "shipped gmail", "[policy.default]"),
        (4, "[[policy.provider]] gmail", "shipped gmail", "[policy.default]"),
        (5, "[[policy.provider]] gmail", "shipped gmail", '[policy.domain."example.org"]'),
    ],
)
def test_each_layer_takes_over_the_limits_it_sets(
    count: int, connections: str, per_connection: str, rate: str
) -> None:
    _, origins = layered(FIVE_LAYERS[:count])
    assert origins == {
        "max_connections": connections,
        "max_messages_per_connection": per_connection,
        "max_rate": rate,
        "max_recipients": "shipped default",
    }


def test_a_limit_no_layer_sets_is_unlimited() -> None:
    limits, origins = layered([("[policy.default]", Limits(max_rate=5.0))])
    assert limits == Limits(max_rate=5.0)
    assert origins["max_connections"] == origins["max_recipients"] == UNLIMITED
    assert layered([]) == (Limits(), dict.fromkeys(origins, UNLIMITED))


def test_layering_the_effective_limits_gives_effective() -> None:
    layers = [("default", DEFAULT), ("gmail", BY_PROVIDER["gmail"])]
    layers.append(("example.org", BY_DOMAIN["example.org"]))
    assert layered(layers)[0] == effective(DEFAULT, BY_PROVIDER, BY_DOMAIN, GMAIL, "example.org")


def test_merged_over_takes_each_field_separately() -> None:
    own = Limits(max_rate=2.0, max_recipients=10)
    base = Limits(max_connections=3, max_rate=9.0)
    assert own.merged_over(base) == Limits(max_connections=3, max_rate=2.0, max_recipients=10)
    assert Limits().merged_over(base) == base
    assert own.merged_over(Limits()) == own


def test_scaled_halves_connections_and_rate_only() -> None:
    assert DEFAULT.scaled(0.5) == Limits(
        max_connections=10, max_messages_per_connection=100, max_rate=25.0, max_recipients=100
    )
    assert DEFAULT.scaled(1) == DEFAULT


def test_scaled_keeps_at_least_one_connection_and_a_positive_rate() -> None:
    tiny = Limits(max_connections=3, max_rate=1e-300)
    scaled = tiny.scaled(1e-300)
    assert scaled.max_connections == 1
    assert scaled.max_rate is not None and scaled.max_rate > 0
    assert Limits(max_connections=3).scaled(0.5).max_connections == 1  # rounded down
    assert Limits(max_connections=1).scaled(0.1).max_connections == 1


def test_scaled_leaves_unlimited_unlimited() -> None:
    assert Limits().scaled(0.5) == Limits()


@pytest.mark.parametrize("factor", [0, -1, 1.5, math.nan, True])
def test_scaled_refuses_a_factor_outside_0_to_1(factor: float) -> None:
    with pytest.raises(ValueError, match="factor must be above 0 and at most 1"):
        DEFAULT.scaled(factor)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_connections": 0}, "max_connections must be a whole number, 1 or more, got 0"),
        ({"max_messages_per_connection": -1}, "max_messages_per_connection must be"),
        ({"max_recipients": 2.5}, "max_recipients must be"),
        ({"max_connections": True}, "max_connections must be"),
        ({"max_rate": 0}, "max_rate must be a number of messages per second above 0, got 0"),
        ({"max_rate": math.inf}, "max_rate must be"),
        ({"max_rate": "10/s"}, "max_rate must be"),
    ],
)
def test_bad_limits_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Limits(**kwargs)  # type: ignore[arg-type]


counts = st.none() | st.integers(min_value=1, max_value=10_000)
rates = st.none() | st.floats(min_value=1e-6, max_value=1e6)
limits = st.builds(Limits, counts, counts, rates, counts)


@given(limits, st.floats(min_value=1e-9, max_value=1))
def test_scaled_never_raises_a_limit_and_never_reaches_zero(base: Limits, factor: float) -> None:
    scaled = base.scaled(factor)
    if base.max_connections is None:
        assert scaled.max_connections is None
    else:
        assert scaled.max_connections is not None
        assert 1 <= scaled.max_connections <= base.max_connections
    if base.max_rate is None:
        assert scaled.max_rate is None
    else:
        assert scaled.max_rate is not None
        assert 0 < scaled.max_rate <= base.max_rate
    assert scaled.max_messages_per_connection == base.max_messages_per_connection
    assert scaled.max_recipients == base.max_recipients


@given(limits, limits, limits)
def test_merging_is_associative_and_set_fields_win(a: Limits, b: Limits, c: Limits) -> None:
    assert a.merged_over(b).merged_over(c) == a.merged_over(b.merged_over(c))
    merged = a.merged_over(b)
    for name in ("max_connections", "max_messages_per_connection", "max_rate", "max_recipients"):
        mine = getattr(a, name)
        assert getattr(merged, name) == (getattr(b, name) if mine is None else mine)


@given(st.lists(st.tuples(st.text(min_size=1, max_size=8), limits), max_size=6))
def test_layered_takes_each_field_from_the_last_layer_that_sets_it(
    layers: list[tuple[str, Limits]],
) -> None:
    merged, origins = layered(layers)
    for name in ("max_connections", "max_messages_per_connection", "max_rate", "max_recipients"):
        values = [(origin, getattr(layer, name)) for origin, layer in layers]
        setting = [(origin, value) for origin, value in values if value is not None]
        origin, value = setting[-1] if setting else (UNLIMITED, None)
        assert getattr(merged, name) == value
        assert origins[name] == origin


@given(
    st.text(alphabet="abcxyz.-", min_size=1, max_size=20),
    st.lists(st.text(alphabet="abcgoogle.-", max_size=30), max_size=3),
    st.booleans(),
)
def test_site_for_never_raises(domain: str, mx_hosts: list[str], group_by_mx: bool) -> None:
    site = site_for(domain, mx_hosts, PROVIDERS, group_by_mx=group_by_mx)
    assert site.provider is None or site.name == site.provider in PROVIDERS
