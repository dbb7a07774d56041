"""``eventually()``: the one way tests wait for something to happen.

Tests never assert on how long something took; they poll for the state they
expect and, when it does not come within a generous timeout, fail saying
what they were waiting for and what they saw instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(
    predicate: Callable[[], T | None],
    timeout: float,
    message: str | Callable[[], str],
    interval: float = 0.02,
) -> T:
    """Poll ``predicate`` until it returns something true, and return that value.

    ``message`` says what was awaited; a callable is called only on failure,
    so it can describe the state at that moment.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            what = message() if callable(message) else message
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(interval)


async def loop_turns(count: int) -> None:
    """Let the event loop run ``count`` passes (ready callbacks and woken tasks):
    how unit tests step a loop instead of sleeping."""
    loop = asyncio.get_running_loop()
    for _ in range(count):
        turn = loop.create_future()
        loop.call_soon(turn.set_result, None)
        await turn
