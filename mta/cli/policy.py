"""`mta policy ...`: see the traffic policy in force, suspend and resume paths.

Works on the spool like `mta queue`, daemon running or not: suspensions are
stored in the spool's policy database, which the daemon looks at before each
delivery, so `suspend` and `resume` take effect on a running daemon at once.
`resume` also makes the jobs the suspension deferred due now, in the same
commit: a running daemon starts them within a second (its scheduler's scan).
With ``[cluster] redis``, both are also told to the other nodes
(mta.cluster.throttle_log), which apply them within about a second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, TextIO, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mta.cli.common import CommandError, Commands, config_option, open_spool
from mta.cluster.limits import ALIVE_SECONDS
from mta.cluster.redis_limits import NODES, sent_key
from mta.cluster.throttle_log import Decision, ThrottleLog
from mta.config import Config, load
from mta.observe.escape import printable
from mta.observe.timefmt import iso_time
from mta.outbound.egress import (
    OTHER,
    limits_from_config,
    load_throttles,
    save_throttles,
    warmup_counter,
)
from mta.policy.warmup import daily_cap, day_of
from mta.spool.store import Spool

OPERATOR = "operator"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
T = TypeVar("T")


def add_commands(commands: Commands) -> None:
    with_config = config_option()
    policy = commands.add_parser("policy", help="traffic policy").add_subparsers(
        dest="policy_command", required=True, metavar="COMMAND"
    )
    show_all = policy.add_parser(
        "show", parents=[with_config], help="limits, warmup state, suspensions in force"
    )
    show_all.add_argument("--json", action="store_true", help="machine-readable output")
    show_all.set_defaults(run=run_show)
    for action, text in (("suspend", "stop sending to a site"), ("resume", "lift a suspension")):
        sub = policy.add_parser(action, parents=[with_config], help=text)
        sub.add_argument("--site", required=True, help="a provider name or a domain")
        sub.add_argument("--source", help="one source (default: every source)")
        if action == "suspend":
            sub.add_argument("--for", dest="duration", default="1h", help="default: %(default)s")
        sub.set_defaults(run=run_change, action=action)


def run_show(args: argparse.Namespace) -> int:
    settings = load(args.config)
    return show(open_spool(args), settings, args.json, sys.stdout)


def run_change(args: argparse.Namespace) -> int:
    settings = load(args.config)
    spool = open_spool(args)
    if args.action == "resume":
        return resume(spool, settings, args.site, args.source, sys.stdout)
    seconds = parse_duration(args.duration)
    return suspend(spool, settings, args.site, args.source, seconds, sys.stdout)


def parse_duration(text: str) -> float:
    """ "90s", "30m", "2h", "1d" (or plain seconds) -> seconds."""
    match = _DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise CommandError(f'--for: expected a duration such as "30m", "2h" or "1d", got "{text}"')
    return float(match.group(1)) * _SECONDS[match.group(2) or "s"]


def _sources(config: Config, source: str | None) -> list[str]:
    names = [s.name for s in config.egress.source] or ["default"]
    if source is None:
        return names
    if source not in names:
        raise CommandError(f"no source named {source}; configured: {', '.join(names)}")
    return [source]


def suspend(
    spool: Spool, config: Config, site: str, source: str | None, seconds: float, out: TextIO
) -> int:
    now = time.time()
    names = _sources(config, source)
    decided = [
        Decision("suspend", name, site.lower(), now + seconds, reason=OPERATOR) for name in names
    ]
    with spool.write() as txn:
        throttles = load_throttles(spool, txn)
        for decision in decided:
            decision.apply(throttles)
        save_throttles(spool, txn, throttles, now)
    out.write(f"suspended {', '.join(names)} to {site} until {iso_time(now + seconds)}\n")
    return tell_fleet(config, decided, out)


def resume(spool: Spool, config: Config, site: str, source: str | None, out: TextIO) -> int:
    now = time.time()
    names = _sources(config, source)
    decided = [Decision("resume", name, site.lower()) for name in names]
    with spool.write() as txn:
        throttles = load_throttles(spool, txn)
        ends = {end for decision in decided for end in decision.apply(throttles)}
        save_throttles(spool, txn, throttles, now)
        due = sum(spool.make_due(txn, end, now) for end in ends if now < end < math.inf)
    out.write(f"resumed {', '.join(names)} to {site}; {due} waiting jobs due now\n")
    return tell_fleet(config, decided, out)


def tell_fleet(config: Config, decided: list[Decision], out: TextIO) -> int:
    """With ``[cluster] redis``, tell the other nodes; 1 if Redis could not be told."""
    url = config.cluster.redis
    if url is None:
        return 0

    async def publish() -> None:
        client = aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            await ThrottleLog(client).publish(decided)
        finally:
            await client.aclose()

    try:
        asyncio.run(publish())
    except (OSError, RedisError) as error:
        out.write(
            f"not told to the other nodes ({error}): this node only; "
            "run the command again when Redis answers\n"
        )
        return 1
    out.write("told the other nodes through redis\n")
    return 0


def restrictions(spool: Spool, now: float) -> list[dict[str, Any]]:
    """Every suspension and throttle in force, for `policy show` and `queue stats`."""
    with spool.read() as txn:
        active = load_throttles(spool, txn).active(now)
    rows = []
    for (source, site), restriction in sorted(active.items()):
        row: dict[str, Any] = {"source": source, "site": site, "reason": restriction.reason}
        if restriction.suspended_until > now:
            row["suspended_until"] = iso_time(restriction.suspended_until)
        if restriction.throttled_until > now:
            row["throttled_until"] = iso_time(restriction.throttled_until)
            row["factor"] = restriction.factor
        rows.append(row)
    return rows


def _warmup(spool: Spool, config: Config, now: float) -> list[dict[str, Any]]:
    """Each source's plan and today's counts: this node's, and with Redis the fleet's
    (None when Redis does not answer)."""
    day = day_of(now)
    providers = [p.name for p in config.policy.provider] + [OTHER]
    counters = {
        (source.name, p): warmup_counter(source.name, p, day)
        for source in config.egress.source
        if source.warmup is not None
        for p in providers
    }
    fleet = _fleet_counts(config, list(counters.values()))
    rows: list[dict[str, Any]] = []
    with spool.read() as txn:
        for source in config.egress.source:
            if source.warmup is None:
                rows.append({"source": source.name, "address": source.address, "warmup": None})
                continue
            w = source.warmup
            names = {p: counters[source.name, p] for p in providers}
            warmup = {
                "start": w.start.isoformat(),
                "cap_today": daily_cap(w.plan(), day),
                "sent_today": {p: spool.counter(txn, name) for p, name in names.items()},
            }
            if config.cluster.redis is not None:
                warmup["fleet_sent_today"] = fleet and {p: fleet[n] for p, n in names.items()}
            rows.append({"source": source.name, "address": source.address, "warmup": warmup})
    return rows


def _fleet_counts(config: Config, counters: list[str]) -> dict[str, int] | None:
    """The fleet's count of each warmup counter, from Redis; None without it."""

    async def counts(client: aioredis.Redis) -> dict[str, int]:
        return {
            counter: sum(int(n) for n in await client.hvals(sent_key(counter)))  # type: ignore[misc]
            for counter in counters
        }

    return _from_redis(config, counts) if counters else {}


def _from_redis(config: Config, ask: Callable[[aioredis.Redis], Awaitable[T]]) -> T | None:
    """What ``ask`` reads from the cluster's Redis; None when it does not answer."""

    async def run() -> T:
        client = aioredis.Redis.from_url(config.cluster.redis or "", socket_connect_timeout=2)
        try:
            return await ask(client)
        finally:
            await client.aclose()

    if config.cluster.redis is None:
        return None
    try:
        return asyncio.run(asyncio.wait_for(run(), 3))
    except (OSError, RedisError, TimeoutError):
        return None


def show(spool: Spool, config: Config, as_json: bool, out: TextIO) -> int:
    now = time.time()
    policy = config.policy
    default = limits_from_config(policy.default)
    document = {
        "sources": _warmup(spool, config, now),
        "pools": {p.name: list(p.sources) for p in config.egress.pool},
        "limits": {  # effective: a provider's over the default, a domain's over the default
            "default": asdict(default),
            "providers": {
                p.name: {
                    "mx_suffixes": list(p.mx_suffixes),
                    **asdict(limits_from_config(p).merged_over(default)),
                }
                for p in policy.provider
            },
            "domains": {
                domain: asdict(limits_from_config(limits).merged_over(default))
                for domain, limits in policy.domain.items()
            },
        },
        "restrictions": restrictions(spool, now),
        "shared": sharing(config),
    }
    if as_json:
        json.dump(document, out, indent=2)
        out.write("\n")
        return 0
    _print(document, out, now)
    return 0


def sharing(config: Config) -> dict[str, Any]:
    """Who shares this node's limits and suspensions: its workers, or the fleet's
    nodes seen alive in Redis (None when Redis does not answer)."""
    cluster = config.cluster
    if cluster.redis is None:
        return {"node": cluster.node, "redis": None, "nodes": [cluster.node]}

    async def alive(client: aioredis.Redis) -> list[str]:
        since = (await client.time())[0] - ALIVE_SECONDS
        names: list[bytes] = await client.zrangebyscore(NODES, since, "+inf")  # type: ignore[assignment]
        return sorted(name.decode() for name in names)

    return {"node": cluster.node, "redis": cluster.redis, "nodes": _from_redis(config, alive)}


def print_sharing(shared: dict[str, Any], out: TextIO) -> None:
    node = shared["node"]
    if shared["redis"] is None:
        out.write(f"node {node}: limits and suspensions shared by this node's workers\n")
    elif shared["nodes"] is None:
        out.write(f"node {node}: redis {shared['redis']} does not answer\n")
    else:
        nodes = ", ".join(shared["nodes"]) or "none yet"
        out.write(f"node {node}: limits and suspensions shared through redis with {nodes}\n")


def _limit_text(limits: dict[str, Any]) -> str:
    names = {
        "max_connections": "connections",
        "max_messages_per_connection": "messages/connection",
        "max_rate": "rate/s",
        "max_recipients": "recipients/transaction",
    }
    parts = [f"{label} {limits[key]:g}" for key, label in names.items() if limits.get(key)]
    return ", ".join(parts) or "no limits"


def _print(document: dict[str, Any], out: TextIO, now: float) -> None:
    today = datetime.fromtimestamp(now, UTC).date().isoformat()
    print_sharing(document["shared"], out)
    out.write("sources:\n")
    for row in document["sources"] or [{"source": "default", "address": None, "warmup": None}]:
        address = row["address"] or "(the host's own address)"
        warmup = row["warmup"]
        if warmup is None:
            state = "no warmup"
        elif warmup["cap_today"] is None:
            state = f"warmed up (plan from {warmup['start']})"
        else:
            sent = ", ".join(f"{p} {n}" for p, n in warmup["sent_today"].items())
            state = f"warming up: {warmup['cap_today']} per provider on {today}; sent {sent}"
            if "fleet_sent_today" in warmup:
                fleet = warmup["fleet_sent_today"]
                counts = ", ".join(f"{p} {n}" for p, n in (fleet or {}).items())
                state += f"; the fleet sent {counts or '(redis does not answer)'}"
        out.write(f"  {row['source']:<12} {address:<16} {state}\n")
    if document["pools"]:
        out.write("pools:\n")
        for name, sources in document["pools"].items():
            out.write(f"  {name:<12} {', '.join(sources)}\n")
    limits = document["limits"]
    out.write(f"limits:\n  {'default':<30} {_limit_text(limits['default'])}\n")
    for name, provider in limits["providers"].items():
        suffixes = " ".join(provider["mx_suffixes"])
        out.write(f"  {'provider ' + name:<30} {_limit_text(provider)} (MX {suffixes})\n")
    for domain, domain_limits in limits["domains"].items():
        out.write(f"  {'domain ' + domain:<30} {_limit_text(domain_limits)}\n")
    rows = document["restrictions"]
    out.write("suspended or throttled now:" + ("\n" if rows else " none\n"))
    for row in rows:
        if "suspended_until" in row:
            what = f"suspended until {row['suspended_until']}"
        else:
            what = f"throttled to {row['factor']:g}x until {row['throttled_until']}"
        out.write(f"  {row['source']} -> {row['site']}: {what} ({printable(row['reason'])})\n")
