"""Group commit: many SMTP sessions share one durable LMDB commit.

An fsync costs about a millisecond, so one commit per message would cap
acceptance near 1,000 messages/s and stall the event loop while it waits.
Instead every session hands its message to one writer thread and awaits a
future. The thread takes everything that queued up while the previous commit
was syncing, writes it all in one transaction, commits once, and only then
resolves each session's future. Under light load a batch is one message and
latency is one fsync; under heavy load batches grow and the fsync is shared.
A future never resolves before its message is on disk (DESIGN invariant 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass

import lmdb

from mta import metrics
from mta.queue.records import Message
from mta.queue.store import Spool, SpoolFull

log = logging.getLogger(__name__)

MAX_BATCH = 512


@dataclass
class _Request:
    message: Message
    body: bytes
    future: asyncio.Future[None]
    loop: asyncio.AbstractEventLoop


class GroupCommitter:
    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()

    async def add(self, message: Message, body: bytes) -> None:
        """Return once the message is durably in the spool; raise SpoolFull if no room."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._requests.put(_Request(message, body, future, loop))
        await future

    def close(self) -> None:
        """Commit what was handed in so far, then stop the writer thread."""
        self._requests.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            batch, stop = self._next_batch()
            if batch:
                self._commit(batch)
            if stop:
                return

    def _next_batch(self) -> tuple[list[_Request], bool]:
        first = self._requests.get()
        if first is None:
            return [], True
        batch = [first]
        while len(batch) < MAX_BATCH:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                break
            if request is None:
                return batch, True
            batch.append(request)
        return batch, False

    def _commit(self, batch: list[_Request]) -> None:
        outcomes: list[BaseException | None] = []
        started = time.perf_counter()
        try:
            with self.spool.write() as txn:
                for request in batch:
                    outcomes.append(self._add_one(txn, request))
        except lmdb.MapFullError:
            outcomes = [SpoolFull("spool database is full")] * len(batch)
        except Exception as error:  # the whole commit failed: nobody is accepted
            log.exception("spool commit failed")
            outcomes = [error] * len(batch)
        metrics.SPOOL_COMMIT_SECONDS.observe(time.perf_counter() - started)
        metrics.SPOOL_COMMIT_MESSAGES.observe(len(batch))
        for request, outcome in zip(batch, outcomes, strict=True):
            # RuntimeError: that event loop is closed, so nobody is waiting.
            with contextlib.suppress(RuntimeError):
                request.loop.call_soon_threadsafe(_settle, request.future, outcome)

    def _add_one(self, txn: lmdb.Transaction, request: _Request) -> BaseException | None:
        # Each check in Spool.add comes before its first write, so refusing
        # one message leaves the others in the batch intact.
        try:
            self.spool.add(txn, request.message, request.body)
        except (SpoolFull, ValueError) as refused:
            return refused
        return None


def _settle(future: asyncio.Future[None], outcome: BaseException | None) -> None:
    if future.cancelled():  # the session went away; the message is stored anyway
        return
    if outcome is None:
        future.set_result(None)
    else:
        future.set_exception(outcome)
