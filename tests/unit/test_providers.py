"""The shipped shaping: each provider's MX hosts roll up into its site; every limit is finite."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from mta.mail.domain import lowercase_name
from mta.policy.limits import Limits, Site, site_for
from mta.policy.providers import DEFAULT_LIMITS, SHIPPED, Provider, suffix_map

SHIPPED_SUFFIXES = suffix_map(SHIPPED, {})

# A realistic MX host of each shipped provider (a domain's most preferred MX).
MX_HOSTS = {
    "barracuda": "d123456a.ess.barracudanetworks.com",
    "cisco": "esa1.hc1234-56.iphmx.com",
    "comcast": "mx1a1.comcast.net",
    "fastmail": "in1-smtp.messagingengine.com",
    "gmail": "gmail-smtp-in.l.google.com",
    "gmx": "mx00.emig.gmx.net",
    "godaddy": "smtp.secureserver.net",
    "icloud": "mx01.mail.icloud.com",
    "ionos": "mx00.ionos.de",
    "kpn": "mx.kpnmail.nl",
    "mailru": "mxs.mail.ru",
    "mimecast": "us-smtp-inbound-1.mimecast.com",
    "netease": "163mx01.mxmail.netease.com",
    "netvigator": "corpmx1.netvigator.com",
    "office365": "example-org.mail.protection.outlook.com",
    "office365-dane": "example-org.o-v1.mx.microsoft",
    "orange": "smtp-in.orange.fr",
    "outlook": "hotmail-com.olc.protection.outlook.com",
    "ovh": "mx1.mail.ovh.net",
    "proofpoint": "mx0a-00123401.pphosted.com",
    "qq": "mxbiz1.qq.com",
    "yahoo": "mta5.am0.yahoodns.net",
    "yahoo-jp": "mx1.mail.yahoo.co.jp",
    "yandex": "mx.yandex.net",
    "zoho": "mx.zoho.com",
}

# More hosts that must land on the same site as their provider's.
MORE_MX_HOSTS = [
    ("aspmx.l.google.com.", "gmail"),
    ("ALT1.ASPMX.L.GOOGLE.COM", "gmail"),
    ("mx-aol.mail.gm0.yahoodns.net", "yahoo"),  # aol.com
    ("mailin-01.mx.aol.com", "yahoo"),
    ("mx1.hotmail.com", "outlook"),
    ("outlook-com.olc.protection.outlook.com", "outlook"),
    ("mx-ha03.web.de", "gmx"),
    ("mx02.mail.icloud.com", "icloud"),
    ("mailstore1.secureserver.net", "godaddy"),
    ("mx00.kundenserver.de", "ionos"),
    ("mxint01.1and1.com", "ionos"),
    ("mx1-us1.ppe-hosted.com", "proofpoint"),
    ("za-smtp-inbound-1.mimecast.co.za", "mimecast"),
    ("mx.zoho.eu", "zoho"),
    ("emx.mail.ru", "mailru"),
    ("mx.yandex.ru", "yandex"),
    ("mx1.qq.com", "qq"),
]


def test_every_shipped_provider_has_a_real_mx_host_here() -> None:
    assert sorted(MX_HOSTS) == sorted(provider.name for provider in SHIPPED)


@pytest.mark.parametrize(("provider", "host"), sorted(MX_HOSTS.items()))
def test_a_providers_mx_host_rolls_up_into_its_site(provider: str, host: str) -> None:
    assert site_for("customer.test", [host], SHIPPED_SUFFIXES) == Site(provider, provider)


@pytest.mark.parametrize(("host", "provider"), MORE_MX_HOSTS)
def test_other_mx_hosts_of_a_provider_roll_up_too(host: str, provider: str) -> None:
    assert site_for("customer.test", [host], SHIPPED_SUFFIXES).name == provider


def test_consumer_outlook_and_office365_are_different_sites() -> None:
    hotmail = site_for("hotmail.com", [MX_HOSTS["outlook"]], SHIPPED_SUFFIXES)
    company = site_for("example.org", [MX_HOSTS["office365"]], SHIPPED_SUFFIXES)
    assert (hotmail.name, company.name) == ("outlook", "office365")


def test_a_backup_mx_at_google_does_not_make_a_domain_googles() -> None:
    mx = ["mx1.example.org", "aspmx.l.google.com"]
    assert site_for("example.org", mx, SHIPPED_SUFFIXES) == Site("example.org", None)
    assert site_for("example.org", mx, SHIPPED_SUFFIXES, group_by_mx=True).provider is None


@pytest.mark.parametrize(
    "host",
    [
        "vps-1234abcd.vps.ovh.net",  # a customer's own server, not OVH's mail service
        "ip-203-0-113-7.ip.secureserver.net",  # likewise at GoDaddy
        "mx.notgoogle.com",
        "mail.example.com",
    ],
)
def test_hosts_that_only_look_alike_are_no_provider(host: str) -> None:
    assert site_for("customer.test", [host], SHIPPED_SUFFIXES).provider is None


@pytest.mark.parametrize("provider", SHIPPED, ids=lambda provider: provider.name)
def test_every_shipped_limit_is_finite(provider: Provider) -> None:
    limits = provider.limits
    assert limits.max_connections is not None
    assert limits.max_rate is not None and math.isfinite(limits.max_rate)
    assert limits.max_messages_per_connection is not None
    assert limits.max_recipients is not None


def test_the_default_limits_are_finite_and_conservative() -> None:
    for field in dataclasses.fields(Limits):
        assert getattr(DEFAULT_LIMITS, field.name) is not None, field.name
    assert DEFAULT_LIMITS.max_connections is not None and DEFAULT_LIMITS.max_connections <= 10
    assert DEFAULT_LIMITS.max_recipients == 100  # what RFC 5321 has every server accept


def test_shipped_providers_are_sorted_unique_and_named_like_configured_ones() -> None:
    names = [provider.name for provider in SHIPPED]
    assert names == sorted(set(names))
    for name in names:  # as mta.config's label_name accepts [[policy.provider]] names
        assert re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", name), name


def test_shipped_suffixes_are_normalised_and_belong_to_one_provider() -> None:
    owners: dict[str, str] = {}
    for provider in SHIPPED:
        assert provider.mx_suffixes, provider.name
        for suffix in provider.mx_suffixes:
            assert suffix == lowercase_name(suffix) and suffix.strip("."), suffix
            assert owners.setdefault(suffix, provider.name) == provider.name, suffix


def test_a_provider_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SHIPPED[0].name = "other"  # type: ignore[misc]


def test_suffix_map_of_the_shipped_providers_alone() -> None:
    assert suffix_map(SHIPPED, {}) == {provider.name: provider.mx_suffixes for provider in SHIPPED}


def test_a_configured_provider_with_a_shipped_name_replaces_its_suffixes() -> None:
    suffixes = suffix_map(SHIPPED, {"gmail": [".google.com"]})
    assert suffixes["gmail"] == (".google.com",)
    assert site_for("a.test", ["mx.googlemail.com"], suffixes).provider is None
    assert suffixes["yahoo"] == SHIPPED_SUFFIXES["yahoo"]


def test_a_configured_provider_without_suffixes_keeps_the_shipped_ones() -> None:
    assert suffix_map(SHIPPED, {"gmail": []})["gmail"] == SHIPPED_SUFFIXES["gmail"]


def test_a_configured_provider_with_a_new_name_is_added() -> None:
    suffixes = suffix_map(SHIPPED, {"partner": [".mx.partner.example"]})
    assert suffixes == {**SHIPPED_SUFFIXES, "partner": (".mx.partner.example",)}
    assert site_for("a.test", ["in.mx.partner.example"], suffixes) == Site("partner", "partner")


def test_a_more_specific_configured_suffix_wins_over_a_shipped_one() -> None:
    suffixes = suffix_map(SHIPPED, {"big-customer": ["big-customer.mail.protection.outlook.com"]})
    host = "big-customer.mail.protection.outlook.com"
    assert site_for("big-customer.example", [host], suffixes).name == "big-customer"
    other = "small-customer.mail.protection.outlook.com"
    assert site_for("small-customer.example", [other], suffixes).name == "office365"
