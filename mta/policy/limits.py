"""The limits that apply to one egress path: (source IP, destination site).

A site is what a receiving provider treats as one: every domain whose mail
goes to Google's MX hosts is one site, "gmail", because Google counts
connections and rates per sending IP over all of them ("MX rollup"). The
providers known by their MX host names ship in mta.policy.providers; the
configuration adds to them. For any other domain, ``site_for`` can roll up
by the MX host set instead: domains served by the same MX hosts share a
site without configuration. Otherwise a domain is a site of its own.

Limits come in layers, from general to specific: the shipped default, the
configured default, the provider's shipped and configured limits, the
domain's own. ``layered`` merges them field by field, the most specific
layer that sets a limit wins, and says which layer each limit came from. A
throttle (mta.policy.throttle) scales the connection and rate limits down
for a while with ``Limits.scaled``.

Pure: DNS answers come in as arguments.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from mta.mail.domain import MAX_NAME_LENGTH, lowercase_name

UNLIMITED = "unlimited"  # the origin of a limit no layer sets
MX_SITE_PREFIX = "mx+"  # a site named by its MX host set (see site_for)
_MX_SET_DIGEST_LENGTH = 10  # hex digits: 40 bits, so two different sets practically never clash
_NOT_HOST_NAME = re.compile(r"[^a-z0-9.-]")


def _check_count(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number, 1 or more, got {value!r}")


@dataclass(frozen=True)
class Limits:
    max_connections: int | None = None  # None: unlimited
    max_messages_per_connection: int | None = None
    max_rate: float | None = None  # messages per second; None: unlimited
    max_recipients: int | None = None  # per transaction

    def __post_init__(self) -> None:
        _check_count("max_connections", self.max_connections)
        _check_count("max_messages_per_connection", self.max_messages_per_connection)
        _check_count("max_recipients", self.max_recipients)
        rate = self.max_rate
        if rate is not None and (
            isinstance(rate, bool)
            or not isinstance(rate, int | float)
            or not (math.isfinite(rate) and rate > 0)
        ):
            raise ValueError(
                f"max_rate must be a number of messages per second above 0, got {rate!r}"
            )

    def merged_over(self, base: Limits) -> Limits:
        """Each limit: this one's if set, else base's."""
        return layered((("base", base), ("self", self)))[0]

    def scaled(self, factor: float) -> Limits:
        """Throttled limits: max_connections and max_rate times `factor` (0 < factor <= 1).

        Connections are rounded down but stay at least 1, so a throttled
        path still moves; the rate stays above 0. An unlimited (None)
        connection count or rate stays unlimited: there is nothing to scale.
        Messages per connection and recipients per transaction are
        unchanged.
        """
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 < factor <= 1:
            raise ValueError(f"a throttle factor must be above 0 and at most 1, got {factor!r}")
        if factor == 1:
            return self
        connections = self.max_connections
        if connections is not None:
            connections = max(1, math.floor(connections * factor))
        rate = self.max_rate
        if rate is not None:
            # A tiny factor on a tiny rate can underflow to 0.0; keep it positive.
            rate = max(rate * factor, math.ulp(0.0))
        return replace(self, max_connections=connections, max_rate=rate)


def layered(layers: Sequence[tuple[str, Limits]]) -> tuple[Limits, Mapping[str, str]]:
    """Merge named layers of limits, given from the most general to the most specific.

    Each limit is that of the last layer that sets it. Returns the merged
    limits and, for each field name ("max_rate" ...), the name of the layer
    it came from, or UNLIMITED when no layer sets it (the limit is then None).
    """
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for field in fields(Limits):
        values[field.name], origins[field.name] = None, UNLIMITED
        for origin, limits in layers:
            value = getattr(limits, field.name)
            if value is not None:
                values[field.name], origins[field.name] = value, origin
    return Limits(**values), origins


OTHER = "other"  # the metric label of a site that is no provider


@dataclass(frozen=True)
class Site:
    # The provider's name ("gmail") if the first MX host matches a provider; with
    # group_by_mx, a name made from the MX host set; else the domain.
    name: str
    provider: str | None
    # Reached by a static route: the operator's own next hop (a smarthost, a
    # relay of theirs), for which the shipped default's caution is not meant.
    static: bool = False


def _suffix_matches(host: str, suffix: str) -> bool:
    # ".google.com" matches "aspmx.l.google.com"; "google.com" (no leading
    # dot) matches "google.com" and "x.google.com" but not "evilgoogle.com".
    if suffix.startswith("."):
        return host.endswith(suffix)
    return host == suffix or host.endswith("." + suffix)


def _provider_of(host: str, providers: Mapping[str, Sequence[str]]) -> str | None:
    """The provider with the longest MX suffix `host` ends with, if any."""
    host = lowercase_name(host)
    best: tuple[int, str] | None = None
    for provider, suffixes in providers.items():
        for suffix in (suffixes,) if isinstance(suffixes, str) else suffixes:
            wanted = lowercase_name(suffix)
            better = best is None or len(wanted) > best[0]
            if better and wanted.strip(".") and _suffix_matches(host, wanted):
                best = (len(wanted), provider)
    return None if best is None else best[1]


def _mx_set_name(hosts: Iterable[str]) -> str:
    """The site name of a set of (lower-case, non-empty) MX host names.

    "mx+" and the alphabetically first host; when the set has more hosts, or
    that host had to be shortened or had characters other than a-z 0-9 . -
    (each replaced by "-"), also "+" and a digest of the whole set. So the
    name is stable, at most 253 characters of [a-z0-9.+-], and, holding a
    "+" that neither a domain nor a provider name can, never a domain's or
    a provider's.
    """
    unique = sorted(set(hosts))
    readable_length = MAX_NAME_LENGTH - len(MX_SITE_PREFIX) - 1 - _MX_SET_DIGEST_LENGTH
    readable = _NOT_HOST_NAME.sub("-", unique[0])[:readable_length]
    if unique == [readable]:
        return MX_SITE_PREFIX + readable
    # JSON keeps the set's members apart whatever characters they hold.
    digest = hashlib.sha256(json.dumps(unique).encode()).hexdigest()
    return f"{MX_SITE_PREFIX}{readable}+{digest[:_MX_SET_DIGEST_LENGTH]}"


def site_for(
    domain: str,
    mx_hosts: Sequence[str],
    providers: Mapping[str, Sequence[str]],
    *,
    group_by_mx: bool = False,
    static: bool = False,
) -> Site:
    """The site a domain's mail goes to.

    `mx_hosts` are the domain's MX hosts in order of preference (lowest
    preference number first); `providers` maps a provider's name to the MX
    host suffixes that identify it (".google.com", ".googlemail.com"),
    compared case-insensitively, trailing dots ignored. If the first MX host
    ends with a provider's suffix, the site is that provider's (the longest
    matching suffix wins if several do): a backup MX at a provider does not
    make a domain the provider's.

    Otherwise, with `group_by_mx`, domains with the same set of MX hosts
    (order, case and trailing dots ignored) share a site named after the
    set (``_mx_set_name``: "mx+mx1.example.net+3f0c...", with no provider).
    Pass it only for hosts that are a domain's MX records: a static route's
    hosts say nothing about who else they serve. Without it, or without MX
    hosts, the site is the domain itself, lower-cased.
    """
    provider = _provider_of(mx_hosts[0], providers) if mx_hosts else None
    if provider is not None:
        return Site(provider, provider, static)
    hosts = {lowercase_name(host) for host in mx_hosts} - {""}
    if group_by_mx and hosts:
        return Site(_mx_set_name(hosts), None)
    return Site(lowercase_name(domain), None, static)


def effective(
    default: Limits,
    by_provider: Mapping[str, Limits],
    by_domain: Mapping[str, Limits],
    site: Site,
    domain: str,
) -> Limits:
    """The limits for mail to `domain` on `site`: its own over its provider's over the default.

    ``layered`` over these three layers, without the provenance. `by_domain`
    is looked up with the domain as given and, failing that, lower-cased
    without a trailing dot.
    """
    layers = [("default", default)]
    if site.provider is not None and site.provider in by_provider:
        layers.append((f"provider {site.provider}", by_provider[site.provider]))
    own = by_domain.get(domain)
    if own is None:
        own = by_domain.get(lowercase_name(domain))
    if own is not None:
        layers.append((f"domain {domain}", own))
    return layered(layers)[0]
