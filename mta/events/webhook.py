"""The webhook: hands the events kept in the spool to ``[events] webhook_url``.

One task (``Webhook``) POSTs them in batches as a JSON array and deletes
exactly the posted ones once the webhook answered 2xx; while it fails, the
same batch is retried with capped exponential backoff. A down webhook
therefore only makes the events database grow; SMTP never waits for it.
Delivery to the webhook is at least once: a crash or a stop between its 2xx
and our delete sends that batch again (same ids).
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import random
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from mta.config import EventsConfig
from mta.observe import metrics
from mta.spool.commit import GroupCommitter
from mta.spool.store import Spool

log = logging.getLogger("mta.events")

POLL_SECONDS = 2.0  # the webhook task looks at the spool at least this often


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
