"""Where events go as they happen: a rotating file of JSON lines, and the spool.

- ``[events] file``: one JSON line per event, appended after the commit that
  made it happen, rotated by size. The write happens in a logging
  QueueListener thread, never on the event loop. Best effort: a crash between
  the commit and the write loses the line (the log line is lost the same way).
- ``[events] webhook_url``: the events are appended to the spool's ``events``
  database IN the commit that records what happened (the message accepted,
  the attempt's outcome), so a crash neither loses an event nor reports one
  that did not happen; mta.events.webhook takes them from there.

Order: the spool hands events out oldest first, and a message's reception is
committed before any of its attempts, so a consumer sees each recipient's
events in the order they happened.
"""

from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
import queue
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import lmdb

from mta.config import EventsConfig
from mta.events.event import Event
from mta.observe import metrics
from mta.spool.store import Spool

T = TypeVar("T")


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
            writer = logging.Logger("mta.events.file")  # outside the logging tree: no propagation
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
