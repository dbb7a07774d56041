"""Isolation benchmark: transactional mail through a bulk backlog on a throttled site.

Usage:
  .venv/bin/python tools/bench_priority.py                    # 50,000 bulk, 100 transactional
  .venv/bin/python tools/bench_priority.py --bulk 10000 --max-rate 100

The priorities issue's figure: N bulk messages to one throttled site while
100 transactional ones arrive; the transactional messages' accept-to-delivery
p99 should stay under 1 s. What runs, tools/bench.py's pieces imported:

- its sink (``--role sink``, its own process): 250 to everything, the time
  of each end of DATA by the message's ``X-Bench-Id``;
- ``mta serve`` (bench.Ours: a fresh DKIM key, every domain routed to the
  sink, one worker per core) with ``[policy.domain."example.net"] max_rate =
  "R/s"``: the throttled site. ``server.inflow_backlog = 0``: inflow control
  would slow every client once 20,000 new jobs wait, and the point here is a
  backlog far larger than that;
- its client (``--role client``, its own process): N bulk messages of 4 KB to
  example.net over 20 sessions, as fast as the MTA takes them (no priority
  header: bulk);
- meanwhile this tool sends the transactional ones to example.net too, each on
  a connection of its own as an application sending a password reset would,
  with ``X-MTA-Priority: transactional``, evenly spread over the time the
  backlog takes to drain at R (N / R seconds), the first after ``--first``
  seconds.

Figures:
- transactional accept-to-delivery p50, p99, max: the sink's end of DATA
  minus the 250 this tool got (both CLOCK_REALTIME of this host);
- bulk still queued when each transactional message was delivered (bulk
  accepted by then, less bulk delivered by then), least and median: each
  overtook that many;
- bulk accepted/s, and bulk delivered/s: bulk delivered / (last bulk delivery
  - client start), which the throttle holds at about R;
- the MTA's peak RSS and PSS, summed over its processes (the spool's LMDB
  pages each process maps count too): the backlog waits in the spool, and
  only the jobs in flight in memory.

Every process started here is stopped and the temporary directory removed on
exit, error or Ctrl-C. It prints figures and asserts nothing about timing.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (tools/ is not a package)
from bench_accept import BenchError, make_key  # noqa: E402

DOMAIN = bench.RCPT_DOMAIN  # the bench client's recipients' domain: the throttled site
PRIORITY_HEADER = b"X-MTA-Priority: transactional\r\n"


@dataclass
class Figures:
    bulk_accepted: dict[str, int] = field(default_factory=dict)  # id -> 250 ns
    urgent_accepted: dict[str, int] = field(default_factory=dict)
    start_ns: int = 0
    client_errors: str = ""
    peak_rss: int = 0
    peak_pss: int = 0


# ---------------------------------------------------------------- transactional mail


async def send_one(port: int, bench_id: str, body: bytes) -> int:
    """One transactional message on a connection of its own; the 250's time (ns)."""
    reader, writer, _ = await bench._open(port)
    try:
        head = b"From: <%s>\r\nTo: <u@%s>\r\nSubject: code %s\r\nX-Bench-Id: %s\r\n%s\r\n" % (
            bench.SENDER.encode(),
            DOMAIN.encode(),
            bench_id.encode(),
            bench_id.encode(),
            PRIORITY_HEADER,
        )
        for command, expected in (
            (b"MAIL FROM:<%s>\r\n" % bench.SENDER.encode(), 250),
            (b"RCPT TO:<u@%s>\r\n" % DOMAIN.encode(), 250),
            (b"DATA\r\n", 354),
            (head + body + b".\r\n", 250),
        ):
            writer.write(command)
            code, reply = await asyncio.wait_for(bench._reply(reader), 60)
            if code != expected:
                raise BenchError(f"transactional {bench_id}: {reply.decode(errors='replace')}")
        accepted = time.time_ns()
        writer.write(b"QUIT\r\n")
        await asyncio.wait_for(bench._reply(reader), 60)
        return accepted
    finally:
        writer.close()


async def send_transactional(port: int, count: int, first: float, spread: float) -> dict[str, int]:
    """``count`` messages, the first ``first`` seconds from now, then every ``spread``."""
    body = bench._body(1024)
    start = time.monotonic()
    accepted: dict[str, int] = {}
    for number in range(count):
        await asyncio.sleep(max(0.0, start + first + number * spread - time.monotonic()))
        accepted[f"t{number}"] = await send_one(port, f"t{number}", body)
    return accepted


# ---------------------------------------------------------------- the run


def start_bulk(
    children: bench.Children, port: int, args: argparse.Namespace, out: Path
) -> subprocess.Popen[str]:
    return children.start(
        [
            sys.executable,
            bench.__file__,
            "--role",
            "client",
            "--port",
            str(port),
            "--messages",
            str(args.bulk),
            "--sessions",
            str(args.sessions),
            "--size",
            "4096",
            "--per-connection",
            "0",
            "--recipients",
            "1",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


def finish_bulk(client: subprocess.Popen[str], out: Path, timeout: float, figures: Figures) -> None:
    try:
        stdout, _ = client.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"the bulk client did not finish within {timeout:g}s") from None
    if client.returncode != 0 or not stdout.strip():
        raise BenchError(f"the bulk client failed (exit {client.returncode})")
    summary = json.loads(stdout.strip().splitlines()[-1])
    figures.start_ns = summary["start"]
    if summary["errors"]:
        figures.client_errors = f"{summary['errors']} errors, {summary['last_error']}"
    for line in out.read_text().splitlines():
        bench_id, ns, _, _ = line.split()
        figures.bulk_accepted[bench_id] = int(ns)


def wait_for_delivery(sink_log: bench.SinkLog, expected: set[str], args: argparse.Namespace) -> str:
    """Until every expected message reached the sink; a note if delivery stalled."""
    last_count, last_progress = -1, time.monotonic()
    while not expected <= sink_log.seen.keys():
        sink_log.poll()
        if len(sink_log.seen) != last_count:
            last_count, last_progress = len(sink_log.seen), time.monotonic()
        elif time.monotonic() - last_progress > args.drain_timeout:
            return f"delivery stalled for {args.drain_timeout:g}s"
        time.sleep(0.2)
    return ""


def run(args: argparse.Namespace, tmp: Path) -> Figures:
    children = bench.Children()
    server = bench.Ours(
        tmp / "mta",
        make_key(tmp / "dkim"),
        {
            "server": {"inflow_backlog": "0"},
            f'policy.domain."{DOMAIN}"': {"max_rate": f'"{args.max_rate:g}/s"'},
        },
    )
    figures = Figures()
    sampler: bench.Sampler | None = None
    try:
        sink_log = bench.SinkLog(tmp / "sink.log")
        sink, sink_port = bench.start_sink(children, sink_log.path)
        root_pid, port = server.start(sink_port)
        sampler = bench.Sampler(root_pid)
        sampler.start()
        drain = args.bulk / args.max_rate
        client = start_bulk(children, port, args, tmp / "accepted.log")
        figures.urgent_accepted = asyncio.run(
            send_transactional(port, args.transactional, args.first, drain / args.transactional)
        )
        finish_bulk(client, tmp / "accepted.log", drain + 600, figures)
        note = wait_for_delivery(
            sink_log, set(figures.bulk_accepted) | set(figures.urgent_accepted), args
        )
        if note:
            print(f"note: {note}", file=sys.stderr)
        sampler.stop()
        figures.peak_rss, figures.peak_pss = sampler.peak_rss, sampler.peak_pss
        sampler = None
        stop_notes = server.stop()
        bench.stop_sink(sink)
        sink_log.poll()
        report(figures, sink_log, args, stop_notes)
    except BenchError as error:
        raise BenchError(f"{error}; log tail: {server.log_tail()}") from None
    finally:
        if sampler is not None:
            sampler.stop()
        server.stop()
        children.close()
    return figures


# ---------------------------------------------------------------- report


def report(
    figures: Figures, sink_log: bench.SinkLog, args: argparse.Namespace, notes: list[str]
) -> None:
    delivered = {bench_id: entry[0] for bench_id, entry in sink_log.seen.items()}
    bulk_delivered = sorted(ns for i, ns in delivered.items() if i in figures.bulk_accepted)
    bulk_accepted = sorted(figures.bulk_accepted.values())
    latencies, overtaken = [], []
    for bench_id, accepted_ns in figures.urgent_accepted.items():
        if bench_id not in delivered:
            continue
        at = delivered[bench_id]
        latencies.append((at - accepted_ns) / 1e6)
        overtaken.append(bisect.bisect(bulk_accepted, at) - bisect.bisect(bulk_delivered, at))
    print(
        f"{args.bulk} bulk messages to {DOMAIN} at max_rate {args.max_rate:g}/s, "
        f"{args.transactional} transactional ones spread over the drain"
    )
    if latencies:
        ordered = sorted(latencies)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        print(
            f"transactional accept-to-delivery: p50 {statistics.median(ordered):.0f} ms, "
            f"p99 {p99:.0f} ms, max {ordered[-1]:.0f} ms "
            f"({len(latencies)} of {len(figures.urgent_accepted)} delivered)"
        )
        print(
            f"bulk still queued when a transactional message was delivered: "
            f"least {min(overtaken)}, median {statistics.median(overtaken):.0f}"
        )
        verdict = "meets" if p99 < 1000 else "misses"
        print(f"target: p99 under 1 s: {verdict}")
    if bulk_accepted and bulk_delivered:
        start = figures.start_ns
        print(
            f"bulk: {len(bulk_accepted) / ((bulk_accepted[-1] - start) / 1e9):.0f} accepted/s, "
            f"{len(bulk_delivered) / ((bulk_delivered[-1] - start) / 1e9):.1f} delivered/s "
            f"({len(bulk_delivered)} of {len(bulk_accepted)} delivered)"
        )
    print(
        f"mta serve peak RSS: {figures.peak_rss / 2**20:.0f} MB "
        f"(PSS {figures.peak_pss / 2**20:.0f} MB; the spool's mapped pages count in both)"
    )
    for note in notes + (
        [f"bulk client: {figures.client_errors}"] if figures.client_errors else []
    ):
        print(f"note: {note}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bulk", type=int, default=50_000, help="bulk messages (50000)")
    parser.add_argument(
        "--transactional", type=int, default=100, help="transactional messages (100)"
    )
    parser.add_argument(
        "--max-rate", type=float, default=200.0, help="the site's max_rate, messages/s (200)"
    )
    parser.add_argument("--sessions", type=int, default=20, help="bulk client sessions (20)")
    parser.add_argument(
        "--first", type=float, default=2.0, help="seconds before the first transactional one"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="give up waiting for delivery after this many seconds without progress",
    )
    args = parser.parse_args(argv)
    if min(args.bulk, args.transactional, args.sessions) < 1 or args.max_rate <= 0:
        parser.error("--bulk, --transactional, --sessions and --max-rate must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, bench._terminate)  # every finally runs
    tmp = Path(tempfile.mkdtemp(prefix="bench-priority-"))
    try:
        run(args, tmp)
    except BenchError as error:
        print(f"bench_priority: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
