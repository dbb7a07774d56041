"""`mta serve`: start the listeners, the spool writer and /metrics; stop cleanly.

The listeners: SMTP on ``[server] listen`` and, when ``[http] listen`` is
set, the HTTP injection API (mta.inbound.http_api) on it, both with the
same intake (mta.inbound.intake).

SIGTERM or SIGINT: stop listening, close idle sessions, let sessions in a
transaction and API requests under way finish (up to ``[server]
shutdown_timeout``), let the webhook finish the POST under way (events not
yet posted stay in the spool for the next start), commit what was handed to
the spool writer, exit 0.

With ``[server] workers`` above 1, `mta serve` is mta.node.workers' supervisor and
each worker process runs a ``Daemon`` with a ``WorkerRole``: it listens with
SO_REUSEPORT, delivers only the domains it owns (mta.node.ownership), leaves
/metrics to the supervisor, and only worker 0 posts to the webhook.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvloop

from mta.cluster import suppression_sync
from mta.cluster.local_limits import LocalLimits, local_limits_dir
from mta.config import Config, ConfigError, HostPort, ServerConfig, load
from mta.events.log import EventLog
from mta.events.webhook import Webhook
from mta.inbound.auth import Authenticator, UsersFileError, read_users
from mta.inbound.handler import Handler
from mta.inbound.intake import Intake
from mta.inbound.node_sessions import NodeSessions, node_sessions_dir
from mta.inbound.server import Session, Sessions
from mta.node.local_mail import LocalMail
from mta.node.ownership import Peers
from mta.observe import http, loop_lag, metrics
from mta.outbound.dispatcher import Attempter
from mta.outbound.egress import Egress
from mta.outbound.routes import Resolver
from mta.outbound.tls_policies import TlsPolicies
from mta.outbound.tls_report import TlsReports
from mta.policy.retry import RetrySchedule
from mta.policy.tls import Failure, TlsPolicy
from mta.policy.tls_report import Reporter
from mta.signing.keys import DkimKey, SigningError, load_key
from mta.signing.signer import Signer
from mta.spool.commit import GroupCommitter
from mta.spool.gauges import SpoolCollector
from mta.spool.ids import IdGenerator
from mta.spool.records import Message, jobs_for
from mta.spool.scheduled_queue import Scheduler
from mta.spool.store import Spool

if TYPE_CHECKING:
    from mta.inbound.http_api import InjectApi

log = logging.getLogger("mta")
TLS_REPORT_EVERY = 600.0  # seconds between looks for finished days to report (TLS-RPT)
TLS_REPORT_CHECK = 5.0  # how often the wall clock is read for that


class StartupError(Exception):
    """The daemon cannot start; str() says why in one sentence."""


@dataclass
class WorkerRole:
    """What makes a Daemon one worker among several (see mta.node.workers)."""

    peers: Peers
    ready_fd: int  # written to once the listeners are open

    @property
    def index(self) -> int:
        return self.peers.index

    def announce_ready(self) -> None:
        os.write(self.ready_fd, b"ready")
        os.close(self.ready_fd)


def serve(config: Config, path: str, role: WorkerRole | None = None) -> int:
    """Run the daemon with ``config``, read from ``path`` (read again on SIGHUP)."""

    async def main() -> int:
        return await Daemon(config, path, role).run()

    return uvloop.run(main())


def check(config: Config) -> int:
    """Everything `mta serve` loads besides the spool, so that a bad key, certificate,
    route or users file is one clear error before anything starts; the number of
    DKIM keys."""
    return len(Resources.load(config).keys)


@dataclass
class Resources:
    """What a configuration names beyond its own text, loaded and checked: built
    in one place so that starting, `check-config` and a reload fail alike."""

    keys: list[DkimKey]
    tls: ssl.SSLContext | None
    resolver: Resolver
    users: dict[str, str] | None  # None: AUTH is off
    api_tls: ssl.SSLContext | None  # the HTTP API's certificate; None: plain HTTP

    @classmethod
    def load(cls, config: Config) -> Resources:
        users_file = config.server.users_file
        return cls(
            keys=load_keys(config),
            tls=tls_context(config.server),
            resolver=resolver(config),
            users=read_users(users_file) if users_file else None,
            api_tls=server_tls(config.http.tls_cert, config.http.tls_key, "[http]"),
        )


def load_keys(config: Config) -> list[DkimKey]:
    return [load_key(k.domain, k.selector, k.private_key) for k in config.dkim]


def tls_context(server: ServerConfig) -> ssl.SSLContext | None:
    return server_tls(server.tls_cert, server.tls_key, "[server]")


def server_tls(cert: str | None, key: str | None, section: str) -> ssl.SSLContext | None:
    """A server's TLS context with the certificate and key of ``section``; None without."""
    if cert is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    load_certificate(context, cert, key, section)
    return context


def load_certificate(context: ssl.SSLContext, cert: str, key: str, section: str) -> None:
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ConfigError(
            f"{section} tls_cert/tls_key: cannot load {cert} and {key}: {reason}"
        ) from None


class Daemon:
    """The running MTA: its parts, built from one configuration, reloaded on SIGHUP."""

    def __init__(self, config: Config, path: str, role: WorkerRole | None = None) -> None:
        self.config, self.path, self.role = config, path, role
        self.peers = role.peers if role is not None else None
        resources = Resources.load(config)
        self.tls = resources.tls
        self.authenticator = Authenticator(resources.users) if resources.users is not None else None
        self.spool = Spool(config.spool.path, config.spool.max_size, config.spool.min_free_disk)
        self.committer = GroupCommitter(self.spool)
        self.events = event_log(config, self.spool)
        self.webhook = (
            Webhook(self.spool, self.committer, config.events)
            if config.events.webhook_url and (role is None or role.index == 0)
            else None
        )
        if self.webhook is not None:
            self.events.wake = self.webhook.wake
        self.sign_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dkim")
        signer = Signer(resources.keys)
        self.new_id = new_id = IdGenerator(node=config.cluster.node)  # the handler's and the API's
        if role is None:
            LocalLimits.clear(str(local_limits_dir(config.spool.path)))  # the last run's leases
            NodeSessions.clear(str(node_sessions_dir(config.spool.path)))  # and sessions
        # Connection counts and AUTH failures, shared by the node's workers.
        self.node_sessions = NodeSessions(str(node_sessions_dir(config.spool.path)))
        self.intake = Intake(
            config, self.spool, self.committer, signer, self.sign_pool, self.queued, self.events
        )
        # The node's own mail is signed by the intake, so with the keys of a reload too.
        local_mail = LocalMail(self.spool, self.committer, self.intake.sign, new_id, self.queued)
        self.tls_reports = tls_reports(config, self.spool, local_mail)
        self.egress = Egress(config, self.spool, on_tls=self.tls_session)
        self.scheduler = Scheduler(
            self.spool,
            lambda key: self.attempter(key),
            config.delivery.max_concurrent,
            config.delivery.max_concurrent_per_domain,
            owns=self.peers.owns if self.peers is not None else lambda domain: True,
        )
        self.attempter = Attempter(
            spool=self.spool,
            committer=self.committer,
            resolver=resources.resolver,
            egress=self.egress,
            signer=signer,
            sign_pool=self.sign_pool,
            new_id=new_id,
            schedule=retry_schedule(config),
            hostname=config.server.hostname,
            on_queued=self.queued,
            tls_policies=TlsPolicies(config, self.spool),
            suppression_config=config.suppression,
            events=self.events,
        )
        self.handler = Handler(
            config.server,
            self.spool,
            self.intake,
            new_id,
            suppression=config.suppression,
        )
        self.api: InjectApi | None = None
        if config.http.listen is not None:
            # Imported only here: aiohttp and Jinja2 cost every other start 0.15 s.
            from mta.inbound.http_api import InjectApi

            self.api = InjectApi(config, self.intake, new_id, resources.api_tls)
        self.sessions = Sessions(
            config.server.max_connections,
            config.server.max_connections_per_ip,
            auth_failures=self.node_sessions,
            counts=self.node_sessions,
        )
        self.stopping = asyncio.Event()
        self.key_count = len(resources.keys)

    def queued(self, message: Message) -> None:
        """A message was committed: its jobs go to our scheduler or their owners."""
        keys = [job.key for job in jobs_for(message)]
        self.scheduler.offer(keys)
        if self.peers is not None:
            self.peers.hand_over(keys)

    def new_session(self) -> Session:
        server = self.config.server  # read per connection, so a reload applies to new sessions
        return Session(
            self.handler,
            self.sessions,
            hostname=server.hostname,
            ident="ESMTP",
            data_size_limit=server.max_message_size,
            tls_context=self.tls,
            authenticator=self.authenticator,
            auth_require_tls=True,
            timeout=server.idle_timeout,
        )

    def not_ready(self) -> str | None:
        if self.stopping.is_set():
            return "stopping"
        with self.spool.read() as txn:
            return self.spool.room_problem(txn)

    async def run(self) -> int:
        config = self.config
        stop = handle_signals(on_reload=self.reload)
        try:
            listeners = await listen(
                self.new_session, config.server, reuse_port=self.role is not None
            )
            await self._start_api()
            if self.role is None:
                serve_metrics(config, self.spool, self.not_ready)
            loop = asyncio.get_running_loop()
            delivering = loop.create_task(self.scheduler.run())
            renewing = loop.create_task(self.egress.shared.run())
            watching = loop.create_task(loop_lag.watch())
            first = self.role is None or self.role.index == 0  # one per node shares the list
            syncer = suppression_sync.syncer(config.cluster, self.spool) if first else None
            sharing = loop.create_task(syncer.run()) if syncer is not None else None
            following = (
                loop.create_task(self.egress.follow_fleet())
                if config.cluster.redis and (self.role is None or self.role.index == 0)
                else None
            )
            posting = loop.create_task(self.webhook.run()) if self.webhook else None
            reporting = [
                loop.create_task(task)
                for task in self._tls_report_tasks(self.role is None or self.role.index == 0)
            ]
            if self.peers is not None:
                self.peers.listen(self.scheduler.offer)
            if self.role is None or self.role.index == 0:
                self._warn_orphan_events()
            if self.role is None:
                log.info(
                    "mta started: listening on %s, metrics on %s, spool %s, %d DKIM key(s)",
                    listening(config),
                    config.metrics.listen,
                    Path(config.spool.path).resolve(),
                    self.key_count,
                )
            else:
                log.info("worker %d started", self.role.index)
                self.role.announce_ready()
            await stop.wait()
            self.stopping.set()
            log.info("stopping: no new connections; finishing open transactions and deliveries")
            if self.webhook is not None:
                self.webhook.stop()  # after the POST under way; the rest waits in the spool
            for listener in listeners:
                listener.close()
            timeout = self.config.server.shutdown_timeout
            await asyncio.gather(self.sessions.drain(timeout), self._stop_api())
            await self.scheduler.stop(timeout)
            await delivering
            renewing.cancel()
            watching.cancel()
            if sharing is not None:
                sharing.cancel()
            if following is not None:
                following.cancel()
            for task in reporting:
                task.cancel()  # the counting task flushes once more
            await asyncio.gather(*reporting, return_exceptions=True)
            if posting is not None:
                await posting
        finally:
            if self.peers is not None:
                self.peers.close()
            await self.egress.close()
            self.committer.close()
            self.events.close()
            self.sign_pool.shutdown()
            self.spool.close()
            self.node_sessions.close()
        if self.role is None:
            log.info("mta stopped")
        else:
            log.info("worker %d stopped", self.role.index)
        return 0

    async def _start_api(self) -> None:
        if self.api is None:
            return
        try:
            await self.api.start(reuse_port=self.role is not None)
        except OSError as error:
            raise StartupError(
                f"cannot listen on {self.config.http.listen} (the HTTP API): {error.strerror}"
            ) from None

    async def _stop_api(self) -> None:
        if self.api is not None:
            await self.api.stop()

    def tls_session(
        self, address: str, policy: TlsPolicy, host: str, failure: Failure | None
    ) -> None:
        """How an outbound TLS session went: counted, and kept for TLS-RPT."""
        metrics.TLS_SESSIONS.labels(policy.level, policy.source, failure or "ok").inc()
        if self.tls_reports is not None:
            self.tls_reports.count(policy, host, address, failure, time.time())

    def _tls_report_tasks(self, sending: bool) -> list[Coroutine[Any, Any, None]]:
        """Every process counts; one per node sends the finished days' reports."""
        if self.tls_reports is None:
            return []
        return [self.tls_reports.run(), *([self._send_tls_reports()] if sending else [])]

    async def _send_tls_reports(self) -> None:
        """Look for finished days to report every TLS_REPORT_EVERY seconds of the wall
        clock (checked often, so a clock that steps is followed)."""
        assert self.tls_reports is not None
        looked = None
        while True:
            now = time.time()
            if looked != now // TLS_REPORT_EVERY:
                looked = now // TLS_REPORT_EVERY
                try:
                    await self.tls_reports.send_due(now)
                except Exception:  # a report is retried at the next look; delivery goes on
                    log.exception("sending TLS reports failed")
            await asyncio.sleep(TLS_REPORT_CHECK)

    async def reload(self) -> None:
        """SIGHUP: read the config file again and apply it without dropping a session.

        Everything is built first, so a config, key, route or users-file error
        leaves the running configuration untouched; then each part takes its own
        settings from the new configuration.
        """
        try:
            new = load(self.path)
            resources = Resources.load(new)
            schedule = retry_schedule(new)
            if self.api is not None and self.api.tls is not None and resources.api_tls:
                # The listener keeps its context: the renewed certificate goes into it,
                # before anything else changes (it was checked by Resources.load).
                cert, key = new.http.tls_cert, new.http.tls_key
                assert cert is not None and key is not None
                load_certificate(self.api.tls, cert, key, "[http]")
        except (ConfigError, SigningError, UsersFileError) as error:
            log.error("reload failed, the running configuration stays: %s", error)
            return
        self._warn_restart_only(new, resources)
        signer = Signer(resources.keys)
        self.config, self.tls, self.key_count = new, resources.tls, len(resources.keys)
        if self.authenticator is not None and resources.users is not None:
            self.authenticator.replace_users(resources.users)
        self.sessions.reload(new)
        self.intake.reload(new, signer)
        self.handler.reload(new)
        self._reload_api(new)
        self.attempter.reload(new, signer, resources.resolver, schedule)
        self.scheduler.reload(new)
        await self.egress.reload(new)
        log.info("reloaded %s: %d DKIM key(s)", self.path, self.key_count)

    def _reload_api(self, new: Config) -> None:
        """The API takes the new tenants and limits (its certificate: in reload)."""
        if self.api is not None:
            self.api.reload(new)

    def _warn_restart_only(self, new: Config, resources: Resources) -> None:
        """Log each change a reload cannot apply: these need a restart."""
        old = self.config
        for what, before, after in (
            ("[server] listen", old.server.listen, new.server.listen),
            ("[http] listen", old.http.listen, new.http.listen),
            (
                "HTTPS on or off ([http] tls_cert)",
                old.http.tls_cert is None,
                new.http.tls_cert is None,
            ),
            ("[spool]", old.spool, new.spool),
            ("[metrics] listen", old.metrics.listen, new.metrics.listen),
            ("[events]", old.events, new.events),
            ("[cluster]", old.cluster, new.cluster),
            ("[server] workers", old.server.workers, new.server.workers),
            (
                "AUTH on or off ([server] users_file)",
                self.authenticator is not None,
                resources.users is not None,
            ),
        ):
            if before != after:
                log.warning("reload: %s changed; it takes effect at the next restart", what)

    def _warn_orphan_events(self) -> None:
        if self.webhook is not None:
            return
        with self.spool.read() as txn:
            waiting = self.spool.event_count(txn)
        if waiting:
            log.warning(
                "%d delivery event(s) wait in the spool for a webhook; "
                "none is configured ([events] webhook_url)",
                waiting,
            )


def handle_signals(on_reload: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.Event:
    """From now on each SIGHUP runs ``on_reload``, and SIGTERM or SIGINT sets the
    event returned. Called first thing, so that a signal during startup is not
    the default action (death) but a reload, or a stop once started."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def reload() -> None:
        task = loop.create_task(on_reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    return stop


def event_log(config: Config, spool: Spool) -> EventLog:
    try:
        return EventLog(config.events, spool)
    except OSError as error:
        raise StartupError(
            f"cannot open the events file {config.events.file}: {error.strerror or error}"
        ) from None


def tls_reports(config: Config, spool: Spool, local_mail: LocalMail) -> TlsReports | None:
    """TLS-RPT, when ``[tls_report] enabled``."""
    settings = config.tls_report
    if not settings.enabled:
        return None
    reporter = Reporter(
        settings.organization,
        settings.contact or settings.sender,
        settings.submitter or config.server.hostname,
    )
    delivery = config.delivery
    return TlsReports(
        spool,
        reporter,
        settings.sender,
        local_mail.enqueue,
        [(ns.host, ns.port) for ns in delivery.nameservers] or None,
        allow_private=delivery.allow_private_mx,
        ca_file=delivery.ca_file,
    )


def resolver(config: Config) -> Resolver:
    delivery = config.delivery
    try:
        return Resolver(
            nameservers=[(ns.host, ns.port) for ns in delivery.nameservers] or None,
            smtp_port=delivery.smtp_port,
            allow_private=delivery.allow_private_mx,
            routes={domain: (hop.host, hop.port) for domain, hop in delivery.routes.items()},
        )
    except ValueError as error:  # no system resolver, or a route host that is no host
        raise ConfigError(f"[delivery] {error}") from None


def retry_schedule(config: Config) -> RetrySchedule:
    delivery = config.delivery
    return RetrySchedule(
        first=delivery.retry_first,
        factor=delivery.retry_factor,
        cap=delivery.retry_max,
        max_age=delivery.max_age,
    )


def serve_metrics(
    config: Config,
    spool: Spool,
    not_ready: http.Readiness,
    registry: http.CollectorRegistry = http.REGISTRY,
) -> None:
    try:
        http.serve(config.metrics.listen, not_ready, [SpoolCollector(spool)], registry)
    except OSError as error:
        raise StartupError(
            f"cannot serve metrics on {config.metrics.listen}: {error.strerror}"
        ) from None


def listening(config: Config) -> str:
    """Where the daemon listens, for its start line: SMTP, and the HTTP API if any."""
    smtp = " ".join(str(address) for address in config.server.listen)
    return smtp if config.http.listen is None else f"{smtp}, HTTP API on {config.http.listen}"


def every_address(config: Config) -> list[HostPort]:
    """Every address the daemon listens on for clients: SMTP's, and the API's."""
    api = [config.http.listen] if config.http.listen is not None else []
    return [*config.server.listen, *api]


async def listen(
    factory: Callable[[], asyncio.Protocol], server: ServerConfig, reuse_port: bool = False
) -> list[asyncio.Server]:
    return await listen_on(factory, server.listen, reuse_port)


async def listen_on(
    factory: Callable[[], asyncio.Protocol],
    addresses: Sequence[HostPort],
    reuse_port: bool = False,
) -> list[asyncio.Server]:
    loop = asyncio.get_running_loop()
    listeners = []
    for address in addresses:
        try:
            listeners.append(
                await loop.create_server(
                    factory, address.host, address.port, reuse_port=reuse_port or None
                )
            )
        except OSError as error:
            for listener in listeners:
                listener.close()
            raise StartupError(f"cannot listen on {address}: {error.strerror}") from None
    return listeners
