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
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from mta.cli.common import CommandError, Commands, config_option, open_spool
from mta.cluster import redis_client
from mta.cluster.limits import ALIVE_SECONDS
from mta.cluster.redis_limits import NODES, sent_key
from mta.cluster.throttle_log import Decision, ThrottleLog
from mta.config import Config, load
from mta.observe.escape import printable
from mta.observe.timefmt import iso_time
from mta.outbound import warmup_counts
from mta.outbound.shaping import Shaping
from mta.policy.limits import OTHER, Site
from mta.policy.throttle import describe
from mta.policy.warmup import day_of, hour_of, hour_share
from mta.spool.store import Spool
from mta.spool.throttles import load_throttles, save_throttles

if TYPE_CHECKING:
    import redis.asyncio as aioredis  # imported only with Redis: mta.cluster.redis_client

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
        sub.add_argument(
            "--site", required=True, help="a site as `mta policy show` names it: gmail, mx+..."
        )
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
        # An operator drains an address: its mail may go from the pool's others.
        Decision("suspend", name, site.lower(), now + seconds, reason=OPERATOR, failover=True)
        for name in names
    ]
    with spool.write() as txn:
        throttles = load_throttles(spool, txn)
        for decision in decided:
            decision.apply(throttles)
        save_throttles(spool, txn, throttles, now)
    out.write(f"suspended {', '.join(names)} to {site} until {iso_time(now + seconds)}\n")
    return tell_fleet(config, decided, out)


def resume(spool: Spool, config: Config, site: str, source: str | None, out: TextIO) -> int:
    """Lift the site's restrictions: one source's, or, without ``source``, all of them,
    those a rule put on every source or on a sending domain included."""
    now = time.time()
    names = _sources(config, source)
    if source is None:
        with spool.read() as txn:
            restricted = load_throttles(spool, txn).active(now)
        names += sorted(
            sender for sender, on in restricted if on == site.lower() and sender not in names
        )
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
        client = redis_client.connect(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            await ThrottleLog(client).publish(decided)
        finally:
            await client.aclose()

    try:
        asyncio.run(publish())
    except (OSError, redis_client.redis_error()) as error:
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


def _warmup(spool: Spool, config: Config, now: float, providers: list[str]) -> list[dict[str, Any]]:
    """Each source's plan per provider: its day, today's and tomorrow's cap, this hour's
    share and today's count; with Redis also the fleet's count (None when Redis does
    not answer)."""
    day = day_of(now)
    warming = [source for source in config.egress.source if source.warmup is not None]
    counters = {
        (source.name, p): warmup_counts.day_counters(source.name, p, day)
        for source in warming
        for p in providers
    }
    fleet = _fleet_counts(config, [name for names in counters.values() for name in names])
    rows: list[dict[str, Any]] = []
    with spool.read() as txn:
        for source in config.egress.source:
            row: dict[str, Any] = {"source": source.name, "address": source.address}
            if source.warmup is None:
                rows.append(row | {"warmup": None})
                continue
            plans = {
                p: _plan_state(
                    warmup_counts.plan_today(spool, txn, source.warmup, source.name, p, now),
                    warmup_counts.sent_today(spool, txn, source.name, p, now),
                    now,
                )
                for p in providers
            }
            if config.cluster.redis is not None:
                for p, plan in plans.items():
                    names = counters[source.name, p]
                    plan["fleet_sent_today"] = fleet and sum(fleet[n] for n in names)
            rows.append(
                row | {"warmup": {"start": source.warmup.start.isoformat(), "providers": plans}}
            )
    return rows


def _plan_state(plan: warmup_counts.PlanToday, sent: int, now: float) -> dict[str, Any]:
    """A source's plan with one provider today, this hour's share and today's count."""
    return {
        "day": plan.day,
        "cap_today": plan.cap,
        "cap_tomorrow": plan.cap_tomorrow,
        "this_hour": None if plan.cap is None else hour_share(plan.cap, hour_of(now)),
        "sent_today": sent,
        "held_days": plan.held_days,
    }


def _fleet_counts(config: Config, counters: list[str]) -> dict[str, int] | None:
    """The fleet's count of each warmup counter, from Redis; None without it."""

    async def counts(client: aioredis.Redis) -> dict[str, int]:
        pipeline = client.pipeline(transaction=False)
        for counter in counters:
            pipeline.hvals(sent_key(counter))
        answers = await pipeline.execute()
        return {
            counter: sum(int(n) for n in values)
            for counter, values in zip(counters, answers, strict=True)
        }

    return _from_redis(config, counts) if counters else {}


def _from_redis(config: Config, ask: Callable[[aioredis.Redis], Awaitable[T]]) -> T | None:
    """What ``ask`` reads from the cluster's Redis; None when it does not answer."""

    async def run() -> T:
        client = redis_client.connect(config.cluster.redis or "", socket_connect_timeout=2)
        try:
            return await ask(client)
        finally:
            await client.aclose()

    if config.cluster.redis is None:
        return None
    try:
        return asyncio.run(asyncio.wait_for(run(), 3))
    except (OSError, redis_client.redis_error(), TimeoutError):
        return None


def show(spool: Spool, config: Config, as_json: bool, out: TextIO) -> int:
    now = time.time()
    shaping = Shaping(config)
    document = {
        "sources": _warmup(spool, config, now, [*shaping.suffixes, OTHER]),
        "pools": {p.name: list(p.sources) for p in config.egress.pool},
        "limits": {  # effective, each value with the layer it comes from
            "default": _limits(shaping, Site("", None), ""),
            # A static route's site: the operator's next hop, without the shipped default.
            "static_routes": _limits(shaping, Site("", None, static=True), ""),
            "providers": {
                name: {"mx_suffixes": list(suffixes), **_limits(shaping, Site(name, name), "")}
                for name, suffixes in sorted(shaping.suffixes.items())
            },
            "domains": {
                domain: _limits(shaping, Site(domain, None), domain) for domain in shaping.domains
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


def _limits(shaping: Shaping, site: Site, domain: str) -> dict[str, Any]:
    limits, origins = shaping.limits(site, domain)
    return {"limits": asdict(limits), "from": dict(origins)}


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


_LIMIT_NAMES = {
    "max_connections": "connections",
    "max_messages_per_connection": "messages/connection",
    "max_rate": "rate/s",
    "max_recipients": "recipients/transaction",
}


def _limit_text(entry: dict[str, Any]) -> str:
    """ "connections 20 (shipped gmail), rate/s 10 ([policy.default])" """
    limits, origins = entry["limits"], entry["from"]
    parts = [
        f"{label} {limits[key]:g} ({origins[key]})"
        for key, label in _LIMIT_NAMES.items()
        if limits.get(key)
    ]
    return ", ".join(parts) or "no limits"


def _warmup_lines(warmup: dict[str, Any]) -> list[str]:
    """One line per group of providers in the same state, most sent first."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    plans = warmup["providers"]
    for provider, plan in sorted(plans.items(), key=lambda item: -item[1]["sent_today"]):
        state = (plan["day"], plan["cap_today"], plan["this_hour"], plan["cap_tomorrow"])
        groups.setdefault(state, []).append(provider)
    lines = []
    for (day, cap, hour, tomorrow), providers in groups.items():
        if cap is None:
            lines.append(f"{', '.join(providers)}: warmed up (plan from {warmup['start']})")
            continue
        sent = ", ".join(
            f"{p} {plans[p]['sent_today']}" + _fleet(plans[p])
            for p in providers
            if plans[p]["sent_today"] or plans[p].get("fleet_sent_today")
        )
        lines.append(
            f"{', '.join(providers)}: day {day}, cap {cap} today ({hour} this hour), "
            f"{'no cap' if tomorrow is None else tomorrow} tomorrow; sent {sent or 'none'}"
        )
    return lines


def _fleet(plan: dict[str, Any]) -> str:
    if "fleet_sent_today" not in plan:
        return ""
    fleet = plan["fleet_sent_today"]
    return " (the fleet: redis does not answer)" if fleet is None else f" (the fleet {fleet})"


def _print(document: dict[str, Any], out: TextIO, now: float) -> None:
    print_sharing(document["shared"], out)
    out.write("sources:\n")
    for row in document["sources"] or [{"source": "default", "address": None, "warmup": None}]:
        address = row["address"] or "(the host's own address)"
        if row["warmup"] is None:
            out.write(f"  {row['source']:<12} {address:<16} no warmup\n")
            continue
        out.write(
            f"  {row['source']:<12} {address:<16} warming up since {row['warmup']['start']}:\n"
        )
        for line in _warmup_lines(row["warmup"]):
            out.write(f"    {line}\n")
    if document["pools"]:
        out.write("pools:\n")
        for name, sources in document["pools"].items():
            out.write(f"  {name:<12} {', '.join(sources)}\n")
    limits = document["limits"]
    out.write(f"limits:\n  {'default':<30} {_limit_text(limits['default'])}\n")
    out.write(f"  {'static routes':<30} {_limit_text(limits['static_routes'])}\n")
    for name, provider in limits["providers"].items():
        suffixes = " ".join(provider["mx_suffixes"])
        out.write(f"  {'provider ' + name:<30} {_limit_text(provider)}; MX {suffixes}\n")
    for domain, domain_limits in limits["domains"].items():
        out.write(f"  {'domain ' + domain:<30} {_limit_text(domain_limits)}\n")
    rows = document["restrictions"]
    out.write("suspended or throttled now:" + ("\n" if rows else " none\n"))
    for row in rows:
        if "suspended_until" in row:
            what = f"suspended until {row['suspended_until']}"
        else:
            what = f"throttled to {row['factor']:g}x until {row['throttled_until']}"
        whom = describe(row["source"])
        out.write(f"  {whom} -> {row['site']}: {what} ({printable(row['reason'])})\n")
