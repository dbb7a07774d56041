"""End-to-end benchmark: our MTA against Postfix as a plain relay, same load, same run.

Usage:
  .venv/bin/python tools/bench.py                       # the default loads (below)
  .venv/bin/python tools/bench.py --size 4k,100k --per-connection 0,1 --recipients 1,20
  .venv/bin/python tools/bench.py --sessions-sweep 1,5,10,20,50 [--plot sweep.svg]
  .venv/bin/python tools/bench.py --skip-postfix --py-spy /tmp/prof   # only ours, profiled
  .venv/bin/python tools/bench.py --rate 200 [--size 4k ...]   # every load paced at 200 msg/s
  .venv/bin/python tools/bench.py --half-peak --size 4k         # latency at half of peak load
  .venv/bin/python tools/bench.py --cluster --skip-postfix --size 4k   # the cost of [cluster] redis

``--cluster`` starts a redis-server on loopback (tests/harness/redis_server.py,
nothing saved to disk) and runs ours a second time per load and round with
``[cluster] redis`` naming it (``node = "bench"``, other cluster settings at
their defaults), beside the usual runs, alternating which goes first; a
table then compares the two: delivered/s and CPU ms/msg with Redis, without,
and the ratio (CPU ms/msg is our processes'; a note gives redis-server's),
and a "target:" line says whether the shared state costs at most 10% of
delivered/s (the fleet issue's target).  Needs the Debian redis-server
package.

``--rate R`` paces every load, open loop, at R messages/s in total over the
sessions (see the client below) instead of sending as fast as possible; the
usual table is printed (its accepted/s is then the achieved rate) and, per
load, the paced table below.  A paced client may take its schedule's length,
messages / R seconds, on top of ``--timeout``.

``--half-peak`` is the speed issue's latency target ("p99 accept-to-delivery
latency at half of peak load under 100 ms"): the loads run unpaced as usual
(that table is printed first), then the FIRST load (with no load option, the
issue's target load: 4 KB, connections reused, 1 recipient, 20 sessions;
``--size 4k`` runs only that one) runs again paced:
  - "half own peak": each MTA at half of ITS OWN peak, its delivered/s in the
    unpaced run of that load (median run with --rounds).  Ours' row is the
    issue's target, and a "target:" line says whether its p99 is under 100 ms.
  - "half lower peak": both MTAs at the same rate, half of the lower of the two
    peaks, so the latencies compare at the same offered load (at half their own
    peaks the faster MTA is asked for more, which is not a like-for-like
    comparison).  The slower MTA's run at half its own peak is that run already
    and is printed again, not run twice; the faster one runs once more.
With --skip-postfix (or if a peak run failed) only the "half own peak" rows
exist.  Paced runs with --rounds report the median run by p99 latency.
--rate and --half-peak do not combine with each other or with --sessions-sweep.

What runs, for every load and for each MTA in turn (alternating which goes first):

- a receiver: a small asyncio SMTP sink (this file, ``--role sink``, in its own
  process, uvloop) on 127.0.0.1 that answers 250 to everything, advertises
  PIPELINING, and at each end of DATA notes the wall-clock time (ns), the
  message's ``X-Bench-Id`` header and its number of RCPTs.  Postfix's
  smtp-sink was the first choice, but its per-transaction dump files only
  carry the kernel's coarse file mtime (every file of a 20-message burst had
  the same timestamp here), too coarse for a p50 of a few milliseconds.
- the MTA under test, relaying everything to that sink:
  ours: ``mta serve`` with a temporary config and spool, a fresh RSA-2048 DKIM
  key from ``mta dkim keygen`` for example.test (every message is From
  app@example.test, so every message is signed), ``[delivery.routes] "*" =
  "127.0.0.1:SINKPORT"``, other settings at their defaults
  (max_concurrent_per_domain 20, max_messages_per_connection 100);
  ``--mta-option SECTION.KEY=VALUE`` adds settings (e.g. server.workers=2).
  Postfix: a throwaway instance in a temporary directory (see bench_accept.py
  for the pitfalls) with ``relayhost = [127.0.0.1]:SINKPORT``, no DKIM,
  delivery at Postfix's defaults: default_destination_concurrency_limit 20
  (starting at 5, slow start), smtp_connection_cache_on_demand yes,
  default_destination_recipient_limit 50, in_flow_delay 1s; queue files
  fsynced before the 250, as ours.
- a client: an asyncio SMTP client (this file, ``--role client``, its own
  process, uvloop) with S sessions, K messages per connection (0 = all of a
  session's messages on one connection), R recipients per message
  (u0..u{R-1}@example.net, so one transaction per message at the sink),
  MAIL/RCPT/DATA pipelined when the server offers PIPELINING (both do), a
  unique ``X-Bench-Id`` per message; it notes the wall-clock time (ns) at
  which each message's 250 after DATA arrives: the accept timestamp.
  Paced (``--rate R``, open loop): message k (ids handed out in order to
  whichever session is free) is due at client start + k/R seconds; its session
  waits for that time (never starting it earlier), then opens a connection if
  it has none (with K messages per connection, after K it QUITs and the next
  message opens a new one, at its own due time) and sends it.  A session stays
  idle on its open connection between messages.  The schedule does not wait
  for the server: if it falls behind, every session is busy when a message
  falls due, the message starts late and "late" and "due->del" below grow.
  With too few sessions for R times the per-message time the client falls
  behind too: raise --sessions.  The lateness includes ~1 ms of the event
  loop's timer granularity.

Figures, per run:
- accepted/s: messages answered 250 / (last 250 - client start);
- delivered/s: messages whose every recipient reached the sink /
  (last delivery - client start);
- CPU ms/msg: utime+stime of the server's process tree (for Postfix the master
  and every child, reaped ones included) from client start until the last
  delivery, divided by messages; client and sink CPU are printed apart;
- latency p50/p99: sink end-of-DATA time minus the client's 250 time, per
  message (both clocks are CLOCK_REALTIME of the same host);
- peak RSS: the largest sum of VmRSS over the server's processes, sampled
  every 0.2 s (PSS, which shares libraries fairly among Postfix's many
  processes, alongside).

Paced runs (--rate, --half-peak) also print a table with, per MTA and rate:
- rate: "--rate", "half own peak" or "half lower peak" (above);
- peak del/s: the unpaced delivered/s the rate was derived from ("-" for --rate);
- target/s: the rate the client was asked for (peak / 2 for --half-peak);
- achieved/s: accepted/s as above, messages answered 250 / (last 250 - client
  start); about target/s when the server keeps up (the last message is due
  (messages - 1) / target after the start), under it when it does not;
- delivered/s, CPU ms/msg: as above, over the paced run;
- p50 ms, p99 ms, max ms: accept-to-delivery latency as above (sink end of
  DATA minus the client's 250), nearest-rank percentiles;
- late p99 ms: p99 of (when the client began a message - its due time);
  0 to ~2 ms when the schedule was kept; a note follows when it exceeds 10 ms;
- due->del p99: p99 of (sink end of DATA - due time): what an open-loop sender
  sees, including the wait for a free session, the connection and the SMTP
  transaction; accept-to-delivery alone cannot see a server that falls behind
  at accepting.

Every wait is bounded, every process started here is stopped and every
temporary directory removed on exit, error, Ctrl-C or SIGTERM.  Needs Linux,
root (for Postfix) and the Debian postfix package.  It prints figures and
asserts nothing about timing.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The test harness's redis-server; tools run from the repository root or with it on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_accept import (  # noqa: E402  (tools/ is not a package)
    MTA,
    POSTFIX,
    BenchError,
    Postfix,
    _process_tree,
    free_port,
    free_ports,
    make_key,
    postfix_main_cf,
    py_spy,
    stop_process,
    tail,
    tree_cpu,
    wait_for_banner,
)

from tests.harness.programs import SBIN  # noqa: E402
from tests.harness.redis_server import RedisServer  # noqa: E402

SENDER = "app@example.test"  # our DKIM key's domain
RCPT_DOMAIN = "example.net"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
LATE_NOTE_MS = 10.0  # a paced run whose p99 start lag exceeds this gets a note
ID_RE = re.compile(rb"\r\nX-Bench-Id: *([^\r\n]+)", re.IGNORECASE)


# ---------------------------------------------------------------- sink role


class _SinkProtocol(asyncio.Protocol):
    """One SMTP session at the sink: 250 to everything, a record per end of DATA."""

    def __init__(self, records: list[str]) -> None:
        self.records = records
        self.buf = bytearray()
        self.data: bytearray | None = None
        self.rcpts = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.transport.write(b"220 sink.bench.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        if self.data is not None:
            self._data(data)
        else:
            self.buf += data
            self._commands()

    def _commands(self) -> None:
        out: list[bytes] = []
        while self.data is None:
            end = self.buf.find(b"\r\n")
            if end < 0:
                break
            verb = bytes(self.buf[:4]).upper()
            del self.buf[: end + 2]
            if verb in (b"EHLO", b"HELO"):
                out.append(b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE\r\n")
            elif verb == b"MAIL":
                self.rcpts = 0
                out.append(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                self.rcpts += 1
                out.append(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.data = bytearray(b"\r\n")
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                self._write(out)
                if self.transport is not None:
                    self.transport.close()
                return
            elif verb in (b"RSET", b"NOOP"):
                out.append(b"250 2.0.0 Ok\r\n")
            else:
                out.append(b"502 5.5.2 Error: command not recognized\r\n")
        self._write(out)
        if self.data is not None and self.buf:
            rest = bytes(self.buf)
            self.buf.clear()
            self._data(rest)

    def _data(self, chunk: bytes) -> None:
        assert self.data is not None
        start = max(0, len(self.data) - 4)
        self.data += chunk
        end = self.data.find(b"\r\n.\r\n", start)
        if end < 0:
            return
        now = time.time_ns()
        message = self.data
        self.data = None
        head_end = message.find(b"\r\n\r\n", 0, end + 2)
        found = ID_RE.search(message, 0, head_end if head_end >= 0 else end + 2)
        bench_id = found.group(1).decode("ascii", "replace").strip() if found else "-"
        self.records.append(f"{bench_id} {now} {self.rcpts}\n")
        self._write([b"250 2.0.0 Ok: queued\r\n"])
        leftover = message[end + 5 :]
        if leftover:
            self.buf += leftover
            self._commands()

    def _write(self, out: list[bytes]) -> None:
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))


async def _sink_main(out_path: str) -> None:
    records: list[str] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _SinkProtocol(records), "127.0.0.1", 0, backlog=1024, reuse_address=True
    )
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    with open(out_path, "a") as out:
        while not stop.is_set():
            if records:
                out.write("".join(records))
                records.clear()
                out.flush()
            with _suppress_timeout():
                await asyncio.wait_for(stop.wait(), 0.1)
        server.close()
        out.write("".join(records))
    usage = os.times()
    print(json.dumps({"cpu": usage.user + usage.system}), flush=True)


class _suppress_timeout:  # noqa: N801  (a tiny context manager)
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> bool:
        return kind is not None and issubclass(kind, TimeoutError)


# ---------------------------------------------------------------- client role


@dataclass
class _ClientState:
    remaining: int
    rate: float = 0.0  # messages/s over all sessions; 0 = as fast as possible
    start_ns: int = 0  # wall clock of message 0's scheduled start
    start_mono: float = 0.0  # the same instant on time.monotonic()
    # (id, 250 ns, scheduled ns, started ns)
    accepted: list[tuple[int, int, int, int]] = field(default_factory=list)
    rejected: int = 0
    errors: int = 0
    last_error: str = ""
    next_id: int = 0

    def claim(self) -> int | None:
        """The next message's id (also its place in the schedule), or None when all are taken."""
        if self.remaining <= 0:
            return None
        self.remaining -= 1
        bench_id = self.next_id
        self.next_id += 1
        return bench_id

    def scheduled_ns(self, bench_id: int) -> int:
        return self.start_ns + round(bench_id * 1e9 / self.rate) if self.rate else self.start_ns

    async def wait_turn(self, bench_id: int) -> None:
        """Open loop: message k starts k/rate seconds after the client's start, not earlier."""
        if self.rate:
            delay = self.start_mono + bench_id / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by the server")
        lines.append(line)
        if line[3:4] != b"-":
            return int(line[:3]), b"".join(lines)


def _body(size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    body_size = max(2, size - 260)  # ~260 bytes of headers below
    return (line * (body_size // len(line) + 1))[: body_size - 2] + b"\r\n"


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
    """A connection past EHLO: (reader, writer, whether the server pipelines)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, limit=1 << 20), 60
    )
    try:
        code, _ = await asyncio.wait_for(_reply(reader), 60)
        if code != 220:
            raise ConnectionError(f"banner {code}")
        writer.write(b"EHLO client.bench.test\r\n")
        code, ehlo = await asyncio.wait_for(_reply(reader), 60)
        if code != 250:
            raise ConnectionError(f"EHLO {code}")
    except BaseException:
        writer.close()
        raise
    return reader, writer, b"PIPELINING" in ehlo.upper()


def _rcpt_domain(bench_id: int, domains: int) -> bytes:
    """example.net, or with --domains N message k's domain d{k mod N}.example.net."""
    if domains == 1:
        return RCPT_DOMAIN.encode()
    return b"d%d.%s" % (bench_id % domains, RCPT_DOMAIN.encode())


async def _client_session(
    state: _ClientState, port: int, per_connection: int, recipients: int, body: bytes, domains: int
) -> None:
    date = email.utils.formatdate(localtime=False).encode()
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter, bool] | None = None
    sent = 0  # on this connection
    pending: tuple[int, int] | None = None  # (id, started ns) claimed but not yet begun
    try:
        while state.errors <= 50:
            if pending is None:
                bench_id = state.claim()
                if bench_id is None:
                    break
                await state.wait_turn(bench_id)
                pending = (bench_id, time.time_ns())
            try:
                if connection is None:
                    connection, sent = await _open(port), 0  # a failure keeps the message
                reader, writer, pipelining = connection
                bench_id, started_ns = pending
                pending = None  # from here on an error loses this message, as in SMTP
                sent += 1
                domain = _rcpt_domain(bench_id, domains)
                envelope_rcpts = b"".join(
                    b"RCPT TO:<u%d@%s>\r\n" % (i, domain) for i in range(recipients)
                )
                to_header = b"To: <u0@%s>\r\n" % domain
                commands = [b"MAIL FROM:<%s>\r\n" % SENDER.encode()]
                if pipelining:
                    commands.append(envelope_rcpts + b"DATA\r\n")
                    writer.write(b"".join(commands))
                    codes = [(await asyncio.wait_for(_reply(reader), 60))[0]]
                    for _ in range(recipients + 1):
                        codes.append((await asyncio.wait_for(_reply(reader), 60))[0])
                else:
                    codes = []
                    for command in [commands[0], *envelope_rcpts.splitlines(True), b"DATA\r\n"]:
                        writer.write(command)
                        codes.append((await asyncio.wait_for(_reply(reader), 60))[0])
                if codes[-1] != 354:
                    state.rejected += 1
                    writer.write(b"RSET\r\n")
                    await asyncio.wait_for(_reply(reader), 60)
                else:
                    head = (
                        b"From: <%s>\r\n%sSubject: bench %d\r\nDate: %s\r\n"
                        b"Message-ID: <%d.%d@bench.example.test>\r\nX-Bench-Id: %d\r\n\r\n"
                        % (SENDER.encode(), to_header, bench_id, date, bench_id, port, bench_id)
                    )
                    writer.write(head + body + b".\r\n")
                    code, _ = await asyncio.wait_for(_reply(reader), 120)
                    if code == 250:
                        state.accepted.append(
                            (bench_id, time.time_ns(), state.scheduled_ns(bench_id), started_ns)
                        )
                    else:
                        state.rejected += 1
                if per_connection and sent >= per_connection:
                    connection = None
                    writer.write(b"QUIT\r\n")
                    try:
                        await asyncio.wait_for(_reply(reader), 60)
                    finally:
                        writer.close()
            except (OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError) as error:
                state.errors += 1
                state.last_error = f"{type(error).__name__}: {error}"
                if connection is not None:
                    connection[1].close()
                    connection = None
                await asyncio.sleep(0.1)
        if connection is not None:
            reader, writer, _ = connection
            writer.write(b"QUIT\r\n")
            await asyncio.wait_for(_reply(reader), 60)
    except (OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError) as error:
        state.errors += 1
        state.last_error = f"{type(error).__name__}: {error}"
    finally:
        if connection is not None:
            connection[1].close()


async def _client_main(args: argparse.Namespace) -> None:
    state = _ClientState(remaining=args.messages, rate=args.rate or 0.0)
    body = _body(args.size)
    start = state.start_ns = time.time_ns()
    state.start_mono = time.monotonic()
    await asyncio.gather(
        *(
            _client_session(
                state, args.port, args.per_connection, args.recipients, body, args.domains
            )
            for _ in range(args.sessions)
        )
    )
    end = time.time_ns()
    with open(args.out, "w") as out:
        out.write("".join(f"{i} {t} {s} {b}\n" for i, t, s, b in state.accepted))
    usage = os.times()
    summary = {
        "start": start,
        "end": end,
        "accepted": len(state.accepted),
        "rejected": state.rejected,
        "errors": state.errors,
        "last_error": state.last_error,
        "cpu": usage.user + usage.system,
    }
    print(json.dumps(summary), flush=True)


def _run_loop(main: Any) -> None:
    try:
        import uvloop

        uvloop.run(main)
    except ImportError:
        asyncio.run(main)


# ---------------------------------------------------------------- orchestration


@dataclass(frozen=True)
class Load:
    size: int
    per_connection: int
    recipients: int
    sessions: int
    messages: int
    rate: float = 0.0  # messages/s over all sessions, open loop; 0 = as fast as possible

    def label(self) -> str:
        size = f"{self.size // 1024}KB" if self.size % 1024 == 0 else f"{self.size}B"
        per = "all" if self.per_connection == 0 else str(self.per_connection)
        return f"{size} {per}/conn {self.recipients}rcpt {self.sessions}s"


@dataclass
class Run:
    mta: str
    load: Load
    accepted: int = 0
    rejected: int = 0
    client_errors: int = 0
    delivered: int = 0
    duplicates: int = 0
    accept_seconds: float = 0.0
    deliver_seconds: float = 0.0
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    sink_cpu: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    late_ms: list[float] = field(default_factory=list)  # paced: started minus scheduled
    scheduled_ms: list[float] = field(default_factory=list)  # paced: delivery minus scheduled
    peak_rss: int = 0
    peak_pss: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def accepted_rate(self) -> float:
        return self.accepted / self.accept_seconds if self.accept_seconds else 0.0

    @property
    def delivered_rate(self) -> float:
        return self.delivered / self.deliver_seconds if self.deliver_seconds else 0.0

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.server_cpu / self.accepted if self.accepted else 0.0

    def percentile(self, q: float, values: list[float] | None = None) -> float:
        """The q-quantile (nearest rank) of values, by default the accept-to-delivery latencies."""
        values = self.latencies_ms if values is None else values
        if not values:
            return 0.0
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Children:
    """Every helper process this run started, stopped on close()."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[Any]] = []

    def start(self, command: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        process = subprocess.Popen(command, start_new_session=True, **kwargs)
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            stop_process(process, 10)
        self.processes.clear()


class Sampler(threading.Thread):
    """Peak summed RSS and PSS of a process tree, sampled every 0.2 s."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.peak_rss = 0
        self.peak_pss = 0
        self.halt = threading.Event()

    def sample(self) -> None:
        rss = pss = 0
        for pid in _process_tree(self.root):
            rss += _kb_field(f"/proc/{pid}/status", "VmRSS:")
            pss += _kb_field(f"/proc/{pid}/smaps_rollup", "Pss:")
        self.peak_rss = max(self.peak_rss, rss * 1024)
        self.peak_pss = max(self.peak_pss, pss * 1024)

    def run(self) -> None:
        while not self.halt.is_set():
            self.sample()
            self.halt.wait(0.2)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=5)


def _kb_field(path: str, name: str) -> int:
    try:
        with open(path) as status:
            for line in status:
                if line.startswith(name):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def start_sink(children: Children, out: Path) -> tuple[subprocess.Popen[str], int]:
    sink = children.start(
        [sys.executable, __file__, "--role", "sink", "--out", str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sink.stdout is not None
    line = _readline_within(sink.stdout, START_TIMEOUT)
    if not line.strip().isdigit():
        raise BenchError(f"the sink did not start (said {line!r})")
    return sink, int(line)


def _readline_within(stream: IO[str], timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0] if result else ""


def stop_sink(sink: subprocess.Popen[str]) -> float:
    """SIGTERM the sink; its CPU seconds."""
    sink.send_signal(signal.SIGTERM)
    try:
        out, _ = sink.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        sink.kill()
        sink.communicate(timeout=10)
        raise BenchError("the sink did not stop within 30s") from None
    lines = out.strip().splitlines()
    return float(json.loads(lines[-1])["cpu"]) if lines else 0.0


class SinkLog:
    """Reads the sink's records as they are written: id -> (last time ns, recipients)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = ""
        self.seen: dict[str, list[int]] = {}  # id -> [last ns, rcpts, transactions]
        self.rcpts = 0

    def poll(self) -> None:
        try:
            with self.path.open() as log:
                log.seek(self.offset)
                text = log.read()
                self.offset = log.tell()
        except OSError:
            return
        text = self.partial + text
        lines = text.split("\n")
        self.partial = lines.pop()
        for line in lines:
            bench_id, ns, rcpts = line.split()
            entry = self.seen.setdefault(bench_id, [0, 0, 0])
            entry[0] = max(entry[0], int(ns))
            entry[1] += int(rcpts)
            entry[2] += 1
            self.rcpts += int(rcpts)


class Server:
    """The MTA under test; start() returns the pid at the root of its processes."""

    name = ""
    root: Path

    def start(self, sink_port: int) -> tuple[int, int]:
        raise NotImplementedError

    def stop(self) -> list[str]:
        raise NotImplementedError

    def log_tail(self) -> str:
        raise NotImplementedError


class Ours(Server):
    name = "ours"

    def __init__(
        self, root: Path, key: Path, options: dict[str, dict[str, str]], name: str = "ours"
    ) -> None:
        self.name = name
        self.root = root
        self.key = key
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None
        self.log = root / "mta.log"

    def config(self, port: int, metrics_port: int, sink_port: int) -> str:
        sections: dict[str, dict[str, str]] = {
            "server": {
                "hostname": '"mta.bench.test"',
                "listen": f'["127.0.0.1:{port}"]',
                "relay_networks": '["127.0.0.0/8"]',
                "max_connections": "2000",
                "max_connections_per_ip": "1000",
                "shutdown_timeout": "10",
            },
            "spool": {
                "path": f'"{self.root / "spool"}"',
                "max_size": str(64 * 2**30),
                "min_free_disk": "0",
            },
            "metrics": {"listen": f'"127.0.0.1:{metrics_port}"'},
            "log": {"level": '"info"'},
            "delivery": {},
            "delivery.routes": {'"*"': f'"127.0.0.1:{sink_port}"'},
        }
        for section, values in self.options.items():
            sections.setdefault(section, {}).update(values)
        lines = []
        for section, values in sections.items():
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {value}" for key, value in values.items())
        lines += [
            "[[dkim]]",
            'domain = "example.test"',
            'selector = "s1"',
            f'private_key = "{self.key}"',
            "",
        ]
        return "\n".join(lines)

    def start(self, sink_port: int) -> tuple[int, int]:
        self.root.mkdir()
        port, metrics_port = free_ports(2)
        config = self.root / "mta.toml"
        config.write_text(self.config(port, metrics_port, sink_port))
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [MTA, "serve", "--config", str(config)],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        process = self.process
        wait_for_banner(port, START_TIMEOUT, lambda: process.poll() is None)
        return process.pid, port

    def stop(self) -> list[str]:
        if self.process is None:
            return []
        code = stop_process(self.process, STOP_TIMEOUT)
        self.process = None
        return [] if code == 0 else [f"mta serve exited with {code}"]

    def log_tail(self) -> str:
        return tail(self.log)


class PostfixRelay(Server):
    name = "Postfix"

    def __init__(self, root: Path, size: int) -> None:
        self.root = root
        self.size = size
        self.instance: Postfix | None = None

    def start(self, sink_port: int) -> tuple[int, int]:
        if os.geteuid() != 0:
            raise BenchError("Postfix needs root to start")
        if not Path(POSTFIX).exists():
            raise BenchError("postfix is not installed")
        main_cf = postfix_main_cf(self.root, self.size, [f"relayhost = [127.0.0.1]:{sink_port}"])
        self.instance = Postfix(self.root, free_port(), main_cf)
        return self.instance.start(), self.instance.port

    def stop(self) -> list[str]:
        notes = []
        if self.instance is not None:
            left = self.instance.stored()
            if left:
                notes.append(f"Postfix still queued {left} messages at the end")
            self.instance.stop()
        return notes

    def log_tail(self) -> str:
        return tail(self.root / "maillog")


def bench_one(server: Server, load: Load, args: argparse.Namespace, work: Path) -> Run:
    """One load against one MTA, with its own sink; never raises BenchError."""
    run = Run(server.name, load)
    children = Children()
    sampler: Sampler | None = None
    sink: subprocess.Popen[str] | None = None
    try:
        sink_log = SinkLog(work / "sink.log")
        sink, sink_port = start_sink(children, sink_log.path)
        root_pid, port = server.start(sink_port)
        sampler = Sampler(root_pid)
        sampler.start()
        spy_out = None
        if args.py_spy and server.name != "postfix":
            Path(args.py_spy).mkdir(parents=True, exist_ok=True)
            label = load.label().replace(" ", "_").replace("/", "per")
            spy_out = str(Path(args.py_spy) / f"{server.name}-{label}.txt")  # ours, cluster
        with py_spy(root_pid, spy_out):
            cpu_before = tree_cpu(root_pid)
            client = children.start(
                [
                    sys.executable,
                    __file__,
                    "--role",
                    "client",
                    "--port",
                    str(port),
                    "--messages",
                    str(load.messages),
                    "--sessions",
                    str(load.sessions),
                    "--size",
                    str(load.size),
                    "--per-connection",
                    str(load.per_connection),
                    "--recipients",
                    str(load.recipients),
                    "--domains",
                    str(args.domains),
                    "--rate",
                    repr(load.rate),
                    "--out",
                    str(work / "accepted.log"),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            # a paced client needs its schedule's length on top of the usual allowance
            client_timeout = args.timeout + (load.messages / load.rate if load.rate else 0.0)
            try:
                out, _ = client.communicate(timeout=client_timeout)
            except subprocess.TimeoutExpired:
                raise BenchError(f"the client did not finish within {client_timeout:g}s") from None
            if client.returncode != 0 or not out.strip():
                raise BenchError(f"the client failed (exit {client.returncode})")
            summary = json.loads(out.strip().splitlines()[-1])
            run.accepted, run.rejected = summary["accepted"], summary["rejected"]
            run.client_errors, run.client_cpu = summary["errors"], summary["cpu"]
            if summary["errors"]:
                run.notes.append(f"client: {summary['errors']} errors, {summary['last_error']}")
            start_ns = summary["start"]
            accepted: dict[str, int] = {}
            scheduled: dict[str, int] = {}
            for line in (work / "accepted.log").read_text().splitlines():
                bench_id, ns, scheduled_ns, started_ns = line.split()
                accepted[bench_id] = int(ns)
                scheduled[bench_id] = int(scheduled_ns)
                if load.rate:
                    run.late_ms.append((int(started_ns) - int(scheduled_ns)) / 1e6)
            if accepted:
                run.accept_seconds = (max(accepted.values()) - start_ns) / 1e9
            # wait for delivery: all recipients of every accepted message, or no progress
            expected = len(accepted) * load.recipients
            last_progress, last_count = time.monotonic(), -1
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                if sink.poll() is not None:
                    raise BenchError(f"the sink exited with {sink.returncode}")
                sink_log.poll()
                if sink_log.rcpts >= expected:
                    break
                if sink_log.rcpts != last_count:
                    last_count, last_progress = sink_log.rcpts, time.monotonic()
                elif time.monotonic() - last_progress > args.drain_timeout:
                    run.notes.append(f"delivery stalled for {args.drain_timeout:g}s")
                    break
                time.sleep(0.05)
            run.server_cpu = tree_cpu(root_pid) - cpu_before
        sampler.stop()
        run.peak_rss, run.peak_pss = sampler.peak_rss, sampler.peak_pss
        sampler = None
        run.notes += server.stop()
        run.sink_cpu = stop_sink(sink)
        sink = None
        sink_log.poll()
        delivered_at = []
        for bench_id, (delivered_ns, rcpts, _transactions) in sink_log.seen.items():
            if bench_id not in accepted:
                continue
            if rcpts >= load.recipients:
                run.delivered += 1
                delivered_at.append(delivered_ns)
                run.latencies_ms.append((delivered_ns - accepted[bench_id]) / 1e6)
                if load.rate:
                    run.scheduled_ms.append((delivered_ns - scheduled[bench_id]) / 1e6)
            if rcpts > load.recipients:
                run.duplicates += 1
        if delivered_at:
            run.deliver_seconds = (max(delivered_at) - start_ns) / 1e9
        if run.delivered < run.accepted:
            run.notes.append(f"only {run.delivered} of {run.accepted} accepted were delivered")
        if run.duplicates:
            run.notes.append(f"{run.duplicates} messages delivered more than once")
        late_p99 = run.percentile(0.99, run.late_ms)
        if load.rate and late_p99 > LATE_NOTE_MS:
            run.notes.append(
                f"the client fell behind its schedule (p99 {late_p99:.0f} ms late): "
                f"the server did not keep up with {load.rate:.0f}/s, or too few sessions"
            )
    except BenchError as error:
        run.error = f"{error}; log tail: {server.log_tail()}"
    finally:
        if sampler is not None:
            sampler.stop()
        with _suppress_bench_error():
            server.stop()
        if sink is not None:
            with _suppress_bench_error():
                stop_sink(sink)
        children.close()
    return run


class _suppress_bench_error:  # noqa: N801
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> bool:
        return kind is not None and issubclass(kind, (BenchError, OSError))


def bench_load(
    load: Load | dict[int, Load], args: argparse.Namespace, tmp: Path, key: Path, turn: int
) -> list[list[Run]]:
    """[ours runs, Postfix runs, ours with [cluster] redis runs] over --rounds rounds,
    rotating who goes first.

    load is the same for every MTA (ours with Redis only with --cluster), or {0: ours'
    load, 1: Postfix's load} (either may be missing: that MTA is not run), as
    --half-peak gives each MTA its own rate.
    """
    loads = load if isinstance(load, dict) else {0: load, 1: load, 2: load}
    kinds = [
        k for k in sorted(loads) if (k != 1 or not args.skip_postfix) and (k != 2 or args.cluster)
    ]
    counter = itertools.count()
    runs: list[list[Run]] = [[], [], []]
    for round_no in range(args.rounds):
        first = (turn + round_no) % len(kinds) if kinds else 0
        for which in kinds[first:] + kinds[:first]:
            load = loads[which]
            work = tmp / f"run{next(counter)}-{turn}"
            work.mkdir()
            work.chmod(0o755)
            server: Server = (
                PostfixRelay(work / "postfix", load.size)
                if which == 1
                else Ours(work / "mta", key, args.mta_options)
                if which == 0
                else Ours(work / "mta", key, args.cluster_options, "cluster")
            )
            paced = f" at {load.rate:.0f}/s" if load.rate else ""
            print(f"  {load.label()}{paced}: {server.name} ...", file=sys.stderr, flush=True)
            redis_cpu = tree_cpu(args.redis_pid) if which == 2 else 0.0
            run = bench_one(server, load, args, work)
            if which == 2 and run.delivered:
                redis_cpu = tree_cpu(args.redis_pid) - redis_cpu
                run.notes.append(f"redis-server: {1000 * redis_cpu / run.delivered:.2f} ms CPU/msg")
            runs[which].append(run)
            shutil.rmtree(work, ignore_errors=True)
            # Every round's figures, for the spread behind a median.
            outcome = (
                f"FAILED: {run.error}"
                if run.error
                else f"{run.accepted_rate:.0f} accepted/s, {run.delivered_rate:.0f} delivered/s"
            )
            print(f"    {server.name}: {outcome}", file=sys.stderr, flush=True)
    return runs


def median_run(runs: list[Run]) -> Run | None:
    """The run with the median delivered/s, or p99 latency if paced (figures stay together)."""
    good = [r for r in runs if not r.error]
    if not good:
        return runs[0] if runs else None
    good.sort(key=lambda r: r.percentile(0.99) if r.load.rate else r.delivered_rate)
    return good[len(good) // 2]


@dataclass
class PacedRow:
    basis: str  # "half own peak", "half lower peak", "--rate"
    run: Run | None
    peak: float = 0.0  # the unpaced delivered/s the rate was derived from; 0 = none


def half_peak(
    load: Load,
    peaks: tuple[Run | None, Run | None],
    args: argparse.Namespace,
    tmp: Path,
    key: Path,
    turn: int,
) -> list[PacedRow]:
    """Each MTA paced at half its own peak delivered/s, then both at half the lower peak."""
    peak = [r.delivered_rate if r is not None and not r.error else 0.0 for r in peaks]
    own = {which: replace(load, rate=peak[which] / 2) for which in (0, 1) if peak[which] > 0}
    runs = bench_load(own, args, tmp, key, turn)
    medians = [median_run(runs[0]), median_run(runs[1])]
    rows = [PacedRow("half own peak", medians[which], peak[which]) for which in own]
    if len(own) < 2:
        return rows  # Postfix skipped or a peak run failed: nothing to compare at one rate
    lower = min(peak)
    slower = 0 if peak[0] <= peak[1] else 1  # its own-peak run is already at half the lower
    faster = 1 - slower
    again = bench_load({faster: replace(load, rate=lower / 2)}, args, tmp, key, turn + 1)
    rows.append(PacedRow("half lower peak", medians[slower], peak[slower]))
    rows.append(PacedRow("half lower peak", median_run(again[faster]), peak[faster]))
    rows.sort(key=lambda r: (r.basis != "half own peak", r.run is None or r.run.mta != "ours"))
    return rows


# ---------------------------------------------------------------- report

COLUMNS = (
    f"{'load':<26} {'MTA':<8} {'accepted/s':>10} {'delivered/s':>11} {'CPU ms/msg':>10} "
    f"{'p50 ms':>8} {'p99 ms':>8} {'peak RSS MB':>11} {'(PSS)':>7} {'client+sink ms/msg':>18}"
)


def row(run: Run) -> str:
    if run.error:
        return f"{run.load.label():<26} {run.mta:<8} FAILED: {run.error}"
    helpers = 1000 * (run.client_cpu + run.sink_cpu) / run.accepted if run.accepted else 0
    return (
        f"{run.load.label():<26} {run.mta:<8} {run.accepted_rate:>10.0f} "
        f"{run.delivered_rate:>11.0f} {run.cpu_ms:>10.2f} {run.percentile(0.5):>8.1f} "
        f"{run.percentile(0.99):>8.1f} {run.peak_rss / 2**20:>11.0f} "
        f"{run.peak_pss / 2**20:>7.0f} {helpers:>18.2f}"
    )


def ratio_row(ours: Run, theirs: Run) -> str:
    def ratio(a: float, b: float, width: int, digits: int = 2) -> str:
        return f"{a / b:>{width - 1}.{digits}f}x" if b else f"{'n/a':>{width}}"

    return (
        f"{'':<26} {'ratio':<8} {ratio(ours.accepted_rate, theirs.accepted_rate, 10)} "
        f"{ratio(ours.delivered_rate, theirs.delivered_rate, 11)} "
        f"{ratio(ours.cpu_ms, theirs.cpu_ms, 10)} "
        f"{ratio(ours.percentile(0.5), theirs.percentile(0.5), 8)} "
        f"{ratio(ours.percentile(0.99), theirs.percentile(0.99), 8)} "
        f"{ratio(ours.peak_rss, theirs.peak_rss, 11)} {ratio(ours.peak_pss, theirs.peak_pss, 7)}"
    )


def report(pairs: list[tuple[Run | None, Run | None]], rounds: int, rate: float = 0.0) -> None:
    print()
    if rate:
        print(f"paced, open loop: {rate:g} messages/s over all sessions (accepted/s = achieved)")
    table(pairs, rounds, "p99" if rate else "delivered/s", "ours / Postfix")
    for ours, theirs in pairs:
        for run in (ours, theirs):
            for note in run.notes if run else []:
                print(f"note: {run.mta} {run.load.label()}: {note}")  # type: ignore[union-attr]


def table(pairs: list[tuple[Run | None, Run | None]], rounds: int, by: str, ratio: str) -> None:
    """Each pair's rows, and the first's figures over the second's (``ratio`` says which)."""
    if rounds > 1:
        print(f"median of {rounds} rounds per MTA (by {by})")
    print(COLUMNS)
    print("-" * len(COLUMNS))
    for first, second in pairs:
        for run in (first, second):
            if run is not None:
                print(row(run))
        if first and second and not first.error and not second.error:
            print(ratio_row(first, second))
    print(f"ratio = {ratio} (higher is better for the rates, lower for the rest)")


def cluster_report(pairs: list[tuple[Run | None, Run | None]], rounds: int) -> None:
    """Ours without and with ``[cluster] redis`` per load, and the fleet issue's target."""
    print()
    print('[cluster] redis: ours with it ("cluster", redis-server on loopback), then without')
    table([(shared, alone) for alone, shared in pairs], rounds, "delivered/s", "with / without")
    for alone, shared in pairs:
        if shared is None:
            continue
        for note in shared.notes:
            print(f"note: {shared.mta} {shared.load.label()}: {note}")
        if alone and not alone.error and not shared.error and alone.delivered_rate:
            kept = shared.delivered_rate / alone.delivered_rate
            verdict = "meets" if kept >= 0.9 else "misses"
            print(
                f"target: {shared.load.label()}: delivered/s with Redis {kept:.0%} of without, "
                f"{verdict} the fleet issue's target (the shared state costs at most 10%)"
            )


PACED_COLUMNS = (
    f"{'rate':<16} {'MTA':<8} {'peak del/s':>10} {'target/s':>8} {'achieved/s':>10} "
    f"{'delivered/s':>11} {'CPU ms/msg':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
    f"{'late p99 ms':>11} {'due->del p99':>12}"
)


def paced_row(row: PacedRow) -> str:
    run = row.run
    if run is None:
        return f"{row.basis:<16} {'?':<8} no run"
    if run.error:
        return f"{row.basis:<16} {run.mta:<8} FAILED: {run.error}"
    peak = f"{row.peak:>10.0f}" if row.peak else f"{'-':>10}"
    return (
        f"{row.basis:<16} {run.mta:<8} {peak} {run.load.rate:>8.0f} {run.accepted_rate:>10.0f} "
        f"{run.delivered_rate:>11.0f} {run.cpu_ms:>10.2f} {run.percentile(0.5):>8.1f} "
        f"{run.percentile(0.99):>8.1f} {max(run.latencies_ms, default=0.0):>8.1f} "
        f"{run.percentile(0.99, run.late_ms):>11.1f} "
        f"{run.percentile(0.99, run.scheduled_ms):>12.1f}"
    )


def paced_report(title: str, rows: list[PacedRow], rounds: int) -> None:
    print()
    print(title + (f"; median of {rounds} rounds per MTA (by p99)" if rounds > 1 else ""))
    print(PACED_COLUMNS)
    print("-" * len(PACED_COLUMNS))
    for row in rows:
        print(paced_row(row))
    print(
        "achieved/s = accepted/s at that rate; p50/p99/max = accept (the client's 250) to\n"
        "delivery at the sink; late p99 = how long after its due time the client began a\n"
        "message (all sessions busy: the server fell behind, or too few sessions);\n"
        "due->del p99 = delivery minus due time, what an open-loop sender sees"
    )
    for row in rows:
        run = row.run
        if run is not None and not run.error and run.mta == "ours" and row.basis == "half own peak":
            p99 = run.percentile(0.99)
            verdict = "meets" if p99 < 100 else "misses"
            print(
                f"target: ours p99 accept-to-delivery at half its peak ({run.load.rate:.0f}/s) "
                f"{p99:.1f} ms {verdict} the issue's target (under 100 ms)"
            )
    seen: set[int] = set()
    for row in rows:
        run = row.run
        if run is None or id(run) in seen:
            continue
        seen.add(id(run))
        for note in run.notes:
            print(f"note: {run.mta} {run.load.label()} at {run.load.rate:.0f}/s: {note}")


def sweep_report(points: list[tuple[int, Run | None, Run | None]], plot: Path) -> None:
    print()
    header = (
        f"{'sessions':>8} {'ours acc/s':>10} {'ours del/s':>10} {'Postfix acc/s':>13} "
        f"{'Postfix del/s':>13} {'del ratio':>9} {'ours p99 ms':>11} {'Postfix p99 ms':>14}"
    )
    print(header)
    print("-" * len(header))
    for sessions, ours, theirs in points:
        o_acc = ours.accepted_rate if ours and not ours.error else 0.0
        o_del = ours.delivered_rate if ours and not ours.error else 0.0
        t_acc = theirs.accepted_rate if theirs and not theirs.error else 0.0
        t_del = theirs.delivered_rate if theirs and not theirs.error else 0.0
        o_p99 = ours.percentile(0.99) if ours and not ours.error else 0.0
        t_p99 = theirs.percentile(0.99) if theirs and not theirs.error else 0.0
        ratio = f"{o_del / t_del:.2f}x" if t_del else "n/a"
        print(
            f"{sessions:>8} {o_acc:>10.0f} {o_del:>10.0f} {t_acc:>13.0f} {t_del:>13.0f} "
            f"{ratio:>9} {o_p99:>11.1f} {t_p99:>14.1f}"
        )
    series = {
        "ours delivered/s": [r.delivered_rate if r and not r.error else 0.0 for _, r, _ in points],
        "Postfix delivered/s": [
            r.delivered_rate if r and not r.error else 0.0 for _, _, r in points
        ],
        "ours accepted/s": [r.accepted_rate if r and not r.error else 0.0 for _, r, _ in points],
        "Postfix accepted/s": [r.accepted_rate if r and not r.error else 0.0 for _, _, r in points],
    }
    counts = [count for count, _, _ in points]
    print()
    print(ascii_chart(counts, series))
    plot.write_text(svg_chart(counts, series))
    print(f"plot: {plot}")


def ascii_chart(sessions: list[int], series: dict[str, list[float]]) -> str:
    top = max((v for values in series.values() for v in values), default=0.0) or 1.0
    width = 50
    marks = dict(zip(series, "OPop", strict=False))
    lines = ["delivered/s (O ours, P Postfix), accepted/s (o ours, p Postfix)"]
    for i, count in enumerate(sessions):
        for name, values in series.items():
            bar = int(round(width * values[i] / top))
            lines.append(f"{count:>4} {marks[name]} |{'#' * bar:<{width}}| {values[i]:.0f}")
        lines.append("")
    return "\n".join(lines).rstrip()


def svg_chart(sessions: list[int], series: dict[str, list[float]]) -> str:
    """Throughput against sessions, a line per series; a hand-written SVG."""
    w, h, left, right, top_pad, bottom = 720, 420, 70, 190, 30, 50
    top = max((v for values in series.values() for v in values), default=0.0) or 1.0
    step = 10 ** max(0, len(str(int(top))) - 1)
    y_max = (int(top / step) + 1) * step
    plot_w, plot_h = w - left - right, h - top_pad - bottom

    def x(i: int) -> float:
        return left + (plot_w * i / (len(sessions) - 1) if len(sessions) > 1 else plot_w / 2)

    def y(v: float) -> float:
        return top_pad + plot_h * (1 - v / y_max)

    colours = ["#1f77b4", "#d62728", "#1f77b4", "#d62728"]
    dashes = ["", "", "6,4", "6,4"]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{left}" y="18" font-size="14">Throughput against concurrent sessions</text>',
    ]
    for k in range(6):
        v = y_max * k / 5
        parts.append(
            f'<line x1="{left}" y1="{y(v):.1f}" x2="{left + plot_w}" y2="{y(v):.1f}" '
            'stroke="#ddd"/>'
        )
        parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
    for i, count in enumerate(sessions):
        parts.append(
            f'<text x="{x(i):.1f}" y="{top_pad + plot_h + 18}" text-anchor="middle">{count}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{h - 10}" text-anchor="middle">'
        "sessions (log-spaced points)</text>"
    )
    parts.append(
        f'<text x="16" y="{top_pad + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {top_pad + plot_h / 2})">messages/s</text>'
    )
    for n, (name, values) in enumerate(series.items()):
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
        dash = f' stroke-dasharray="{dashes[n]}"' if dashes[n] else ""
        parts.append(
            f'<polyline points="{points}" fill="none" stroke="{colours[n]}" '
            f'stroke-width="2"{dash}/>'
        )
        for i, v in enumerate(values):
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="{colours[n]}"/>')
        ly = top_pad + 20 + 22 * n
        parts.append(
            f'<line x1="{w - right + 15}" y1="{ly}" x2="{w - right + 45}" y2="{ly}" '
            f'stroke="{colours[n]}" stroke-width="2"{dash}/>'
        )
        parts.append(f'<text x="{w - right + 50}" y="{ly + 4}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- command line


def _int_list(text: str) -> list[int]:
    values = []
    for word in text.split(","):
        word = word.strip().lower()
        scale = 1024 if word.endswith("k") else 1
        try:
            values.append(int(word.removesuffix("k")) * scale)
        except ValueError:
            raise argparse.ArgumentTypeError(f'"{word}" is not a number') from None
    return values


def _mta_option(text: str) -> tuple[str, str, str]:
    name, sep, value = text.partition("=")
    section, dot, key = name.strip().rpartition(".")
    if not sep or not dot or not key:
        raise argparse.ArgumentTypeError('expected SECTION.KEY=VALUE, e.g. "server.workers=2"')
    return section, key, value.strip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--role", choices=["bench", "sink", "client"], default="bench")
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--size",
        type=_int_list,
        help="message sizes in bytes, comma-separated, k = 1024 (default: 4k)",
    )
    parser.add_argument(
        "--per-connection",
        type=_int_list,
        help="messages per connection, comma-separated; 0 = all of a session's (default: 0)",
    )
    parser.add_argument(
        "--recipients", type=_int_list, help="recipients per message, comma-separated (default 1)"
    )
    parser.add_argument(
        "--sessions", type=_int_list, help="concurrent client sessions, comma-separated (20)"
    )
    parser.add_argument(
        "--domains",
        type=int,
        default=1,
        help="recipient domains, message k to d{k mod N}.example.net (default 1: example.net)",
    )
    parser.add_argument(
        "--messages",
        type=int,
        help="messages per run (default 4000; 2000 per point of a sweep)",
    )
    parser.add_argument(
        "--sessions-sweep",
        type=_int_list,
        metavar="LIST",
        help="throughput against sessions (e.g. 1,5,10,20,50) for the first load",
    )
    parser.add_argument("--plot", default="bench-sweep.svg", help="where the sweep's SVG plot goes")
    parser.add_argument(
        "--rate",
        type=float,
        metavar="R",
        help="open loop: start message k k/R seconds after the client starts (R messages/s "
        "over all sessions) instead of as fast as possible; for every load",
    )
    parser.add_argument(
        "--half-peak",
        action="store_true",
        help="after the unpaced runs, pace the first load at half of each MTA's peak "
        "delivered/s and both at half the lower peak; p50/p99/max latency table",
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs per MTA and load (median)")
    parser.add_argument("--skip-postfix", action="store_true", help="only measure our MTA")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="also run ours with [cluster] redis (a redis-server started here) and compare",
    )
    parser.add_argument(
        "--mta-option",
        type=_mta_option,
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help='extra TOML setting for our MTA, value in TOML syntax (e.g. "server.workers=2")',
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="most seconds a load or a drain may take"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="give up waiting for delivery after this many seconds without progress",
    )
    parser.add_argument(
        "--py-spy",
        metavar="DIR",
        help="record our daemon with py-spy during each run (collapsed stacks in DIR)",
    )
    args = parser.parse_args(argv)
    if args.role != "bench":
        for name in ("size", "per_connection", "recipients", "sessions"):
            values = getattr(args, name)
            setattr(args, name, values[0] if values else 0)
        return args
    args.mta_options = {}
    for section, key, value in args.mta_option:
        args.mta_options.setdefault(section, {})[key] = value
    for name in ("size", "recipients", "sessions", "sessions_sweep"):
        if any(v < 1 for v in getattr(args, name) or []):
            parser.error(f"--{name.replace('_', '-')} values must be at least 1")
    if any(v < 0 for v in args.per_connection or []):
        parser.error("--per-connection values must be 0 (all) or more")
    if args.messages is not None and args.messages < 1 or args.rounds < 1 or args.domains < 1:
        parser.error("--messages, --rounds and --domains must be at least 1")
    if args.rate is not None and not 0 < args.rate < float("inf"):
        parser.error("--rate must be a positive number of messages/s")
    if args.rate and args.half_peak:
        parser.error("--half-peak chooses its own rates; it does not combine with --rate")
    if (args.rate or args.half_peak) and args.sessions_sweep:
        parser.error("--sessions-sweep measures peak throughput; no --rate or --half-peak")
    return args


def loads_of(args: argparse.Namespace) -> list[Load]:
    messages = args.messages or (2000 if args.sessions_sweep else 4000)
    if args.sessions_sweep:
        size = (args.size or [4096])[0]
        per = (args.per_connection or [0])[0]
        rcpts = (args.recipients or [1])[0]
        return [Load(size, per, rcpts, s, messages) for s in args.sessions_sweep]
    rate = args.rate or 0.0
    if not any((args.size, args.per_connection, args.recipients, args.sessions)):
        # the target load, then one factor changed at a time
        return [
            Load(4096, 0, 1, 20, messages, rate),
            Load(4096, 1, 1, 20, messages, rate),
            Load(4096, 0, 20, 20, messages, rate),
            Load(102400, 0, 1, 20, messages, rate),
        ]
    return [
        Load(size, per, rcpts, sessions, messages, rate)
        for size, per, rcpts, sessions in itertools.product(
            args.size or [4096],
            args.per_connection or [0],
            args.recipients or [1],
            args.sessions or [20],
        )
    ]


def start_redis(root: Path) -> RedisServer:
    if not (shutil.which("redis-server") or shutil.which("redis-server", path=SBIN)):
        raise BenchError("--cluster needs redis-server (the Debian package redis-server)")
    return RedisServer(root).start()


def cluster_options(args: argparse.Namespace, url: str) -> dict[str, dict[str, str]]:
    """Ours' --mta-option settings with ``[cluster]`` naming the Redis at ``url``."""
    options = dict(args.mta_options)
    options["cluster"] = {"redis": f'"{url}"', "node": '"bench"'} | options.get("cluster", {})
    return options


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # every finally runs: servers stopped, temp dirs removed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "sink":
        _run_loop(_sink_main(args.out))
        return 0
    if args.role == "client":
        _run_loop(_client_main(args))
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    tmp.chmod(0o755)  # Postfix daemons drop to the postfix user and must reach the queue
    failed = False
    redis: RedisServer | None = None
    try:
        key = make_key(tmp / "dkim")
        if args.cluster:
            redis = start_redis(tmp / "redis")
            assert redis.process is not None
            args.redis_pid = redis.process.pid
            args.cluster_options = cluster_options(args, redis.url)
        loads = loads_of(args)
        print(
            f"{loads[0].messages} messages per run; client and sink: this tool (asyncio, uvloop); "
            f"ours with DKIM RSA-2048, Postfix {'skipped' if args.skip_postfix else 'no DKIM'}",
            file=sys.stderr,
            flush=True,
        )
        pairs: list[tuple[Run | None, Run | None]] = []
        clustered: list[tuple[Run | None, Run | None]] = []
        for turn, load in enumerate(loads):
            ours_runs, their_runs, cluster_runs = bench_load(load, args, tmp, key, turn)
            pairs.append((median_run(ours_runs), median_run(their_runs)))
            clustered.append((median_run(ours_runs), median_run(cluster_runs)))
            failed = failed or any(r.error for r in ours_runs + their_runs + cluster_runs)
        report(pairs, args.rounds, args.rate or 0.0)
        if args.cluster:
            cluster_report(clustered, args.rounds)
        if args.rate:
            for load, (ours, theirs) in zip(loads, pairs, strict=True):
                paced_report(
                    f"paced, open loop: {load.label()}, {load.messages} messages",
                    [PacedRow("--rate", run) for run in (ours, theirs) if run is not None],
                    args.rounds,
                )
        if args.half_peak:
            load = loads[0]
            print(f"half peak: {load.label()} ...", file=sys.stderr, flush=True)
            rows = half_peak(load, pairs[0], args, tmp, key, len(loads))
            failed = failed or any(r.run is None or r.run.error for r in rows)
            paced_report(
                f"half of peak load, open loop: {load.label()}, {load.messages} messages "
                "(peak = delivered/s of the unpaced run above)",
                rows,
                args.rounds,
            )
        if args.sessions_sweep:
            sweep_report(
                [(load.sessions, o, t) for load, (o, t) in zip(loads, pairs, strict=True)],
                Path(args.plot),
            )
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
