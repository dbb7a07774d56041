"""The node's file of open sessions and AUTH failures (mta.inbound.node_sessions).

One LMDB file stands for the node; ``as_process(pid)`` views of it stand in
for the workers (LMDB opens a file once per process). The clock is a fake,
and whether a PID is alive is injected, so nothing sleeps or kills.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from mta.inbound.auth_limits import AuthRules
from mta.inbound.node_sessions import NodeSessions, node_sessions_dir

WORKER_A, WORKER_B = 4101, 4102


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def node(
    directory: Path, clock: Clock, rules: AuthRules | None = None, max_clients: int = 10_000
) -> NodeSessions:
    """The file as worker A sees it; every other PID counts as alive."""
    return NodeSessions(
        str(directory),
        rules=rules,
        max_clients=max_clients,
        clock=clock,
        pid=WORKER_A,
        alive=lambda pid: True,
    )


# --- connection counts ---


def test_the_limit_per_address_holds_across_workers(tmp_path: Path, clock: Clock) -> None:
    a = node(tmp_path / "sessions", clock)
    b = a.as_process(WORKER_B)
    admitted = [w.admit("192.0.2.7", 100, 20) for _ in range(20) for w in (a, b)]
    assert admitted.count(None) == 20
    assert admitted.count("per_ip") == 20
    assert a.open_sessions("192.0.2.7") == b.open_sessions("192.0.2.7") == 20
    assert b.admit("192.0.2.8", 100, 20) is None  # another address has its own count
    a.leave("192.0.2.7")
    assert b.admit("192.0.2.7", 100, 20) is None  # a slot given back on A is free on B
    assert b.admit("192.0.2.7", 100, 20) == "per_ip"
    a.close()


def test_the_total_holds_across_workers(tmp_path: Path, clock: Clock) -> None:
    a = node(tmp_path / "sessions", clock)
    b = a.as_process(WORKER_B)
    results = [w.admit(f"198.51.100.{n}", 20, 5) for n in range(20) for w in (a, b)]
    assert results.count(None) == 20 and results.count("total") == 20
    assert a.open_sessions() == 20
    for n in range(10):
        b.leave(f"198.51.100.{n}")
    assert [a.admit("203.0.113.1", 20, 100) for _ in range(11)].count(None) == 10
    a.close()


def test_a_dead_workers_sessions_are_forgotten(tmp_path: Path, clock: Clock) -> None:
    directory = tmp_path / "sessions"
    a = node(directory, clock)
    b = a.as_process(WORKER_B)
    for _ in range(3):
        assert a.admit("192.0.2.7", 10, 10) is None
        assert b.admit("192.0.2.7", 10, 10) is None
    assert a.open_sessions("192.0.2.7") == 6
    # The supervisor saw worker B die.
    a.forget(lambda pid: pid == WORKER_B)
    assert a.open_sessions("192.0.2.7") == a.open_sessions() == 3
    a.close()
    # Worker B's counts again, then a worker starts (here with A's PID again, as a
    # reused PID would be): its own PID's and dead processes' counts go.
    b = node(directory, clock).as_process(WORKER_B)
    assert b.admit("192.0.2.7", 10, 10) is None
    assert b.admit("192.0.2.9", 10, 10) is None
    b.close()
    c = NodeSessions(str(directory), clock=clock, pid=WORKER_A, alive=lambda pid: pid != WORKER_B)
    assert c.open_sessions() == 0
    assert c.open_sessions("192.0.2.7") == c.open_sessions("192.0.2.9") == 0
    assert c.admit("192.0.2.7", 10, 10) is None
    c.close()
    # The supervisor's own call, with no worker holding the file open.
    NodeSessions.forget_worker(str(directory), WORKER_A)
    d = NodeSessions(str(directory), clock=clock, pid=WORKER_B, alive=lambda pid: True)
    assert d.open_sessions() == 0
    d.close()
    NodeSessions.forget_worker(str(tmp_path / "never-made"), WORKER_A)  # nothing to do


def test_a_living_workers_sessions_are_kept_when_another_starts(
    tmp_path: Path, clock: Clock
) -> None:
    directory = tmp_path / "sessions"
    a = node(directory, clock).as_process(WORKER_B)
    assert a.admit("192.0.2.7", 10, 10) is None
    a.close()
    b = NodeSessions(str(directory), clock=clock, pid=WORKER_A, alive=lambda pid: True)
    assert b.open_sessions("192.0.2.7") == 1
    b.close()


def test_the_file_is_private_and_cleared(tmp_path: Path, clock: Clock) -> None:
    directory = node_sessions_dir(tmp_path)
    a = node(directory, clock)
    assert a.admit("192.0.2.7", 10, 10) is None
    a.close()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name in ("data.mdb", "lock.mdb"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600
    NodeSessions.clear(str(directory))
    assert not directory.exists()
    b = node(directory, clock)
    assert b.open_sessions() == 0
    b.close()


# --- AUTH failures ---


def test_a_block_is_seen_by_every_worker(tmp_path: Path, clock: Clock) -> None:
    a = node(tmp_path / "sessions", clock)
    b = a.as_process(WORKER_B)
    blocks = []
    for number in range(10):
        worker = (a, b)[number % 2]
        token = worker.begin("192.0.2.7")
        assert token is not None
        blocks.append(worker.failed("192.0.2.7", token))
    assert blocks == [False] * 9 + [True]
    assert a.blocked("192.0.2.7") and b.blocked("192.0.2.7")
    assert a.begin("192.0.2.7") is None and b.begin("192.0.2.7") is None
    assert not b.blocked("192.0.2.8")
    clock.now += 599
    assert b.blocked("192.0.2.7")
    clock.now += 1
    assert not a.blocked("192.0.2.7")
    assert b.begin("192.0.2.7") is not None
    a.close()


def test_checks_under_way_count_against_the_limit(tmp_path: Path, clock: Clock) -> None:
    """40 guesses sent at once over both workers: only 10 are ever checked."""
    a = node(tmp_path / "sessions", clock)
    b = a.as_process(WORKER_B)
    tokens = [(w, w.begin("192.0.2.7")) for _ in range(20) for w in (a, b)]
    reserved = [(w, t) for w, t in tokens if t is not None]
    assert len(reserved) == 10
    assert not a.blocked("192.0.2.7")  # not blocked: reserved tries may yet succeed
    # One succeeds: its try comes back, and one more guess may be checked.
    worker, token = reserved.pop()
    worker.release("192.0.2.7", token)
    again = b.begin("192.0.2.7")
    assert again is not None
    assert a.begin("192.0.2.7") is None
    reserved.append((b, again))
    assert [w.failed("192.0.2.7", t) for w, t in reserved] == [False] * 9 + [True]
    assert b.blocked("192.0.2.7")
    a.close()


def test_a_dead_workers_reserved_tries_lapse(tmp_path: Path, clock: Clock) -> None:
    rules = AuthRules(max_failures=3, window=60.0, block=300.0, pending_ttl=30.0)
    a = node(tmp_path / "sessions", clock, rules=rules)
    assert all(a.begin("192.0.2.7") for _ in range(3))  # then the worker died
    assert a.begin("192.0.2.7") is None
    clock.now += 30
    assert a.begin("192.0.2.7") is not None
    a.close()


def test_a_success_does_not_clear_failures_and_leaves_no_record(
    tmp_path: Path, clock: Clock
) -> None:
    rules = AuthRules(max_failures=3, window=60.0, block=300.0)
    a = node(tmp_path / "sessions", clock, rules=rules)
    token = a.begin("192.0.2.1")
    assert token is not None
    a.release("192.0.2.1", token)  # a login that worked: nothing kept
    assert a.auth_records() == 0
    for _ in range(2):
        assert a.failed("192.0.2.7", a.begin("192.0.2.7")) is False
    token = a.begin("192.0.2.7")
    assert token is not None
    a.release("192.0.2.7", token)
    assert a.failed("192.0.2.7", a.begin("192.0.2.7")) is True
    clock.now += 1000  # long past the window and the block
    token = a.begin("192.0.2.7")
    assert token is not None
    a.release("192.0.2.7", token)
    assert a.auth_records() == 0  # an expired record is dropped when touched
    a.close()


def test_failures_outside_the_window_do_not_count(tmp_path: Path, clock: Clock) -> None:
    rules = AuthRules(max_failures=3, window=60.0, block=300.0)
    a = node(tmp_path / "sessions", clock, rules=rules)
    for _ in range(10):
        assert a.failed("192.0.2.1") is False
        assert a.failed("192.0.2.1") is False
        clock.now += 61
    assert not a.blocked("192.0.2.1")
    a.close()


def test_the_table_stays_bounded_under_a_flood_of_addresses(tmp_path: Path, clock: Clock) -> None:
    rules = AuthRules(max_failures=3, window=60.0, block=300.0)
    a = node(tmp_path / "sessions", clock, rules=rules, max_clients=40)
    b = a.as_process(WORKER_B)
    for _ in range(3):
        a.failed("198.51.100.7")
    assert b.blocked("198.51.100.7")
    for number in range(500):
        clock.now += 0.01
        (a, b)[number % 2].failed(f"10.0.{number // 256}.{number % 256}")
        assert a.auth_records() <= 40
    assert a.auth_records() >= 30  # trimmed to three quarters at most
    # The least recently failing went first: the blocked address too, which
    # costs its guesser nothing new (each address still has max_failures).
    assert not a.blocked("198.51.100.7")
    a.close()


def test_expired_records_are_dropped_before_recent_ones(tmp_path: Path, clock: Clock) -> None:
    rules = AuthRules(max_failures=3, window=60.0, block=300.0)
    a = node(tmp_path / "sessions", clock, rules=rules, max_clients=4)
    for _ in range(3):
        a.failed("192.0.2.1")  # blocked for 300 s: the oldest record, not expired
    clock.now += 1
    a.failed("192.0.2.2")
    a.failed("192.0.2.3")
    clock.now += 200  # 2 and 3 are past their window: expired
    a.failed("192.0.2.4")
    a.failed("192.0.2.5")  # 5 > 4 records: trimmed to 3, the expired ones first
    assert a.auth_records() == 3
    assert a.blocked("192.0.2.1")
    assert a.failed("192.0.2.4") is False
    assert a.failed("192.0.2.4") is True
    a.close()


def test_a_closed_file_refuses_nothing_it_cannot_count(tmp_path: Path, clock: Clock) -> None:
    """After close (the daemon stopping), late callbacks neither fail nor admit."""
    a = node(tmp_path / "sessions", clock)
    assert a.admit("192.0.2.7", 10, 10) is None
    a.close()
    a.leave("192.0.2.7")
    assert a.admit("192.0.2.7", 10, 10) == "total"
    assert not a.blocked("192.0.2.7")
    assert a.begin("192.0.2.7") is None
    assert a.failed("192.0.2.7") is False
