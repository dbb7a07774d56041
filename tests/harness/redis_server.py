"""A real redis-server on a loopback port, for the fleet's shared state.

Started with nothing saved to disk, so ``restart()`` brings it back empty, as
a crashed Redis without persistence would come back. ``pause()`` and
``resume()`` stop and continue the process (kill -STOP / -CONT: a Redis that
answers nothing), ``kill()`` is kill -9.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

from tests.harness.mta import free_port
from tests.harness.poll import eventually
from tests.harness.programs import require_program
from tests.harness.service import Service

START_TIMEOUT = 10.0


class RedisServer(Service):
    def __init__(self, root: Path, port: int | None = None) -> None:
        self.program = require_program("redis-server", "redis-server")
        self.root = root
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.program,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
                "--logfile",
                str(self.root / "redis.log"),
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        eventually(
            self._answers, START_TIMEOUT, lambda: f"redis-server on {self.port}: {self.log()}"
        )
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)  # a stopped process dies at once too
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        """Killed and started again on the same port, empty."""
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()

    def log(self) -> str:
        path = self.root / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _signal(self, number: signal.Signals) -> None:
        assert self.process is not None, "redis-server is not running"
        self.process.send_signal(number)
