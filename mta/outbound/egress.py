"""Egress: which source address sends a job to a site, and when.

A *site* is where mail goes as the receiving provider sees it: all domains
whose MX hosts belong to one provider share one site ("gmail"), any other
domain is its own site. A *path* is a (source, site) pair, and the traffic
policy applies per path:

- connections: at most ``max_connections`` deliveries at once on a path;
- rate: messages leave a path no faster than ``max_rate``, evenly spaced;
- warmup: a source on a warmup plan sends each provider at most that day's
  cap; past it, the pool's other sources carry the traffic;
- suspension and throttling: a response rule (mta.policy.rules) or an
  operator can suspend a path, or scale its limits down, for a while.

``lease`` picks a source of the message's pool for the site: one that is not
suspended or capped, preferring one with a free connection slot and rate
budget (by the pool's weights). When every usable path is busy the job waits
in memory in the ready queue (mta.outbound.ready_queue); when no source may
send at all it answers ``Wait`` with the time the job should come back, and
the job is deferred without counting an attempt.

Suspensions live in the spool's policy database, so they survive restarts and
``mta policy suspend|resume`` can change them from another process: the
daemon re-reads them at most ``REFRESH`` seconds apart. Warmup counters live
there too, incremented in the same commit that records the delivery.
"""

from __future__ import annotations

import datetime
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import lmdb

from mta.config import Config, LimitsConfig
from mta.mail.reply import Reply
from mta.observe import metrics
from mta.outbound.pool import Source, pools_from_config, sources_from_config
from mta.outbound.ready_queue import Busy, ReadyQueue
from mta.outbound.routes import Route
from mta.outbound.smtp_client import Deliverer
from mta.policy.limits import Limits, Site, effective, site_for
from mta.policy.rate import RateLimiter
from mta.policy.rules import DEFAULT_RULES, Action, Rule, compile_rule, match
from mta.policy.throttle import Throttles
from mta.policy.warmup import day_of, remaining
from mta.spool.store import Spool

log = logging.getLogger("mta.egress")

REFRESH = 1.0  # seconds between reads of suspensions changed by the admin tool
THROTTLES = "throttles"  # the spool policy-state name of the suspensions
OTHER = "other"  # the metric label of sites that are no configured provider


def warmup_counter(source: str, provider: str, day: datetime.date) -> str:
    return f"warmup\0{source}\0{provider}\0{day.isoformat()}"


def load_throttles(spool: Spool, txn: lmdb.Transaction) -> Throttles:
    raw = spool.state(txn, THROTTLES)
    return Throttles.from_json(raw.decode()) if raw else Throttles()


def save_throttles(spool: Spool, txn: lmdb.Transaction, throttles: Throttles) -> None:
    spool.set_state(txn, THROTTLES, throttles.to_json().encode())


@dataclass
class EgressPath:
    """One (source, site) in memory: deliveries under way and the rate budget."""

    label: str  # the site's provider, or "other": the metric label
    in_use: int = 0
    limiter: RateLimiter | None = None

    def has_slot(self, limits: Limits) -> bool:
        return limits.max_connections is None or self.in_use < limits.max_connections

    def rate_wait(self, limits: Limits, now: float) -> float:
        if limits.max_rate is None:
            return 0.0
        if self.limiter is None:
            self.limiter = RateLimiter(limits.max_rate)
        elif self.limiter.per_second != limits.max_rate:
            self.limiter.set_rate(limits.max_rate, now)  # throttled, or back to normal
        return self.limiter.wait(now)


@dataclass(frozen=True)
class Lease:
    """The right to deliver one job on one path now; give it back with ``release``."""

    source: Source
    site: Site
    limits: Limits
    path: EgressPath = field(repr=False)
    warmup_counter: str | None = None  # the day's count this delivery is reserved against


@dataclass(frozen=True)
class Wait:
    """No source of the pool may send to the site before ``until``."""

    until: float
    reason: str


class Egress:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.spool = spool
        self.clock = clock
        self.rng = rng or random.Random()
        self.sources: list[Source] = []
        self._deliverers: list[Deliverer] = []
        self.configure(config)
        self.paths: dict[tuple[str, str], EgressPath] = {}
        # Warmup reservations: leased but not yet counted in the spool, so that
        # deliveries under way cannot overshoot the day's cap.
        self._reserved: Counter[str] = Counter()
        self.throttles = Throttles()
        self._read_at = float("-inf")
        # A busy job looks again at least as often as suspensions are re-read.
        self.ready_queue = ReadyQueue(clock, recheck=REFRESH)

    def configure(self, config: Config) -> list[Deliverer]:
        """Take (new) sources, pools, limits and rules; the retired SMTP clients.

        A source whose address, EHLO name and TLS requirements are unchanged
        keeps its client and its pooled connections; deliveries under way
        finish on whatever they leased.
        """
        self.sources = sources_from_config(config, {s.name: s for s in self.sources})
        kept = {id(source.deliverer) for source in self.sources}
        self.pools = pools_from_config(config, self.sources)
        policy = config.policy
        self.providers = {p.name: p.mx_suffixes for p in policy.provider}
        self.default_limits = limits_from_config(policy.default)
        self.provider_limits = {p.name: limits_from_config(p) for p in policy.provider}
        self.domain_limits = {d: limits_from_config(lim) for d, lim in policy.domain.items()}
        self.rules = response_rules(config)
        retired = [d for d in self._deliverers if id(d) not in kept]
        self._deliverers = [source.deliverer for source in self.sources]
        return retired

    async def reload(self, config: Config) -> None:
        """Take a reloaded configuration and close the SMTP clients it retired."""
        for retired in self.configure(config):
            await retired.close()

    # --- where and how fast ---

    def site(self, domain: str, route: Route) -> Site:
        return site_for(domain, [host.name for host in route.hosts], self.providers)

    def limits(self, site: Site, domain: str) -> Limits:
        return effective(
            self.default_limits, self.provider_limits, self.domain_limits, site, domain
        )

    async def lease(self, pool: str, site: Site, domain: str) -> Lease | Wait:
        """A path to send on now (waiting for a slot or the rate), or when to come back."""
        return await self.ready_queue.wait(lambda now: self._try_lease(pool, site, domain, now))

    def _try_lease(self, pool: str, site: Site, domain: str, now: float) -> Lease | Wait | Busy:
        self._refresh(now)
        usable, waits = self._usable(pool, site, domain, now)
        if not usable:
            # Before a job waits for hours, make sure an operator has not
            # just resumed the path (`mta policy resume`, then a flush).
            self._refresh(now, force=True)
            usable, waits = self._usable(pool, site, domain, now)
        if not usable:
            until, reason = min(waits)
            return Wait(until, reason)
        ready = [u for u in usable if u[2].has_slot(u[3]) and u[2].rate_wait(u[3], now) == 0]
        if ready:
            source, _, path, limits = self._pick(ready)
            return self._take(source, site, path, limits, now)
        return Busy(
            min(
                (u[2].rate_wait(u[3], now) for u in usable if u[2].has_slot(u[3])),
                default=REFRESH,
            )
        )

    def release(self, lease: Lease) -> None:
        lease.path.in_use -= 1
        self._gauge(lease)
        self.ready_queue.wake()

    def _usable(
        self, pool: str, site: Site, domain: str, now: float
    ) -> tuple[list[tuple[Source, int, EgressPath, Limits]], list[tuple[float, str]]]:
        usable: list[tuple[Source, int, EgressPath, Limits]] = []
        waits: list[tuple[float, str]] = []
        base = self.limits(site, domain)
        for source, weight in self.pools.get(pool) or self.pools[""]:
            key = (source.name, site.name)
            restriction = self.throttles.state(key, now)
            if restriction.suspended_until > now:
                reason = f"{source.name} to {site.name} suspended ({restriction.reason})"
                waits.append((restriction.suspended_until, reason))
                continue
            left = self._warmup_left(source, site, now)
            if left is not None and left <= 0:
                tomorrow = datetime.datetime.combine(
                    day_of(now) + datetime.timedelta(days=1), datetime.time(), datetime.UTC
                ).timestamp()
                waits.append((tomorrow, f"{source.name} reached its warmup cap for {site.name}"))
                continue
            limits = base.scaled(restriction.factor) if restriction.factor < 1 else base
            path = self.paths.setdefault(key, EgressPath(site.provider or OTHER))
            usable.append((source, weight, path, limits))
        return usable, waits

    def _pick(
        self, ready: Sequence[tuple[Source, int, EgressPath, Limits]]
    ) -> tuple[Source, int, EgressPath, Limits]:
        return self.rng.choices(list(ready), weights=[weight for _, weight, _, _ in ready])[0]

    def _take(
        self, source: Source, site: Site, path: EgressPath, limits: Limits, now: float
    ) -> Lease:
        path.in_use += 1
        if path.limiter is not None:
            path.limiter.take(now)
        counter = None
        if source.warmup is not None:
            counter = warmup_counter(source.name, site.provider or OTHER, day_of(now))
            self._reserved[counter] += 1
        lease = Lease(source, site, limits, path, counter)
        self._gauge(lease)
        return lease

    def _gauge(self, lease: Lease) -> None:
        label = lease.path.label
        in_use = sum(
            path.in_use
            for (source, _), path in self.paths.items()
            if source == lease.source.name and path.label == label
        )
        metrics.EGRESS_CONNECTIONS.labels(lease.source.name, label).set(in_use)

    # --- warmup ---

    def _warmup_left(self, source: Source, site: Site, now: float) -> int | None:
        if source.warmup is None:
            return None
        provider = site.provider or OTHER
        day = day_of(now)
        counter = warmup_counter(source.name, provider, day)
        with self.spool.read() as txn:
            sent = self.spool.counter(txn, counter)
        left = remaining(source.warmup, day, sent + self._reserved[counter])
        if left is not None:
            metrics.WARMUP_REMAINING.labels(source.name, provider).set(left)
        return left

    def count_sent(self, txn: lmdb.Transaction, lease: Lease, delivered: int) -> None:
        """In the delivery's commit: add to the source's warmup count for the provider."""
        if lease.warmup_counter is not None and delivered:
            self.spool.add_to_counter(txn, lease.warmup_counter, delivered)

    def settle(self, lease: Lease) -> None:
        """After the delivery's commit: its warmup reservation is counted, or void."""
        if lease.warmup_counter is not None:
            self._reserved[lease.warmup_counter] -= 1
            if self._reserved[lease.warmup_counter] <= 0:
                del self._reserved[lease.warmup_counter]

    # --- reacting to replies ---

    def react(self, lease: Lease, replies: Mapping[str, Reply]) -> list[Rule]:
        """Apply the response rules to what the site answered; the rules that acted."""
        acted: dict[str, Rule] = {}
        now = self.clock()
        for reply in {str(reply): reply for reply in replies.values()}.values():
            rule = match(self.rules, reply)
            if rule is None or rule.action is Action.NONE or rule.name in acted:
                continue
            acted[rule.name] = rule
            key = (lease.source.name, lease.site.name)
            if rule.action is Action.SUSPEND:
                self.throttles.suspend(key, now + rule.duration, rule.name)
            else:
                self.throttles.throttle(key, rule.factor, now + rule.duration, rule.name)
            metrics.THROTTLE_EVENTS.labels(rule.name).inc()
            log.warning(
                "%s %s to %s for %.0fs after %s: %s",
                rule.action.value,
                lease.source.name,
                lease.site.name,
                rule.duration,
                rule.name,
                reply,
            )
        return list(acted.values())

    def persist(self, txn: lmdb.Transaction, rules: Sequence[Rule], lease: Lease) -> None:
        """Merge what ``react`` decided into the stored suspensions (in the delivery's commit)."""
        if not rules:
            return
        stored = load_throttles(self.spool, txn)
        key = (lease.source.name, lease.site.name)
        state = self.throttles.state(key, self.clock())
        if state.suspended_until:
            stored.suspend(key, state.suspended_until, state.reason)
        if state.throttled_until:
            stored.throttle(key, state.factor, state.throttled_until, state.reason)
        save_throttles(self.spool, txn, stored)

    def _refresh(self, now: float, force: bool = False) -> None:
        """Pick up suspensions the admin tool (or another worker) changed, at most
        every REFRESH seconds unless ``force``."""
        if not force and now - self._read_at < REFRESH:
            return
        self._read_at = now
        with self.spool.read() as txn:
            self.throttles = load_throttles(self.spool, txn)
        metrics.SUSPENSIONS_ACTIVE.set(
            sum(1 for r in self.throttles.active(now).values() if r.suspended_until > now)
        )

    async def close(self) -> None:
        for deliverer in self._deliverers:
            await deliverer.close()


def response_rules(config: Config) -> tuple[Rule, ...]:
    """The configured rules, then the shipped ones (unless turned off)."""
    configured = [
        compile_rule(r.name, r.pattern, r.classification, r.action, r.duration, r.factor)
        for r in config.policy.rule
    ]
    return (*configured, *(DEFAULT_RULES if config.policy.default_rules else ()))


def limits_from_config(config: LimitsConfig) -> Limits:
    return Limits(
        max_connections=config.max_connections,
        max_messages_per_connection=config.max_messages_per_connection,
        max_rate=config.max_rate,
        max_recipients=config.max_recipients,
    )
