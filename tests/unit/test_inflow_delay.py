"""Inflow control's wait: none up to the backlog limit, then in proportion, capped."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mta.policy.inflow import delay


def test_nothing_waits_at_or_under_the_limit_or_without_one() -> None:
    assert delay(0, 20_000, 1.0) == 0.0
    assert delay(20_000, 20_000, 1.0) == 0.0
    assert delay(10**9, 0, 1.0) == 0.0  # 0 turns it off


def test_the_wait_grows_with_the_backlog_up_to_its_maximum() -> None:
    assert delay(25_000, 20_000, 1.0) == 0.25
    assert delay(30_000, 20_000, 1.0) == 0.5
    assert delay(40_000, 20_000, 1.0) == 1.0
    assert delay(400_000, 20_000, 1.0) == 1.0


@given(
    st.integers(min_value=0, max_value=10**7),
    st.integers(min_value=0, max_value=10**7),
    st.integers(min_value=1, max_value=10**6),
    st.floats(min_value=0, max_value=10),
)
def test_the_wait_never_shrinks_as_the_backlog_grows(
    smaller: int, more: int, limit: int, max_delay: float
) -> None:
    first = delay(smaller, limit, max_delay)
    assert 0.0 <= first <= max_delay
    assert first <= delay(smaller + more, limit, max_delay)
