"""Unit fixtures: an empty spool in the test's temporary directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mta.spool.store import Spool


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    """Room for large messages (1 GiB); tests of a full spool open their own, smaller."""
    opened = Spool(tmp_path / "spool", max_size=2**30)
    yield opened
    opened.close()
