"""Relay soak: smtp-source -> Postfix -> our MTA -> smtp-sink, inflow control off and on.

Usage:
  .venv/bin/python tools/relay_soak.py        # 120 s of injection, inflow control off, then on
  .venv/bin/python tools/relay_soak.py --seconds 60 --runs on --inflow-backlog 5000
  .venv/bin/python tools/relay_soak.py --messages 20000 --interval 2 --keep

Run it from the repository root, as the other tools, as root (Postfix).

Issue 21's "internal relay" soak as a tool: an application (Postfix's
smtp-source) hands 4 KB messages to a Postfix relay, whose relayhost is our
MTA, which delivers them to a receiver (Postfix's smtp-sink).  Before inflow
control our MTA accepted faster than it delivered on a 2-core machine and its
spool grew without bound; with it (``[server] inflow_backlog``), MAIL FROM
waits once the node's untried jobs pass the limit, so the backlog should stay
near the limit and the excess wait in Postfix's queue, whose own
``in_flow_delay`` then slows the client (once Postfix's active queue is full:
``qmgr_message_active_limit``, 20,000; until then Postfix takes in all it can).

Each run (``--runs``, by default "off" then "on"):

1. Start: smtp-sink on 127.0.0.1 (tests/harness/sink.py: ``-c`` counters, one
   dump file per message), our MTA (tools/bench.py's ``Ours``: a DKIM key from
   ``mta dkim keygen``, every message signed, ``[delivery.routes] "*"`` to the
   sink, other settings at their defaults, plus ``--mta-option``) with
   ``[server] inflow_backlog = 0`` (off) or ``--inflow-backlog`` (on, 2,000:
   small enough to be reached in a short run; the default, 20,000, would take
   longer than the run to reach) and ``inflow_max_delay = --inflow-max-delay``,
   and a throwaway Postfix (tools/bench.py's ``PostfixRelay``: relayhost our
   MTA, delivery at Postfix's defaults: 20 connections to one destination,
   ``in_flow_delay`` 1 s).
2. Inject: ``smtp-source -s --sessions -m --messages -l --size -d`` (built by
   tools/bench_accept.py) into Postfix, for ``--seconds`` or until it has sent
   ``--messages``, whichever comes first; then it is stopped (SIGTERM), in the
   middle of its transactions.  What counts as injected is what Postfix
   committed (a qmgr "queue active" line in its maillog, once per queue file):
   a transaction cut by the stop may or may not have been committed.
3. Drain: nothing more comes in; the run waits until Postfix's queue and our
   spool are both empty, at most ``--drain-seconds``, and gives up earlier
   when nothing moved for ``--stall-seconds``.
4. Stop everything, then count (below).

Every ``--interval`` seconds (and at the end of each phase) it samples:

- from our /metrics: ``mta_messages_received_total`` (accepted/s),
  ``mta_messages_delivered_total`` (delivered/s), the gauge
  ``mta_spool_untried_jobs`` ("gauge"; it is set at each MAIL FROM, so it
  keeps its last value while no mail comes in, e.g. through the drain),
  ``mta_inflow_delayed_total`` and ``mta_inflow_delay_seconds_total``
  (transactions made to wait per second, and their mean wait),
  ``mta_egress_connections`` (deliveries under way at the sample), and over
  the interval the p50 of ``mta_spool_commit_seconds`` and the p99 of
  ``mta_event_loop_lag_seconds`` (interpolated in their buckets by
  tools/backlog.py's ``quantile``): where delivery's time goes;
- from our spool, opened read-only beside the daemon through
  ``mta.spool.store.Spool`` (what ``mta queue stats`` reads, without starting
  a Python per sample): untried jobs (the count inflow control reads), ready
  jobs, messages and bytes;
- Postfix: messages its cleanup took in per second (its maillog, read as it
  grows) and the messages in its queue (files under maildrop, incoming,
  active, deferred and hold);
- the sink: messages received per second (smtp-sink's counter);
- CPU, in % of one core: our processes' and Postfix's (every process of each
  tree, reaped children included: tools/bench_accept.py's ``tree_cpu``), the
  busiest of our processes (with one destination domain, the worker that owns
  it delivers everything, on the loop that also serves its share of the SMTP
  sessions), the tools' (smtp-source, smtp-sink, this tool), and everything
  else the machine ran (its busy time in /proc/stat minus those: other
  people's work, kernel threads); and the 1-minute load average.  Other work
  on the two cores moves every figure.

Per run it prints the time series, then a summary: mean accepted/s and
delivered/s over the injection, peak untried jobs (spool and gauge), peak
ready jobs and spool size, the spool at the end of the injection and at the
end, Postfix's peak queue, the inflow waits, the drain time, and the counts
along the chain: injected (Postfix committed) -> sent by Postfix to us ->
received by us -> delivered by us -> received by the sink.  Loss and
duplicates are checked by Message-ID: smtp-source writes a unique one per
message of a run (process id, session socket, a counter); Postfix's maillog
names the Message-ID of every message it committed, and every dump file of
the sink has the message's Message-ID and the queue IDs Postfix and our MTA
put in their Received fields.  "lost" are committed Message-IDs that never
reached the sink (only meaningful when both queues drained; otherwise what
is still queued is said beside it); a duplicate is a Message-ID the sink got
more than once, and is put down to whoever made the copy: Postfix accepting
it twice (different Postfix queue IDs), Postfix relaying it to us twice
(different queue IDs of ours), or our MTA delivering one queue ID twice.
Finally a table compares the runs.

Every wait is bounded; every process started here is stopped and the work
directory (under TMPDIR) removed on exit, error, Ctrl-C or SIGTERM (the work
directory is kept with ``--keep``).  Exit status: 0 when every run was
measured, whatever the figures (lost mail is printed, not an exit status); 1
on an error (a server that would not start or died); 130 when interrupted.
Needs Linux, root and the Debian postfix package (postfix, smtp-source,
smtp-sink).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

# tools/ is not a package; importing bench also puts the repository root on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from backlog import Buckets, difference, quantile  # noqa: E402
from bench import Children, Ours, PostfixRelay, _mta_option, _terminate  # noqa: E402
from bench_accept import (  # noqa: E402
    CLOCK_TICKS,
    POSTFIX,
    SMTP_SOURCE,
    BenchError,
    _process_tree,
    alive,
    count_files,
    make_key,
    smtp_source_command,
    stop_process,
    tail,
    tree_cpu,
)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from mta.spool.records import JobState  # noqa: E402
from mta.spool.store import Spool  # noqa: E402
from tests.harness.programs import SBIN  # noqa: E402
from tests.harness.sink import Sink  # noqa: E402

SPOOL_MAX_SIZE = 64 * 2**30  # Ours' [spool] max_size; LMDB maps it, the file grows as needed
CHECK_EVERY = 0.5  # seconds between liveness checks within an interval
BUSY_SECONDS = 3.0  # how long the machine's other work is measured before a run
METRICS = {
    "mta_messages_received_total": "received",
    "mta_messages_delivered_total": "delivered",
    "mta_spool_untried_jobs": "gauge",
    "mta_inflow_delayed_total": "delayed",
    "mta_inflow_delay_seconds_total": "delay_seconds",
    "mta_egress_connections": "connections",
}
HISTOGRAMS = {
    "mta_spool_commit_seconds_bucket": "commit",
    "mta_event_loop_lag_seconds_bucket": "lag",
}
# Postfix's maillog: what it committed, what it sent on, and what became of each queue file.
CLEANUP_RE = re.compile(r"postfix/cleanup\[\d+\]: (\w+): message-id=(<[^>]*>)")
ACTIVE_RE = re.compile(
    r"postfix/qmgr\[\d+\]: (\w+): from=<[^>]*>, size=\d+, nrcpt=\d+ \(queue active"
)
STATUS_RE = re.compile(r"postfix/smtp\[\d+\]: (\w+): to=<[^>]*>,.* status=(\w+)")
REMOVED_RE = re.compile(r"postfix/qmgr\[\d+\]: (\w+): removed")
# A sink dump's header: smtp-source's Message-Id, the queue IDs of Postfix and of ours.
MESSAGE_ID_RE = re.compile(rb"^Message-Id:[ \t]*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)
RECEIVED_ID_RE = re.compile(rb"\(((?:Postfix)|(?:mta))\) with \w+ id (\w+)")
COLUMNS = (
    ("t s", 6),
    ("phase", 6),
    ("PF in/s", 7),
    ("acc/s", 6),
    ("del/s", 6),
    ("sink/s", 6),
    ("untried", 8),
    ("gauge", 7),
    ("ready", 7),
    ("spool MB", 8),
    ("PF queue", 8),
    ("waits/s", 7),
    ("wait ms", 7),
    ("conns", 5),
    ("commit ms", 9),
    ("lag p99", 7),
    ("ours %", 6),
    ("top %", 5),
    ("PF %", 5),
    ("tools %", 7),
    ("else %", 6),
    ("load", 5),
)


class Maillog:
    """Postfix's maillog, read as it grows: what it committed and what it sent on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: IO[str] | None = None
        self.partial = ""
        self.current: dict[str, str] = {}  # queue ID -> Message-ID, while the file exists
        self.active: set[str] = set()  # queue IDs committed and not yet removed
        self.committed: collections.Counter[str] = collections.Counter()  # Message-ID -> times
        self.cleaned = 0  # messages its cleanup took in (a transaction cut short too)
        self.statuses: collections.Counter[str] = collections.Counter()  # sent, deferred, ...

    def poll(self) -> None:
        if self.file is None:
            try:
                self.file = self.path.open(errors="replace")
            except OSError:
                return  # postlogd has not written yet
        text = self.partial + self.file.read()
        *lines, self.partial = text.split("\n")
        for line in lines:
            self._line(line)

    def _line(self, line: str) -> None:
        if found := CLEANUP_RE.search(line):
            self.current[found[1]] = found[2]
            self.cleaned += 1
        elif found := ACTIVE_RE.search(line):
            if found[1] not in self.active:  # a deferred file comes back to active: once
                self.active.add(found[1])
                self.committed[self.current.get(found[1], "?")] += 1
        elif found := STATUS_RE.search(line):
            self.statuses[found[2]] += 1
        elif found := REMOVED_RE.search(line):
            self.active.discard(found[1])
            self.current.pop(found[1], None)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    @property
    def injected(self) -> int:
        return sum(self.committed.values())


@dataclass
class Tick:
    """One sample; the counters are totals since the daemon started."""

    at: float  # seconds since the injection began
    phase: str  # "inject" or "drain"
    received: float = 0.0
    delivered: float = 0.0
    gauge: float = 0.0
    delayed: float = 0.0
    delay_seconds: float = 0.0
    untried: int = 0
    ready: int = 0
    messages: int = 0
    spool_bytes: int = 0
    postfix_queue: int = 0
    postfix_deferred: int = 0
    injected: int = 0  # messages Postfix's cleanup took in
    sink: int = 0
    ours_cpu: float = 0.0  # CPU seconds: our processes
    postfix_cpu: float = 0.0  # Postfix's
    tools_cpu: float = 0.0  # smtp-source, smtp-sink and this tool
    machine_cpu: float = 0.0  # every process on the machine (/proc/stat)
    load: float = 0.0
    connections: float = 0.0  # our deliveries under way
    commit: Buckets = field(default_factory=list)  # our spool commits' seconds
    lag: Buckets = field(default_factory=list)  # our event loops' lag
    ours_processes: dict[int, int] = field(default_factory=dict)  # pid -> CPU clock ticks

    @property
    def else_cpu(self) -> float:
        """CPU seconds of everything else on the machine: other work, kernel threads."""
        return self.machine_cpu - self.ours_cpu - self.postfix_cpu - self.tools_cpu

    def busy(self, previous: Tick, name: str) -> float:
        """CPU seconds of ``name`` over the interval since ``previous``, in % of a core
        (0 at least: the counters are read one after the other)."""
        spent = getattr(self, name) - getattr(previous, name)
        return max(0.0, 100 * spent / (self.at - previous.at))


@dataclass
class SinkCount:
    files: int = 0  # dump files
    parsed: int = 0  # of which complete messages
    counter: int = 0  # smtp-sink's own message counter
    without_id: int = 0
    ids: collections.Counter[str] = field(default_factory=collections.Counter)
    # Message-ID -> (Postfix queue ID, our queue ID) of each copy
    copies: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


@dataclass
class Soak:
    """One run: its settings, samples and counts."""

    name: str  # "off" or "on"
    inflow_backlog: int
    interval: float
    busy_before: float = 0.0  # % of a core the machine was busy just before the run
    ticks: list[Tick] = field(default_factory=list)
    inject_seconds: float = 0.0
    client_exit: str = ""
    drain_seconds: float = 0.0
    drained: bool = False
    maillog: Maillog | None = None
    sink: SinkCount = field(default_factory=SinkCount)
    notes: list[str] = field(default_factory=list)

    @property
    def end_of_injection(self) -> Tick:
        return [t for t in self.ticks if t.phase == "inject"][-1]

    def peak(self, name: str) -> float:
        return max((getattr(t, name) for t in self.ticks), default=0)

    def mean_rate(self, name: str) -> float:
        """Per second over the injection, of a counter (received, delivered, ...)."""
        first, last = self.ticks[0], self.end_of_injection
        seconds = last.at - first.at
        return (getattr(last, name) - getattr(first, name)) / seconds if seconds > 0 else 0.0


# ---------------------------------------------------------------- sampling


def scrape(tick: Tick, metrics_port: int) -> None:
    """Our /metrics into ``tick``: the METRICS summed over their samples, the HISTOGRAMS'
    buckets."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    buckets: dict[str, dict[float, float]] = {name: {} for name in HISTOGRAMS.values()}
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            families = list(text_string_to_metric_families(response.read().decode()))
    except OSError as error:
        raise BenchError(f"our /metrics, {url}: {error}") from None
    for sample in (sample for family in families for sample in family.samples):
        if sample.name in METRICS:
            name = METRICS[sample.name]
            setattr(tick, name, getattr(tick, name) + sample.value)
        elif sample.name in HISTOGRAMS:
            counts = buckets[HISTOGRAMS[sample.name]]
            bound = float(sample.labels["le"])
            counts[bound] = counts.get(bound, 0.0) + sample.value
    for name, counts in buckets.items():
        setattr(tick, name, sorted(counts.items()))


def machine_cpu() -> float:
    """CPU seconds the whole machine has been busy (user, system, interrupts, steal)."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


class Rig:
    """The sink, our MTA and Postfix of one run; close() stops what was started."""

    def __init__(self, work: Path, key: Path, options: dict[str, dict[str, str]], size: int):
        self.work = work
        self.sink = Sink(work / "sink", host="127.0.0.1", name="sink.soak.test")
        self.ours = Ours(work / "mta", key, options)
        self.relay = PostfixRelay(work / "postfix", size)
        self.children = Children()
        self.spool: Spool | None = None
        self.maillog = Maillog(work / "postfix" / "maillog")
        self.metrics_port = 0
        self.ours_pid = self.postfix_pid = 0
        self.sink_started = False

    def start(self) -> int:
        """Start the sink, ours and Postfix; Postfix's SMTP port."""
        try:
            self.sink.start()
        except (AssertionError, RuntimeError) as error:
            raise BenchError(f"smtp-sink did not start: {error}") from None
        self.sink_started = True
        self.ours_pid, our_port = self.ours.start(self.sink.port)
        settings = tomllib.loads((self.ours.root / "mta.toml").read_text())
        self.metrics_port = int(settings["metrics"]["listen"].rpartition(":")[2])
        self.spool = Spool(settings["spool"]["path"], SPOOL_MAX_SIZE, create=False)
        self.postfix_pid, postfix_port = self.relay.start(our_port)  # relayhost = ours
        return postfix_port

    def check(self) -> None:
        """BenchError if a server died."""
        if self.ours.process is None or self.ours.process.poll() is not None:
            raise BenchError(f"mta serve exited during the run; log: {self.ours.log_tail()}")
        if not alive(self.postfix_pid):
            raise BenchError(f"Postfix's master exited; maillog: {self.relay.log_tail()}")
        if self.sink.process is None or self.sink.process.poll() is not None:
            raise BenchError("smtp-sink exited during the run")

    def sample(self, at: float, phase: str) -> Tick:
        self.check()
        assert self.spool is not None and self.relay.instance is not None
        tick = Tick(at, phase)
        scrape(tick, self.metrics_port)
        with self.spool.read() as txn:
            tick.untried = self.spool.untried_jobs(txn)
            stats = self.spool.stats(txn)
        tick.ready = stats.by_state.get(JobState.READY.value, 0)
        tick.messages, tick.spool_bytes = stats.messages, stats.bytes
        tick.postfix_queue = self.relay.instance.stored()
        tick.postfix_deferred = count_files(self.relay.instance.queue / "deferred")
        self.maillog.poll()
        tick.injected = self.maillog.cleaned
        tick.sink = self.sink.counters().messages
        tick.ours_processes = _process_tree(self.ours_pid)
        tick.ours_cpu = sum(tick.ours_processes.values()) / CLOCK_TICKS
        tick.postfix_cpu = tree_cpu(self.postfix_pid)
        helpers = [
            p for p in [*self.children.processes, self.sink.process] if p and p.poll() is None
        ]
        mine = os.times()  # this tool, and its children once reaped (smtp-source, at its stop)
        tick.tools_cpu = sum(mine[:4]) + sum(tree_cpu(helper.pid) for helper in helpers)
        tick.machine_cpu = machine_cpu()
        tick.load = os.getloadavg()[0]
        return tick

    def queued(self) -> tuple[int, int]:
        """(messages in Postfix's queue, messages in our spool), for the drain."""
        self.check()
        assert self.spool is not None and self.relay.instance is not None
        with self.spool.read() as txn:
            ours = self.spool.message_count(txn)
        return self.relay.instance.stored(), ours

    def close(self, notes: list[str]) -> None:
        """Stop everything (the client first, the sink last); notes get what is worth saying."""
        self.children.close()
        notes += self.relay.stop()
        self.relay.instance = None  # stopped: a second close() has nothing to do
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        if self.ours.process is not None:
            notes += self.ours.stop()
        if self.sink_started:
            self.sink.stop()
            self.sink_started = False
        self.maillog.poll()
        self.maillog.close()


def count_sink(sink: Sink) -> SinkCount:
    """What the (stopped) sink received, by Message-ID."""
    count = SinkCount(files=count_files(sink.dump_dir), counter=sink.counters().messages)
    for dumped in sink.messages():
        count.parsed += 1
        head = dumped.data[: dumped.data.find(b"\r\n\r\n")]
        found = MESSAGE_ID_RE.search(head)
        if found is None:
            count.without_id += 1
            continue
        message_id = found[1].decode(errors="replace")
        ids = {kind.decode(): queue_id.decode() for kind, queue_id in RECEIVED_ID_RE.findall(head)}
        count.ids[message_id] += 1
        count.copies.setdefault(message_id, []).append(
            (ids.get("Postfix", "?"), ids.get("mta", "?"))
        )
    return count


# ---------------------------------------------------------------- one run


def soak(name: str, backlog: int, args: argparse.Namespace, work: Path, key: Path) -> Soak:
    """One run with ``inflow_backlog = backlog``; BenchError if it could not be measured."""
    run = Soak(name, backlog, args.interval)
    options = {section: dict(values) for section, values in args.mta_options.items()}
    options.setdefault("server", {}).update(
        {"inflow_backlog": str(backlog), "inflow_max_delay": repr(args.inflow_max_delay)}
    )
    work.mkdir()
    work.chmod(0o755)  # Postfix's daemons drop to the postfix user and must reach its queue
    rig = Rig(work, key, options, args.size)
    run.maillog = rig.maillog
    before = machine_cpu()
    time.sleep(BUSY_SECONDS)  # what other work there is, before ours starts
    run.busy_before = 100 * (machine_cpu() - before) / BUSY_SECONDS
    try:
        postfix_port = rig.start()
        inject(run, rig, args, postfix_port)
        drain(run, rig, args)
    except BenchError as error:
        raise BenchError(f"inflow control {name}: {error}") from None
    finally:
        rig.close(run.notes)
    run.sink = count_sink(rig.sink)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return run


def inject(run: Soak, rig: Rig, args: argparse.Namespace, postfix_port: int) -> None:
    """smtp-source into Postfix for --seconds (or --messages), sampling."""
    command = smtp_source_command(args, postfix_port, args.sessions, args.messages, reuse=True)
    run.ticks.append(rig.sample(0.0, "inject"))
    report_tick(run)
    with (rig.work / "smtp-source.log").open("ab") as log:
        started = time.monotonic()
        client = rig.children.start(command, stdout=log, stderr=log)
    end = started + args.seconds
    next_tick = started + args.interval
    while client.poll() is None and time.monotonic() < end:
        time.sleep(max(0.0, min(CHECK_EVERY, next_tick - time.monotonic(), end - time.monotonic())))
        rig.check()
        if time.monotonic() >= next_tick and time.monotonic() < end and client.poll() is None:
            run.ticks.append(rig.sample(time.monotonic() - started, "inject"))
            report_tick(run)
            next_tick += args.interval
    code = client.poll()
    stop_process(client, 10)
    run.inject_seconds = time.monotonic() - started
    if code is None:
        run.client_exit = f"stopped after {run.inject_seconds:.0f} s"
    else:
        run.client_exit = f"finished with exit {code} after {run.inject_seconds:.0f} s"
        if code != 0:
            run.notes.append(
                f"smtp-source exited with {code}: {tail(rig.work / 'smtp-source.log')}"
            )
    run.ticks.append(rig.sample(run.inject_seconds, "inject"))
    report_tick(run)
    run.inject_seconds = run.ticks[-1].at


def drain(run: Soak, rig: Rig, args: argparse.Namespace) -> None:
    """Until both queues are empty: --drain-seconds at most, or until nothing moved for
    --stall-seconds."""
    started = time.monotonic()
    offset = run.inject_seconds  # the table's clock goes on from the injection
    deadline = started + args.drain_seconds
    next_tick = started + args.interval
    moved_at, last = started, (-1, -1, -1)
    stalled = False
    while time.monotonic() < deadline:
        queued = rig.queued()
        if queued == (0, 0):
            run.drained = True
            break
        state = (*queued, rig.sink.counters().messages)
        if state != last:
            moved_at, last = time.monotonic(), state
        elif time.monotonic() - moved_at > args.stall_seconds:
            run.notes.append(
                f"the drain stalled: nothing moved for {args.stall_seconds:g} s with "
                f"{queued[0]} messages in Postfix's queue and {queued[1]} in ours"
            )
            stalled = True
            break
        if time.monotonic() >= next_tick:
            run.ticks.append(rig.sample(offset + time.monotonic() - started, "drain"))
            report_tick(run)
            next_tick += args.interval
        time.sleep(CHECK_EVERY)
    run.drain_seconds = time.monotonic() - started
    if not run.drained and not stalled:
        run.notes.append(f"not drained within --drain-seconds {args.drain_seconds:g}")
    time.sleep(1.0)  # smtp-sink writes its dump after its 250; let the last ones land
    run.ticks.append(rig.sample(offset + run.drain_seconds, "drain"))
    report_tick(run)


# ---------------------------------------------------------------- report


def row_of(previous: Tick | None, tick: Tick) -> list[str]:
    """One line of the time series: rates over the interval that ends at ``tick``."""
    dt = tick.at - previous.at if previous is not None else 0.0

    def rate(name: str) -> str:
        if previous is None or dt <= 0:
            return "-"
        return f"{(getattr(tick, name) - getattr(previous, name)) / dt:.0f}"

    def busy(name: str) -> str:
        return f"{tick.busy(previous, name):.0f}" if previous is not None and dt > 0 else "-"

    waits = tick.delayed - previous.delayed if previous is not None else 0.0
    waited = tick.delay_seconds - previous.delay_seconds if previous is not None else 0.0
    return [
        f"{tick.at:.0f}",
        tick.phase,
        rate("injected"),
        rate("received"),
        rate("delivered"),
        rate("sink"),
        f"{tick.untried}",
        f"{tick.gauge:.0f}",
        f"{tick.ready}",
        f"{tick.spool_bytes / 2**20:.0f}",
        f"{tick.postfix_queue}",
        rate("delayed"),
        f"{1000 * waited / waits:.0f}" if waits else "-",
        f"{tick.connections:.0f}",
        percentile_ms(previous, tick, "commit", 0.5),
        percentile_ms(previous, tick, "lag", 0.99),
        busy("ours_cpu"),
        busiest(previous, tick),
        busy("postfix_cpu"),
        busy("tools_cpu"),
        busy("else_cpu"),
        f"{tick.load:.1f}",
    ]


def busiest(previous: Tick | None, tick: Tick) -> str:
    """The CPU of the busiest of our processes over the interval (a worker), in % of a core."""
    if previous is None or tick.at <= previous.at:
        return "-"
    spent = [t - previous.ours_processes.get(pid, t) for pid, t in tick.ours_processes.items()]
    return f"{100 * max(spent, default=0) / CLOCK_TICKS / (tick.at - previous.at):.0f}"


def percentile_ms(previous: Tick | None, tick: Tick, name: str, q: float) -> str:
    """The q-quantile of a histogram over the interval, in ms (backlog.py's interpolation)."""
    if previous is None:
        return "-"
    window = difference(getattr(tick, name), getattr(previous, name))
    return f"{1000 * quantile(window, q):.1f}" if window and window[-1][1] > 0 else "-"


def line_of(cells: list[str]) -> str:
    return " ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, COLUMNS, strict=True))


def report_tick(run: Soak) -> None:
    """The newest sample as a progress line on stderr."""
    previous = run.ticks[-2] if len(run.ticks) > 1 else None
    print(
        f"  [{run.name}] " + line_of(row_of(previous, run.ticks[-1])), file=sys.stderr, flush=True
    )


def print_series(run: Soak) -> None:
    print()
    print(
        f"inflow control {run.name} (inflow_backlog = {run.inflow_backlog}): a sample every "
        f"{run.interval:g} s and at the end of each phase; rates over the interval before it"
    )
    header = line_of([name for name, _ in COLUMNS])
    print(header)
    print("-" * len(header))
    previous: Tick | None = None
    for tick in run.ticks:
        print(line_of(row_of(previous, tick)))
        previous = tick


def losses(run: Soak) -> dict[str, int]:
    """Committed Message-IDs the sink never got, extras, and duplicates by who made them."""
    assert run.maillog is not None
    committed, received = run.maillog.committed, run.sink.ids
    found = {
        "lost": sum((committed - received).values()),
        "not injected": sum((received - committed).values()),
        "accepted twice by Postfix": 0,
        "relayed twice by Postfix": 0,
        "delivered twice by ours": 0,
    }
    for message_id, times in received.items():
        if times < 2:
            continue
        postfix_ids = {p for p, _ in run.sink.copies[message_id]}
        our_ids = {o for _, o in run.sink.copies[message_id]}
        if len(postfix_ids) > 1:
            found["accepted twice by Postfix"] += times - 1
        elif len(our_ids) > 1:
            found["relayed twice by Postfix"] += times - 1
        else:
            found["delivered twice by ours"] += times - 1
    return found


def summary(run: Soak) -> list[tuple[str, str]]:
    """(label, value) rows of a run's summary."""
    assert run.maillog is not None
    end, last = run.end_of_injection, run.ticks[-1]
    first = run.ticks[0]
    waits = last.delayed - first.delayed
    delivered = last.delivered - first.delivered
    found = losses(run)
    drained = (
        f"both queues empty after {run.drain_seconds:.0f} s"
        if run.drained
        else f"NOT drained after {run.drain_seconds:.0f} s: {last.postfix_queue} in Postfix's "
        f"queue, {last.messages} in our spool"
    )
    still = last.postfix_queue + last.messages
    loss = f"{found['lost']}" + (f" (of which up to {still} still queued)" if still else "")
    duplicates = sum(v for k, v in found.items() if "twice" in k)
    why = ", ".join(f"{k} {v}" for k, v in found.items() if "twice" in k and v)
    load = [t.load for t in run.ticks]
    other = end.busy(first, "else_cpu") if end.at > 0 else 0.0
    deferred = run.peak("postfix_deferred")
    return [
        ("inflow_backlog", f"{run.inflow_backlog}" + (" (off)" if not run.inflow_backlog else "")),
        ("injection", f"{run.inject_seconds:.0f} s, smtp-source {run.client_exit}"),
        ("injected (Postfix committed)", f"{run.maillog.injected}"),
        ("mean accepted/s (Postfix)", f"{run.mean_rate('injected'):.0f}"),
        ("mean accepted/s (ours)", f"{run.mean_rate('received'):.0f}"),
        ("mean delivered/s (ours)", f"{run.mean_rate('delivered'):.0f}"),
        ("peak untried jobs (spool / gauge)", f"{run.peak('untried')} / {run.peak('gauge'):.0f}"),
        ("peak ready jobs", f"{run.peak('ready')}"),
        (
            "peak spool",
            f"{run.peak('messages')} messages, {run.peak('spool_bytes') / 2**20:.0f} MB",
        ),
        (
            "spool at the end of injection",
            f"{end.ready} ready jobs, {end.untried} untried, {end.spool_bytes / 2**20:.0f} MB",
        ),
        (
            "peak Postfix queue",
            f"{run.peak('postfix_queue')}"
            + (f" ({deferred} deferred at most)" if deferred else ""),
        ),
        ("Postfix queue at the end of injection", f"{end.postfix_queue}"),
        (
            "inflow waits",
            f"{waits:.0f} transactions, {last.delay_seconds - first.delay_seconds:.0f} s in all"
            + (
                f", mean {1000 * (last.delay_seconds - first.delay_seconds) / waits:.0f} ms"
                if waits
                else ""
            ),
        ),
        ("drain", drained),
        (
            "end to end",
            f"{run.maillog.injected / last.at:.0f} messages/s (injected over injection and drain)"
            if last.at > 0 and run.drained
            else "- (not drained)",
        ),
        ("spool at the end", f"{last.ready} ready jobs, {last.spool_bytes / 2**20:.0f} MB"),
        (
            "ours CPU per delivered message",
            f"{1000 * (last.ours_cpu - first.ours_cpu) / delivered:.2f} ms" if delivered else "-",
        ),
        ("load average (1 min)", f"{min(load):.1f} to {max(load):.1f}"),
        (
            "the machine's other work",
            f"{run.busy_before:.0f}% of a core just before the run, {other:.0f}% through the "
            "injection (all but ours, Postfix and the tools: other processes, kernel threads)",
        ),
        (
            "chain",
            f"injected {run.maillog.injected} -> sent on by Postfix "
            f"{run.maillog.statuses['sent']} -> accepted by ours {last.received:.0f} -> "
            f"delivered by ours {last.delivered:.0f} -> at the sink {run.sink.counter}",
        ),
        (
            "at the sink",
            f"{run.sink.files} dump files, {run.sink.parsed} complete, "
            f"{len(run.sink.ids)} distinct Message-IDs"
            + (f", {run.sink.without_id} without one" if run.sink.without_id else ""),
        ),
        ("lost (committed, never at the sink)", loss),
        ("duplicates at the sink", f"{duplicates}" + (f" ({why})" if why else "")),
        ("at the sink, not injected", f"{found['not injected']}"),
    ]


def print_summary(run: Soak) -> None:
    print()
    print(f"summary, inflow control {run.name}:")
    rows = summary(run)
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    assert run.maillog is not None
    other = {k: v for k, v in run.maillog.statuses.items() if k != "sent"}
    notes = run.notes + ([f"Postfix's deliveries to us that failed: {other}"] if other else [])
    for note in notes:
        print(f"  note: {note}")


def print_comparison(runs: list[Soak]) -> None:
    if len(runs) < 2:
        return
    print()
    print("comparison")
    tables = [dict(summary(run)) for run in runs]
    labels = [
        "inflow_backlog",
        "injected (Postfix committed)",
        "mean accepted/s (Postfix)",
        "mean accepted/s (ours)",
        "mean delivered/s (ours)",
        "peak untried jobs (spool / gauge)",
        "peak ready jobs",
        "spool at the end of injection",
        "peak Postfix queue",
        "drain",
        "end to end",
        "lost (committed, never at the sink)",
        "duplicates at the sink",
    ]
    width = max(len(label) for label in labels)
    for label in labels:
        print(f"  {label:<{width}}  " + "  |  ".join(table[label] for table in tables))


# ---------------------------------------------------------------- command line


LEGEND = """\
columns: t s = seconds since the injection began; PF in/s = messages Postfix's cleanup
took in; acc/s, del/s = our mta_messages_received_total and mta_messages_delivered_total;
sink/s = smtp-sink's messages; untried = the spool's untried jobs (what inflow control
reads), gauge = mta_spool_untried_jobs (set at MAIL FROM only); ready = ready jobs;
spool MB = bytes stored; PF queue = messages in Postfix's queue; waits/s, wait ms =
transactions inflow control made wait and their mean wait; conns = our deliveries under
way; commit ms = p50 of our spool commits; lag p99 = our event loops' lag; CPU in % of
one core: ours (all our processes), top (the busiest of them: a worker), Postfix (PF),
tools (smtp-source, smtp-sink, this tool), else (the rest of the machine: other work);
load = 1-minute load average.  Rates are over the interval before."""


# The numeric options: flag, type, default, what it sets, and its range.
NUMBERS = (
    ("--seconds", float, 120.0, "seconds of injection per run", 1, 3600),
    ("--messages", int, 1_000_000, "most messages smtp-source sends per run", 1, 10**9),
    ("--sessions", int, 20, "smtp-source's sessions", 1, 1000),
    ("--size", int, 4096, "payload bytes per message", 1, 10**8),
    ("--inflow-backlog", int, 2000, '[server] inflow_backlog of the run "on"', 1, 10**9),
    ("--inflow-max-delay", float, 1.0, "[server] inflow_max_delay in both runs", 0, 60),
    ("--interval", float, 5.0, "seconds between samples", 0.5, 600),
    ("--drain-seconds", float, 120.0, "most seconds to wait for both queues to empty", 0, 3600),
    ("--stall-seconds", float, 30.0, "stop the drain when nothing moved for this long", 1, 3600),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, kind, default, text, _, _ in NUMBERS:
        parser.add_argument(flag, type=kind, default=default, help=f"{text} (default {default:g})")
    parser.add_argument(
        "--runs",
        default="off,on",
        help='which runs, in order: "off", "on" or both, comma-separated (default off,on)',
    )
    parser.add_argument(
        "--mta-option",
        metavar="SECTION.KEY=VALUE",
        help="a setting for our MTA in both runs, as tools/bench.py's (e.g. server.workers=2)",
        action="append",
        type=_mta_option,  # bench.py's parser of the option
        default=[],
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    for flag, _, _, _, low, high in NUMBERS:
        if not low <= getattr(args, flag[2:].replace("-", "_")) <= high:
            parser.error(f"{flag} must be from {low:g} to {high:g}")
    args.run_names = [word.strip() for word in args.runs.split(",") if word.strip()]
    if not args.run_names or any(name not in ("off", "on") for name in args.run_names):
        parser.error('--runs takes "off", "on" or both, comma-separated')
    args.mta_options = {}
    for section, key, value in args.mta_option:
        args.mta_options.setdefault(section, {})[key] = value
    return args


def check_programs() -> None:
    if os.geteuid() != 0:
        raise BenchError("Postfix needs root to start: run this tool as root")
    for program in (POSTFIX, SMTP_SOURCE):
        if not Path(program).exists():
            raise BenchError(f"{program} is not installed (Debian package postfix)")
    if not (shutil.which("smtp-sink") or shutil.which("smtp-sink", path=SBIN)):
        raise BenchError("smtp-sink is not installed (Debian package postfix)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    work = Path(tempfile.mkdtemp(prefix="relay-soak-"))
    work.chmod(0o755)  # Postfix's daemons drop to the postfix user and must reach its queue
    try:
        runs = soak_all(args, work)
    except (BenchError, KeyboardInterrupt) as error:
        stopped = isinstance(error, KeyboardInterrupt)
        print("interrupted; cleaning up" if stopped else f"relay_soak: {error}", file=sys.stderr)
        return 130 if stopped else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}", file=sys.stderr)
    for run in runs:
        print_series(run)
        print_summary(run)
    print_comparison(runs)
    print()
    print(LEGEND)
    return 0


def soak_all(args: argparse.Namespace, work: Path) -> list[Soak]:
    """Every run of --runs, in order."""
    check_programs()
    key = make_key(work / "dkim")
    print(
        f"relay soak: smtp-source ({args.sessions} sessions, {args.size}-byte messages, "
        f"{args.seconds:g} s or {args.messages} messages) -> Postfix -> ours -> smtp-sink; "
        f"runs: {', '.join(args.run_names)}; load average {os.getloadavg()[0]:.1f}",
        file=sys.stderr,
        flush=True,
    )
    print("  " + " " * 7 + line_of([name for name, _ in COLUMNS]), file=sys.stderr)
    runs = []
    for number, name in enumerate(args.run_names):
        backlog = args.inflow_backlog if name == "on" else 0
        runs.append(soak(name, backlog, args, work / f"run{number}-{name}", key))
    return runs


if __name__ == "__main__":
    sys.exit(main())
