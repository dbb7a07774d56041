"""The per-address table of failed AUTH attempts, on a fake clock."""

from __future__ import annotations

import pytest

from mta.inbound.auth_limits import AuthFailures


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def table(clock: Clock, **limits: float) -> AuthFailures:
    settings = {"max_failures": 3, "window": 60.0, "block": 300.0} | limits
    return AuthFailures(
        max_failures=int(settings["max_failures"]),
        window=settings["window"],
        block=settings["block"],
        max_clients=int(settings.get("max_clients", 100)),
        clock=clock,
    )


def test_an_address_is_blocked_after_max_failures_and_freed_after_block() -> None:
    clock = Clock()
    failures = table(clock)
    assert not failures.blocked("192.0.2.1")
    assert failures.failed("192.0.2.1") is False
    assert failures.failed("192.0.2.1") is False
    assert failures.failed("192.0.2.1") is True
    assert failures.blocked("192.0.2.1")
    assert not failures.blocked("192.0.2.2")  # other clients are not affected
    clock.now += 299
    assert failures.blocked("192.0.2.1")
    clock.now += 1
    assert not failures.blocked("192.0.2.1")


def test_failures_outside_the_window_do_not_count() -> None:
    clock = Clock()
    failures = table(clock)
    for _ in range(10):
        assert failures.failed("192.0.2.1") is False
        assert failures.failed("192.0.2.1") is False
        clock.now += 61  # two failures a minute stay under three per minute
    assert not failures.blocked("192.0.2.1")


def test_a_burst_of_failures_inside_the_window_blocks_once_more() -> None:
    clock = Clock()
    failures = table(clock)
    for _ in range(3):
        failures.failed("192.0.2.1")
    clock.now += 300
    assert not failures.blocked("192.0.2.1")
    assert failures.failed("192.0.2.1") is False  # the old burst left the window
    failures.failed("192.0.2.1")
    assert failures.failed("192.0.2.1") is True
    clock.now += 299
    assert failures.blocked("192.0.2.1")


def test_the_table_stays_bounded_under_a_flood_of_addresses() -> None:
    clock = Clock()
    failures = table(clock, max_clients=50)
    for _ in range(3):
        failures.failed("198.51.100.7")
    assert failures.blocked("198.51.100.7")
    for number in range(10_000):
        clock.now += 0.001
        failures.failed(f"10.{number // 65536}.{number // 256 % 256}.{number % 256}")
        assert len(failures) <= 50
    # The oldest entries went first: the flood pushed the blocked address out,
    # which costs its guesser nothing new: each address still has max_failures.
    assert len(failures) == 50


def test_expired_entries_are_dropped_before_recent_ones() -> None:
    clock = Clock()
    failures = table(clock, max_clients=2)
    failures.failed("192.0.2.1")
    clock.now += 1000  # long past its window and any block
    failures.failed("192.0.2.2")
    failures.failed("192.0.2.2")
    failures.failed("192.0.2.3")
    assert len(failures) == 2
    failures.failed("192.0.2.2")
    assert failures.blocked("192.0.2.2")  # kept its count; the expired entry went


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        AuthFailures(max_failures=0)
