"""Delivery events: what happened to each recipient, for the sending application.

Every reception, delivery, deferral, bounce and expiry of one recipient is an
``Event`` (a flat JSON object; ``id`` lets a consumer drop duplicates). They
go two ways:

- ``[events] file``: one JSON line per event, appended after the commit that
  made it happen, rotated by size. The write happens in a logging
  QueueListener thread, never on the event loop. Best effort: a crash between
  the commit and the write loses the line (the log line is lost the same way).
- ``[events] webhook_url``: the events are appended to the spool's ``events``
  database IN the commit that records what happened (the message accepted,
  the attempt's outcome), so a crash neither loses an event nor reports one
  that did not happen. One task (``Webhook``) POSTs them in batches as a JSON
  array and deletes exactly the posted ones once the webhook answered 2xx;
  while it fails, the same batch is retried with capped exponential backoff.
  A down webhook therefore only makes the events database grow; SMTP never
  waits for it. Delivery to the webhook is at least once: a crash or a stop
  between its 2xx and our delete sends that batch again (same ids).

Order: the spool hands events out oldest first, and a message's reception is
committed before any of its attempts, so a consumer sees each recipient's
events in the order they happened.

An attempt that never talked SMTP because no path may send yet (a rate
limit, a warmup cap, a suspension: the job just waits, its attempt count
unchanged) makes no ``deferred`` event; its log line says so. If the message
expires meanwhile, that is an ``expired`` event.
"""

from __future__ import annotations

import asyncio
import datetime
import fcntl
import http.client
import json
import logging
import logging.handlers
import os
import queue
import random
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeVar

import lmdb

from mta.config import EventsConfig
from mta.mail.reply import Reply
from mta.observe import metrics
from mta.policy.disposition import Decision
from mta.policy.outcome import Outcome, outcome
from mta.spool.commit import GroupCommitter
from mta.spool.records import Message
from mta.spool.store import Spool

log = logging.getLogger("mta.events")

EventType = Literal["received", "delivered", "deferred", "bounced", "expired"]
T = TypeVar("T")
POLL_SECONDS = 2.0  # the webhook task looks at the spool at least this often


@dataclass(frozen=True)
class Event:
    """One thing that happened to one recipient of one message.

    Fields that do not apply are None: a reception has no source, site, MX,
    reply or classification; a delivery has no classification.
    """

    id: str  # "<queue id>.<recipient>.<attempt>.<type>": unique, stable across a resend
    type: EventType
    time: str  # ISO 8601 UTC, when it happened
    queue_id: str
    message_id: str  # the Message-ID header
    sender: str  # "" for the null sender (a bounce)
    recipient: str
    source: str | None  # the egress source that sent
    site: str | None  # the destination site (MX host set) it was sent to
    mx: str | None  # the relay that answered: "mx.example.net[192.0.2.1]:25"
    reply: str | None  # the reply that decided this recipient: "550 5.1.1 ..."
    dsn: str | None  # its RFC 3463 status: "5.1.1"
    classification: str | None  # for failures: invalid_recipient, spam_block, ...
    attempt: int  # delivery attempts so far (0 for a reception)
    arrived: str  # ISO 8601 UTC, when the message was accepted

    def encode(self) -> bytes:
        """Compact JSON, ASCII only (anything else \\u-escaped), one line."""
        return json.dumps(asdict(self), separators=(",", ":")).encode()


def iso_time(seconds: float) -> str:
    """``2027-01-15T08:00:00.123Z``."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _event(
    kind: EventType,
    message: Message,
    recipient: str,
    attempt: int,
    now: float,
    *,
    source: str | None = None,
    site: str | None = None,
    mx: str | None = None,
    reply: Reply | None = None,
    classification: str | None = None,
) -> Event:
    return Event(
        id=f"{message.id}.{recipient}.{attempt}.{kind}",
        type=kind,
        time=iso_time(now),
        queue_id=message.id,
        message_id=message.message_id,
        sender=message.sender,
        recipient=recipient,
        source=source,
        site=site,
        mx=mx,
        reply=None if reply is None else str(reply),
        dsn=None if reply is None else reply.status,
        classification=classification,
        attempt=attempt,
        arrived=iso_time(message.arrived),
    )


def received_events(message: Message, now: float) -> list[Event]:
    """One ``received`` event per recipient of a message just accepted."""
    return [_event("received", message, recipient, 0, now) for recipient in message.recipients]


def attempt_events(
    *,
    message: Message,
    recipients: Sequence[str],
    replies: Mapping[str, Reply],
    decision: Decision,
    attempt: int,
    now: float,
    classify: Callable[[Reply], str],
    mx: str | None = None,
    source: str | None = None,
    site: str | None = None,
    tried: bool = True,
) -> list[Event]:
    """The events of one delivery attempt of ``recipients`` (one job).

    ``replies`` are the replies the decision was made on; ``attempt`` counts
    this one; ``tried`` is False when no SMTP was attempted (no path may send
    yet), which makes no ``deferred`` events.
    """
    bounced = dict(decision.bounced)
    events = []
    for recipient in recipients:
        given = replies[recipient]
        path = {"source": source, "site": site, "mx": mx}
        if recipient in decision.delivered:
            events.append(
                _event("delivered", message, recipient, attempt, now, reply=given, **path)
            )
        elif recipient in bounced:
            reply = bounced[recipient]
            kind: EventType = (
                "expired"
                if decision.expired and outcome(given) is not Outcome.BOUNCED
                else "bounced"
            )
            events.append(
                _event(
                    kind,
                    message,
                    recipient,
                    attempt,
                    now,
                    reply=reply,
                    classification=classify(reply),
                    **path,
                )
            )
        elif tried:
            events.append(
                _event(
                    "deferred",
                    message,
                    recipient,
                    attempt,
                    now,
                    reply=given,
                    classification=classify(given),
                    **path,
                )
            )
    return events


class EventLog:
    """Where events go: ``store`` inside the commit, ``publish`` after it.

    ``store`` appends to the spool only when a webhook is configured (no one
    would ever take them out otherwise); ``publish`` writes the file lines,
    counts the events and wakes the webhook task.
    """

    def __init__(self, config: EventsConfig, spool: Spool | None = None) -> None:
        self.spool = spool if config.webhook_url else None
        self.wake: Callable[[], None] = lambda: None  # the webhook task's, once it runs
        self._writer: logging.Logger | None = None
        self._listener: logging.handlers.QueueListener | None = None
        if config.file:
            # Raises OSError when the file cannot be opened: the caller says so at startup.
            handler = RotatingFile(
                config.file,
                maxBytes=config.max_file_bytes,
                backupCount=config.backups,
                encoding="utf-8",
            )
            handler.setFormatter(logging.Formatter("%(message)s"))
            lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
            self._listener = logging.handlers.QueueListener(lines, handler)
            self._listener.start()
            writer = logging.Logger(
                "mta.events.event_log.file"
            )  # outside the logging tree: no propagation
            writer.addHandler(logging.handlers.QueueHandler(lines))
            self._writer = writer

    @property
    def spooled(self) -> bool:
        """Whether events are kept in the spool for a webhook."""
        return self.spool is not None

    def store(self, txn: lmdb.Transaction, events: Sequence[Event]) -> None:
        """Inside the commit that makes ``events`` happen: keep them for the webhook."""
        if self.spool is not None:
            for event in events:
                self.spool.append_event(txn, event.encode())

    def storing(
        self, events: Sequence[Event], change: Callable[[lmdb.Transaction], T]
    ) -> Callable[[lmdb.Transaction], T]:
        """``change`` and then ``store(txn, events)``, as one change for ``committer.run``."""

        def both(txn: lmdb.Transaction) -> T:
            result = change(txn)
            self.store(txn, events)
            return result

        return both

    def publish(self, events: Sequence[Event]) -> None:
        """After that commit: the file lines, the metrics, a nudge to the webhook."""
        for event in events:
            metrics.EVENTS.labels(event.type).inc()
            if self._writer is not None:
                self._writer.info(event.encode().decode())
        if events and self.spool is not None:
            self.wake()

    def close(self) -> None:
        """Write out the lines still queued and close the file."""
        if self._listener is not None:
            self._listener.stop()
            for handler in self._listener.handlers:
                handler.close()
            self._listener = None
            self._writer = None


class RotatingFile(logging.handlers.RotatingFileHandler):
    """RotatingFileHandler that worker processes can share, and where
    ``backupCount=0`` means "start the file again" at ``maxBytes`` (the
    standard one would then let it grow for ever).

    Every worker appends to the same file. Each line is written under an
    exclusive lock (flock) on the file's directory, which rotation does not
    rename, after reopening the file if another worker rotated it meanwhile:
    one worker rotates at a time and nobody keeps writing into a file that
    was renamed away.
    """

    def __init__(self, filename: str, **kwargs: Any) -> None:
        super().__init__(filename, **kwargs)
        self._directory = os.open(os.path.dirname(self.baseFilename), os.O_RDONLY)

    def emit(self, record: logging.LogRecord) -> None:
        fcntl.flock(self._directory, fcntl.LOCK_EX)
        try:
            self._reopen_if_rotated()
            super().emit(record)
        finally:
            fcntl.flock(self._directory, fcntl.LOCK_UN)

    def _reopen_if_rotated(self) -> None:
        if self.stream is None:
            return
        try:
            current = os.stat(self.baseFilename)
        except FileNotFoundError:
            current = None
        opened = os.fstat(self.stream.fileno())
        if current is None or (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
            self.stream.close()
            self.stream = self._open()

    def close(self) -> None:
        super().close()
        if self._directory >= 0:  # logging may close a handler twice
            os.close(self._directory)
            self._directory = -1

    def shouldRollover(self, record: logging.LogRecord) -> bool:  # noqa: N802
        if self.backupCount == 0 and self.maxBytes > 0:
            if self.stream is None:
                self.stream = self._open()
            self.stream.seek(0, os.SEEK_END)  # other workers append too
            return self.stream.tell() + len(self.format(record)) + 1 >= self.maxBytes
        return bool(super().shouldRollover(record))

    def doRollover(self) -> None:  # noqa: N802
        if self.backupCount > 0:
            super().doRollover()
            return
        if self.stream:
            self.stream.close()
        # Truncate in place: another worker may hold the file open.
        self.stream = open(self.baseFilename, "w", encoding=self.encoding)  # noqa: SIM115


# --- the webhook ---


def batch_body(events: Sequence[bytes]) -> bytes:
    """The POST body: the stored events (each a JSON object) as one JSON array."""
    return b"[" + b",".join(events) + b"]"


@dataclass(frozen=True)
class Backoff:
    """Seconds to wait before retrying a batch after its ``failures``-th failure in a row:
    ``first`` doubling, capped at ``cap``, each drawn between half and all of that."""

    cap: float
    first: float = 1.0

    def delay(self, failures: int, rng: random.Random) -> float:
        if failures <= 0:
            return 0.0
        ceiling = min(self.cap, self.first * 2.0 ** min(failures - 1, 64))
        return ceiling / 2 + rng.random() * ceiling / 2


PostResult = Literal["ok", "http_error", "connection_error"]


def post_result(status: int | None) -> PostResult:
    """How a POST ended: an HTTP status, or None when no answer came (refused, timeout)."""
    if status is None:
        return "connection_error"
    return "ok" if 200 <= status < 300 else "http_error"


def post_json(url: str, body: bytes, timeout: float) -> int:
    """POST ``body`` as application/json; the response status. Blocking (run in a thread).

    Raises OSError or http.client.HTTPException when no answer comes.
    """
    parts = urllib.parse.urlsplit(url)
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    assert parts.hostname is not None
    connection = connection_class(parts.hostname, parts.port, timeout=timeout)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        connection.request(
            "POST",
            path,
            body=body,
            headers={"Content-Type": "application/json", "User-Agent": "mta-events"},
        )
        response = connection.getresponse()
        response.read(65536)  # a small answer body; the status is what counts
        return response.status
    finally:
        connection.close()


Post = Callable[[str, bytes, float], int]


class Webhook:
    """The task that hands the spooled events to ``[events] webhook_url``."""

    def __init__(
        self,
        spool: Spool,
        committer: GroupCommitter,
        config: EventsConfig,
        *,
        post: Post = post_json,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        poll: float = POLL_SECONDS,
    ) -> None:
        assert config.webhook_url is not None
        self.spool = spool
        self.committer = committer
        self.url = config.webhook_url
        self.batch = config.webhook_batch
        self.timeout = config.webhook_timeout
        self.post = post
        self.backoff = backoff or Backoff(cap=config.webhook_retry_max)
        self.rng = rng or random.Random()
        self.poll = poll
        self.failures = 0  # failed POSTs in a row
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="webhook")

    def wake(self) -> None:
        """New events were committed: look now (unless backing off after a failure)."""
        self._wakeup.set()

    def stop(self) -> None:
        """Stop after the POST under way (and its commit); what is left stays spooled."""
        self._stopping.set()

    async def run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._wakeup.clear()
                try:
                    sent = await self.send_batch()
                except Exception:  # a failed delete commit, say: log, back off, go on
                    log.exception("webhook: unexpected error; retrying")
                    sent = None
                if sent is None:
                    self.failures += 1
                    await self._sleep(self.backoff.delay(self.failures, self.rng), wakeable=False)
                elif sent == 0:
                    await self._sleep(self.poll, wakeable=True)
        finally:
            self._pool.shutdown(wait=False)

    async def send_batch(self) -> int | None:
        """POST the oldest waiting events; how many were delivered (0: none
        waiting), or None when the webhook failed and the batch stays."""
        with self.spool.read() as txn:
            batch = self.spool.events(txn, self.batch)
        if not batch:
            return 0
        loop = asyncio.get_running_loop()
        status: int | None
        error = ""
        try:
            body = batch_body([event for _, event in batch])
            status = await loop.run_in_executor(self._pool, self.post, self.url, body, self.timeout)
        except (OSError, http.client.HTTPException) as failure:
            status, error = None, str(failure) or type(failure).__name__
        result = post_result(status)
        metrics.WEBHOOK_POSTS.labels(result).inc()
        if result != "ok":
            log.warning(
                "webhook %s: %s; %d event(s) kept, retry %d",
                self.url,
                error or f"HTTP status {status}",
                len(batch),
                self.failures + 1,
            )
            return None
        keys = [key for key, _ in batch]
        await self.committer.run(lambda txn: self.spool.delete_events(txn, keys))
        metrics.WEBHOOK_EVENTS.inc(len(keys))
        if self.failures:
            log.info("webhook %s: delivering again after %d failure(s)", self.url, self.failures)
        self.failures = 0
        return len(keys)

    async def _sleep(self, seconds: float, *, wakeable: bool) -> None:
        waits = [asyncio.ensure_future(self._stopping.wait())]
        if wakeable:
            waits.append(asyncio.ensure_future(self._wakeup.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
