"""The TLS policy of each delivery: how its connections must be protected (mta.policy.tls).

In this order, the first that has something to say:

1. the domain's own level in ``[delivery.tls_policy]``: the operator's word wins;
2. DANE: the domain's MX answer and the MX hosts' TLSA records, validated by
   a resolver of ``[delivery] dnssec_nameservers`` (mta.outbound.dane);
3. MTA-STS: the domain's policy, ``enforce`` or ``testing``
   (mta.outbound.mta_sts), unless ``[delivery] mta_sts = false``;
4. ``encrypt`` for a domain in ``[delivery] require_tls`` (deprecated);
5. ``[delivery] tls_level`` for every other domain (``may`` unless set).

DANE takes precedence over MTA-STS (RFC 8461 2). A static route is the
operator's own path, not the domain's MX: only the configuration applies.
An MX host whose TLSA records could not be validated now (a bogus or failing
answer) may not be used: it is left out of the route, and when that leaves
no host the delivery waits (RFC 7672 2.1.1).
"""

from __future__ import annotations

from dataclasses import replace

from mta.config import Config
from mta.mail.address import is_address_literal
from mta.outbound.dane import Dane, dane_policy
from mta.outbound.mta_sts import MtaSts
from mta.outbound.routes import ResolveError, Route
from mta.policy.mta_sts import tls_policy as sts_policy
from mta.policy.tls import Level, TlsPolicy
from mta.spool.store import Spool


class TlsPolicies:
    def __init__(self, config: Config, spool: Spool) -> None:
        self._spool = spool
        self.reload(config)

    def reload(self, config: Config) -> None:
        """Take a reloaded configuration; deliveries under way keep the policy they got."""
        delivery = config.delivery
        levels = dict.fromkeys(delivery.require_tls, Level.ENCRYPT)
        self._explicit = {
            d: TlsPolicy(Level(level), "config") for d, level in delivery.tls_policy.items()
        }
        self._configured = {domain: TlsPolicy(level, "config") for domain, level in levels.items()}
        self._default = TlsPolicy(Level(delivery.tls_level), "default")
        nameservers = [(ns.host, ns.port) for ns in delivery.nameservers] or None
        self._sts = (
            MtaSts(
                self._spool,
                nameservers,
                allow_private=delivery.allow_private_mx,
                port=delivery.mta_sts_port,
                ca_file=delivery.ca_file,
            )
            if delivery.mta_sts
            else None
        )
        validating = [(ns.host, ns.port) for ns in delivery.dnssec_nameservers]
        self._dane = Dane(validating, smtp_port=delivery.smtp_port) if validating else None

    async def for_route(self, route: Route) -> tuple[TlsPolicy, Route]:
        """The policy for mail to ``route.domain``, and the route's hosts it may use.

        ResolveError (temporary) when DANE leaves no usable host.
        """
        domain = route.domain
        if domain in self._explicit:
            return self._explicit[domain], route
        configured = self._configured.get(domain, self._default)
        if route.static or is_address_literal(domain):
            return configured, route
        if self._dane is not None:
            found = await self._dane.tlsa(domain, [host.name for host in route.hosts])
            route = _without(route, found.failed)
            dane = dane_policy(found)
            if dane is not None:
                return dane, route
        if self._sts is not None:
            sts = await self._sts.policy(domain)
            published = sts_policy(sts.policy, domain, configured)
            if published is not None:
                return published, route
        return configured, route


def _without(route: Route, failed: dict[str, str]) -> Route:
    """``route`` without the hosts DANE may not use now; ResolveError if none is left."""
    if not failed:
        return route
    kept = tuple(host for host in route.hosts if host.name not in failed)
    if not kept:
        why = "; ".join(f"{host}: {reason}" for host, reason in sorted(failed.items()))
        raise ResolveError("4.7.5", f"no MX host of {route.domain} is usable now ({why})", False)
    return replace(route, hosts=kept)
