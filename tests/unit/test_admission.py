"""The shared limit model: leases never above max_connections, GCRA never above
its rate, warmup reservations and counts never above the day's cap."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from mta.policy.admission import (
    Ask,
    CountState,
    Granted,
    PathState,
    Refused,
    Warmup,
    admit,
    release,
    renew,
    renew_reservation,
    settle,
    share,
)

TTL = 10.0


def test_the_first_free_candidate_gets_the_lease() -> None:
    full, free = PathState(leases={"x": 5.0}), PathState()
    asks = [Ask("a", max_connections=1), Ask("b", max_connections=1)]
    assert admit([full, free], asks, "l1", now=1.0, ttl=TTL) == Granted(1)
    assert free.leases == {"l1": 1.0 + TTL}


def test_a_connection_limit_refuses_until_a_release() -> None:
    state = PathState()
    ask = Ask("a", max_connections=2)
    assert admit([state], [ask], "l1", 0.0, TTL) == Granted(0)
    assert admit([state], [ask], "l2", 0.0, TTL) == Granted(0)
    assert admit([state], [ask], "l3", 0.0, TTL) == Refused(None)
    release(state, "l1")
    assert admit([state], [ask], "l3", 0.0, TTL) == Granted(0)


def test_a_dead_holders_lease_expires() -> None:
    state = PathState()
    ask = Ask("a", max_connections=1)
    assert admit([state], [ask], "dead", 0.0, TTL) == Granted(0)
    assert admit([state], [ask], "next", TTL - 0.001, TTL) == Refused(None)
    assert admit([state], [ask], "next", TTL, TTL) == Granted(0)


def test_renewing_keeps_a_lease_and_a_lapsed_one_is_gone() -> None:
    state = PathState()
    admit([state], [Ask("a")], "l1", 0.0, TTL)
    assert renew(state, "l1", 5.0, TTL)
    assert state.leases["l1"] == 5.0 + TTL
    assert not renew(state, "l1", 5.0 + TTL, TTL)
    assert "l1" not in state.leases


def test_the_rate_spaces_messages_and_says_how_long_to_wait() -> None:
    state = PathState()
    ask = Ask("a", interval=0.5)
    assert admit([state], [ask], "l1", 100.0, TTL) == Granted(0)
    refused = admit([state], [ask], "l2", 100.25, TTL)
    assert refused == Refused(0.25)
    assert admit([state], [ask], "l2", 100.5, TTL) == Granted(0)


def test_the_shortest_rate_wait_of_the_candidates_is_reported() -> None:
    slow, fast = PathState(tat=110.0), PathState(tat=103.0)
    asks = [Ask("slow", interval=10.0), Ask("fast", interval=1.0)]
    assert admit([slow, fast], asks, "l", 100.0, TTL) == Refused(3.0)


def warm(cap: int, wanted: int) -> Ask:
    return Ask("a", warmup=Warmup("day", cap, wanted))


def test_a_warmup_cap_reserves_what_is_left_and_reports_a_full_day() -> None:
    count = CountState(sent={"node-a": 3, "node-b": 3})
    assert admit([PathState()], [warm(10, 3)], "r1", 0.0, TTL, [count]) == Granted(0, 3, 1)
    # One left: a delivery of five may send one of them.
    assert admit([PathState()], [warm(10, 5)], "r2", 0.0, TTL, [count]) == Granted(0, 1, 0)
    # Reserved, not sent: the day is not over, the reservations may come back.
    assert admit([PathState()], [warm(10, 1)], "r3", 0.0, TTL, [count]) == Refused(None)
    settle(count, "node-a", 3 + 3, "r1")  # r1 delivered all three
    settle(count, "node-b", 3, "r2")  # r2 delivered none
    assert admit([PathState()], [warm(10, 1)], "r4", 0.0, TTL, [count]) == Granted(0, 1, 0)
    settle(count, "node-b", 4, "r4")
    assert admit([PathState()], [warm(10, 1)], "r5", 0.0, TTL, [count]) == Refused(None, (0,))


def test_a_warmup_reservation_of_a_dead_holder_expires_unless_renewed() -> None:
    count = CountState()
    assert admit([PathState()], [warm(2, 2)], "dead", 0.0, TTL, [count]) == Granted(0, 2, 0)
    assert admit([PathState()], [warm(2, 1)], "r", TTL - 1, TTL, [count]) == Refused(None)
    renew_reservation(count, "dead", 2, TTL - 1, TTL)
    assert admit([PathState()], [warm(2, 1)], "r", TTL, TTL, [count]) == Refused(None)
    assert admit([PathState()], [warm(2, 1)], "r", 2 * TTL, TTL, [count]) == Granted(0, 1, 1)


def test_a_late_older_count_does_not_lower_the_nodes_count() -> None:
    count = CountState()
    settle(count, "node-a", 7, None)
    settle(count, "node-a", 6, None)
    assert count.sent == {"node-a": 7}


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["admit", "deliver", "fail"]),
            st.integers(min_value=1, max_value=4),  # recipients wanted, or delivered
            st.sampled_from(["node-a", "node-b"]),
        ),
        max_size=60,
    ),
    st.integers(min_value=1, max_value=12),
)
def test_deliveries_at_once_never_send_more_than_the_cap(
    steps: list[tuple[str, int, str]], cap: int
) -> None:
    count, sent = CountState(), {"node-a": 0, "node-b": 0}
    under_way: list[tuple[str, int, str]] = []  # reservation, recipients, node
    for n, (operation, number, node) in enumerate(steps):
        if operation == "admit":
            granted = admit([PathState()], [warm(cap, number)], f"r{n}", 0.0, TTL, [count])
            if isinstance(granted, Granted):
                assert 1 <= granted.reserved <= number
                under_way.append((f"r{n}", granted.reserved, node))
        elif under_way:
            reservation, reserved, holder = under_way.pop(0)
            if operation == "deliver":
                sent[holder] += min(number, reserved)
            settle(count, holder, sent[holder], reservation)
        held = sum(n for n, _ in count.reserved.values())
        assert sum(count.sent.values()) + held <= cap
    assert sum(sent.values()) <= cap


operations = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=3, allow_nan=False),  # time passing before it
        st.sampled_from(["admit", "release"]),
    ),
    max_size=80,
)


@given(
    operations,
    st.integers(min_value=1, max_value=4),
    st.sampled_from([0.1, 0.25, 1.0]),
    st.integers(min_value=1, max_value=3),
)
def test_no_window_holds_more_than_the_limits_allow(
    steps: list[tuple[float, str]], max_connections: int, interval: float, burst: int
) -> None:
    state = PathState()
    ask = Ask("p", max_connections, interval, burst)
    now, granted, held = 1000.0, [], []
    for n, (elapsed, operation) in enumerate(steps):
        now += elapsed
        if operation == "release" and held:
            release(state, held.pop(0))
        elif admit([state], [ask], f"l{n}", now, TTL) == Granted(0):
            granted.append(now)
            held.append(f"l{n}")
        assert len(state.leases) <= max_connections
    for i, start in enumerate(granted):
        for end in granted[i:]:
            inside = sum(1 for t in granted if start <= t <= end)
            assert inside <= burst + math.floor((end - start) / interval + 1e-6)


@given(st.integers(min_value=0, max_value=500), st.integers(min_value=1, max_value=20))
def test_the_nodes_shares_add_up_to_the_limit(limit: int, nodes: int) -> None:
    parts = [share(limit, rank, nodes) for rank in range(nodes)]
    assert sum(parts) == limit
    assert max(parts) - min(parts) <= 1
