"""The event-loop lag watcher records how late each wake-up came (an injected clock)."""

from __future__ import annotations

import asyncio

import pytest

from mta.observe import loop_lag


def test_each_wake_up_records_how_late_it_came() -> None:
    now = [100.0]
    late_by = iter([0.0, 0.030, 0.250])
    seen: list[float] = []

    async def wake_late(seconds: float) -> None:
        try:
            now[0] += seconds + next(late_by)
        except StopIteration:
            raise asyncio.CancelledError from None

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(loop_lag.watch(0.1, lambda: now[0], wake_late, seen.append))
    assert seen == pytest.approx([0.0, 0.030, 0.250])
