"""The limits that apply to one egress path: (source IP, destination site).

A site is what a receiving provider treats as one: every domain whose mail
goes to Google's MX hosts is one site, "gmail", because Google counts
connections and rates per sending IP over all of them ("MX rollup"). Any
other domain is a site of its own.

Limits are configured as defaults, per provider and per domain; for a
domain, each limit is the domain's own if set, else its provider's, else
the default. A throttle (mta.policy.throttle) scales the connection and
rate limits down for a while with ``Limits.scaled``.

Pure: DNS answers come in as arguments.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace


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
        return Limits(
            **{
                f.name: getattr(base, f.name)
                if getattr(self, f.name) is None
                else getattr(self, f.name)
                for f in fields(self)
            }
        )

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


@dataclass(frozen=True)
class Site:
    name: str  # the provider's name ("gmail") if the MX matches a provider, else the domain
    provider: str | None


def _normalise(host: str) -> str:
    return host.strip().rstrip(".").lower()


def _suffix_matches(host: str, suffix: str) -> bool:
    # ".google.com" matches "aspmx.l.google.com"; "google.com" (no leading
    # dot) matches "google.com" and "x.google.com" but not "evilgoogle.com".
    if suffix.startswith("."):
        return host.endswith(suffix)
    return host == suffix or host.endswith("." + suffix)


def site_for(domain: str, mx_hosts: Sequence[str], providers: Mapping[str, Sequence[str]]) -> Site:
    """The site a domain's mail goes to.

    `mx_hosts` are the domain's MX hosts in order of preference (lowest
    preference number first); `providers` maps a provider's name to the MX
    host suffixes that identify it (".google.com", ".googlemail.com"),
    compared case-insensitively, trailing dots ignored. If the first MX host
    ends with a provider's suffix, the site is that provider's (the longest
    matching suffix wins if several do); otherwise, or without MX hosts, the
    site is the domain itself, lower-cased.
    """
    name = _normalise(domain)
    if mx_hosts:
        first = _normalise(mx_hosts[0])
        best: tuple[int, str] | None = None
        for provider, suffixes in providers.items():
            for suffix in (suffixes,) if isinstance(suffixes, str) else suffixes:
                wanted = _normalise(suffix)
                better = best is None or len(wanted) > best[0]
                if better and wanted.strip(".") and _suffix_matches(first, wanted):
                    best = (len(wanted), provider)
        if best is not None:
            return Site(best[1], best[1])
    return Site(name, None)


def effective(
    default: Limits,
    by_provider: Mapping[str, Limits],
    by_domain: Mapping[str, Limits],
    site: Site,
    domain: str,
) -> Limits:
    """The limits for mail to `domain` on `site`: its own over its provider's over the default.

    `by_domain` is looked up with the domain as given and, failing that,
    lower-cased without a trailing dot.
    """
    limits = default
    if site.provider is not None and site.provider in by_provider:
        limits = by_provider[site.provider].merged_over(limits)
    own = by_domain.get(domain)
    if own is None:
        own = by_domain.get(_normalise(domain))
    if own is not None:
        limits = own.merged_over(limits)
    return limits
