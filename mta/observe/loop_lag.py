"""Event-loop lag: how late the loop wakes a task that asked to sleep.

Every process runs one watcher. A pass of the event loop that runs long (a
synchronous scan, a big DKIM signature, a burst of sessions) delays every
session and delivery of the process by as much; the watcher asks to wake
every ``INTERVAL`` seconds and records how much later than that it woke, in
the ``mta_event_loop_lag_seconds`` histogram.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from mta.observe import metrics

INTERVAL = 0.1  # seconds between looks: ten observations a second per process


async def watch(
    interval: float = INTERVAL,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    observe: Callable[[float], None] = metrics.EVENT_LOOP_LAG_SECONDS.observe,
) -> None:
    """Record the loop's lag every ``interval`` seconds, until cancelled."""
    while True:
        asked = clock() + interval
        await sleep(interval)
        observe(max(0.0, clock() - asked))
