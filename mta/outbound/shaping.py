"""Shaping: each site's limits, from what ships and what is configured, and where each comes from.

Layers from the most general to the most specific: the shipped default
(mta.policy.providers), ``[policy.default]``, the shipped provider's limits,
the user's ``[[policy.provider]]`` of that name, ``[policy.domain."d"]``.
Each limit comes from the most specific layer that sets it, so a user's
setting always overrides what ships for the same place, and a provider's
published limit is not loosened by a broad ``[policy.default]``.
``[policy] shipped_shaping = false`` leaves the shipped layers out.
"""

from __future__ import annotations

from collections.abc import Mapping

from mta.config import Config, LimitsConfig
from mta.policy.limits import Limits, Site, layered
from mta.policy.providers import DEFAULT_LIMITS, SHIPPED, suffix_map


class Shaping:
    def __init__(self, config: Config) -> None:
        policy = config.policy
        shipped = SHIPPED if policy.shipped_shaping else ()
        self.suffixes = suffix_map(shipped, {p.name: p.mx_suffixes for p in policy.provider})
        self._shipped_default = ("shipped default", DEFAULT_LIMITS if shipped else Limits())
        self._default = ("[policy.default]", limits_from_config(policy.default))
        self._shipped = {p.name: p.limits for p in shipped}
        self._configured = {p.name: limits_from_config(p) for p in policy.provider}
        self.domains = {d: limits_from_config(limits) for d, limits in policy.domain.items()}

    def layers(self, site: Site, domain: str) -> list[tuple[str, Limits]]:
        """The layers that apply to mail for ``domain`` on ``site``, general first;
        a static route's site is the operator's own next hop, not a stranger's
        server the shipped default is cautious with."""
        layers = [self._default] if site.static else [self._shipped_default, self._default]
        provider = site.provider
        if provider in self._shipped:
            layers.append((f"shipped {provider}", self._shipped[provider]))
        if provider in self._configured:
            layers.append((f"[[policy.provider]] {provider}", self._configured[provider]))
        if domain in self.domains:
            layers.append((f'[policy.domain."{domain}"]', self.domains[domain]))
        return layers

    def limits(self, site: Site, domain: str) -> tuple[Limits, Mapping[str, str]]:
        """The limits for ``domain`` on ``site``, and the layer each came from."""
        return layered(self.layers(site, domain))


def limits_from_config(config: LimitsConfig) -> Limits:
    return Limits(
        max_connections=config.max_connections,
        max_messages_per_connection=config.max_messages_per_connection,
        max_rate=config.max_rate,
        max_recipients=config.max_recipients,
    )
