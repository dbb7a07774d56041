"""`mta serve` with ``[server] workers`` above 1: a supervisor and its workers.

One Python process uses one core for the GIL-holding part of SMTP, signing
and delivery; workers put every core to work, as Postfix's many processes do.

The supervisor (the process `mta serve` started):
- checks the configuration (keys, certificates, routes, users file) and that
  every listening address (SMTP's, the HTTP API's) is free, so a mistake is
  one clear error;
- starts the workers (``python -m mta.node.workers``) and waits until each one
  listens; if one cannot start, it stops the others and exits 1;
- serves /metrics (the workers' figures summed, prometheus_client's
  multiprocess mode, plus the spool's gauges), /healthz and /readyz;
- passes SIGHUP (reload) and SIGTERM/SIGINT (stop) on to the workers;
- starts a worker again when it dies, after a pause that grows while it
  keeps dying (1 s, doubling up to 30 s).

Each worker is a whole MTA (mta.node.daemon.Daemon) on the same spool: its own
SMTP listeners and HTTP API on the same addresses with SO_REUSEPORT (the
kernel spreads connections over them), its own LMDB environment and group
commit (LMDB serialises the workers' commits), and deliveries for the
domains it owns (mta.node.ownership). Workers die with the supervisor
(PR_SET_PDEATHSIG): a SIGKILL of `mta serve` stops everything at once, as a
crash of one process would, and the spool's leases make that safe
(docs/architecture.md, invariant 3).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import uvloop
from prometheus_client import multiprocess

from mta import config
from mta.cluster.local_limits import LocalLimits, local_limits_dir
from mta.inbound.auth import UsersFileError
from mta.inbound.node_sessions import NodeSessions, node_sessions_dir
from mta.node import daemon
from mta.node.ownership import Peers
from mta.observe import http, logs
from mta.signing.keys import SigningError
from mta.spool.store import Spool

log = logging.getLogger("mta")

START_TIMEOUT = 60.0  # a worker that does not listen by then is broken
RESTART_PAUSE_FIRST, RESTART_PAUSE_MAX = 1.0, 30.0
STABLE_AFTER = 60.0  # a worker that ran this long starts again after the first pause
_PR_SET_PDEATHSIG = 1


def supervise(settings: config.Config, path: str) -> int:
    """Run ``settings.server.workers`` workers until SIGTERM or SIGINT."""
    daemon.check(settings)

    async def main() -> int:
        return await Supervisor(settings, path).run()

    return uvloop.run(main())


@dataclass
class Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    ready: bool = False
    pause: float = RESTART_PAUSE_FIRST


@dataclass
class Supervisor:
    settings: config.Config
    path: str
    workers: list[Worker] = field(default_factory=list)
    stopping: bool = False

    def __post_init__(self) -> None:
        count = self.settings.server.workers
        self.workers = [Worker(index) for index in range(count)]
        # Worker i reads its inbox, pairs[i][0]; any worker writes to pairs[i][1].
        self.pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(count)]
        spool = self.settings.spool
        self.spool = Spool(spool.path, spool.max_size, spool.min_free_disk)
        self.metrics_dir = Path(spool.path) / "metrics"
        self.sessions_dir = str(node_sessions_dir(spool.path))

    async def run(self) -> int:
        stop = daemon.handle_signals(on_reload=self._reload)
        try:
            await self._check_listen()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)  # the last run's figures
            LocalLimits.clear(str(local_limits_dir(self.settings.spool.path)))  # and leases
            NodeSessions.clear(self.sessions_dir)  # and open sessions, AUTH failures
            self.metrics_dir.mkdir(mode=0o700)
            daemon.serve_metrics(
                self.settings,
                self.spool,
                self.not_ready,
                registry=http.worker_registry(str(self.metrics_dir)),
            )
            if not await self._start_all():
                return 1
            log.info(
                "mta started: %d workers listening on %s, metrics on %s, spool %s",
                len(self.workers),
                daemon.listening(self.settings),
                self.settings.metrics.listen,
                Path(self.settings.spool.path).resolve(),
            )
            watching = [asyncio.create_task(self._watch(worker)) for worker in self.workers]
            await stop.wait()
            log.info("stopping: telling %d workers to finish", len(self.workers))
            self.stopping = True
            await self._stop_all()
            for task in watching:
                task.cancel()
            await asyncio.gather(*watching, return_exceptions=True)
        finally:
            self.spool.close()
            for inbox, outbox in self.pairs:
                inbox.close()
                outbox.close()
        log.info("mta stopped")
        return 0

    def not_ready(self) -> str | None:
        if self.stopping:
            return "stopping"
        down = [str(w.index) for w in self.workers if not w.ready]
        if down:
            return f"worker(s) {', '.join(down)} not running"
        with self.spool.read() as txn:
            return self.spool.room_problem(txn)

    async def _check_listen(self) -> None:
        """Bind each address once without SO_REUSEPORT: a port another program (or
        another `mta serve`) holds fails here with a clear error, not silently
        shared with it."""
        addresses = daemon.every_address(self.settings)
        for listener in await daemon.listen_on(asyncio.Protocol, addresses):
            listener.close()
            await listener.wait_closed()

    async def _start_all(self) -> bool:
        results = await asyncio.gather(*(self._start(worker) for worker in self.workers))
        if all(results):
            return True
        log.error("a worker could not start (its error is above); stopping")
        self.stopping = True
        await self._stop_all()
        return False

    async def _start(self, worker: Worker) -> bool:
        """Start ``worker`` and wait until it listens; False if it died first."""
        ready_read, ready_write = os.pipe()
        inbox = self.pairs[worker.index][0].fileno()
        outboxes = [outbox.fileno() for _, outbox in self.pairs]
        env = os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        try:
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # not the current directory first on the path: the supervisor's mta
                "-m",
                "mta.node.workers",
                "--config",
                self.path,
                "--index",
                str(worker.index),
                "--parent",
                str(os.getpid()),
                "--inbox",
                str(inbox),
                "--outboxes",
                ",".join(map(str, outboxes)),
                "--ready",
                str(ready_write),
                pass_fds=(inbox, *outboxes, ready_write),
                env=env,
            )
        finally:
            os.close(ready_write)
        worker.started = time.monotonic()
        reader = asyncio.StreamReader()
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(ready_read, "rb")
        )
        try:
            # EOF (b"") means the worker exited before it listened.
            answer = await asyncio.wait_for(reader.read(16), START_TIMEOUT)
        except TimeoutError:
            log.error("worker %d did not start within %.0f s", worker.index, START_TIMEOUT)
            worker.process.kill()
            answer = b""
        finally:
            transport.close()
        worker.ready = answer == b"ready"
        return worker.ready

    async def _watch(self, worker: Worker) -> None:
        """Start ``worker`` again whenever it dies, until the supervisor stops."""
        while not self.stopping:
            assert worker.process is not None
            code = await worker.process.wait()
            worker.ready = False
            if self.stopping:
                return
            with contextlib.suppress(OSError):  # its gauges no longer count
                multiprocess.mark_process_dead(worker.process.pid, str(self.metrics_dir))
            # Nor its sessions: their slots come back at once.
            NodeSessions.forget_worker(self.sessions_dir, worker.process.pid)
            if time.monotonic() - worker.started > STABLE_AFTER:
                worker.pause = RESTART_PAUSE_FIRST
            log.error(
                "worker %d (pid %d) exited with %s; starting it again in %.0f s",
                worker.index,
                worker.process.pid,
                _describe_exit(code),
                worker.pause,
            )
            await asyncio.sleep(worker.pause)
            worker.pause = min(worker.pause * 2, RESTART_PAUSE_MAX)
            if not self.stopping:
                await self._start(worker)

    async def _reload(self) -> None:
        try:
            new = config.load(self.path)
        except config.ConfigError as error:
            log.error("reload failed, the running configuration stays: %s", error)
            return
        if new.server.workers != len(self.workers):
            log.warning("reload: [server] workers changed; it takes effect at the next restart")
        self._signal_all(signal.SIGHUP, only_ready=True)

    def _signal_all(self, number: int, only_ready: bool = False) -> None:
        for worker in self.workers:
            if only_ready and not worker.ready:
                continue  # still starting: it reads the config file as it starts
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(number)

    async def _stop_all(self) -> None:
        """SIGTERM to every worker; SIGKILL to those still there after the grace time."""
        self._signal_all(signal.SIGTERM)
        running = [w.process for w in self.workers if w.process is not None]
        grace = self.settings.server.shutdown_timeout + 15.0
        waits = [asyncio.create_task(process.wait()) for process in running]
        if not waits:
            return
        _, late = await asyncio.wait(waits, timeout=grace)
        if late:
            log.error("%d worker(s) still running %.0f s after SIGTERM: killing", len(late), grace)
            self._signal_all(signal.SIGKILL)
            await asyncio.wait(late)


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


# --- the worker side ---


def _die_with(parent: int) -> None:
    """Ask Linux to SIGKILL this process when the supervisor dies; exit at once if
    it is already gone."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        sys.exit(1)


def worker_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mta.node.workers")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--inbox", type=int, required=True)
    parser.add_argument("--outboxes", required=True)
    parser.add_argument("--ready", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with(args.parent)
    settings = config.load(args.config)
    logs.setup(settings.log.level, settings.log.format)
    peers = Peers(
        args.index,
        socket.socket(fileno=args.inbox),
        [socket.socket(fileno=int(fd)) for fd in args.outboxes.split(",")],
    )
    try:
        return daemon.serve(settings, args.config, daemon.WorkerRole(peers, args.ready))
    except (
        daemon.StartupError,
        config.ConfigError,
        SigningError,
        UsersFileError,
    ) as error:
        log.error("worker %d: %s", args.index, error)
        return 1


if __name__ == "__main__":
    sys.exit(worker_main())
