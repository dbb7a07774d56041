"""Recipients/s through the HTTP injection API against SMTP: the same MTA, the same run.

Usage:
  .venv/bin/python tools/bench_api.py                       # 10,000 recipients each way
  .venv/bin/python tools/bench_api.py --recipients 50000 --rounds 3

Issue 17's target: the API takes recipients at least twice as fast as SMTP
with 20 sessions does. Both runs use tools/bench.py's pieces (imported, not
copied): its asyncio sink on 127.0.0.1 (250 to everything, a record per
message with its ``X-Bench-Id``), ``mta serve`` configured as bench.py's
``Ours`` (every message DKIM-signed with RSA-2048, delivered to the sink
by a static route, other settings at their defaults: 2 workers here), the
same message body.

- SMTP: bench.py's own run (``bench_one``) with its client: 20 sessions, all
  messages of a session on one connection, pipelined, one recipient each.
- API: the MTA also serves ``[http]`` with one tenant; a client here posts
  requests of ``--per-request`` (1,000) recipients, ``--concurrency`` (4) at
  once over keep-alive connections (the kernel spreads them over the
  workers); every recipient has its own ``X-Bench-Id`` and subject through a
  template, so each message is composed and signed on its own, as with SMTP.

Figures per run: accepted rcpt/s, recipients in 200 answers (or 250 replies)
over the time from the client's start to the last answer; delivered rcpt/s,
recipients at the sink over the time to the last one; server CPU ms per
recipient (the MTA's process tree, from the client's start until the last
delivery). The ratio line compares the API with SMTP (medians with
``--rounds``, which alternate which goes first). Every process started here
is stopped and every directory removed on exit; it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import (  # noqa: E402  (tools/ is not a package)
    SENDER,
    Children,
    Load,
    Ours,
    Run,
    SinkLog,
    _body,
    _suppress_bench_error,
    bench_one,
    median_run,
    start_sink,
    stop_sink,
)
from bench_accept import MTA, BenchError, free_port, make_key, tree_cpu  # noqa: E402

from tests.harness.poll import eventually  # noqa: E402

SIZE = 4096  # bytes of each message, as bench.py's default load
SMTP_SESSIONS = 20
TENANT = "bench"
START_TIMEOUT = 60.0


class OursWithApi(Ours):
    """bench.py's MTA, also serving the injection API for one tenant."""

    def __init__(self, root: Path, key: Path) -> None:
        self.api_port = free_port()
        http = {"listen": f'"127.0.0.1:{self.api_port}"', "tokens_file": f'"{root / "tokens"}"'}
        super().__init__(root, key, {"http": http}, name="API")

    def config(self, port: int, metrics_port: int, sink_port: int) -> str:
        tenant = f'[[tenant]]\nname = "{TENANT}"\nsender_domains = ["example.test"]\n'
        return super().config(port, metrics_port, sink_port) + tenant

    def start(self, sink_port: int) -> tuple[int, int]:
        started = super().start(sink_port)
        # Every worker listens once the supervisor says so: connections made
        # before would all go to the first worker up.
        eventually(
            lambda: "mta started" in self.log.read_text(),
            START_TIMEOUT,
            "the MTA to say it started",
            interval=0.1,
        )
        return started

    def token(self) -> str:
        made = subprocess.run(
            [MTA, "tenant", "token", "add", TENANT, "--config", str(self.root / "mta.toml")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if made.returncode != 0:
            raise BenchError(f"mta tenant token add failed: {made.stderr.strip()}")
        return made.stdout.splitlines()[-1]


def requests(total: int, per_request: int) -> list[bytes]:
    """The API requests for ``total`` recipients, as JSON, built before the clock starts."""
    text = _body(SIZE).decode()  # the body of bench.py's messages
    content = {
        "from": {"email": SENDER},
        "subject": "bench {{ id }}",
        "headers": {"X-Bench-Id": "{{ id }}"},
        "text_body": text,
    }
    documents = []
    for first in range(0, total, per_request):
        ids = range(first, min(total, first + per_request))
        recipients = [{"email": f"u{n}@example.net", "substitutions": {"id": n}} for n in ids]
        document = {"envelope_sender": SENDER, "recipients": recipients, "content": content}
        documents.append(json.dumps(document).encode())
    return documents


async def post_all(url: str, token: str, bodies: list[bytes], concurrency: int) -> dict[str, int]:
    """Post every body, ``concurrency`` at once; recipients accepted, and when."""
    pending = list(reversed(bodies))
    result = {"start": time.time_ns(), "last": 0, "accepted": 0, "errors": 0}
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            while pending:
                async with session.post(url, data=pending.pop(), headers=headers) as response:
                    answer = await response.json()
                if response.status != 200:
                    result["errors"] += 1
                    print(f"  API answered {response.status}: {answer}", file=sys.stderr)
                    continue
                result["accepted"] += answer["success_count"]
                result["last"] = time.time_ns()

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return result


def bench_api(args: argparse.Namespace, work: Path, key: Path) -> Run:
    """One API run with its own sink; never raises BenchError."""
    run = Run("API", Load(SIZE, 0, args.per_request, args.concurrency, args.recipients))
    server = OursWithApi(work / "mta", key)
    children = Children()
    sink: subprocess.Popen[str] | None = None
    try:
        sink_log = SinkLog(work / "sink.log")
        sink, sink_port = start_sink(children, sink_log.path)
        root_pid, _ = server.start(sink_port)
        bodies = requests(args.recipients, args.per_request)
        url = f"http://127.0.0.1:{server.api_port}/api/inject/v1"
        cpu_before = tree_cpu(root_pid)
        posted = asyncio.run(post_all(url, server.token(), bodies, args.concurrency))
        run.accepted, run.client_errors = posted["accepted"], posted["errors"]
        run.accept_seconds = (posted["last"] - posted["start"]) / 1e9
        wait_for_delivery(sink_log, run.accepted, args.drain_timeout)
        run.server_cpu = tree_cpu(root_pid) - cpu_before
        delivered = [entry[0] for entry in sink_log.seen.values()]
        run.delivered = len(delivered)
        if delivered:
            run.deliver_seconds = (max(delivered) - posted["start"]) / 1e9
        run.notes += server.stop()
    except BenchError as error:
        run.error = f"{error}; log tail: {server.log_tail()}"
    finally:
        with _suppress_bench_error():
            server.stop()
        if sink is not None:
            with _suppress_bench_error():
                stop_sink(sink)
        children.close()
    return run


def wait_for_delivery(sink_log: SinkLog, expected: int, stall: float) -> None:
    """Until the sink has seen ``expected`` recipients, or none more for ``stall`` seconds."""
    progress = (time.monotonic(), -1)
    while sink_log.rcpts < expected and time.monotonic() - progress[0] < stall:
        sink_log.poll()
        if sink_log.rcpts != progress[1]:
            progress = (time.monotonic(), sink_log.rcpts)
        time.sleep(0.05)


def bench_smtp(args: argparse.Namespace, work: Path, key: Path) -> Run:
    load = Load(SIZE, 0, 1, SMTP_SESSIONS, args.recipients)
    smtp = argparse.Namespace(
        py_spy=None, domains=1, timeout=args.timeout, drain_timeout=args.drain_timeout
    )
    run = bench_one(Ours(work / "mta", key, {}, name="SMTP"), load, smtp, work)
    return run


def row(label: str, run: Run | None) -> str:
    if run is None or run.error:
        return f"| {label} | failed: {run.error if run else 'no run'} | | |"
    return (
        f"| {label} | {run.accepted_rate:,.0f} | {run.delivered_rate:,.0f} | {run.cpu_ms:.2f} |"
        + (f" {'; '.join(run.notes)}" if run.notes else "")
    )


def report(smtp: Run | None, api: Run | None, args: argparse.Namespace) -> None:
    print(
        f"\n{args.recipients:,} recipients per run, {SIZE // 1024} KB messages, DKIM RSA-2048, "
        f"{args.rounds} round(s) (median)\n"
    )
    print("| path | accepted rcpt/s | delivered rcpt/s | server CPU ms/rcpt |")
    print("|---|---|---|---|")
    print(row(f"SMTP, {SMTP_SESSIONS} sessions, 1 recipient per message", smtp))
    print(row(f"API, {args.per_request:,} recipients per request, {args.concurrency} at once", api))
    if smtp and api and not smtp.error and not api.error and smtp.accepted_rate:
        accepted = api.accepted_rate / smtp.accepted_rate
        delivered = api.delivered_rate / smtp.delivered_rate if smtp.delivered_rate else 0.0
        verdict = "met" if accepted >= 2 else "NOT met"
        print(
            f"\nratio API/SMTP: accepted {accepted:.2f}x, delivered {delivered:.2f}x "
            f"(target: accepted at least 2x: {verdict})"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipients", type=int, default=10_000, help="per run (10,000)")
    parser.add_argument("--per-request", type=int, default=1000, help="API recipients per request")
    parser.add_argument("--concurrency", type=int, default=4, help="API requests at once (4)")
    parser.add_argument("--rounds", type=int, default=1, help="runs each way (median)")
    parser.add_argument("--timeout", type=float, default=300.0, help="most seconds for a run")
    parser.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds without delivery: give up"
    )
    args = parser.parse_args(argv)
    if min(args.recipients, args.per_request, args.concurrency, args.rounds) < 1:
        parser.error("--recipients, --per-request, --concurrency and --rounds: at least 1")
    return args


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # every finally runs: servers stopped, directories removed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    tmp = Path(tempfile.mkdtemp(prefix="bench-api-"))
    runs: dict[str, list[Run]] = {"SMTP": [], "API": []}
    try:
        key = make_key(tmp / "dkim")
        for round_no in range(args.rounds):
            order = [bench_smtp, bench_api] if round_no % 2 == 0 else [bench_api, bench_smtp]
            for measure in order:
                work = tmp / f"run{round_no}-{measure.__name__}"
                work.mkdir()
                print(
                    f"  round {round_no + 1}: {measure.__name__} ...", file=sys.stderr, flush=True
                )
                run = measure(args, work, key)
                runs[run.mta].append(run)
                print(f"    {row(run.mta, run)}", file=sys.stderr, flush=True)  # the spread
                shutil.rmtree(work, ignore_errors=True)
        report(median_run(runs["SMTP"]), median_run(runs["API"]), args)
    except BenchError as error:
        print(f"bench_api: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if any(run.error for both in runs.values() for run in both) else 0


if __name__ == "__main__":
    sys.exit(main())
