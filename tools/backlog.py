"""Backlog drain: event-loop lag and session latency while a big backlog for one domain drains.

Usage:
  .venv/bin/python tools/backlog.py                  # 100,000 and 1,000,000 due jobs (about 7 min)
  .venv/bin/python tools/backlog.py --jobs 100000 --workers 2 --sessions-rate 40 --keep

Run it from the repository root, as the other tools: `mta serve` starts its
workers with ``python -m``, which puts the current directory first on their
path (a directory there named like a dependency breaks them).

Issue 21's figures for "a big backlog must not stall the node": with a
domain held at one connection and a large number of its jobs due, the event
loop must keep its passes short (p99 lag under 20 ms) and the domain must
drain as fast as it does without the backlog (within 10%).

For the baseline (the "empty backlog", below) and for each size N of
``--jobs``, a run is:

1. Spool: a fresh copy of a spool holding N jobs for one domain
   (backlog.test), each a message of about 150 bytes to one recipient, all
   due now.  Each size's spool is built once, directly through
   ``mta.spool.store.Spool`` in write transactions of 20,000 (nothing goes
   through SMTP or DKIM), and copied for every run, since a run delivers
   some of it.  Free disk is checked first, at ``BYTES_PER_JOB`` a job
   (a job takes about 790 bytes of LMDB), and the tool refuses with a
   message when there is too little.
2. Serve: a receiver on loopback (Postfix's smtp-sink, counting only, when
   installed: a C program, light on the two cores; else tools/bench.py's
   asyncio sink), and `mta serve` (tools/bench.py's ``Ours``: its config
   and DKIM key) on that spool, with ``[delivery.routes]`` sending
   backlog.test (and "*") to the receiver, ``[delivery]
   max_concurrent_per_domain = 1`` (the domain held at one connection, the
   issue's scenario), ``[server] workers = --workers`` (2), the rest at
   their defaults (one connection carries 100 messages).  The daemon starts
   draining at once.
3. Measure, after ``--warmup`` seconds (3), over a window of ``--window``
   seconds (30):
   - sessions: from the window's start, EHLO + NOOP + QUIT sessions opened
     at ``--sessions-rate`` a second (40) for ``--sessions-seconds`` (5),
     open loop, by a client process of this tool; a session's latency is
     from connect to the 221 reply; p50/p99/max by nearest rank.  The
     kernel spreads the sessions over the workers (SO_REUSEPORT), so about
     half of them meet the worker that delivers.
   - event-loop lag: ``mta_event_loop_lag_seconds`` scraped from /metrics at
     the window's start and end; the difference of the bucket counts is the
     window's histogram.  p50 and p99 are interpolated within their bucket
     as Prometheus's histogram_quantile does; "max <=" is the upper bound of
     the highest bucket with an observation in the window.  /metrics sums
     the workers, and one worker alone owns (delivers) backlog.test, so the
     other's quieter loop dilutes the node's figure: the tool also reads
     each worker's own histogram from the multiprocess directory
     (``SPOOL/metrics/histogram_PID.db``, with prometheus_client's
     ``MultiProcessCollector.merge``) and reports the delivering worker's
     ("owner").  A worker observes ten times a second, so a 30 s window
     holds 300 observations a worker; the rounds' windows are added up.
   - drain rate: ``mta_messages_delivered_total`` (one recipient a message)
     sampled every 0.5 s; delivered/s from the window's start to the last
     sample at which the spool still held mail (``mta_spool_messages`` > 0),
     so a baseline that runs out early is measured while it lasted (a note
     says so).  The receiver's count over the window is printed beside it.
   - context: our processes' CPU per delivered message, the p50 of
     ``mta_spool_commit_seconds`` (each delivery holds the domain's one slot
     through its fsync'd commit, so the disk sets much of the rate), and the
     load average: other work on the machine moves every figure.
4. The daemon is stopped (SIGTERM), the receiver too, the run's spool removed.

``--rounds`` (3) runs every size that many times, alternating (the order
rotates each round), as tools/bench.py does: delivered/s varies by 10-30%
between runs on a busy 2-core machine.  The drain ratio of a size is the
median over the rounds of its delivered/s against the baseline's in the
same round.

The baseline is a small spool backlog (``--baseline-jobs``; by default 750
jobs a second of warm-up and window, 25,000 with the defaults: enough for
the one connection's drain, 520-630/s here, to last the window), not mail
injected over SMTP.  Its drain takes the very path of the large backlogs:
jobs found in the spool by the scheduler and delivered one at a time over
the one connection, the same messages, the same receiver; only the number
of due jobs differs.  Fresh mail over SMTP instead would have the MTA accept
and DKIM-sign on the same event loops and cores while it delivers, and its
jobs would be offered at commit rather than found by the scheduler: the
ratio would compare accepting with not accepting, not a small backlog with
a big one.  An empty backlog cannot be drained; a pass of the scheduler
costs one seek per domain whatever the backlog, so what a small backlog
still shares with the big ones is only LMDB's page lookups (a B-tree level
or two fewer).

Targets (issue 21), printed as "met" or "NOT met", never as an exit status:
p99 event-loop lag under 20 ms, i.e. at least 99% of the observations of all
rounds in buckets up to 0.02 s, for the node (/metrics) and for the
delivering worker; the drain ratio at least 0.90.

Every wait is bounded; every process started here is stopped and the work
directory (under TMPDIR) removed on exit, error, Ctrl-C or SIGTERM, unless
``--keep``.  Exit status: 0 when every run was measured, 1 on an error (with
a message), 130 when interrupted.  It asserts nothing about the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# tools/ is not a package; importing bench also puts the repository root on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lmdb  # noqa: E402
from bench import (  # noqa: E402
    Children,
    Ours,
    SinkLog,
    _readline_within,
    _reply,
    _run_loop,
    _terminate,
    start_sink,
    stop_sink,
)
from bench_accept import BenchError, make_key, tree_cpu  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from mta.spool.ids import IdGenerator  # noqa: E402
from mta.spool.records import Message  # noqa: E402
from mta.spool.store import Spool  # noqa: E402
from tests.harness.mta import free_port  # noqa: E402
from tests.harness.programs import SBIN  # noqa: E402
from tests.harness.sink import Sink  # noqa: E402

DOMAIN = "backlog.test"
SENDER = "app@example.test"
PER_TRANSACTION = 20_000
SPOOL_MAX_SIZE = 64 * 2**30  # as tools/bench.py's Ours; LMDB maps it, the file grows as needed
BYTES_PER_JOB = 2048  # what the disk check asks a job: 2.5 times the ~800 bytes one takes
DISK_HEADROOM = 2 * 2**30
SAMPLE_EVERY = 0.5
PROBE_TIMEOUT = 10.0  # per SMTP reply of a probe session
LAG_METRIC = "mta_event_loop_lag_seconds"
LAG_TARGET = 0.02  # seconds: p99 under this
DRAIN_TARGET = 0.90  # of the baseline's delivered/s
BASELINE_RATE = 750  # baseline jobs per second of warm-up and window
TABLE_COLUMNS = (
    "due jobs",
    "deliv/s",
    "ratio",
    "CPU ms/msg",
    "lag p50",
    "lag p99",
    "lag max",
    "owner p99",
    "owner max",
    "sess p50",
    "sess p99",
    "sess max",
)
MESSAGE = (
    "From: <{sender}>\r\nTo: <u{number}@{domain}>\r\nSubject: backlog {number}\r\n"
    "Message-ID: <{number}@backlog.example.test>\r\n\r\nbacklog\r\n"
)


# ---------------------------------------------------------------- the spool


def check_disk(directory: Path, jobs: int) -> None:
    """BenchError unless ``directory``'s filesystem has room for spools of ``jobs`` jobs."""
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    needed = jobs * BYTES_PER_JOB + DISK_HEADROOM
    if free < needed:
        raise BenchError(
            f"not enough disk: the spools hold up to {jobs:,} jobs at a time (each size's "
            "spool, and the copy a run delivers from), about "
            f"{needed / 2**30:.1f} GiB at {BYTES_PER_JOB} bytes a job with "
            f"{DISK_HEADROOM // 2**30} GiB to spare, and {directory} has "
            f"{free / 2**30:.1f} GiB free: ask for fewer --jobs, or set TMPDIR elsewhere"
        )


def build_spool(path: Path, count: int) -> tuple[float, int]:
    """A spool with ``count`` jobs for DOMAIN, all due now; (seconds, bytes on disk)."""
    spool = Spool(path, max_size=SPOOL_MAX_SIZE, min_free_disk=0)
    new_id = IdGenerator(node="backlog")
    started = time.monotonic()
    done = 0
    try:
        while done < count:
            now = time.time()
            with spool.write() as txn:
                for number in range(done, min(done + PER_TRANSACTION, count)):
                    data = MESSAGE.format(sender=SENDER, number=number, domain=DOMAIN).encode()
                    message = Message(new_id(), SENDER, (f"u{number}@{DOMAIN}",), now, len(data))
                    spool.add(txn, message, data)
            done = min(done + PER_TRANSACTION, count)
            print(f"\r  building: {done:,} / {count:,} jobs", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    finally:
        spool.close()
    size = sum(item.stat().st_size for item in path.iterdir() if item.is_file())
    return time.monotonic() - started, size


# ---------------------------------------------------------------- the receiver


class CountingSink(Sink):
    """Postfix's smtp-sink that only counts (-c): no dump file per message (the
    harness's Sink writes one, and a million files would be the benchmark)."""

    def command(self) -> list[str]:
        user = ["-u", "nobody"] if os.geteuid() == 0 else []  # smtp-sink insists, as root
        return [self.binary, "-c", "-h", self.name, *user, f"{self.host}:{self.port}", "64"]


class Receiver:
    """Where backlog.test is routed: smtp-sink if installed, else tools/bench.py's sink."""

    def __init__(self, directory: Path, children: Children) -> None:
        self.directory = directory
        self.children = children
        self.smtp_sink: CountingSink | None = None
        self.process: subprocess.Popen[str] | None = None
        self.log: SinkLog | None = None
        self.address = ""
        self.kind = ""

    def start(self) -> str:
        """Start it; its "host:port"."""
        if shutil.which("smtp-sink") or shutil.which("smtp-sink", path=SBIN):
            self.kind = "smtp-sink"
            self.smtp_sink = CountingSink(self.directory, name="sink.backlog.test")
            try:
                self.smtp_sink.start()
            except (AssertionError, RuntimeError) as error:
                raise BenchError(f"smtp-sink did not start: {error}") from None
            self.address = f"{self.smtp_sink.host}:{self.smtp_sink.port}"
        else:
            self.kind = "asyncio sink (tools/bench.py; smtp-sink is not installed)"
            self.directory.mkdir(parents=True, exist_ok=True)
            self.log = SinkLog(self.directory / "sink.log")
            self.process, port = start_sink(self.children, self.log.path)
            self.address = f"127.0.0.1:{port}"
        return self.address

    def delivered(self) -> int:
        """Messages it has received so far."""
        if self.smtp_sink is not None:
            return self.smtp_sink.counters().messages
        assert self.log is not None
        self.log.poll()
        return self.log.rcpts  # one recipient per message

    def alive(self) -> bool:
        process = self.smtp_sink.process if self.smtp_sink is not None else self.process
        return process is not None and process.poll() is None

    def stop(self) -> None:
        if self.smtp_sink is not None:
            self.smtp_sink.stop()
        if self.process is not None:
            process, self.process = self.process, None
            stop_sink(process)


# ---------------------------------------------------------------- probe role


async def _probe_session(port: int) -> float:
    """One EHLO + NOOP + QUIT session; its milliseconds from connect to the 221."""
    started = time.perf_counter()
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port), PROBE_TIMEOUT
    )
    try:
        for command, expected in (
            (b"", 220),
            (b"EHLO probe.backlog.test\r\n", 250),
            (b"NOOP\r\n", 250),
            (b"QUIT\r\n", 221),
        ):
            if command:
                writer.write(command)
            code, text = await asyncio.wait_for(_reply(reader), PROBE_TIMEOUT)
            if code != expected:
                raise ConnectionError(f"{command.strip() or b'banner'!r}: {text[:80]!r}")
        return 1000 * (time.perf_counter() - started)
    finally:
        writer.close()


async def _probe_main(port: int, rate: float, seconds: float) -> None:
    """Open-loop sessions: session k starts k/rate s after the first; JSON to stdout."""
    latencies: list[float] = []
    errors: list[str] = []

    async def one(k: int, start: float) -> None:
        delay = start + k / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            latencies.append(await _probe_session(port))
        except (OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError) as error:
            errors.append(f"{type(error).__name__}: {error}")

    start = time.perf_counter()
    await asyncio.gather(*(one(k, start) for k in range(max(1, round(rate * seconds)))))
    print(json.dumps({"latencies": latencies, "errors": errors}), flush=True)


# ---------------------------------------------------------------- metrics


Buckets = list[tuple[float, float]]  # (upper bound, cumulative count), ascending; inf last


@dataclass
class Sample:
    at: float  # time.monotonic()
    delivered: float
    spool_messages: float
    lag: Buckets
    commit: Buckets


def scrape(metrics_port: int) -> Sample:
    """One read of /metrics: delivered recipients, messages in the spool, the lag and
    commit-time buckets."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    except OSError as error:
        raise BenchError(f"could not read {url}: {error}") from None
    at = time.monotonic()
    delivered = spool_messages = 0.0
    lag: Buckets = []
    commit: Buckets = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mta_messages_delivered_total":
                delivered += sample.value
            elif sample.name == "mta_spool_messages":
                spool_messages = sample.value
            elif sample.name == f"{LAG_METRIC}_bucket":
                lag.append((float(sample.labels["le"]), sample.value))
            elif sample.name == "mta_spool_commit_seconds_bucket":
                commit.append((float(sample.labels["le"]), sample.value))
    if not lag:
        raise BenchError(f"{url} has no {LAG_METRIC} (a daemon from before commit dc1cd8f?)")
    return Sample(at, delivered, spool_messages, sorted(lag), sorted(commit))


def worker_histograms(metrics_dir: Path) -> dict[int, tuple[float, Buckets]]:
    """Per worker pid: (delivered recipients, lag buckets), from prometheus_client's
    multiprocess files (none with ``workers = 1``: the node's figures are the one process's)."""
    workers: dict[int, tuple[float, Buckets]] = {}
    for path in sorted(metrics_dir.glob("histogram_*.db")):
        pid = int(path.stem.rpartition("_")[2])
        lag: Buckets = []
        for metric in MultiProcessCollector.merge([str(path)], accumulate=True):
            lag += [
                (float(s.labels["le"]), s.value)
                for s in metric.samples
                if s.name == f"{LAG_METRIC}_bucket"
            ]
        counters = metrics_dir / f"counter_{pid}.db"
        delivered = 0.0
        if counters.exists():
            for metric in MultiProcessCollector.merge([str(counters)], accumulate=True):
                delivered += sum(
                    s.value for s in metric.samples if s.name == "mta_messages_delivered_total"
                )
        if lag:
            workers[pid] = (delivered, sorted(lag))
    return workers


def difference(after: Buckets, before: Buckets) -> Buckets:
    """The window's histogram: cumulative counts at the end minus those at the start."""
    counts = dict(before)
    return [(bound, count - counts.get(bound, 0.0)) for bound, count in after]


def combined(a: Buckets, b: Buckets) -> Buckets:
    """Two windows' histograms (same bounds) as one."""
    counts = dict(b)
    return [(bound, count + counts.pop(bound, 0.0)) for bound, count in a] + sorted(counts.items())


def quantile(buckets: Buckets, q: float) -> float:
    """Prometheus's histogram_quantile: linear within the bucket holding rank q * total;
    in the +Inf bucket, the highest finite bound."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return 0.0
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if bound == float("inf"):
                return lower
            width = cumulative - below
            return lower + (bound - lower) * ((rank - below) / width if width else 1.0)
        lower, below = bound, cumulative
    return lower


def highest_bound(buckets: Buckets) -> float:
    """The upper bound of the highest bucket with an observation (inf: over the last one)."""
    highest, below = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative > below:
            highest = bound
        below = cumulative
    return highest


def lag_met(buckets: Buckets) -> bool:
    """At least 99% of the observations in buckets up to LAG_TARGET: p99 under it."""
    total = buckets[-1][1] if buckets else 0.0
    within = next((count for bound, count in buckets if bound == LAG_TARGET), 0.0)
    return total <= 0 or within >= 0.99 * total


def lag_text(buckets: Buckets) -> str:
    top = highest_bound(buckets)
    most = "> 2.5 s" if top == float("inf") else f"<= {1000 * top:g} ms"
    count = int(buckets[-1][1]) if buckets else 0
    return (
        f"p50 {1000 * quantile(buckets, 0.5):.1f} ms, p99 {1000 * quantile(buckets, 0.99):.1f} ms, "
        f"max {most} ({count} observations)"
    )


def percentile(values: list[float], q: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def median(values: list[float]) -> float:
    return percentile(values, 0.5)


# ---------------------------------------------------------------- runs


@dataclass
class Window:
    """One run: a daemon on a fresh copy of a backlog, measured over the window."""

    round: int
    rate: float = 0.0  # delivered/s over the window while the spool held mail
    rate_seconds: float = 0.0
    delivered: float = 0.0  # in the whole window
    sink_delivered: int = 0
    left: float = 0.0  # messages in the spool at the end of the window
    node_lag: Buckets = field(default_factory=list)  # /metrics: the workers summed
    owner_lag: Buckets = field(default_factory=list)  # the worker that delivered
    other_lag: Buckets = field(default_factory=list)  # the other workers, summed
    commit: Buckets = field(default_factory=list)
    sessions: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)
    receiver: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def cpu_ms(self) -> float:
        """Our processes' CPU per message delivered in the window."""
        return 1000 * self.cpu_seconds / self.delivered if self.delivered else 0.0


@dataclass
class Backlog:
    """One backlog size over the rounds."""

    label: str
    jobs: int
    build_seconds: float = 0.0
    spool_bytes: int = 0
    windows: list[Window] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # to the same round's baseline

    def pooled(self, name: str) -> Buckets:
        total: Buckets = []
        for window in self.windows:
            total = combined(total, getattr(window, name))
        return total

    @property
    def sessions(self) -> list[float]:
        return [ms for window in self.windows for ms in window.sessions]

    @property
    def rate(self) -> float:
        return median([window.rate for window in self.windows])


def build_template(work: Path, jobs: int, templates: dict[int, Path], backlog: Backlog) -> Path:
    """The spool with ``jobs`` due jobs that every run of that size copies; built once."""
    if jobs not in templates:
        path = work / "templates" / str(jobs)
        print(f"building a spool of {jobs:,} due jobs for {DOMAIN}", file=sys.stderr, flush=True)
        try:
            backlog.build_seconds, backlog.spool_bytes = build_spool(path, jobs)
        except (OSError, lmdb.Error) as error:
            raise BenchError(f"building {jobs:,} jobs in {path} failed: {error}") from None
        templates[jobs] = path
    return templates[jobs]


def run_one(
    backlog: Backlog, round_no: int, template: Path, args: argparse.Namespace, work: Path, key: Path
) -> Window:
    """The daemon on a copy of ``template``, measured (see the module's docstring)."""
    window = Window(round_no)
    run_dir = work / f"run-{backlog.label.replace(',', '')}-{round_no + 1}"
    run_dir.mkdir()
    shutil.copytree(template, run_dir / "spool")
    children = Children()
    receiver = Receiver(run_dir / "sink", children)
    mta: Ours | None = None
    try:
        sink = receiver.start()
        window.receiver = receiver.kind
        metrics_port = free_port()
        options = {
            "server": {"workers": str(args.workers)},
            "spool": {"path": f'"{run_dir / "spool"}"', "max_size": str(SPOOL_MAX_SIZE)},
            "metrics": {"listen": f'"127.0.0.1:{metrics_port}"'},
            "delivery": {"max_concurrent_per_domain": "1"},
            "delivery.routes": {f'"{DOMAIN}"': f'"{sink}"', '"*"': f'"{sink}"'},
        }
        mta = Ours(run_dir / "mta", key, options)
        root_pid, port = mta.start(0)  # the routes above replace Ours' own to this port
        measure(window, args, mta, receiver, children, root_pid, port, metrics_port)
        window.notes += mta.stop()
    except BenchError as error:
        log = f"; mta log: {mta.log_tail()}" if mta is not None else ""
        raise BenchError(f"{backlog.label}, round {round_no + 1}: {error}{log}") from None
    finally:
        if mta is not None:
            mta.stop()
        receiver.stop()
        children.close()
        if not args.keep:
            shutil.rmtree(run_dir / "spool", ignore_errors=True)
    return window


def measure(
    window: Window,
    args: argparse.Namespace,
    mta: Ours,
    receiver: Receiver,
    children: Children,
    root_pid: int,
    port: int,
    metrics_port: int,
) -> None:
    """Warm up, then sessions, lag and drain over the window."""
    process = mta.process

    def check_alive() -> None:
        if process is None or process.poll() is not None:
            raise BenchError("mta serve exited during the run")
        if not receiver.alive():
            raise BenchError("the receiver exited during the run")

    deadline = time.monotonic() + args.warmup
    while time.monotonic() < deadline:
        check_alive()
        time.sleep(0.1)
    metrics_dir = mta.root.parent / "spool" / "metrics"
    first = scrape(metrics_port)
    workers_before = worker_histograms(metrics_dir)
    sink_before = receiver.delivered()
    cpu_before = tree_cpu(root_pid)
    load_before = os.getloadavg()[0]
    probe = children.start(
        [
            sys.executable,
            __file__,
            "--role",
            "probe",
            "--port",
            str(port),
            "--sessions-rate",
            repr(args.sessions_rate),
            "--sessions-seconds",
            repr(args.sessions_seconds),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    samples = [first]
    end = first.at + args.window
    while time.monotonic() < end:
        time.sleep(max(0.0, min(SAMPLE_EVERY, end - time.monotonic())))
        check_alive()
        samples.append(scrape(metrics_port))
    last = samples[-1]
    workers_after = worker_histograms(metrics_dir)
    window.cpu_seconds = tree_cpu(root_pid) - cpu_before
    window.sink_delivered = receiver.delivered() - sink_before
    window.load = (load_before, os.getloadavg()[0])
    assert probe.stdout is not None
    line = _readline_within(probe.stdout, args.sessions_seconds + 4 * PROBE_TIMEOUT)
    if not line:
        raise BenchError("the session client gave no result in time")
    outcome = json.loads(line)
    window.sessions = outcome["latencies"]
    if outcome["errors"]:
        window.notes.append(f"{len(outcome['errors'])} sessions failed: {outcome['errors'][0]}")

    # Drain: from the window's start to the last sample that still had mail to send.
    busy = [s for s in samples if s.spool_messages > 0] or samples[:1]
    stop = busy[-1]
    window.rate_seconds = stop.at - first.at
    if window.rate_seconds > 0:
        window.rate = (stop.delivered - first.delivered) / window.rate_seconds
    window.delivered = last.delivered - first.delivered
    window.left = last.spool_messages
    if stop is not last:
        window.notes.append(
            f"the backlog ran out {window.rate_seconds:.1f} s into the {args.window:g} s "
            "window; delivered/s is over that part"
        )
    window.node_lag = difference(last.lag, first.lag)
    window.commit = difference(last.commit, first.commit)
    for pid, (delivered, lag) in workers_after.items():
        before = workers_before.get(pid, (0.0, []))
        lag = difference(lag, before[1])
        if delivered > before[0] and not window.owner_lag:
            window.owner_lag = lag
        else:
            window.other_lag = combined(window.other_lag, lag)


# ---------------------------------------------------------------- report


def report(backlogs: list[Backlog], args: argparse.Namespace) -> None:
    baseline = backlogs[0]
    receiver = baseline.windows[0].receiver if baseline.windows else ""
    print(
        f"backlog drain: {DOMAIN} held at one connection (max_concurrent_per_domain = 1), "
        f"workers = {args.workers}; per run: {args.warmup:g} s warm-up, then a "
        f"{args.window:g} s window with {args.sessions_rate:g} sessions/s for "
        f"{args.sessions_seconds:g} s; {args.rounds} round(s), alternating; receiver: {receiver}"
    )
    for b in backlogs:
        print(f"\n{'baseline: ' if b is baseline else ''}{b.jobs:,} due jobs")
        print(
            f"  spool      built in {b.build_seconds:.1f} s, {b.spool_bytes / 2**20:,.0f} MB "
            f"({b.spool_bytes / b.jobs:,.0f} bytes a job), copied for each run"
        )
        for w in b.windows:
            versus = (
                f", {w.rate / baseline.windows[w.round].rate:.2f}x that round's baseline"
                if b is not baseline and baseline.windows[w.round].rate
                else ""
            )
            print(
                f"  round {w.round + 1}    {w.rate:,.0f} delivered/s over {w.rate_seconds:.1f} s"
                f"{versus} (receiver: {w.sink_delivered:,}); {w.cpu_ms:.2f} ms CPU/msg; "
                f"commit p50 {1000 * quantile(w.commit, 0.5):.1f} ms; "
                f"{w.left:,.0f} left; load {w.load[0]:.1f}-{w.load[1]:.1f}"
            )
            for note in w.notes:
                print(f"             note: {note}")
        print(f"  lag node   {lag_text(b.pooled('node_lag'))}  (/metrics: all workers)")
        if any(w.owner_lag for w in b.windows):
            print(f"  lag owner  {lag_text(b.pooled('owner_lag'))}  (the worker delivering)")
        if any(w.other_lag for w in b.windows):
            print(f"  lag other  {lag_text(b.pooled('other_lag'))}  (the other workers)")
        sessions = b.sessions
        if sessions:
            print(
                f"  sessions   p50 {percentile(sessions, 0.5):.1f} ms, "
                f"p99 {percentile(sessions, 0.99):.1f} ms, max {max(sessions):.1f} ms "
                f"({len(sessions)} EHLO + NOOP + QUIT, connect to 221)"
            )

    def ms(value: float) -> str:
        return "> 2500" if value == float("inf") else f"{1000 * value:.1f}"

    table = [TABLE_COLUMNS]
    for b in backlogs:
        node = b.pooled("node_lag")
        owner = b.pooled("owner_lag") or node
        sessions = b.sessions
        table.append(
            (
                f"{b.jobs:,}" + (" (baseline)" if b is baseline else ""),
                f"{b.rate:,.0f}",
                f"{median(b.ratios) if b is not baseline else 1.0:.2f}x",
                f"{median([w.cpu_ms for w in b.windows]):.2f}",
                ms(quantile(node, 0.5)),
                ms(quantile(node, 0.99)),
                "<=" + ms(highest_bound(node)),
                ms(quantile(owner, 0.99)),
                "<=" + ms(highest_bound(owner)),
                f"{percentile(sessions, 0.5):.1f}",
                f"{percentile(sessions, 0.99):.1f}",
                f"{max(sessions, default=0.0):.1f}",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(TABLE_COLUMNS))]
    print()
    for number, row in enumerate(table):
        cells = [cell.rjust(width) for cell, width in zip(row, widths, strict=True)]
        cells[0] = row[0].ljust(widths[0])
        print("  ".join(cells))
        if number == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    print(
        "(medians over the rounds for deliv/s, ratio (each round's against its own baseline) "
        "and CPU; lag and sessions pooled over the rounds, in ms; lag p50/p99 interpolated "
        "within their buckets, max is a bucket's upper bound)"
    )
    print()
    for b in backlogs[1:]:
        lags = [b.pooled("node_lag"), b.pooled("owner_lag")]
        lag = "met" if all(lag_met(buckets) for buckets in lags) else "NOT met"
        ratio = median(b.ratios)
        drain = "met" if ratio >= DRAIN_TARGET else "NOT met"
        print(
            f"target, {b.jobs:,} jobs: p99 event-loop lag < {1000 * LAG_TARGET:g} ms {lag}; "
            f"drain rate within {100 * (1 - DRAIN_TARGET):.0f}% of the baseline's {drain} "
            f"({ratio:.2f}x)"
        )


# ---------------------------------------------------------------- command line


def _jobs_list(text: str) -> list[int]:
    try:
        values = [int(word.strip().replace("_", "")) for word in text.split(",") if word.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f'"{text}" is not a comma list of numbers') from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("one or more counts of at least 1")
    return list(dict.fromkeys(values))  # each size once, in the order given


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--role", choices=["backlog", "probe"], default="backlog")
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--jobs",
        type=_jobs_list,
        default=[100_000, 1_000_000],
        help="backlog sizes, comma-separated (default 100000,1000000)",
    )
    parser.add_argument(
        "--baseline-jobs",
        type=int,
        help=f"the small backlog the others are compared with (default {BASELINE_RATE} a "
        "second of --warmup plus --window: 25000 with their defaults)",
    )
    parser.add_argument("--workers", type=int, default=2, help="[server] workers (default 2)")
    parser.add_argument(
        "--sessions-rate",
        type=float,
        default=40.0,
        help="EHLO + NOOP + QUIT sessions a second while draining (default 40)",
    )
    parser.add_argument(
        "--sessions-seconds", type=float, default=5.0, help="for how long (default 5)"
    )
    parser.add_argument(
        "--window", type=float, default=30.0, help="seconds measured per run (default 30)"
    )
    parser.add_argument(
        "--warmup", type=float, default=3.0, help="seconds from start to the window (default 3)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs per size, alternating (default 3)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (spools, logs, configs)"
    )
    args = parser.parse_args(argv)
    if args.role == "probe":
        return args
    if args.baseline_jobs is None:
        args.baseline_jobs = -(-BASELINE_RATE * int(args.warmup + args.window) // 1000) * 1000
    if args.workers < 1 or args.baseline_jobs < 1 or not 1 <= args.rounds <= 20:
        parser.error("--workers and --baseline-jobs must be at least 1, --rounds 1 to 20")
    if not 0 < args.sessions_rate <= 1000 or not 0 < args.sessions_seconds <= 600:
        parser.error("--sessions-rate must be in (0, 1000], --sessions-seconds in (0, 600]")
    if not 1 <= args.window <= 3600 or not 0 <= args.warmup <= 600:
        parser.error("--window must be 1 to 3600 seconds, --warmup 0 to 600")
    if args.sessions_seconds > args.window:
        parser.error("--sessions-seconds must fit in --window")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "probe":
        _run_loop(_probe_main(args.port, args.sessions_rate, args.sessions_seconds))
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    work = Path(tempfile.mkdtemp(prefix="backlog-"))
    backlogs = [Backlog("baseline", args.baseline_jobs)]
    backlogs += [Backlog(f"{jobs:,}", jobs) for jobs in args.jobs]
    sizes = {b.jobs for b in backlogs}
    # the templates, and a copy of the largest at a time (of every run with --keep)
    copies = args.rounds * sum(b.jobs for b in backlogs) if args.keep else max(sizes)
    templates: dict[int, Path] = {}
    try:
        check_disk(work, sum(sizes) + copies)
        key = make_key(work / "dkim")
        for round_no in range(args.rounds):
            first = round_no % len(backlogs)
            for b in backlogs[first:] + backlogs[:first]:
                template = build_template(work, b.jobs, templates, b)
                if not b.build_seconds:  # a size equal to another's shares its spool
                    same = next(o for o in backlogs if o.jobs == b.jobs and o.build_seconds)
                    b.build_seconds, b.spool_bytes = same.build_seconds, same.spool_bytes
                print(f"  {b.label}, round {round_no + 1} ...", file=sys.stderr, flush=True)
                b.windows.append(run_one(b, round_no, template, args, work, key))
                w = b.windows[-1]
                print(
                    f"    {w.rate:,.0f} delivered/s, owner lag p99 "
                    f"{1000 * quantile(w.owner_lag or w.node_lag, 0.99):.1f} ms, sessions p99 "
                    f"{percentile(w.sessions, 0.99):.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
        for b in backlogs[1:]:
            b.ratios = [
                w.rate / base.rate
                for w, base in zip(b.windows, backlogs[0].windows, strict=True)
                if base.rate
            ]
        report(backlogs, args)
    except BenchError as error:
        print(f"backlog: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
