"""How the daemon behaves with a large backlog of deferred mail.

    .venv/bin/python tools/bench_large_queue.py [--messages 1000000] [--keep DIR]

Fills a fresh spool with N deferred messages (4 KB, due in an hour, to 1,000
domains) through the spool API, in large transactions, then measures what the
speed issue asks of a large queue:

- start: from `mta serve` to the SMTP port answering;
- memory: the daemon's RSS (with its worker processes, summed) once
  started, and after delivering new mail;
- `mta queue stats`: how long the command takes;
- new mail to a healthy domain: accept-to-delivery time of a few messages
  (to a local sink) with the backlog present.

It prints the figures and asserts nothing. Everything runs on 127.0.0.1 in a
temporary directory (or --keep DIR), removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mta.spool.ids import IdGenerator  # noqa: E402
from mta.spool.records import Job, Message  # noqa: E402
from mta.spool.store import Spool  # noqa: E402
from tests.harness.mta import MTA, dkim_keygen, free_port, free_ports  # noqa: E402

BODY = (b"From: app@example.test\r\nSubject: backlog\r\n\r\n" + b"x" * 76 + b"\r\n") * 50


def fill(spool_path: Path, count: int) -> float:
    """N deferred messages, 10,000 per transaction; the seconds it took."""
    spool = Spool(spool_path, max_size=64 * 2**30, min_free_disk=0)
    new_id = IdGenerator(node="bench")
    started = time.monotonic()
    later = time.time() + 3600
    done = 0
    while done < count:
        with spool.write() as txn:
            for _ in range(min(10_000, count - done)):
                queue_id = new_id()
                recipient = f"user{done}@backlog{done % 1000}.example"
                message = Message(
                    queue_id, "app@example.test", (recipient,), time.time(), len(BODY)
                )
                spool.add(txn, message, BODY)
                [job] = spool.jobs_of(txn, queue_id)
                deferred = Job(
                    queue_id,
                    job.domain,
                    job.recipients,
                    later,
                    attempts=1,
                    last_reply="451 4.4.1 connect to mx: Connection refused",
                    last_class="other",
                )
                spool.put_job(txn, deferred, old=job)
                done += 1
        print(f"\r  filled {done:,} / {count:,}", end="", flush=True)
    print()
    spool.close()
    return time.monotonic() - started


def rss_mb(pid: int) -> float:
    """RSS of ``pid`` and its worker processes, summed (pages they share count twice)."""
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) / 1024
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += rss_mb(int(child))
    return total


async def sink(port: int, arrivals: dict[str, float]) -> asyncio.Server:
    """A minimal SMTP server that notes when each Subject arrives."""

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            await converse(reader, writer)
        writer.close()

    async def converse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"DATA":
                writer.write(b"354 go\r\n")
                subject = ""
                while (data := await reader.readline()) not in (b".\r\n", b""):
                    if data.startswith(b"Subject: "):
                        subject = data[9:].decode().strip()
                arrivals[subject] = time.monotonic()
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 Bye\r\n")
                break
            else:
                writer.write(b"250-sink\r\n250 8BITMIME\r\n" if verb == b"EHLO" else b"250 Ok\r\n")
            await writer.drain()

    return await asyncio.start_server(session, "127.0.0.1", port)


async def send(port: int, subject: str) -> float:
    """One message over SMTP; when its 250 came."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for command in (
        None,
        b"EHLO bench\r\n",
        b"MAIL FROM:<app@example.test>\r\n",
        b"RCPT TO:<fresh@healthy.example>\r\n",
        b"DATA\r\n",
    ):
        if command:
            writer.write(command)
        while (await reader.readline())[3:4] == b"-":
            pass
    writer.write(f"From: app@example.test\r\nSubject: {subject}\r\n\r\nhello\r\n.\r\n".encode())
    await reader.readline()
    accepted = time.monotonic()
    writer.close()
    return accepted


async def measure(root: Path, count: int) -> None:
    smtp_port, metrics_port, sink_port = free_ports(3)
    dkim_keygen(root / "dkim")
    config = root / "mta.toml"
    config.write_text(
        f'[server]\nhostname = "bench.test"\nlisten = ["127.0.0.1:{smtp_port}"]\n'
        f'[spool]\npath = "{root / "spool"}"\nmax_size = {64 * 2**30}\nmin_free_disk = 0\n'
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n[log]\nlevel = "warning"\n'
        f'[delivery.routes]\n"healthy.example" = "127.0.0.1:{sink_port}"\n'
        f'"*" = "127.0.0.1:{free_port()}"\n'
        f'[[dkim]]\ndomain = "example.test"\nselector = "s1"\n'
        f'private_key = "{root / "dkim" / "example.test.s1.pem"}"\n'
    )
    print(f"filling the spool with {count:,} deferred messages ...")
    filled = fill(root / "spool", count)
    size = sum(f.stat().st_size for f in (root / "spool").iterdir()) / 2**20
    print(f"  {filled:.1f} s, spool {size:,.0f} MB on disk")

    arrivals: dict[str, float] = {}
    server = await sink(sink_port, arrivals)
    started = time.monotonic()
    daemon = subprocess.Popen(
        [MTA, "serve", "--config", str(config)], stderr=(root / "mta.log").open("wb")
    )
    try:
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", smtp_port), timeout=0.2).close()
                break
            await asyncio.sleep(0.05)
        start_seconds = time.monotonic() - started
        rss_start = rss_mb(daemon.pid)
        stats_started = time.monotonic()
        subprocess.run(
            [MTA, "queue", "stats", "--json", "--config", str(config)],
            check=True,
            capture_output=True,
        )
        stats_seconds = time.monotonic() - stats_started
        delays = []
        for number in range(20):
            subject = f"fresh-{number}"
            accepted = await send(smtp_port, subject)
            deadline = time.monotonic() + 30
            while subject not in arrivals and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            delays.append((arrivals.get(subject, float("inf")) - accepted) * 1000)
        rss_after = rss_mb(daemon.pid)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        server.close()
    delays.sort()
    print(f"\n{count:,} deferred messages in the spool")
    print(f"  start to accepting mail      {start_seconds:8.2f} s")
    print(f"  RSS after start              {rss_start:8.0f} MB")
    print(f"  RSS after 20 new messages    {rss_after:8.0f} MB")
    print(f"  mta queue stats              {stats_seconds:8.2f} s")
    print(
        f"  new mail accept-to-delivery  p50 {delays[len(delays) // 2]:.1f} ms, "
        f"max {delays[-1]:.1f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="mta-large-queue-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(measure(root, args.messages))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
