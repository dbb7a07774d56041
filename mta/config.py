"""The configuration file: TOML in, frozen dataclasses out, or one clear error.

Every section is a dataclass whose fields say the TOML type they accept and,
where the raw value needs it, a parser that turns it into what the code uses
(``"127.0.0.1:2525"`` becomes ``HostPort("127.0.0.1", 2525)``). One generic
loader walks the file against those dataclasses, so an unknown key, a wrong
type or a bad value is reported the same way everywhere, naming the key:

    etc/mta.toml: [server] max_recipients: expected an integer, got "many"

Relative paths in the file are relative to the working directory the daemon
is started in (``make run`` and the systemd unit both start it in the
project directory).
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import os
import re
import socket
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mta.mail.address import parse_ip
from mta.mail.domain import lowercase_name
from mta.policy.providers import SHIPPED
from mta.policy.rate import parse_rate
from mta.policy.rules import Rule, compile_rule
from mta.policy.warmup import PRESETS, WarmupPlan, preset_plan

DEFAULT_PATH = "etc/mta.toml"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """The configuration cannot be used; str() is one sentence naming the key."""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# --- value parsers: raw TOML value -> value the code uses; ValueError = bad value ---


def parse_host_port(text: str) -> HostPort:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f'expected "host:port", got "{text}"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f'write an IPv6 address in brackets, as "[::1]:25"; got "{text}"')
    if not host:
        raise ValueError(f'expected "host:port", got "{text}"')
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError(f"port {number} is out of range 1-65535")
    return HostPort(host, number)


def parse_network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f'"{text}" is not a network such as "10.0.0.0/8"') from None


def positive(number: Any) -> Any:
    if not number > 0:  # also refuses NaN
        raise ValueError(f"must be greater than 0, got {number}")
    return number


def not_negative(number: Any) -> Any:
    if not number >= 0:  # also refuses NaN
        raise ValueError(f"must be 0 or more, got {number}")
    return number


def non_empty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def lowercase_domain(text: str) -> str:
    name = lowercase_name(text)
    if not name or " " in name or "@" in name:
        raise ValueError(f'"{text}" is not a domain name')
    return name


def one_of(*choices: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text not in choices:
            raise ValueError(f'expected one of {", ".join(choices)}; got "{text}"')
        return text

    return check


# --- field declaration ---

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
_PLURAL_NAMES = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}


def setting(
    kind: type,
    default: Any = MISSING,
    parse: Callable[[Any], Any] | None = None,
    many: bool = False,
    table: bool = False,
) -> Any:
    """A config key: its TOML type (a list of them when ``many``, a table of
    name = value when ``table``), its parser, and its default, given already
    parsed (``None`` for optional keys)."""
    meta = {"kind": kind, "parse": parse, "many": many, "table": table}
    if isinstance(default, list | tuple):
        frozen = tuple(default)
        return field(default_factory=lambda: frozen, metadata=meta)
    if isinstance(default, dict):
        return field(default_factory=lambda: MappingProxyType(default), metadata=meta)
    return field(default=default, metadata=meta)


# --- sections ---


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = setting(str, socket.gethostname(), parse=non_empty)
    listen: tuple[HostPort, ...] = setting(
        str, [HostPort("127.0.0.1", 2525)], parse=parse_host_port, many=True
    )
    relay_networks: tuple[IPNetwork, ...] = setting(
        str,
        [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")],
        parse=parse_network,
        many=True,
    )
    max_message_size: int = setting(int, 26_214_400, parse=positive)
    max_recipients: int = setting(int, 1000, parse=positive)
    max_connections: int = setting(int, 1000, parse=positive)
    max_connections_per_ip: int = setting(int, 100, parse=positive)
    idle_timeout: float = setting(float, 300.0, parse=positive)
    shutdown_timeout: float = setting(float, 30.0, parse=not_negative)
    # Inflow control (mta.policy.inflow): untried jobs before MAIL FROM waits;
    # 0 turns it off. The default is Postfix's active queue size.
    inflow_backlog: int = setting(int, 20_000, parse=not_negative)
    inflow_max_delay: float = setting(float, 1.0, parse=not_negative)
    # Error replies a session may get without a message accepted; then 421 and
    # close (Postfix's smtpd_hard_error_limit, same default).
    hard_error_limit: int = setting(int, 20, parse=positive)
    tls_cert: str | None = setting(str, None, parse=non_empty)
    tls_key: str | None = setting(str, None, parse=non_empty)
    users_file: str | None = setting(str, None, parse=non_empty)
    # One per core: more workers than cores did not help (docs/benchmarks.md).
    workers: int = setting(int, os.cpu_count() or 1, parse=positive)

    def __post_init__(self) -> None:
        if not self.listen:
            raise ValueError("listen: give at least one host:port")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.users_file and not self.tls_cert:
            raise ValueError("users_file needs tls_cert and tls_key: AUTH is only offered over TLS")


@dataclass(frozen=True)
class SpoolConfig:
    path: str = setting(str, "var/spool", parse=non_empty)
    max_size: int = setting(int, 10 * 2**30, parse=positive)
    min_free_disk: int = setting(int, 256 * 2**20, parse=not_negative)


@dataclass(frozen=True)
class MetricsConfig:
    listen: HostPort = setting(str, HostPort("127.0.0.1", 9125), parse=parse_host_port)


@dataclass(frozen=True)
class LogConfig:
    level: str = setting(str, "info", parse=one_of("debug", "info", "warning", "error"))
    format: str = setting(str, "text", parse=one_of("text", "json"))


@dataclass(frozen=True)
class DeliveryConfig:
    nameservers: tuple[HostPort, ...] = setting(str, [], parse=parse_host_port, many=True)
    smtp_port: int = setting(int, 25, parse=positive)
    allow_private_mx: bool = setting(bool, False)
    routes: Mapping[str, HostPort] = setting(str, {}, parse=parse_host_port, table=True)
    # Deprecated: each domain listed gets "encrypt", as in tls_policy (which wins).
    require_tls: tuple[str, ...] = setting(str, [], parse=lowercase_domain, many=True)
    # Outbound TLS levels (mta.policy.tls); "dane" is not among them: only DNS says it.
    _LEVELS = ("none", "may", "encrypt", "verify")
    tls_level: str = setting(str, "may", parse=one_of(*_LEVELS))
    tls_policy: Mapping[str, str] = setting(str, {}, parse=one_of(*_LEVELS), table=True)
    ca_file: str | None = setting(str, None, parse=non_empty)  # None: the system's store
    # A domain's own word on TLS: its MTA-STS policy (fetched over HTTPS from this
    # port) and, through resolvers that validate DNSSEC, its DANE TLSA records.
    mta_sts: bool = setting(bool, True)
    mta_sts_port: int = setting(int, 443, parse=positive)
    dnssec_nameservers: tuple[HostPort, ...] = setting(str, [], parse=parse_host_port, many=True)
    max_concurrent: int = setting(int, 100, parse=positive)
    max_concurrent_per_domain: int = setting(int, 20, parse=positive)
    connect_timeout: float = setting(float, 30.0, parse=positive)
    command_timeout: float = setting(float, 300.0, parse=positive)
    max_messages_per_connection: int = setting(int, 100, parse=positive)
    connection_idle_timeout: float = setting(float, 5.0, parse=positive)
    retry_first: float = setting(float, 60.0, parse=positive)
    retry_factor: float = setting(float, 2.0, parse=positive)
    retry_max: float = setting(float, 3600.0, parse=positive)
    max_age: float = setting(float, 5 * 86400.0, parse=positive)

    def __post_init__(self) -> None:
        if self.retry_factor < 1:
            raise ValueError("retry_factor must be 1 or more: waits never shrink")
        if self.retry_max < self.retry_first:
            raise ValueError("retry_max must be at least retry_first")
        if self.ca_file is not None:
            # Loaded here so that a bad file fails check-config, a start and a reload alike.
            try:
                ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as error:
                why = getattr(error, "strerror", None) or str(error)
                raise ValueError(f"ca_file: cannot load {self.ca_file}: {why}") from None


def parse_date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f'expected a date such as "2026-11-25", got "{text}"') from None


def ip_address(text: str) -> str:
    ip = parse_ip(text)
    if ip is None:
        raise ValueError(f'"{text}" is not an IP address')
    return ip


def label_name(text: str) -> str:
    """A name that is also a Prometheus label value and a log token."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", text):
        raise ValueError(f'"{text}": use lower-case letters, digits, "-", "_" or "." (63 at most)')
    return text


def parse_rate_setting(text: str) -> float:
    return parse_rate(text)


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """How a warmup plan grows: a shipped preset, a schedule of daily caps, or a
    first day times a factor each day; unset: the "standard" preset."""

    plan: str | None = setting(str, None, parse=one_of(*PRESETS))
    schedule: tuple[int, ...] = setting(int, [], parse=positive, many=True)
    first_day: int | None = setting(int, None, parse=positive)
    factor: float | None = setting(float, None, parse=positive)
    until: int | None = setting(int, None, parse=positive)
    cap: int | None = setting(int, None, parse=positive)  # the daily cap never exceeds this

    def shape(self) -> tuple[str, ...]:
        """The keys that say how the plan grows (``cap`` applies to any)."""
        names = ("plan", "schedule", "first_day", "factor", "until")
        return tuple(name for name in names if getattr(self, name) not in (None, ()))

    def build(self, start: datetime.date) -> WarmupPlan:
        shape = self.shape()
        if "plan" in shape and len(shape) > 1:
            raise ValueError(f"plan: give a preset or {', '.join(shape[1:])}, not both")
        if "schedule" in shape and len(shape) > 1:
            raise ValueError(f"schedule: give a schedule or {', '.join(shape[1:])}, not both")
        if self.schedule:
            return WarmupPlan(start, cap=self.cap, schedule=self.schedule)
        if self.first_day is None and self.factor is None and self.until is None:
            return preset_plan(self.plan or "standard", start, cap=self.cap)
        return WarmupPlan(
            start,
            500 if self.first_day is None else self.first_day,
            2.0 if self.factor is None else self.factor,
            self.cap,
            1_000_000 if self.until is None else self.until,
        )


@dataclass(frozen=True, kw_only=True)
class ProviderPlanConfig(PlanConfig):
    """One provider's own plan for a source; what it leaves unset is the source's."""

    start: datetime.date | None = setting(str, None, parse=parse_date)


@dataclass(frozen=True, kw_only=True)
class WarmupConfig(PlanConfig):
    start: datetime.date = setting(str, parse=parse_date)
    provider: Mapping[str, ProviderPlanConfig] = setting(ProviderPlanConfig, {}, table=True)

    def plan_for(self, provider: str) -> WarmupPlan:
        """The plan with ``provider``: its own keys over the source's; one that says how
        the plan grows replaces the source's way of growing."""
        own = self.provider.get(provider)
        if own is None:
            return self.build(self.start)
        keys = {f.name: getattr(own if own.shape() else self, f.name) for f in fields(PlanConfig)}
        keys["cap"] = self.cap if own.cap is None else own.cap
        return PlanConfig(**keys).build(own.start or self.start)

    def __post_init__(self) -> None:
        # Each plan's own checks (factor >= 1, cap >= first_day, ...), at load time.
        self.build(self.start)
        for name in self.provider:
            try:
                self.plan_for(name)
            except ValueError as error:
                raise ValueError(f"provider.{name}: {error}") from None


@dataclass(frozen=True)
class SourceConfig:
    name: str = setting(str, parse=label_name)
    address: str = setting(str, parse=ip_address)
    ehlo: str | None = setting(str, None, parse=non_empty)
    warmup: WarmupConfig | None = setting(WarmupConfig, None)


@dataclass(frozen=True)
class PoolConfig:
    name: str = setting(str, parse=label_name)
    sources: tuple[str, ...] = setting(str, [], parse=label_name, many=True)
    weights: tuple[int, ...] = setting(int, [], parse=positive, many=True)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError(f"{self.name}: sources: give at least one source")
        if self.weights and len(self.weights) != len(self.sources):
            raise ValueError(f"{self.name}: weights: give one weight per source, or none")


@dataclass(frozen=True)
class EgressConfig:
    source: tuple[SourceConfig, ...] = setting(SourceConfig, [], many=True)
    pool: tuple[PoolConfig, ...] = setting(PoolConfig, [], many=True)
    pool_header: str = setting(str, "X-MTA-Pool", parse=non_empty)
    default_pool: str = setting(str, "default", parse=label_name)
    sender_pools: Mapping[str, str] = setting(str, {}, parse=label_name, table=True)

    def __post_init__(self) -> None:
        sources = [source.name for source in self.source]
        pools = [pool.name for pool in self.pool]
        for kind, names in (("source", sources), ("pool", pools)):
            for name in names:
                if names.count(name) > 1:
                    raise ValueError(f"{kind} {name} is defined twice")
        for pool in self.pool:
            for name in pool.sources:
                if name not in sources:
                    raise ValueError(f"pool {pool.name}: no [[egress.source]] named {name}")
        for name in {self.default_pool, *self.sender_pools.values()}:
            if self.pool and name not in pools:
                raise ValueError(f"no [[egress.pool]] named {name}")


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    max_connections: int | None = setting(int, None, parse=positive)
    max_messages_per_connection: int | None = setting(int, None, parse=positive)
    max_rate: float | None = setting(str, None, parse=parse_rate_setting)  # "10/s", "600/min"
    max_recipients: int | None = setting(int, None, parse=positive)


@dataclass(frozen=True, kw_only=True)
class ProviderConfig(LimitsConfig):
    name: str = setting(str, parse=label_name)
    # Replace a shipped provider's suffixes; a provider that does not ship needs them.
    mx_suffixes: tuple[str, ...] = setting(str, [], parse=lowercase_domain, many=True)


@dataclass(frozen=True)
class RuleConfig:
    name: str = setting(str, parse=label_name)
    pattern: str = setting(str, parse=non_empty)
    classification: str = setting(str, parse=non_empty)
    action: str = setting(str, "none", parse=one_of("none", "suspend", "throttle"))
    duration: float = setting(float, 0.0, parse=not_negative)
    factor: float = setting(float, 0.5, parse=positive)
    scope: str = setting(str, "source", parse=one_of("source", "domain", "site"))
    failover: bool = setting(bool, False)  # a suspension's mail may move to sibling sources

    def compile(self) -> Rule:
        return compile_rule(
            self.name,
            self.pattern,
            self.classification,
            self.action,
            self.duration,
            self.factor,
            self.scope,
            self.failover,
        )

    def __post_init__(self) -> None:
        self.compile()


@dataclass(frozen=True)
class PolicyConfig:
    default: LimitsConfig = setting(LimitsConfig, LimitsConfig())
    provider: tuple[ProviderConfig, ...] = setting(ProviderConfig, [], many=True)
    domain: Mapping[str, LimitsConfig] = setting(LimitsConfig, {}, table=True)
    rule: tuple[RuleConfig, ...] = setting(RuleConfig, [], many=True)  # before the defaults
    default_rules: bool = setting(bool, True)  # the shipped rules for major providers
    shipped_shaping: bool = setting(bool, True)  # the shipped providers' limits and a default

    def __post_init__(self) -> None:
        names = [provider.name for provider in self.provider]
        shipped = {provider.name for provider in SHIPPED} if self.shipped_shaping else set()
        for provider in self.provider:
            if names.count(provider.name) > 1:
                raise ValueError(f"provider {provider.name} is defined twice")
            if not provider.mx_suffixes and provider.name not in shipped:
                raise ValueError(
                    f"provider {provider.name}: mx_suffixes: give at least one, e.g. "
                    '".google.com" (only a shipped provider may leave them out)'
                )


def http_url(text: str) -> str:
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", text):
        raise ValueError(f'expected an http:// or https:// URL, got "{text}"')
    return text


@dataclass(frozen=True)
class EventsConfig:
    file: str | None = setting(str, None, parse=non_empty)  # JSON lines, rotated
    max_file_bytes: int = setting(int, 100 * 2**20, parse=positive)
    backups: int = setting(int, 5, parse=not_negative)
    webhook_url: str | None = setting(str, None, parse=http_url)
    webhook_batch: int = setting(int, 100, parse=positive)
    webhook_timeout: float = setting(float, 10.0, parse=positive)
    webhook_retry_max: float = setting(float, 300.0, parse=positive)


@dataclass(frozen=True)
class SuppressionConfig:
    action: str = setting(str, "reject", parse=one_of("reject", "drop"))
    # Unambiguous "no such user" bounces join the list, for the bounced mail's sender domain.
    add_hard_bounces: bool = setting(bool, True)
    # Seconds a bounce keeps its recipient suppressed: addresses get reused or come back.
    bounce_expiry: float = setting(float, 180 * 86400.0, parse=positive)


@dataclass(frozen=True)
class TlsReportConfig:
    # TLS-RPT (RFC 8460): a daily report of TLS outcomes to domains that ask for one.
    enabled: bool = setting(bool, False)
    organization: str = setting(str, "", parse=non_empty)
    sender: str = setting(str, "", parse=non_empty)  # the reports' envelope sender and From
    contact: str | None = setting(str, None, parse=non_empty)  # default: sender
    submitter: str | None = setting(str, None, parse=lowercase_domain)  # default: hostname

    def __post_init__(self) -> None:
        if self.enabled and not (self.organization and self.sender):
            raise ValueError("enabled: give organization and sender too")


PRIORITIES = ("transactional", "bulk")  # transactional mail goes first on every path


@dataclass(frozen=True)
class TenantConfig:
    # One application or customer sharing the MTA: who it is (an AUTH name, a
    # client network, an API token) and what it may use.
    name: str = setting(str, parse=label_name)
    sender_domains: tuple[str, ...] = setting(str, parse=lowercase_domain, many=True)
    pools: tuple[str, ...] = setting(str, [], parse=label_name, many=True)
    default_pool: str | None = setting(str, None, parse=label_name)
    priority: str = setting(str, "bulk", parse=one_of(*PRIORITIES))
    smtp_users: tuple[str, ...] = setting(str, [], parse=non_empty, many=True)
    relay_networks: tuple[IPNetwork, ...] = setting(str, [], parse=parse_network, many=True)

    def __post_init__(self) -> None:
        if not self.sender_domains:
            raise ValueError(f"{self.name}: sender_domains: give at least one domain")
        if self.default_pool is not None and self.default_pool not in self.pools:
            raise ValueError(f"{self.name}: default_pool {self.default_pool} is not in its pools")


@dataclass(frozen=True)
class HttpConfig:
    # The HTTP injection API (POST /api/inject/v1); None: not served.
    listen: HostPort | None = setting(str, None, parse=parse_host_port)
    tls_cert: str | None = setting(str, None, parse=non_empty)
    tls_key: str | None = setting(str, None, parse=non_empty)
    # The tenants' API tokens, hashed (`mta tenant token add NAME`).
    tokens_file: str = setting(str, "var/api-tokens", parse=non_empty)
    max_request_size: int = setting(int, 50 * 2**20, parse=positive)
    max_recipients: int = setting(int, 10_000, parse=positive)  # per request

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")


def redis_url(text: str) -> str:
    if not re.fullmatch(r"(rediss?://[^\s/]+(/[0-9]+)?|unix:///\S+)", text):
        raise ValueError(
            f'expected "redis://HOST:PORT/DB", "rediss://..." or "unix:///PATH", got "{text}"'
        )
    return text


def node_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", text):
        raise ValueError(f'a node name is 1 to 63 letters, digits, ".", "_" or "-", got "{text}"')
    return text


@dataclass(frozen=True)
class ClusterConfig:
    # Where the fleet's traffic-policy state lives; None: this node's workers
    # share it through a file beside the spool, and no other node sees it.
    redis: str | None = setting(str, None, parse=redis_url)
    node: str = setting(str, socket.gethostname().split(".")[0] or "node", parse=node_name)
    # A Redis answer slower than this counts as Redis away for that delivery.
    redis_timeout: float = setting(float, 0.01, parse=positive)


@dataclass(frozen=True)
class DkimConfig:
    domain: str = setting(str, parse=lowercase_domain)
    selector: str = setting(str, parse=non_empty)
    private_key: str = setting(str, parse=non_empty)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = setting(ServerConfig, ServerConfig())
    spool: SpoolConfig = setting(SpoolConfig, SpoolConfig())
    metrics: MetricsConfig = setting(MetricsConfig, MetricsConfig())
    log: LogConfig = setting(LogConfig, LogConfig())
    delivery: DeliveryConfig = setting(DeliveryConfig, DeliveryConfig())
    egress: EgressConfig = setting(EgressConfig, EgressConfig())
    policy: PolicyConfig = setting(PolicyConfig, PolicyConfig())
    events: EventsConfig = setting(EventsConfig, EventsConfig())
    suppression: SuppressionConfig = setting(SuppressionConfig, SuppressionConfig())
    tls_report: TlsReportConfig = setting(TlsReportConfig, TlsReportConfig())
    cluster: ClusterConfig = setting(ClusterConfig, ClusterConfig())
    http: HttpConfig = setting(HttpConfig, HttpConfig())
    tenant: tuple[TenantConfig, ...] = setting(TenantConfig, [], many=True)
    dkim: tuple[DkimConfig, ...] = setting(DkimConfig, [], many=True)

    def __post_init__(self) -> None:
        self._check_warmup_providers()
        self._check_tenants()
        seen: set[tuple[str, str]] = set()
        for key in self.dkim:
            if (key.domain, key.selector) in seen:
                raise ValueError(f"[[dkim]]: {key.domain} selector {key.selector} is listed twice")
            seen.add((key.domain, key.selector))

    def _check_tenants(self) -> None:
        """Each tenant has its own name and AUTH names, and uses configured pools."""
        pools = {pool.name for pool in self.egress.pool}
        names: set[str] = set()
        users: dict[str, str] = {}
        for tenant in self.tenant:
            if tenant.name in names:
                raise ValueError(f"[[tenant]] {tenant.name} is defined twice")
            names.add(tenant.name)
            for pool in tenant.pools:
                if pool not in pools:
                    raise ValueError(f"[[tenant]] {tenant.name}: no [[egress.pool]] named {pool}")
            for user in tenant.smtp_users:
                if user in users:
                    raise ValueError(
                        f"[[tenant]] {tenant.name}: smtp_users: {user} is also {users[user]}'s"
                    )
                users[user] = tenant.name

    def _check_warmup_providers(self) -> None:
        """A per-provider plan must name a provider, or it would never apply."""
        known = {p.name for p in self.policy.provider} | {"other"}
        if self.policy.shipped_shaping:
            known |= {p.name for p in SHIPPED}
        for source in self.egress.source:
            for name in source.warmup.provider if source.warmup else ():
                if name not in known:
                    raise ValueError(
                        f"[[egress.source]] {source.name}: warmup.provider.{name}: no provider "
                        f'of that name (shipped, [[policy.provider]] or "other")'
                    )


# --- loading ---


def load(path: str | Path) -> Config:
    """Read and validate the file at ``path``; raise ConfigError on any problem."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 at byte {error.start}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    try:
        return parse(document)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def parse(document: dict[str, Any]) -> Config:
    """Validate an already decoded TOML document."""
    config: Config = _build(Config, document, "")
    return config


def _build(cls: type, table: Any, where: str) -> Any:
    """An instance of the dataclass ``cls`` from a TOML table found at ``where``."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table of keys")
    _reject_unknown(table, [f.name for f in fields(cls)], where)
    values = {}
    for spec in fields(cls):
        if spec.name in table:
            values[spec.name] = _convert(spec.metadata, table[spec.name], where, spec.name)
        elif spec.default is MISSING and spec.default_factory is MISSING:
            raise ConfigError(f"{where}: required key {spec.name} is missing")
    try:
        return cls(**values)
    except ValueError as error:
        raise ConfigError(f"{where} {error}" if where else str(error)) from None


def _reject_unknown(table: dict[str, Any], known: list[str], where: str) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            place = f"{where} " if where else ""
            raise ConfigError(f"{place}unknown key {key}{hint}")


def _convert(meta: Any, raw: Any, where: str, name: str) -> Any:
    """The value of key ``name`` of the table at ``where``."""
    kind = meta["kind"]
    nested = isinstance(kind, type) and is_dataclass(kind)
    if meta["table"]:
        if not isinstance(raw, dict):
            what = "tables" if nested else _TYPE_NAMES[kind]
            raise ConfigError(f"{where} {name}: expected a table of name = {what}")
        return MappingProxyType(
            {
                key.lower(): _convert_one(
                    meta,
                    value,
                    _child(where, f"{name}.{key}") if nested else f"{where} {name}.{key}",
                )
                for key, value in raw.items()
            }
        )
    if meta["many"]:
        if not isinstance(raw, list):
            if nested:
                path = _child(where, name)[1:-1]
                raise ConfigError(f"{path}: write each entry as a [[{path}]] table")
            raise ConfigError(f"{where} {name}: expected a list of {_PLURAL_NAMES[kind]}")
        return tuple(
            _convert_one(
                meta, item, f"[{_child(where, name)}] #{number}" if nested else f"{where} {name}"
            )
            for number, item in enumerate(raw, 1)
        )
    return _convert_one(meta, raw, _child(where, name) if nested else f"{where} {name}".strip())


def _child(where: str, name: str) -> str:
    """Where a nested table is, as its TOML header says it: [server], [policy.default]."""
    if not where:
        return f"[{name}]"
    if where.startswith("[["):  # inside an entry of a list of tables
        return f"{where} {name}"
    return f"[{where[1:-1]}.{name}]"


def _convert_one(meta: Any, raw: Any, where: str) -> Any:
    kind = meta["kind"]
    if isinstance(kind, type) and is_dataclass(kind):
        return _build(kind, raw, where)
    # TOML integers are valid floats; booleans are never numbers.
    accepted = (int, float) if kind is float else (kind,)
    if isinstance(raw, bool) != (kind is bool) or not isinstance(raw, accepted):
        shown = f'"{raw}"' if isinstance(raw, str) else str(raw).lower()
        raise ConfigError(f"{where}: expected {_TYPE_NAMES[kind]}, got {shown}")
    value = kind(raw)
    if meta["parse"] is None:
        return value
    try:
        return meta["parse"](value)
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None
