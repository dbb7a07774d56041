"""Tenants: whose mail a submission is, and what that tenant may use. Pure.

A tenant is one application or customer sharing the MTA (``[[tenant]]``). A
client is a tenant by its AUTH name (``smtp_users``), by its address
(``relay_networks``, the first tenant listed whose network holds it) or, over
HTTP, by its API token. A tenant may send only from its ``sender_domains``
(the envelope sender's and the From field's domain) and only through its
``pools``; mail of no tenant (the operator's own relay clients) is checked
as before tenants existed.
"""

from __future__ import annotations

from collections.abc import Iterable

from mta.config import PRIORITIES, EgressConfig, TenantConfig
from mta.inbound.access import in_networks
from mta.mail.address import domain_of, mailbox_domain
from mta.mail.domain import lowercase_name
from mta.mail.header import header_safe


class Refused(Exception):
    """The tenant may not do this; str() says what, for a 550 5.7.1 or a 403."""


class Tenants:
    def __init__(self, tenants: Iterable[TenantConfig]) -> None:
        self.all = tuple(tenants)
        self._by_name = {tenant.name: tenant for tenant in self.all}
        self._by_user = {user: tenant for tenant in self.all for user in tenant.smtp_users}

    def named(self, name: str) -> TenantConfig | None:
        return self._by_name.get(name)

    def of_client(self, auth_user: str | None, client_ip: str) -> TenantConfig | None:
        """The tenant an SMTP client is: by its AUTH name, else by its address."""
        if auth_user is not None:
            return self._by_user.get(auth_user)
        for tenant in self.all:
            if in_networks(client_ip, tenant.relay_networks):
                return tenant
        return None

    def may_relay(self, client_ip: str) -> bool:
        """A tenant's network may relay without AUTH: it is that tenant."""
        return self.of_client(None, client_ip) is not None


def check_sender(tenant: TenantConfig | None, address: str, what: str = "sender") -> None:
    """Refused unless ``tenant`` may send as ``address`` ("" is the null sender)."""
    if tenant is None or not address:
        return
    domain = domain_of(address)
    if domain not in tenant.sender_domains:
        raise Refused(f"tenant {tenant.name} may not send as {what} domain {domain}")


def check_author(tenant: TenantConfig, from_value: str) -> None:
    """Refused unless ``tenant`` may send as the From field's address."""
    domain = mailbox_domain(from_value)
    if domain is None or lowercase_name(domain) not in tenant.sender_domains:
        shown = header_safe(domain or "(none)")[:64]  # the client's text, in a reply and the log
        raise Refused(f"tenant {tenant.name} may not send as From: domain {shown}")


def pool_for(
    tenant: TenantConfig | None, instructed: str | None, sender: str, egress: EgressConfig
) -> str:
    """The egress pool of a message; "" when no pools are configured.

    An instructed pool (a header or an API field) must exist (else ValueError)
    and, for a tenant, be one of its ``pools`` (else Refused). Otherwise: the
    tenant's ``default_pool``, else the first of its pools, else the sender
    domain's pool, else the node's default.
    """
    if not egress.pool:
        return ""  # no pools configured: the host's own address
    if instructed is not None:
        if instructed not in {pool.name for pool in egress.pool}:
            raise ValueError(instructed)
        if tenant is not None and instructed not in tenant.pools:
            raise Refused(f"tenant {tenant.name} may not use pool {instructed}")
        return instructed
    if tenant is not None and tenant.pools:
        return tenant.default_pool or tenant.pools[0]
    return egress.sender_pools.get(domain_of(sender), egress.default_pool)


def priority_for(tenant: TenantConfig | None, instructed: str | None) -> str:
    """The message's priority: the one instructed, else the tenant's, else bulk.
    ValueError for a name that is not a priority."""
    if instructed is not None:
        if instructed not in PRIORITIES:
            raise ValueError(instructed)
        return instructed
    return tenant.priority if tenant is not None else "bulk"
