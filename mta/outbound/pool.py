"""Sources and pools: the local addresses mail leaves from, and how they are grouped.

A *source* is one local address (or the host's own, when no
``[[egress.source]]`` is configured) with its EHLO name, its warmup plan and
its own SMTP client, so that a connection opened from one address is never
reused for another. A *pool* is a weighted list of sources; a message names
its pool, and mta.outbound.egress picks one of the pool's sources per
delivery.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from mta.config import Config, WarmupConfig
from mta.outbound.smtp_client import ClientSettings, Deliverer, Slot
from mta.policy.tls import Failure, TlsPolicy

# How a TLS session went, with the address it left from: (address, policy, MX host, failure).
TlsOutcome = Callable[[str, TlsPolicy, str, Failure | None], None]


@dataclass
class Source:
    """One local address mail leaves from, with the SMTP client that sends from it."""

    name: str
    address: str | None  # None: let the kernel choose (no [[egress.source]] configured)
    warmup: WarmupConfig | None  # its plan, and any per provider
    deliverer: Deliverer


def client_settings(config: Config, source_address: str | None, helo: str) -> ClientSettings:
    delivery = config.delivery
    return ClientSettings(
        helo=helo,
        connect_timeout=delivery.connect_timeout,
        command_timeout=delivery.command_timeout,
        max_messages_per_connection=delivery.max_messages_per_connection,
        idle_timeout=delivery.connection_idle_timeout,
        source_address=source_address,
        ca_file=delivery.ca_file,
    )


def sources_from_config(
    config: Config,
    current: Mapping[str, Source],
    on_slot_free: Callable[[Slot], None],
    on_tls: TlsOutcome = lambda address, policy, host, failure: None,
) -> list[Source]:
    """One Deliverer per source, so that connections are pooled per source address;
    a source in ``current`` with the same settings keeps its Deliverer. Each tells
    ``on_slot_free`` when a connection slot is free again, and ``on_tls`` how each
    TLS session went (mta.outbound.smtp_client)."""
    configured: list[tuple[str, str | None, WarmupConfig | None, str | None]] = [
        (s.name, s.address, s.warmup, s.ehlo) for s in config.egress.source
    ] or [("default", None, None, None)]
    sources = []
    for name, address, plan, ehlo in configured:
        settings = client_settings(config, address, ehlo or config.server.hostname)
        old = current.get(name)
        if old and old.deliverer.settings == settings:
            deliverer = old.deliverer
        else:
            deliverer = Deliverer(settings, on_slot_free, partial(on_tls, address or ""))
        sources.append(Source(name, address, plan, deliverer))
    return sources


def pools_from_config(config: Config, sources: list[Source]) -> dict[str, list[tuple[Source, int]]]:
    """Pool name -> (source, weight); "" is the pool of mail that names none."""
    by_name = {source.name: source for source in sources}
    pools = {
        pool.name: [
            (by_name[name], pool.weights[n] if pool.weights else 1)
            for n, name in enumerate(pool.sources)
        ]
        for pool in config.egress.pool
    }
    pools[""] = pools.get(config.egress.default_pool) or [(source, 1) for source in sources]
    return pools
