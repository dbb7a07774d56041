"""`mta serve`: start the listener, the spool writer and /metrics; stop cleanly.

SIGTERM or SIGINT: stop listening, close idle sessions, let sessions in a
transaction finish (up to ``[server] shutdown_timeout``), commit what was
handed to the spool writer, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import uvloop

from mta import metrics, signing
from mta.config import Config, ConfigError, ServerConfig
from mta.inbound.auth import Authenticator, read_users
from mta.inbound.handler import Handler
from mta.inbound.server import Session, Sessions
from mta.outbound.attempt import Attempter
from mta.outbound.egress import Egress
from mta.outbound.resolver import Resolver
from mta.outbound.scheduler import Scheduler
from mta.policy.retry import RetrySchedule
from mta.queue.commit import GroupCommitter
from mta.queue.ids import IdGenerator
from mta.queue.store import Spool

log = logging.getLogger("mta")


class StartupError(Exception):
    """The daemon cannot start; str() says why in one sentence."""


def serve(config: Config) -> int:
    return uvloop.run(_serve(config))


def load_keys(config: Config) -> list[signing.DkimKey]:
    return [signing.load_key(k.domain, k.selector, k.private_key) for k in config.dkim]


def tls_context(server: ServerConfig) -> ssl.SSLContext | None:
    if server.tls_cert is None or server.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(server.tls_cert, server.tls_key)
    except (OSError, ssl.SSLError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ConfigError(
            f"[server] tls_cert/tls_key: cannot load {server.tls_cert} and "
            f"{server.tls_key}: {reason}"
        ) from None
    return context


async def _serve(config: Config) -> int:
    server_config = config.server
    keys = load_keys(config)
    context = tls_context(server_config)
    routes = resolver(config)
    authenticator = (
        Authenticator(read_users(server_config.users_file)) if server_config.users_file else None
    )
    spool = Spool(config.spool.path, config.spool.max_size, config.spool.min_free_disk)
    committer = GroupCommitter(spool)
    sign_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dkim")
    signer, new_id = signing.Signer(keys), IdGenerator()
    egress = Egress(config, spool)
    scheduler = Scheduler(
        spool,
        lambda key: attempter(key),
        config.delivery.max_concurrent,
        config.delivery.max_concurrent_per_domain,
    )
    attempter = Attempter(
        spool=spool,
        committer=committer,
        resolver=routes,
        egress=egress,
        signer=signer,
        sign_pool=sign_pool,
        new_id=new_id,
        schedule=retry_schedule(config),
        hostname=server_config.hostname,
        on_queued=scheduler.wake,
    )
    handler = Handler(
        server_config, config.egress, spool, committer, signer, sign_pool, new_id, scheduler.wake
    )
    sessions = Sessions(server_config.max_connections, server_config.max_connections_per_ip)

    def new_session() -> Session:
        return Session(
            handler,
            sessions,
            hostname=server_config.hostname,
            ident="ESMTP",
            data_size_limit=server_config.max_message_size,
            tls_context=context,
            authenticator=authenticator,
            auth_require_tls=True,
            timeout=server_config.idle_timeout,
        )

    try:
        listeners = await _listen(new_session, server_config)
        stopping = asyncio.Event()

        def not_ready() -> str | None:
            if stopping.is_set():
                return "stopping"
            with spool.read() as txn:
                return spool.room_problem(txn)

        try:
            metrics.serve(config.metrics.listen, spool, not_ready)
        except OSError as error:
            raise StartupError(
                f"cannot serve metrics on {config.metrics.listen}: {error.strerror}"
            ) from None
        delivering = asyncio.get_running_loop().create_task(scheduler.run())
        log.info(
            "mta started: listening on %s, metrics on %s, spool %s, %d DKIM key(s)",
            " ".join(str(address) for address in server_config.listen),
            config.metrics.listen,
            Path(config.spool.path).resolve(),
            len(keys),
        )
        await _wait_for_stop_signal()
        stopping.set()
        log.info("stopping: no new connections; finishing open transactions and deliveries")
        for listener in listeners:
            listener.close()
        await sessions.drain(server_config.shutdown_timeout)
        await scheduler.stop(server_config.shutdown_timeout)
        await delivering
    finally:
        await egress.close()
        committer.close()
        sign_pool.shutdown()
        spool.close()
    log.info("mta stopped")
    return 0


async def _wait_for_stop_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    await stop.wait()


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


async def _listen(factory: Callable[[], Session], server: ServerConfig) -> list[asyncio.Server]:
    loop = asyncio.get_running_loop()
    listeners = []
    for address in server.listen:
        try:
            listeners.append(await loop.create_server(factory, address.host, address.port))
        except OSError as error:
            for listener in listeners:
                listener.close()
            raise StartupError(f"cannot listen on {address}: {error.strerror}") from None
    return listeners
