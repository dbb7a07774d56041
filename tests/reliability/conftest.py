"""Reliability scenarios: faults, hostile input, crashes.

Every scenario takes the ``scenario`` fixture and fills in what it checked
and its counts (messages sent, accepted, delivered, lost, duplicated).
When MTA_RELIABILITY_REPORT names a file, each scenario appends one JSON
line to it with its outcome; ``tools/reliability_report.py`` runs this suite
that way and writes the table in docs/reliability.md.

MTA_SOAK=1 runs the long versions (more messages, more kills); the default
keeps ``make test`` quick.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator, Iterator
from dataclasses import asdict, dataclass

import pytest

SOAK = os.environ.get("MTA_SOAK") == "1"


def scaled(quick: int, soak: int) -> int:
    """A count for the quick run, or for the soak run."""
    return soak if SOAK else quick


@dataclass
class Scenario:
    name: str
    checked: str = ""
    sent: int = 0
    accepted: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_OUTCOME] = report.outcome
    return report


_OUTCOME = pytest.StashKey[str]()


@pytest.fixture
def scenario(request: pytest.FixtureRequest) -> Iterator[Scenario]:
    record = Scenario(request.node.name)
    yield record
    path = os.environ.get("MTA_RELIABILITY_REPORT")
    if path:
        outcome = request.node.stash.get(_OUTCOME, "error")
        line = asdict(record) | {"module": request.node.module.__name__, "outcome": outcome}
        with open(path, "a") as report:
            report.write(json.dumps(line) + "\n")
