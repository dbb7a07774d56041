"""Who may relay, and which envelope addresses are acceptable."""

from __future__ import annotations

import ipaddress

import pytest

from mta.inbound.access import may_relay
from mta.mail.address import MAX_ADDRESS_LENGTH, address_is_valid

NETWORKS = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]


@pytest.mark.parametrize(
    ("client", "allowed"),
    [
        ("10.1.2.3", True),
        ("10.255.255.255", True),
        ("11.0.0.1", False),
        ("192.0.2.1", False),
        ("2001:db8::25", True),
        ("2001:db9::25", False),
        ("::ffff:10.1.2.3", True),  # IPv4 client on a dual-stack socket
        ("::ffff:192.0.2.1", False),
        ("not an address", False),
        ("", False),
    ],
)
def test_may_relay_by_network(client: str, allowed: bool) -> None:
    assert may_relay(client, authenticated=False, networks=NETWORKS) is allowed


def test_authenticated_clients_may_relay_from_anywhere() -> None:
    assert may_relay("192.0.2.1", authenticated=True, networks=NETWORKS)
    assert may_relay("192.0.2.1", authenticated=True, networks=[])


def test_no_networks_means_nobody_unauthenticated() -> None:
    assert not may_relay("127.0.0.1", authenticated=False, networks=[])


def test_loopback_defaults() -> None:
    loopback = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    assert may_relay("127.0.0.1", False, loopback)
    assert may_relay("::1", False, loopback)
    assert may_relay("::ffff:127.0.0.1", False, loopback)
    assert not may_relay("::2", False, loopback)


@pytest.mark.parametrize(
    "address",
    [
        "user@example.com",
        "first.last+tag@mail.example.co.uk",
        "UPPER@EXAMPLE.COM",
        "x@localhost",
        "a-b_c=d@x-y.example",
        "user@[192.0.2.1]",
        "user@[IPv6:2001:db8::1]",
        '"quoted"@example.com',
        "a" * 64 + "@example.com",
    ],
)
def test_normal_addresses_are_valid(address: str) -> None:
    assert address_is_valid(address)


@pytest.mark.parametrize(
    "address",
    [
        "@a,@b:user@example.com",  # source route
        "@a:user@example.com",
        "user%other.example@example.com",  # percent hack
        "host!user@example.com",  # bang path
        "user",  # no domain
        "user@",
        "@example.com",  # no local part
        "us er@example.com",
        "user\t@example.com",
        "user\x00@example.com",
        "user\x7f@example.com",
        '"a b"@example.com',  # spaces stay out even when quoted
        "user@exa mple.com",
        "user@example..com",
        "user@-example.com",
        "user@example-.com",
        "user@example.com.",
        "user@exam_ple.com",
        "user@[192.0.2.1",
        "user@[IPv6:zz::1]",
        "a" * 65 + "@example.com",  # local part over 64
        "user@" + ("a" * 63 + ".") * 4 + "com",  # over 254 in all
        "user@" + "a" * 64 + ".com",  # label over 63
    ],
)
def test_bad_addresses_are_refused(address: str) -> None:
    assert not address_is_valid(address)


def test_length_limit_is_exactly_254() -> None:
    domain = ".".join(["a" * 63] * 3 + ["a" * 60])  # 252 characters, every label legal
    assert len("u@" + domain) == MAX_ADDRESS_LENGTH == 254
    assert address_is_valid("u@" + domain)
    assert not address_is_valid("uu@" + domain)


@pytest.mark.parametrize("address", ["a@b@example.com", "a,b@example.com", "<a>@example.com"])
def test_unquoted_specials_in_the_local_part_are_refused(address: str) -> None:
    assert not address_is_valid(address)


@pytest.mark.parametrize("address", ["u@[999.1.1.1]", "u@[IPv6::::]", "u@[IPv6:1.2.3.4]"])
def test_address_literal_must_hold_a_real_address(address: str) -> None:
    assert not address_is_valid(address)
