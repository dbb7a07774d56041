"""Measure ACCEPT throughput of our MTA against Postfix, in the same run, same client.

Usage: .venv/bin/python tools/bench_accept.py [--messages N] [--sessions S]
           [--size BYTES] [--per-connection K] [--skip-postfix]
           [--postfix-queue hold|defer] [--timeout SECONDS] [--py-spy FILE]

What it measures: messages per second accepted over SMTP, from the start of
the load generator to its exit (first connection to last 250 and QUIT), with
S concurrent sessions each sending messages with a payload of BYTES (plus the
~170 bytes of headers smtp-source writes: From, To, Date, Message-Id).  The
load generator for both servers is Postfix's own ``smtp-source``, so neither
server is favoured by the client; the client's CPU is printed too, to show it
is not the bottleneck.

1. Our MTA: a temporary directory with a config (127.0.0.1, free ports, its
   own spool) and a fresh DKIM key made by ``mta dkim keygen`` for
   example.test, the domain of the sender smtp-source uses, so every message
   is DKIM-signed, committed durably (group commit) and only then answered
   250.  After the load the daemon is stopped with SIGTERM and ``mta queue
   stats --json`` says how many messages the spool holds.
2. Postfix: a throwaway instance in a temporary directory (its own
   config_directory, queue_directory and data_directory, smtpd on 127.0.0.1
   and a free port, no chroot, mynetworks 127.0.0.0/8), started with
   ``postfix -c DIR start``.  Postfix fsyncs each queue file before its 250,
   as we do.  So that it only accepts, like our MTA which does not deliver
   yet, every message goes to the hold queue (``--postfix-queue hold``, the
   default: smtpd_data_restrictions = check_client_access static:HOLD) or,
   with ``--postfix-queue defer``, through the queue manager into the
   deferred queue (defer_transports = smtp), which costs Postfix extra work.
   Reverse DNS of the client is off (our MTA does none either).

--per-connection K: 0 (default) keeps each session's connection for all its
messages (smtp-source -d); 1 opens a new connection per message; K > 1 runs
S workers that each start ``smtp-source -s 1 -d -m K`` again and again
(smtp-source itself knows only "one" or "all").

CPU: utime+stime of the server's processes from /proc, including children
reaped meanwhile (for Postfix: master, smtpd, cleanup, trivial-rewrite, qmgr
and the rest of the master's children).  Needs Linux, root (for Postfix) and
the Debian postfix package.  Every wait is bounded; temporary directories and
processes are removed on exit, error or Ctrl-C.  Prints figures only; it
asserts nothing about timing.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

# The test harness's MTA helpers; tools run from the repository root or with it on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness.mta import dkim_keygen, free_port, free_ports  # noqa: E402
from tests.harness.poll import eventually  # noqa: E402

BIN = Path(sys.executable).parent
MTA = str(BIN / "mta") if (BIN / "mta").exists() else (shutil.which("mta") or "mta")
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
SENDER = "app@example.test"  # smtp-source writes "From: <SENDER>"; our DKIM key's domain
RECIPIENT = "user@example.net"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


class BenchError(Exception):
    """A run could not be done; str() says why."""


@dataclass
class Result:
    name: str
    messages: int
    sessions: int
    size: int
    per_connection: int
    seconds: float = 0.0
    server_cpu: float | None = None  # seconds
    client_cpu: float | None = None  # seconds
    stored: int | None = None
    error: str | None = None

    @property
    def rate(self) -> float | None:
        return self.messages / self.seconds if self.seconds and not self.error else None


# --- processes and ports ---


def wait_for_banner(port: int, timeout: float, alive: Callable[[], bool]) -> None:
    """Until a 220 greeting comes from 127.0.0.1:port; BenchError on timeout or death."""
    last = "nothing"

    def greeted() -> bool:
        nonlocal last
        if not alive():
            raise BenchError("the server exited during startup")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.settimeout(5)
                greeting = sock.recv(512)
                if greeting.startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    with suppress(OSError):
                        sock.recv(512)
                    return True
                last = repr(greeting[:80])
        except OSError as error:
            last = str(error)
        return False

    try:
        eventually(greeted, timeout, "", interval=0.1)
    except AssertionError:
        raise BenchError(
            f"no 220 greeting on 127.0.0.1:{port} within {timeout:g}s ({last})"
        ) from None


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (fields[0] is the state)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _process_tree(root: int) -> dict[int, int]:
    """pid -> CPU ticks (own and reaped children's) for root and all its descendants."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)
        # utime, stime, cutime, cstime: fields 14-17 of stat, 11-14 here
        ticks[pid] = sum(int(value) for value in fields[11:15])
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in ticks:
            tree[pid] = ticks[pid]
            todo.extend(children.get(pid, []))
    return tree


def tree_cpu(root: int) -> float:
    """CPU seconds of a process and all its descendants, including reaped children."""
    return sum(_process_tree(root).values()) / CLOCK_TICKS


def descendants(root: int) -> set[int]:
    return set(_process_tree(root)) - {root}


def alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    """SIGTERM, wait up to timeout, then SIGKILL; the exit code, None if killed."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        return None


# --- load ---


def smtp_source_command(
    args: argparse.Namespace, port: int, sessions: int, count: int, reuse: bool
) -> list[str]:
    command = [
        SMTP_SOURCE,
        "-s",
        str(sessions),
        "-m",
        str(count),
        "-l",
        str(args.size),
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
        "-M",
        "bench.example.test",
    ]
    if reuse:
        command.append("-d")  # don't disconnect: next message over the same connection
    return [*command, f"127.0.0.1:{port}"]


class Load:
    """Runs smtp-source against a port; kills what it started when closed."""

    def __init__(self, args: argparse.Namespace, port: int, log: Path) -> None:
        self.args = args
        self.port = port
        self.log = log
        self.processes: list[subprocess.Popen[bytes]] = []
        self.failures: list[str] = []
        self.lock = threading.Lock()

    def run(self) -> tuple[float, float]:
        """Send every message; wall seconds and client CPU seconds. BenchError on failure."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        deadline = started + self.args.timeout
        k = self.args.per_connection
        if k in (0, 1):
            command = smtp_source_command(
                self.args, self.port, self.args.sessions, self.args.messages, reuse=k == 0
            )
            self._run_one(command, deadline)
        else:
            self._run_workers(k, deadline)
        seconds = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if self.failures:
            raise BenchError(self.failures[0])
        client = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return seconds, client

    def _run_one(self, command: list[str], deadline: float) -> None:
        with self.log.open("ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=log)
        with self.lock:
            self.processes.append(process)
        try:
            code = process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
            self._fail(f"smtp-source did not finish within --timeout {self.args.timeout:g}s")
            return
        with self.lock:
            self.processes.remove(process)  # on any exception close() kills it
        if code != 0:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
            self._fail(f"smtp-source exited with {code}: {' | '.join(tail)}")

    def _run_workers(self, k: int, deadline: float) -> None:
        remaining = [self.args.messages]

        def worker() -> None:
            while not self.failures and time.monotonic() < deadline:
                with self.lock:
                    count = min(k, remaining[0])
                    remaining[0] -= count
                if count == 0:
                    return
                self._run_one(
                    smtp_source_command(self.args, self.port, 1, count, reuse=True), deadline
                )
            if time.monotonic() >= deadline:
                self._fail(f"load did not finish within --timeout {self.args.timeout:g}s")

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(self.args.sessions)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()) + 15)

    def _fail(self, reason: str) -> None:
        with self.lock:
            self.failures.append(reason)

    def close(self) -> None:
        with self.lock:
            processes = list(self.processes)
        for process in processes:
            if process.poll() is None:
                process.kill()
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)


def measure(
    result: Result, args: argparse.Namespace, port: int, server_pid: int, log: Path
) -> None:
    load = Load(args, port, log)
    try:
        cpu_before = tree_cpu(server_pid)
        result.seconds, result.client_cpu = load.run()
        result.server_cpu = tree_cpu(server_pid) - cpu_before
    finally:
        load.close()


# --- our MTA ---


def make_key(directory: Path) -> Path:
    """A fresh DKIM key for example.test (selector s1) in ``directory``, by `mta dkim keygen`."""
    try:
        dkim_keygen(directory)
    except RuntimeError as error:
        raise BenchError(str(error)) from None
    return directory / "example.test.s1.pem"


def run_mta(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MTA, *args], capture_output=True, text=True, timeout=timeout)


def mta_config(root: Path, port: int, metrics_port: int, args: argparse.Namespace) -> str:
    return "\n".join(
        [
            "[server]",
            'hostname = "mta.bench.test"',
            f'listen = ["127.0.0.1:{port}"]',
            'relay_networks = ["127.0.0.0/8"]',
            f"max_connections = {max(1000, 2 * args.sessions)}",
            f"max_connections_per_ip = {max(100, 2 * args.sessions)}",
            "shutdown_timeout = 10",
            "[spool]",
            f'path = "{root / "spool"}"',
            f"max_size = {max(10 * 2**30, 4 * args.messages * (args.size + 4096))}",
            "min_free_disk = 0",
            "[metrics]",
            f'listen = "127.0.0.1:{metrics_port}"',
            "[log]",
            'level = "info"',
            # Accept only, like Postfix's hold queue: mail waits for a port where
            # nothing listens, with no retry during the run (and no DNS lookups).
            "[delivery]",
            "retry_first = 3600",
            "retry_max = 3600",
            "[delivery.routes]",
            f'"*" = "127.0.0.1:{free_port()}"',
            "[[dkim]]",
            'domain = "example.test"',
            'selector = "s1"',
            f'private_key = "{root / "dkim" / "example.test.s1.pem"}"',
            "",
        ]
    )


@contextmanager
def py_spy(pid: int, out: str | None) -> Iterator[None]:
    """Optionally sample the daemon with py-spy while the load runs."""
    if out is None:
        yield
        return
    spy_bin = str(BIN / "py-spy") if (BIN / "py-spy").exists() else "py-spy"
    fmt = "raw" if out.endswith((".txt", ".raw")) else "speedscope"
    spy = subprocess.Popen(
        [
            spy_bin,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "200",
            "--threads",
            "--nonblocking",
            "--subprocesses",  # worker processes too
            "--format",
            fmt,
            "--output",
            out,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(1.0)  # let it attach before the load starts
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(timeout=10)
        print(f"py-spy profile of our MTA: {out}", file=sys.stderr)


def bench_ours(args: argparse.Namespace, tmp: Path) -> Result:
    result = Result("ours (mta)", args.messages, args.sessions, args.size, args.per_connection)
    root = tmp / "mta"
    root.mkdir()
    make_key(root / "dkim")
    port, metrics_port = free_ports(2)
    config = root / "mta.toml"
    config.write_text(mta_config(root, port, metrics_port, args))
    log_path = root / "mta.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [MTA, "serve", "--config", str(config)],
                stdout=log,
                stderr=log,
                start_new_session=True,  # Ctrl-C is ours to relay
            )
        daemon = process
        wait_for_banner(port, START_TIMEOUT, lambda: daemon.poll() is None)
        with py_spy(process.pid, args.py_spy):
            measure(result, args, port, process.pid, root / "smtp-source.log")
        code = stop_process(process, STOP_TIMEOUT)
        process = None
        if code != 0:
            raise BenchError(f"mta serve exited with {code}; log tail: {tail(log_path)}")
        stats = run_mta("queue", "stats", "--json", "--config", str(config))
        if stats.returncode != 0:
            raise BenchError(f"mta queue stats failed: {stats.stderr.strip()}")
        result.stored = int(json.loads(stats.stdout)["messages"])
    except BenchError as error:
        result.error = f"{error}; mta log tail: {tail(log_path)}"
    finally:
        if process is not None:
            stop_process(process, STOP_TIMEOUT)
    return result


def tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- Postfix ---

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen}      inet  n       -       n       -       -       smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_main_cf(root: Path, size: int, delivery: list[str]) -> str:
    """A throwaway Postfix's main.cf; ``delivery`` says what becomes of accepted mail."""
    lines = [
        "compatibility_level = 3.6",
        f"queue_directory = {root / 'queue'}",
        f"data_directory = {root / 'data'}",
        "mail_owner = postfix",
        "setgid_group = postdrop",
        f"maillog_file = {root / 'maillog'}",
        f"maillog_file_prefixes = {root}",
        "myhostname = postfix.bench.test",
        "mydomain = bench.test",
        "myorigin = $mydomain",
        "mydestination =",
        "local_recipient_maps =",
        "relay_domains =",
        "alias_maps =",
        "alias_database =",
        "inet_interfaces = 127.0.0.1",
        "inet_protocols = ipv4",
        "mynetworks = 127.0.0.0/8",
        "smtpd_relay_restrictions = permit_mynetworks, reject",
        "smtpd_peername_lookup = no",
        f"message_size_limit = {max(10_240_000, 2 * size + 65536)}",
        "default_process_limit = 200",
        "biff = no",
        "append_dot_mydomain = no",
        *delivery,
    ]
    return "\n".join(lines) + "\n"


def accept_only(postfix_queue: str) -> list[str]:
    """main.cf lines that keep accepted mail in Postfix's queue during the measurement."""
    # never try to deliver during the measurement
    lines = ["relayhost = [127.0.0.1]:9"]
    if postfix_queue == "hold":
        lines.append("smtpd_data_restrictions = check_client_access static:HOLD")
    else:
        lines.append("defer_transports = smtp, relay")
    return lines


def count_files(directory: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(directory))


class Postfix:
    """A throwaway Postfix instance under root; stop() is safe to call more than once."""

    def __init__(self, root: Path, port: int, main_cf: str) -> None:
        self.root = root
        self.conf = root / "etc"
        self.queue = root / "queue"
        self.port = port
        owner = pwd.getpwnam("postfix")
        for directory in (self.conf, self.queue, root / "data"):
            directory.mkdir(parents=True)
        os.chown(root / "data", owner.pw_uid, owner.pw_gid)
        (self.conf / "main.cf").write_text(main_cf)
        (self.conf / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{port}"))
        self.master_pid: int | None = None

    def postfix(self, *words: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.conf), *words],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self) -> int:
        started = self.postfix("start")
        pid_file = self.queue / "pid" / "master.pid"
        if pid_file.exists():
            with suppress(ValueError):
                self.master_pid = int(pid_file.read_text().split()[0])
        if started.returncode != 0 or self.master_pid is None:
            raise BenchError(
                f"postfix start failed ({started.returncode}): "
                f"{(started.stdout + started.stderr).strip()[-400:]}"
            )
        pid = self.master_pid
        wait_for_banner(self.port, START_TIMEOUT, lambda: alive(pid))
        return pid

    def stored(self) -> int:
        return sum(
            count_files(self.queue / name)
            for name in ("maildrop", "incoming", "active", "deferred", "hold")
        )

    def stop(self) -> None:
        pid = self.master_pid
        if pid is None:
            return
        workers = descendants(pid)
        with suppress(subprocess.TimeoutExpired, OSError):
            self.postfix("stop", timeout=STOP_TIMEOUT)
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            with suppress(subprocess.TimeoutExpired, OSError):
                self.postfix("abort", timeout=10)
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # the master runs in its own session
        # The master's children exit on their own once it is gone; make sure.
        deadline = time.monotonic() + 10
        while any(alive(worker) for worker in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        for worker in workers:
            if alive(worker) and _stat_fields(worker) is not None:
                with suppress(ProcessLookupError, PermissionError):
                    os.kill(worker, signal.SIGKILL)
        self.master_pid = None


def bench_postfix(args: argparse.Namespace, tmp: Path) -> Result:
    result = Result(
        f"Postfix ({args.postfix_queue})",
        args.messages,
        args.sessions,
        args.size,
        args.per_connection,
    )
    if os.geteuid() != 0:
        result.error = "Postfix needs root to start; skipped"
        return result
    if not Path(POSTFIX).exists():
        result.error = "postfix is not installed; skipped"
        return result
    root = tmp / "postfix"
    main_cf = postfix_main_cf(root, args.size, accept_only(args.postfix_queue))
    instance = Postfix(root, free_port(), main_cf)
    try:
        master = instance.start()
        measure(result, args, instance.port, master, instance.root / "smtp-source.log")
        instance.stop()
        result.stored = instance.stored()
    except BenchError as error:
        result.error = f"{error}; maillog tail: {tail(instance.root / 'maillog')}"
    finally:
        instance.stop()
    return result


# --- report ---


def report(results: list[Result]) -> None:
    header = (
        f"{'MTA':<18} {'messages':>8} {'sessions':>8} {'size':>6} {'per-conn':>8} "
        f"{'seconds':>8} {'accepted/s':>10} {'CPU ms/msg':>10} {'client ms/msg':>13} "
        f"{'stored':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if r.error:
            print(f"{r.name:<18} FAILED: {r.error}")
            continue
        cpu = f"{1000 * r.server_cpu / r.messages:.2f}" if r.server_cpu is not None else "n/a"
        client = f"{1000 * r.client_cpu / r.messages:.2f}" if r.client_cpu is not None else "n/a"
        stored = str(r.stored) if r.stored is not None else "n/a"
        per_conn = "all" if r.per_connection == 0 else str(r.per_connection)
        print(
            f"{r.name:<18} {r.messages:>8} {r.sessions:>8} {r.size:>6} {per_conn:>8} "
            f"{r.seconds:>8.2f} {r.rate or 0:>10.0f} {cpu:>10} {client:>13} {stored:>7}"
        )
    ours, theirs = results[0], results[-1]
    if len(results) == 2 and ours.rate and theirs.rate:
        line = f"ours/Postfix: accepted/s {ours.rate / theirs.rate:.2f}x"
        if ours.server_cpu and theirs.server_cpu:
            line += f", CPU per message {ours.server_cpu / theirs.server_cpu:.2f}x"
        print(line)
    for r in results:
        if not r.error and r.stored is not None and r.stored != r.messages:
            print(f"note: {r.name} holds {r.stored} messages after the run, expected {r.messages}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10000, help="messages per MTA")
    parser.add_argument("--sessions", type=int, default=20, help="concurrent SMTP sessions")
    parser.add_argument("--size", type=int, default=4096, help="payload bytes per message")
    parser.add_argument(
        "--per-connection",
        type=int,
        default=0,
        metavar="K",
        help="messages per connection; 0 = all of a session's (default)",
    )
    parser.add_argument("--skip-postfix", action="store_true", help="only measure our MTA")
    parser.add_argument(
        "--postfix-queue",
        choices=["hold", "defer"],
        default="hold",
        help="where Postfix puts accepted mail (default: hold)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="most seconds the load may take per MTA"
    )
    parser.add_argument(
        "--py-spy",
        metavar="FILE",
        help="record our daemon with py-spy during the load "
        "(.txt: collapsed stacks, else speedscope JSON)",
    )
    args = parser.parse_args(argv)
    for name in ("messages", "sessions", "size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.per_connection < 0:
        parser.error("--per-connection must be 0 (all) or more")
    if not Path(SMTP_SOURCE).exists():
        parser.error("smtp-source is not installed (Debian package postfix)")
    return args


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # run every finally: stop servers, remove temp dirs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    tmp = Path(tempfile.mkdtemp(prefix="bench-accept-"))
    tmp.chmod(0o755)  # Postfix daemons drop to the postfix user and must reach the queue
    results: list[Result] = []
    try:
        print(
            f"{args.messages} messages of {args.size} payload bytes, {args.sessions} sessions, "
            f"per connection: {args.per_connection or 'all'}; client: smtp-source",
            flush=True,
        )
        results.append(bench_ours(args, tmp))
        if not args.skip_postfix:
            results.append(bench_postfix(args, tmp))
        report(results)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
