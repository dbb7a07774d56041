"""The one way we write a moment for people and programs: ISO 8601 in UTC, to the millisecond.

``2027-01-15T08:00:00.123Z`` in log lines, delivery events and the JSON the
``mta queue`` and ``mta policy`` commands print, so one parser reads them all.
"""

from __future__ import annotations

from datetime import UTC, datetime


def iso_time(seconds: float) -> str:
    """``seconds`` since the epoch as ``2027-01-15T08:00:00.123Z``."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
