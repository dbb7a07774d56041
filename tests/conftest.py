"""Fixtures every suite shares, and the CI rule for tests that could not run.

The fixtures start a real `mta serve` (tests/harness/mta.py): ``mta`` is
configured but not started (tests adjust it, then start()), ``running_mta``
is started and must exit 0 at the end.

Tests that need something from outside Python (smtp-sink, swaks, NSD,
Postfix, Prometheus, systemd-analyze, libopendkim, root) skip where it is
absent, so a developer's `pytest` still runs the rest. In CI (``CI`` set, as
every CI service does) that skip would hide a broken install behind a green
run, so the report hook below turns a skip whose reason says something "is
not installed" or is "missing" into a failure. `make test` installs all of
them (DEBIAN_TOOLS in the Makefile).
"""

from __future__ import annotations

import os
import re
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.harness.mta import Mta
from tests.harness.programs import require_program

MISSING = re.compile(r"\bnot installed\b|\bmissing\b", re.IGNORECASE)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return report
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if MISSING.search(reason):
        report.outcome = "failed"
        report.longrepr = f"CI must run this test, but: {reason.removeprefix('Skipped: ')}"
    return report


@pytest.fixture
def mta(tmp_path: Path) -> Iterator[Mta]:
    """A configured, not yet started MTA; tests adjust .server/.spool, then start()."""
    instance = Mta(tmp_path)
    yield instance
    instance.kill()  # the test failed before it stopped it


@pytest.fixture
def running_mta(mta: Mta) -> Iterator[Mta]:
    mta.start()
    yield mta
    if mta.process is not None:
        assert mta.stop() == 0, mta.log()


@pytest.fixture(scope="session")
def swaks() -> str:
    return require_program("swaks", "swaks")
