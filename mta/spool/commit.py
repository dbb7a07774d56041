"""Group commit: many SMTP sessions and deliveries share one durable LMDB commit.

An fsync costs about a millisecond, so one commit per change would cap the
spool near 1,000 changes/s. Instead every change (a new message from a
session, a delivery result from the scheduler) is a function of a
transaction, and the caller awaits a future that resolves only once its
change is on disk (docs/architecture.md, invariant 1). The changes handed in during one pass
of the event loop are committed together, in one of two places:

- Under light load (fewer than INLINE_BATCH changes in the pass) by the
  writer thread, so the event loop goes on serving sessions during the
  fsync. The thread takes everything that queued up while it was syncing,
  runs it in one transaction and commits once: under heavy load the fsync is
  shared.
- Under heavy load (INLINE_BATCH or more) by the event loop itself, which
  then stops for the commit (LMDB's writer lock, shared with the other
  workers, and two fdatasyncs: 0.5-2 ms). That costs less than the thread:
  py-lmdb releases the GIL in every call, and with the loop busy the writer
  waits for it back twenty-odd times per change, each a futex wake-up and a
  context switch. At half of peak load, where a pass holds one or two
  changes, the thread keeps accept-to-delivery latency low (the figures are
  in docs/benchmarks.md).

A change that raises is rolled back alone and reported to its caller, while
the rest of the batch commits. The batch first runs in one nested
transaction; only if a change raises is that undone and every change run
again in a nested transaction of its own (a nested transaction per change
always would cost two more LMDB calls per change). So a change may run
twice; it must only touch the spool through the transaction it is given.
A commit that finds no room (LMDB's map, or the disk: ENOSPC) stores nothing
and tells every caller SpoolFull, which a session answers with 452 4.3.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import lmdb

from mta.observe import metrics
from mta.spool.records import Message
from mta.spool.store import Spool, SpoolFull

log = logging.getLogger(__name__)

MAX_BATCH = 512  # changes per commit by the writer thread
INLINE_BATCH = 3  # changes in one pass of the event loop that it commits itself
T = TypeVar("T")


@dataclass
class _Request:
    change: Callable[[lmdb.Transaction], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


@dataclass
class _Outcome:
    value: Any = None
    error: BaseException | None = None


class GroupCommitter:
    """Commits changes from one thread's event loop (see the module docstring)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._this_pass: list[_Request] = []  # handed in since the loop last flushed
        self._flush_on: asyncio.AbstractEventLoop | None = None  # whose loop will flush them
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()

    async def add(self, message: Message, body: bytes) -> None:
        """Return once the message is durably in the spool; raise SpoolFull if no room."""
        await self.run(lambda txn: self.spool.add(txn, message, body))

    async def run(self, change: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``change`` with the others of this pass of the loop; its result once committed.

        It runs on this thread or the writer thread (see the module docstring),
        must only touch the spool through the transaction it is given, and may
        run twice (once in a batch undone because another change raised).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if self._flush_on is not loop:  # (not: an earlier loop stopped before it flushed)
            loop.call_soon(self._flush)  # after what this pass of the loop still has to run
            self._flush_on = loop
        self._this_pass.append(_Request(change, future, loop))
        return await future

    def close(self) -> None:
        """Commit what was handed in so far, then stop the writer thread."""
        self._hand_to_writer()
        self._requests.put(None)
        self._thread.join()

    def _flush(self) -> None:
        self._flush_on = None
        if len(self._this_pass) < INLINE_BATCH:
            self._hand_to_writer()
            return
        batch, self._this_pass = self._this_pass, []
        for request, outcome in zip(batch, self._commit(batch), strict=True):
            with contextlib.suppress(RuntimeError):  # as in _run
                _settle(request.future, outcome)

    def _hand_to_writer(self) -> None:
        batch, self._this_pass = self._this_pass, []
        for request in batch:
            self._requests.put(request)

    def _run(self) -> None:
        """The writer thread: commit what queued up, tell each caller's loop."""
        while True:
            batch, stop = self._next_batch()
            outcomes = self._commit(batch) if batch else []
            for request, outcome in zip(batch, outcomes, strict=True):
                # RuntimeError: that event loop is closed, so nobody is waiting.
                with contextlib.suppress(RuntimeError):
                    request.loop.call_soon_threadsafe(_settle, request.future, outcome)
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

    def _commit(self, batch: list[_Request]) -> list[_Outcome]:
        """Run the batch's changes in one durable commit; each one's result or error."""
        outcomes: list[_Outcome] = []
        started = time.perf_counter()
        try:
            with self.spool.write() as txn:
                outcomes = self._apply_all(txn, batch)
        except lmdb.MapFullError:
            outcomes = [_Outcome(error=SpoolFull("spool database is full"))] * len(batch)
        except lmdb.DiskError:  # ENOSPC: the disk filled up faster than room_problem saw
            log.warning("spool commit failed: disk full; %d change(s) not stored", len(batch))
            outcomes = [_Outcome(error=SpoolFull("disk full"))] * len(batch)
        except Exception as error:  # the whole commit failed: nothing in it happened
            log.exception("spool commit failed")
            outcomes = [_Outcome(error=error)] * len(batch)
        metrics.SPOOL_COMMIT_SECONDS.observe(time.perf_counter() - started)
        metrics.SPOOL_COMMIT_MESSAGES.observe(len(batch))
        return outcomes

    def _apply_all(self, txn: lmdb.Transaction, batch: list[_Request]) -> list[_Outcome]:
        """Run the batch's changes in ``txn``; each one's result or error."""
        try:
            with self.spool.env.begin(write=True, parent=txn) as child:
                return [_Outcome(value=request.change(child)) for request in batch]
        except (lmdb.MapFullError, lmdb.DiskError):
            raise  # the parent transaction cannot go on either
        except Exception:  # undone; each again on its own, so only the culprit fails
            return [self._apply(txn, request) for request in batch]

    def _apply(self, txn: lmdb.Transaction, request: _Request) -> _Outcome:
        try:
            with self.spool.env.begin(write=True, parent=txn) as child:
                return _Outcome(value=request.change(child))
        except (lmdb.MapFullError, lmdb.DiskError):
            raise  # the parent transaction cannot go on either
        except Exception as error:  # rolled back alone; the caller hears why
            return _Outcome(error=error)


def _settle(future: asyncio.Future[Any], outcome: _Outcome) -> None:
    if future.cancelled():  # the caller went away; the change is stored anyway
        return
    if outcome.error is None:
        future.set_result(outcome.value)
    else:
        future.set_exception(outcome.error)
