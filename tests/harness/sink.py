"""Postfix's smtp-sink as a receiving MX for integration tests.

``Sink`` runs ``smtp-sink`` on a loopback address and port, with any of its
options passed through (``-f MAIL`` hard-rejects MAIL, ``-r RCPT``
soft-rejects RCPT, ``-Q MAIL`` answers 421 and hangs up, ``-q DATA`` hangs
up without a word; see ``man smtp-sink``). It always runs with:

- ``-d DIR/%H%M%S.``: one dump file per mail transaction, which
  ``messages()`` parses back into the envelope and the exact message bytes;
- ``-c``: running counters on stdout (``sess=N quit=N mesg=N``, separated by
  CR, flushed as they change), read by ``counters()``. ``sess`` counts
  sessions that have ended, so it counts connections once they are closed;
- as root, ``-u nobody`` (required) and ``-R DIR`` (chroot): the dump
  directory must be reachable by nobody, and pytest's tmp directories are
  mode 0700, so smtp-sink is chrooted into the test's directory.

The dump format (smtp-sink 3.7, checked by hand): LF line endings, one
``X-Client-Addr:``, ``X-Client-Proto:``, ``X-Helo-Args:`` and
``X-Mail-Args:`` line, one ``X-Rcpt-Args:`` per RCPT, then a three-line
``Received:`` header (two continuation lines starting with a tab), then the
message as received (dot-stuffing removed, CRLF written as LF), then one
empty line. The message ends with the line break the client sent before the
final dot, so ``data`` (CRLF restored) is exactly what the client meant to
send, with CRLF added at the end if it was missing.

No test should assert on timing; ``wait_*`` helpers poll with ``eventually``
and fail with what they saw.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.harness.mta import free_port
from tests.harness.poll import eventually
from tests.harness.programs import require_program
from tests.harness.service import Service

START_TIMEOUT = 5.0


def is_listening(host: str, port: int) -> bool:
    """Whether a TCP socket listens on host:port, without connecting to it.

    A probe connection would count as a session in smtp-sink's counters, so
    read the kernel's socket table instead (IPv4, Linux).
    """
    packed = socket.inet_aton(host)
    wanted = f"{int.from_bytes(packed, 'little'):08X}:{port:04X}"
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == wanted and fields[3] == "0A":  # 0A: LISTEN
                return True
    return False


@dataclass(frozen=True)
class Dumped:
    """One mail transaction as smtp-sink recorded it."""

    client_addr: str
    helo: str
    mail_args: str  # "<sender> SIZE=..." as sent after MAIL FROM:
    rcpt_args: tuple[str, ...]  # "<rcpt> ..." per RCPT, in order
    data: bytes  # the message, CRLF line endings, as the client sent it (unstuffed)
    path: Path

    @property
    def sender(self) -> str:
        return self.mail_args.split(">", 1)[0].lstrip("<")

    @property
    def recipients(self) -> tuple[str, ...]:
        return tuple(arg.split(">", 1)[0].lstrip("<") for arg in self.rcpt_args)


def parse_dump(path: Path) -> Dumped:
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    fields: dict[str, list[str]] = {}
    index = 0
    while not lines[index].startswith(b"Received:"):
        name, _, value = lines[index].decode().partition(": ")
        fields.setdefault(name, []).append(value)
        index += 1
    # "Received:" and its two continuation lines are smtp-sink's own.
    if not (lines[index + 1].startswith(b"\t") and lines[index + 2].startswith(b"\t")):
        raise ValueError(f"{path}: unexpected Received header in the dump")
    body = b"\n".join(lines[index + 3 :])
    if not body.endswith(b"\n\n"):
        raise ValueError(f"{path}: dump does not end with the empty line smtp-sink adds")
    message = body[:-1].replace(b"\n", b"\r\n")
    return Dumped(
        client_addr=fields["X-Client-Addr"][0],
        helo=fields.get("X-Helo-Args", [""])[0],
        mail_args=fields["X-Mail-Args"][0],
        rcpt_args=tuple(fields.get("X-Rcpt-Args", [])),
        data=message,
        path=path,
    )


@dataclass(frozen=True)
class Counters:
    sessions: int  # sessions that ended
    quits: int
    messages: int


class Sink(Service):
    """smtp-sink on ``host``:``port`` (a free port by default), dumping into ``directory``."""

    def __init__(
        self,
        directory: Path,
        host: str = "127.0.0.10",
        port: int | None = None,
        options: Sequence[str] = (),
        name: str = "smtp-sink",
    ) -> None:
        self.binary = require_program("smtp-sink", "postfix")
        self.directory = directory
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.options = list(options)
        self.name = name
        self.dump_dir = directory / "dump"
        self.output = directory / "stdout"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        command = [self.binary, "-c", "-h", self.name]
        if os.geteuid() == 0:
            # Chrooted: the dump template is a path inside the directory.
            command += ["-u", "nobody", "-R", str(self.directory), "-d", "/dump/%H%M%S."]
        else:
            command += ["-d", f"{self.dump_dir}/%H%M%S."]
        return command + self.options + [f"{self.host}:{self.port}", "64"]

    def start(self) -> Sink:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dump_dir.mkdir(exist_ok=True)
        self.dump_dir.chmod(0o777)  # smtp-sink writes as nobody when started by root
        with open(self.output, "wb") as output:
            self.process = subprocess.Popen(
                self.command(), stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        process = self.process

        def listening() -> bool:
            if process.poll() is not None:
                raise RuntimeError(
                    f"smtp-sink exited with {process.returncode}: "
                    f"{self.output.read_text(errors='replace')}"
                )
            return is_listening(self.host, self.port)

        try:
            eventually(listening, START_TIMEOUT, f"smtp-sink to listen on {self.host}:{self.port}")
        except AssertionError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None

    def messages(self) -> list[Dumped]:
        """Every complete transaction dumped so far, oldest first."""
        paths = sorted(self.dump_dir.iterdir(), key=lambda path: path.stat().st_mtime_ns)
        dumped = []
        for path in paths:
            try:
                dumped.append(parse_dump(path))
            except (ValueError, IndexError, KeyError):
                continue  # still being written
        return dumped

    def wait_for_messages(self, count: int, timeout: float = 5.0) -> list[Dumped]:
        """At least ``count`` dumped messages (smtp-sink writes them after its 250)."""

        def enough() -> list[Dumped]:
            found = self.messages()
            return found if len(found) >= count else []

        return eventually(enough, timeout, f"{count} messages in {self.dump_dir}")

    def counters(self) -> Counters:
        text = self.output.read_bytes().decode(errors="replace")
        last = [part for part in text.replace("\n", "\r").split("\r") if "sess=" in part]
        if not last:
            return Counters(0, 0, 0)
        values = dict(item.split("=", 1) for item in last[-1].split())
        return Counters(int(values["sess"]), int(values["quit"]), int(values["mesg"]))

    def wait_for_counters(
        self, condition: Callable[[Counters], bool], timeout: float = 5.0
    ) -> Counters:
        def met() -> Counters | None:
            counters = self.counters()
            return counters if condition(counters) else None

        return eventually(met, timeout, lambda: f"smtp-sink counters (now {self.counters()})")
