"""Egress: which source address sends a job to a site, and when.

A *site* is where mail goes as the receiving provider sees it: all domains
whose MX hosts belong to one provider share one site ("gmail"), any other
domain is its own site. A *path* is a (source, site) pair, and the traffic
policy applies per path:

- connections: at most ``max_connections`` connections open at once on a
  path, idle pooled ones included (a receiver counts them);
- rate: messages leave a path no faster than ``max_rate``, evenly spaced;
  both held across the node's workers, or the fleet's nodes, by the shared
  limits (mta.cluster.limits);
- warmup: a source on a warmup plan sends each provider at most that day's
  cap, counted per recipient across the node's workers (or the fleet) by the
  shared limits; past it, the pool's other sources carry the traffic;
- suspension and throttling: a response rule (mta.policy.rules) or an
  operator can suspend a path, or scale its limits down, for a while.

``lease`` picks a source of the message's pool for the site: one that is not
suspended or capped, preferring one with a free connection slot and rate
budget (by the pool's weights). When every usable path is busy the job waits
in memory in the ready queue (mta.outbound.ready_queue), transactional jobs
ahead of bulk ones, without a delivery slot of the scheduler; when no source
may send at all it answers ``Wait`` with the time the job should come back,
and the job is deferred without counting an attempt. The connection and rate
limits are the shared limits' alone (a lease is admitted by them in one
decision), so neither the order of a line nor the slots change them.

Suspensions live in the spool's policy database, so they survive restarts and
every worker and ``mta policy suspend|resume`` share them: each lease looks
at them (one small record, parsed only when it changed), so a change is in
force from the next lease of every worker on. A suspension a reply calls for
is stored at once, in a commit of its own, before its delivery gives the
lease back; deliveries already under way on the path finish (at most its
connections). Warmup counts live there too, incremented in the same
commit that records the delivery; a lease reserves the recipients it may
send under the day's cap (``Reservation``) until that commit is made. With
``[cluster] redis`` every suspension, throttle and resume is also told to the
other nodes, and one process per node applies theirs (``follow_fleet``; mta.cluster.throttle_log).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import random
import time
import zlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace

import lmdb

from mta.cluster.limits import Holding, Reservation, SharedLimits, shared_limits
from mta.cluster.throttle_log import Decision
from mta.config import Config
from mta.mail.reply import Reply
from mta.observe import metrics
from mta.outbound import warmup_counts
from mta.outbound.pool import Source, TlsOutcome, pools_from_config, sources_from_config
from mta.outbound.ready_queue import Busy, ReadyQueue
from mta.outbound.routes import Route
from mta.outbound.shaping import Shaping
from mta.outbound.smtp_client import Deliverer, Slot
from mta.policy.admission import Ask, Refused, Warmup
from mta.policy.limits import OTHER, Limits, Site, site_for
from mta.policy.rules import DEFAULT_RULES, Action, Rule, Scope, match
from mta.policy.throttle import EVERY_SOURCE, Restriction, Throttles, describe, domain_key
from mta.policy.warmup import day_of
from mta.spool.store import Spool
from mta.spool.throttles import THROTTLES, load_throttles, parse_throttles, save_throttles

log = logging.getLogger("mta.egress")

REFRESH = 1.0  # seconds between updates of the suspensions gauge
FOLLOW_SECONDS = 1.0  # how often the fleet's suspension decisions are read
FLEET_CURSOR = "fleet-decisions"  # the spool policy-state name of where they were read to
SLOT_POLL = 0.05  # how often a line's first job looks for a slot freed elsewhere
REDIS_LOOKERS = 4  # jobs of a line that may ask Redis at once (mta.outbound.ready_queue)
# Classifications of a reply that hold a source's warmup plan back for the day.
REPUTATION = frozenset({"reputation", "spam_block"})
SITES_CACHED = 100_000  # (domain, MX hosts) -> site answers kept; then the cache starts over


@dataclass
class EgressPath:
    """One (source, site) as this process sees it: its deliveries under way, for the gauge."""

    label: str  # the site's provider, or "other": the metric label
    in_use: int = 0


def path_name(source: str, site: str) -> str:
    """The path's name in the shared limit state (mta.cluster)."""
    return f"{source}>{site}"


@dataclass(frozen=True)
class Stream:
    """Whose mail a job is, as a receiver sees it: what a rule may penalise besides
    the path, and which of the pool's sources the mail goes from while all is well."""

    sending_domain: str = ""  # the DKIM d=, else the envelope sender's domain
    key: str = ""  # the message's queue ID: its mail's place among the pool's sources


@dataclass(frozen=True)
class Lease:
    """The right to deliver one job on one path now; give it back with ``release``."""

    source: Source
    site: Site
    limits: Limits
    path: EgressPath = field(repr=False)
    slot: Slot = field(repr=False)  # its connection slot, and the connection holding it
    reservation: Reservation | None = None  # the recipients it may send under a warmup cap
    stream: Stream = Stream()

    def recipients(self, wanted: tuple[str, ...]) -> tuple[str, ...]:
        """Those of ``wanted`` this lease may send to: a warmup cap may leave fewer."""
        return wanted if self.reservation is None else wanted[: self.reservation.recipients]


# A usable source for a site: its pool weight, its path, its limits now, and
# what to ask the shared limits for.
Candidate = tuple[Source, int, EgressPath, Limits, Ask]


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
        shared: SharedLimits | None = None,
        on_tls: TlsOutcome = lambda address, policy, host, failure: None,
    ) -> None:
        self.spool = spool
        self.on_tls = on_tls
        self.shared = shared or shared_limits(config.cluster, str(spool.path), self._warmup_counts)
        self.clock = clock
        self.rng = rng or random.Random()
        self.sources: list[Source] = []
        self._releasing: set[asyncio.Task[None]] = set()  # slots on their way back
        self._deliverers: list[Deliverer] = []
        self.configure(config)
        self.paths: dict[tuple[str, str], EgressPath] = {}
        self.throttles = Throttles()
        self._stored: bytes | None = None  # the spool's record self.throttles was read from
        self._day_ends = -math.inf  # when the day of the last lease ends (UTC)
        self._gauged_at = float("-inf")
        # A busy job looks again at least this often.
        self.ready_queue = ReadyQueue(
            clock, recheck=REFRESH, lookers=REDIS_LOOKERS if self.shared.remote else 1
        )

    def configure(self, config: Config) -> list[Deliverer]:
        """Take (new) sources, pools, limits and rules; the retired SMTP clients.

        A source whose address, EHLO name and client settings are unchanged
        keeps its client and its pooled connections; deliveries under way
        finish on whatever they leased.
        """
        self.sources = sources_from_config(
            config, {s.name: s for s in self.sources}, self._slot_free, self.on_tls
        )
        kept = {id(source.deliverer) for source in self.sources}
        self.pools = pools_from_config(config, self.sources)
        self.shaping = Shaping(config)
        self.providers = self.shaping.suffixes
        self.domain_limits = self.shaping.domains
        self.rules = response_rules(config)
        self._full: set[str] = set()  # warmup counters whose cap was used up (at these caps)
        self._caps: dict[tuple[str, str, datetime.date], int | None] = {}  # the days' caps
        self._sites: dict[tuple[str, tuple[str, ...], bool], Site] = {}
        self._limits: dict[tuple[str, bool, str], Limits] = {}
        retired = [d for d in self._deliverers if id(d) not in kept]
        self._deliverers = [source.deliverer for source in self.sources]
        return retired

    async def reload(self, config: Config) -> None:
        """Take a reloaded configuration and close the SMTP clients it retired."""
        for retired in self.configure(config):
            await retired.close()

    # --- where and how fast ---

    def site(self, domain: str, route: Route) -> Site:
        """The route's site: a provider's by its MX names, else one per MX host set
        (a static route or a domain without MX is a site of its own)."""
        hosts = tuple(host.name for host in route.hosts)
        by_mx = not (route.static or route.implicit)
        key = (domain, hosts, by_mx)
        site = self._sites.get(key)
        if site is None:
            if len(self._sites) >= SITES_CACHED:
                self._sites.clear()
            site = self._sites[key] = site_for(
                domain, hosts, self.providers, group_by_mx=by_mx, static=route.static
            )
        return site

    def limits(self, site: Site, domain: str) -> Limits:
        key = (site.name, site.static, domain if domain in self.domain_limits else "")
        limits = self._limits.get(key)
        if limits is None:
            if len(self._limits) >= SITES_CACHED:
                self._limits.clear()
            limits = self._limits[key] = self.shaping.limits(site, domain)[0]
        return limits

    async def lease(
        self,
        pool: str,
        site: Site,
        domain: str,
        recipients: int = 1,
        stream: Stream = Stream(),
        priority: str = "bulk",
        still_wanted: Callable[[], bool] = lambda: True,
    ) -> Lease | Wait | None:
        """A path to send ``recipients`` of ``stream`` on now (waiting for a slot or the
        rate, behind the jobs of its ``priority`` and those before it), or when to come
        back; a warmup cap may let the lease take fewer. None: the job waited and is no
        longer ``still_wanted``."""
        line = (pool, site.name, domain if domain in self.domain_limits else "")
        return await self.ready_queue.wait(
            line,
            lambda now: self._try_lease(pool, site, domain, recipients, stream, now),
            priority,
            still_wanted,
        )

    async def _try_lease(
        self, pool: str, site: Site, domain: str, recipients: int, stream: Stream, now: float
    ) -> Lease | Wait | Busy:
        self._refresh(now)
        usable, waits = self._usable(pool, site, domain, recipients, stream, now)
        if not usable:
            until, reason = min(waits)
            return Wait(until, reason)
        candidates = self._preferred(usable)
        idle = self._idle_slot(candidates, domain)
        asks = [ask for *_, ask in candidates]
        if idle is not None:
            # Its connection holds a slot already: that source asks for the rate alone.
            asks[0] = replace(asks[0], takes_slot=False)
        admitted = await self.shared.admit(asks)
        if isinstance(admitted, Refused):
            self._note_full(site, [candidates[i] for i in admitted.full])
            if idle is not None and admitted.retry_in is None:
                # Its path is over its limit (a throttle, or this node's share
                # while Redis is away): the connection closes, freeing its slot.
                candidates[0][0].deliverer.retire(idle, "over the path's connection limit")
            elif idle is not None:
                self._give_back(candidates[0][0], idle)
            # A slot freed in this process wakes the line at once; one freed by
            # another worker or node is seen at the next look.
            return Busy(SLOT_POLL if admitted.retry_in is None else admitted.retry_in)
        source, _, path, limits, ask = candidates[admitted.index]
        if idle is not None and admitted.index == 0:
            slot = idle  # the reused connection
        else:
            if idle is not None:
                self._give_back(candidates[0][0], idle)
            slot = Slot(ask.path, admitted.holding)  # a holding of None: nothing to give back
        if ask.warmup is not None and admitted.left is not None:
            metrics.WARMUP_REMAINING.labels(source.name, site.provider or OTHER).set(admitted.left)
        path.in_use += 1
        lease = Lease(source, site, limits, path, slot, admitted.reservation, stream)
        self._gauge(lease)
        return lease

    def _idle_slot(self, candidates: list[Candidate], domain: str) -> Slot | None:
        """An open idle connection of a candidate, which then goes first (no handshake)."""
        for index, (source, *_, ask) in enumerate(candidates):
            slot = source.deliverer.take_idle(ask.path, domain)
            if slot is not None:
                candidates.insert(0, candidates.pop(index))
                return slot
        return None

    def release(self, lease: Lease) -> None:
        """The delivery is over: its connection waits in the pool, or its slot is free."""
        lease.path.in_use -= 1
        self._gauge(lease)
        self._give_back(lease.source, lease.slot)

    def _give_back(self, source: Source, slot: Slot) -> None:
        source.deliverer.give_back(slot)
        self.ready_queue.wake()  # an idle connection, or a free slot, for the next job

    def _slot_free(self, slot: Slot) -> None:
        """A connection closed (or never opened): its slot goes back to the shared limits."""
        if not isinstance(slot.holding, Holding):
            return
        task = asyncio.get_running_loop().create_task(self.shared.release(slot.holding))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)
        task.add_done_callback(lambda _: self.ready_queue.wake())

    def _usable(
        self, pool: str, site: Site, domain: str, recipients: int, stream: Stream, now: float
    ) -> tuple[list[Candidate], list[tuple[float, str]]]:
        usable: list[Candidate] = []
        waits: list[tuple[float, str]] = []
        base = self.limits(site, domain)
        sources = self.pools.get(pool) or self.pools[""]
        # A restriction on the sending domain, or on every source, holds on every path.
        shared = self._shared_restriction(stream, site, now)
        if shared is not None and shared[0].suspended_until > now:
            return [], [(shared[0].suspended_until, shared[1])]
        home = _home(sources, stream)
        for source, weight in sources:
            key = (source.name, site.name)
            restriction = self.throttles.state(key, now)
            if restriction.suspended_until > now:
                reason = f"{source.name} to {site.name} suspended ({restriction.reason})"
                if source is home and not restriction.failover:
                    # Moving its mail to the pool's other addresses would look like
                    # IP-hopping to the provider: it waits for its own address.
                    return [], [(restriction.suspended_until, reason)]
                waits.append((restriction.suspended_until, reason))
                continue
            warmup = self._warmup(source, site, recipients, now)
            if warmup is not None and warmup.counter in self._full:
                hour_end = (math.floor(now / 3600) + 1) * 3600.0
                waits.append(
                    (hour_end, f"{source.name} reached its warmup cap for {site.name} this hour")
                )
                continue
            factor = (
                restriction.factor if shared is None else min(restriction.factor, shared[0].factor)
            )
            limits = base.scaled(factor) if factor < 1 else base
            path = self.paths.setdefault(key, EgressPath(site.provider or OTHER))
            interval = None if limits.max_rate is None else 1.0 / limits.max_rate
            ask = Ask(path_name(*key), limits.max_connections, interval, warmup=warmup)
            usable.append((source, weight, path, limits, ask))
        return usable, waits

    def _preferred(self, usable: list[Candidate]) -> list[Candidate]:
        """The usable sources in a random order weighted by the pool: the first free one sends."""
        left, ordered = list(usable), []
        while left:
            chosen = self.rng.choices(left, weights=[c[1] for c in left])[0]
            left.remove(chosen)
            ordered.append(chosen)
        return ordered

    def _gauge(self, lease: Lease) -> None:
        label = lease.path.label
        in_use = sum(
            path.in_use
            for (source, _), path in self.paths.items()
            if source == lease.source.name and path.label == label
        )
        metrics.EGRESS_CONNECTIONS.labels(lease.source.name, label).set(in_use)

    # --- warmup ---

    def _shared_restriction(
        self, stream: Stream, site: Site, now: float
    ) -> tuple[Restriction, str] | None:
        """What the rules put on the stream's sending domain or on every source of the
        site, with why; None when nothing is."""
        found: list[tuple[Restriction, str]] = []
        senders = [EVERY_SOURCE] + (
            [domain_key(stream.sending_domain)] if stream.sending_domain else []
        )
        for sender in senders:
            restriction = self.throttles.state((sender, site.name), now)
            if restriction != Restriction():
                reason = f"{describe(sender)} to {site.name} ({restriction.reason})"
                found.append((restriction, reason))
        if not found:
            return None
        suspended = max(found, key=lambda item: item[0].suspended_until)
        if suspended[0].suspended_until > now:
            return suspended
        return min(found, key=lambda item: item[0].factor)

    def _warmup(self, source: Source, site: Site, recipients: int, now: float) -> Warmup | None:
        """This hour's share of the day's cap ``source`` counts against for the site's
        provider; None: no cap."""
        if source.warmup is None:
            return None
        provider = site.provider or OTHER
        day = day_of(now)
        key = (source.name, provider, day)
        if key not in self._caps:
            with self.spool.read() as txn:
                self._caps[key] = warmup_counts.plan_today(
                    self.spool, txn, source.warmup, source.name, provider, now
                ).cap
        cap = self._caps[key]
        if cap is None:
            return None
        counter, share = warmup_counts.hour_counter(source.name, provider, cap, now)
        return Warmup(counter, share, recipients)

    def _note_full(self, site: Site, full: list[Candidate]) -> None:
        """Caps that what was sent used up: those sources wait for the next hour
        (or a reload that raises the cap) without asking again."""
        for source, *_, ask in full:
            assert ask.warmup is not None
            self._full.add(ask.warmup.counter)
            metrics.WARMUP_REMAINING.labels(source.name, site.provider or OTHER).set(0)

    def _warmup_counts(self, names: Collection[str] | None = None) -> dict[str, int]:
        """This node's warmup counts: those ``names`` name, or today's of every source on
        a warmup plan, per provider and hour."""
        if names is None:
            day = day_of(self.clock())
            names = [
                name
                for source in self.sources
                if source.warmup is not None
                for provider in (*self.providers, OTHER)
                for name in warmup_counts.day_counters(source.name, provider, day)
            ]
        with self.spool.read() as txn:
            return {name: self.spool.counter(txn, name) for name in names}

    def count_sent(self, txn: lmdb.Transaction, lease: Lease, delivered: int) -> None:
        """In the delivery's commit: add to the source's warmup count for the provider."""
        if lease.reservation is not None and delivered:
            self.spool.add_to_counter(txn, lease.reservation.counter, delivered)

    def settle(self, lease: Lease) -> None:
        """After the delivery's commit: its warmup reservation is counted, or void."""
        if lease.reservation is not None:
            self.shared.settle(lease.reservation)

    # --- reacting to replies ---

    def react(self, lease: Lease, replies: Mapping[str, Reply]) -> list[Rule]:
        """Apply the response rules to what the site answered; the rules that acted.

        What they decide is in the spool when this returns (call it before
        giving the lease back): no later lease on the path, in this worker or
        another, can miss it.
        """
        acted: dict[str, Rule] = {}
        decided: list[Decision] = []
        now = self.clock()
        for reply in {str(reply): reply for reply in replies.values()}.values():
            rule = match(self.rules, reply)
            if rule is None or rule.action is Action.NONE or rule.name in acted:
                continue
            acted[rule.name] = rule
            sender = _penalised(rule, lease)
            decided.append(
                Decision(
                    "suspend" if rule.action is Action.SUSPEND else "throttle",
                    sender,
                    lease.site.name,
                    now + rule.duration,
                    rule.factor if rule.action is Action.THROTTLE else 1.0,
                    rule.name,
                    failover=rule.failover,
                    classification=rule.classification,
                    at=now,
                )
            )
            metrics.THROTTLE_EVENTS.labels(rule.name).inc()
            log.warning(
                "%s %s to %s for %.0fs after %s: %s",
                rule.action.value,
                describe(sender),
                lease.site.name,
                rule.duration,
                rule.name,
                reply,
            )
        if decided:
            self._store(decided, now)
            self.shared.tell(decided)
        return list(acted.values())

    def _store(self, decided: list[Decision], now: float, cursor: str | None = None) -> None:
        """Make ``decided`` in the spool's suspensions in a commit of its own, now: the
        delivery's commit comes later, after jobs waiting for the path have leased.
        A resume makes the jobs it held due at once; ``cursor``: the fleet's
        decisions are read up to there (mta.cluster.throttle_log)."""
        for decision in decided:
            decision.apply(self.throttles)  # in force here even if the spool cannot take it
        try:
            with self.spool.write() as txn:
                stored = load_throttles(self.spool, txn)
                for decision in decided:
                    for end in decision.apply(stored):
                        if now < end < math.inf:
                            self.spool.make_due(txn, end, now)
                raw = save_throttles(self.spool, txn, stored, now)
                self._hold_warmup(txn, decided)
                if cursor is not None:
                    self.spool.set_state(txn, FLEET_CURSOR, cursor.encode())
        except lmdb.Error as error:
            log.error("suspension not stored, in force in this worker only: %s", error)
            return
        self.throttles, self._stored = stored, raw

    def _hold_warmup(self, txn: lmdb.Transaction, decided: list[Decision]) -> None:
        """A day a provider held a source back for its reputation does not count towards
        the source's warmup plan."""
        names = [source.name for source in self.sources]
        for decision in decided:
            if decision.action == "resume" or decision.classification not in REPUTATION:
                continue
            if decision.site not in self.providers:
                continue  # a single domain's word is no provider's view of the source
            held = names if decision.source == EVERY_SOURCE else [decision.source]
            day = day_of(decision.until if decision.at is None else decision.at)
            warmup_counts.hold(
                self.spool, txn, [(n, decision.site) for n in held if n in names], day
            )

    async def follow_fleet(self) -> None:
        """Apply the fleet's suspensions, throttles and resumes to the spool, every
        second, until cancelled; one process per node does it."""
        while True:
            await asyncio.sleep(FOLLOW_SECONDS)
            with self.spool.read() as txn:
                cursor = (self.spool.state(txn, FLEET_CURSOR) or b"0-0").decode()
            read = await self.shared.read_decisions(cursor)
            if read is not None and read[1] != cursor:
                self._store(read[0], self.clock(), cursor=read[1])

    def _refresh(self, now: float) -> None:
        """Take the spool's suspensions if they changed since the last look (another
        worker's reply, the admin tool), so they are in force from this lease on."""
        with self.spool.read() as txn:
            raw = self.spool.state(txn, THROTTLES)
        if raw != self._stored:
            self.throttles, self._stored = parse_throttles(raw), raw
        self._new_day(now)
        if now - self._gauged_at >= REFRESH:
            self._gauged_at = now
            metrics.SUSPENSIONS_ACTIVE.set(
                sum(1 for r in self.throttles.active(now).values() if r.suspended_until > now)
            )

    def _new_day(self, now: float) -> None:
        """At the first lease of a day: forget the days' caps worked out so far (held days
        may change the new day's), and the spool's old warmup counts."""
        if now < self._day_ends:  # one comparison per lease, not a date conversion
            return
        today = day_of(now)
        self._day_ends = datetime.datetime.combine(
            today + datetime.timedelta(days=1), datetime.time(), datetime.UTC
        ).timestamp()
        self._caps.clear()
        self._full.clear()
        if any(source.warmup is not None for source in self.sources):
            with self.spool.write() as txn:
                warmup_counts.forget_old(self.spool, txn, today)

    async def close(self) -> None:
        for deliverer in self._deliverers:
            await deliverer.close()
        while self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
        await self.shared.close()


def _penalised(rule: Rule, lease: Lease) -> str:
    """Whom a rule's action falls on: the sender part of the restriction's key."""
    if rule.scope is Scope.DOMAIN and lease.stream.sending_domain:
        return domain_key(lease.stream.sending_domain)
    if rule.scope is Scope.SITE:
        return EVERY_SOURCE
    return lease.source.name


def _home(sources: list[tuple[Source, int]], stream: Stream) -> Source:
    """The source the stream's mail goes from while all is well: a weighted choice that
    is the same for the message on every worker, node and attempt."""
    point = zlib.crc32(stream.key.encode()) % sum(weight for _, weight in sources)
    for source, weight in sources:
        if point < weight:
            return source
        point -= weight
    raise AssertionError("a point below the weights' sum falls on a source")


def response_rules(config: Config) -> tuple[Rule, ...]:
    """The configured rules, then the shipped ones (unless turned off)."""
    configured = [rule.compile() for rule in config.policy.rule]
    return (*configured, *(DEFAULT_RULES if config.policy.default_rules else ()))
