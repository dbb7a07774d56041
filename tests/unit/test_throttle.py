"""Suspensions and throttles per (source, site): expiry, extension, strongest factor, JSON."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.policy.throttle import Restriction, Throttles

T0 = 1_700_000_000.0
GMAIL = ("ip1", "gmail")
YAHOO = ("ip1", "yahoo")


def test_nothing_in_force_by_default() -> None:
    throttles = Throttles()
    assert throttles.state(GMAIL, T0) == Restriction()
    assert not throttles.is_suspended(GMAIL, T0)
    assert throttles.factor(GMAIL, T0) == 1.0
    assert throttles.active(T0) == {}


def test_a_suspension_ends_exactly_at_until() -> None:
    throttles = Throttles()
    throttles.suspend(GMAIL, T0 + 1800, "yahoo-tss04")
    assert throttles.is_suspended(GMAIL, T0)
    assert throttles.is_suspended(GMAIL, T0 + 1799.999)
    assert throttles.state(GMAIL, T0) == Restriction(
        suspended_until=T0 + 1800, reason="yahoo-tss04"
    )
    assert not throttles.is_suspended(GMAIL, T0 + 1800)
    assert throttles.state(GMAIL, T0 + 1800) == Restriction()
    assert not throttles.is_suspended(YAHOO, T0)  # per path


def test_a_later_suspension_extends_an_earlier_one_never_shortens_it() -> None:
    throttles = Throttles()
    throttles.suspend(GMAIL, T0 + 3600, "operator")
    throttles.suspend(GMAIL, T0 + 600, "yahoo-tss04")  # shorter: ignored
    assert throttles.state(GMAIL, T0) == Restriction(suspended_until=T0 + 3600, reason="operator")
    throttles.suspend(GMAIL, T0 + 7200, "yahoo-permanent-deferral")  # longer: extends
    assert throttles.state(GMAIL, T0).suspended_until == T0 + 7200
    assert throttles.state(GMAIL, T0).reason == "yahoo-permanent-deferral"


def test_resume_lifts_suspension_and_throttle_at_once() -> None:
    throttles = Throttles()
    throttles.suspend(GMAIL, T0 + 3600, "operator")
    throttles.throttle(GMAIL, 0.5, T0 + 3600, "gmail-rate-limited")
    throttles.suspend(YAHOO, T0 + 3600, "operator")
    throttles.resume(GMAIL)
    assert throttles.state(GMAIL, T0) == Restriction()
    assert throttles.is_suspended(YAHOO, T0)
    throttles.resume(("nobody", "nowhere"))  # nothing to lift: no error


def test_resume_returns_every_end_the_suspension_had() -> None:
    throttles = Throttles()
    throttles.suspend(YAHOO, T0 + 1800, "yahoo-tss04")
    throttles.suspend(YAHOO, T0 + 1000, "yahoo-tss04")  # shorter: no job is told this end
    throttles.suspend(YAHOO, T0 + 1801, "yahoo-tss04")  # a reply of a delivery in flight
    assert throttles.resume(YAHOO) == (T0 + 1800, T0 + 1801)
    assert throttles.resume(YAHOO) == ()  # nothing left to lift


def test_an_expired_suspension_forgets_its_ends() -> None:
    throttles = Throttles()
    throttles.suspend(YAHOO, T0 + 10, "old")
    assert not throttles.is_suspended(YAHOO, T0 + 20)
    throttles.suspend(YAHOO, T0 + 100, "new")
    assert throttles.resume(YAHOO) == (T0 + 100,)


def test_a_suspension_keeps_a_bounded_number_of_ends() -> None:
    throttles = Throttles()
    for extra in range(20):
        throttles.suspend(YAHOO, T0 + 1800 + extra, "yahoo-tss04")
    ends = throttles.resume(YAHOO)
    assert len(ends) == 8 and ends[-1] == T0 + 1819


def test_the_ends_survive_json_and_a_record_without_them_has_one() -> None:
    throttles = Throttles()
    throttles.suspend(YAHOO, T0 + 1800, "yahoo-tss04")
    throttles.suspend(YAHOO, T0 + 1802, "yahoo-tss04")
    assert Throttles.from_json(throttles.to_json()).resume(YAHOO) == (T0 + 1800, T0 + 1802)
    older = (
        '{"version": 1, "paths": [{"source": "ip1", "site": "yahoo",'
        f' "suspended_until": {T0 + 1800}, "suspend_reason": "operator"}}]}}'
    )
    assert Throttles.from_json(older).resume(YAHOO) == (T0 + 1800,)


def test_a_throttle_scales_until_it_ends() -> None:
    throttles = Throttles()
    throttles.throttle(GMAIL, 0.5, T0 + 600, "too-many-connections")
    assert throttles.factor(GMAIL, T0) == 0.5
    assert throttles.state(GMAIL, T0) == Restriction(
        throttled_until=T0 + 600, factor=0.5, reason="too-many-connections"
    )
    assert not throttles.is_suspended(GMAIL, T0)
    assert throttles.factor(GMAIL, T0 + 600) == 1.0


def test_the_lowest_factor_in_force_wins_and_a_weaker_one_outlasts_it() -> None:
    throttles = Throttles()
    throttles.throttle(GMAIL, 0.8, T0 + 3600, "weak-long")
    throttles.throttle(GMAIL, 0.25, T0 + 600, "strong-short")
    throttles.throttle(GMAIL, 0.5, T0 + 1200, "middle")
    assert throttles.state(GMAIL, T0) == Restriction(
        throttled_until=T0 + 600, factor=0.25, reason="strong-short"
    )
    assert throttles.factor(GMAIL, T0 + 600) == 0.5
    assert throttles.factor(GMAIL, T0 + 1200) == 0.8
    assert throttles.factor(GMAIL, T0 + 3600) == 1.0


def test_a_stronger_longer_throttle_replaces_a_weaker_shorter_one() -> None:
    throttles = Throttles()
    throttles.throttle(GMAIL, 0.5, T0 + 600, "first")
    throttles.throttle(GMAIL, 0.5, T0 + 300, "shorter")  # adds nothing
    throttles.throttle(GMAIL, 0.25, T0 + 900, "stronger")
    assert throttles.state(GMAIL, T0).reason == "stronger"
    assert throttles.factor(GMAIL, T0 + 800) == 0.25
    document = json.loads(throttles.to_json())
    assert [t["reason"] for t in document["paths"][0]["throttles"]] == ["stronger"]


def test_a_suspension_shows_over_a_throttle() -> None:
    throttles = Throttles()
    throttles.throttle(GMAIL, 0.5, T0 + 3600, "gmail-rate-limited")
    throttles.suspend(GMAIL, T0 + 600, "operator")
    assert throttles.state(GMAIL, T0) == Restriction(
        suspended_until=T0 + 600, throttled_until=T0 + 3600, factor=0.5, reason="operator"
    )
    assert throttles.state(GMAIL, T0 + 600) == Restriction(
        throttled_until=T0 + 3600, factor=0.5, reason="gmail-rate-limited"
    )


def test_active_lists_what_is_in_force_and_forgets_the_rest() -> None:
    throttles = Throttles()
    for n in range(1000):
        throttles.suspend((f"ip{n}", "gmail"), T0 + n, "old")
        throttles.throttle((f"ip{n}", "yahoo"), 0.5, T0 + n, "old")
    throttles.suspend(GMAIL, T0 + 5000, "operator")
    assert throttles.active(T0 + 1000) == {
        GMAIL: Restriction(suspended_until=T0 + 5000, reason="operator")
    }
    # Memory is bounded: what expired is gone, not just hidden.
    assert [p["source"] for p in json.loads(throttles.to_json())["paths"]] == ["ip1"]


def test_state_forgets_an_expired_path() -> None:
    throttles = Throttles()
    throttles.suspend(GMAIL, T0, "old")
    throttles.state(GMAIL, T0 + 1)
    assert json.loads(throttles.to_json())["paths"] == []


def test_overlapping_throttles_per_path_are_bounded_and_only_get_stricter() -> None:
    throttles = Throttles()
    for n in range(1, 100):  # each weaker and longer than the one before
        throttles.throttle(GMAIL, n / 100, T0 + n, f"r{n}")
    kept = json.loads(throttles.to_json())["paths"][0]["throttles"]
    assert len(kept) <= 8
    for n in range(0, 99):  # never looser than asked for
        assert throttles.factor(GMAIL, T0 + n) <= (n + 1) / 100


def test_an_open_ended_suspension_survives_json() -> None:
    throttles = Throttles()
    throttles.suspend(GMAIL, math.inf, "operator")
    again = Throttles.from_json(throttles.to_json())
    assert again.is_suspended(GMAIL, T0 + 10**9)
    assert again.state(GMAIL, T0).reason == "operator"


def test_json_with_now_leaves_out_what_has_expired() -> None:
    throttles = Throttles()
    throttles.suspend(GMAIL, T0 + 10, "old")
    throttles.throttle(GMAIL, 0.5, T0 + 100, "running")
    throttles.suspend(YAHOO, T0 + 10, "old")
    document = json.loads(throttles.to_json(now=T0 + 50))
    assert document == {
        "version": 1,
        "paths": [
            {
                "source": "ip1",
                "site": "gmail",
                "throttles": [{"factor": 0.5, "until": T0 + 100, "reason": "running"}],
            }
        ],
    }
    restored = Throttles.from_json(throttles.to_json(), now=T0 + 50)
    assert restored.active(T0 + 50) == {
        GMAIL: Restriction(throttled_until=T0 + 100, factor=0.5, reason="running")
    }
    assert json.loads(restored.to_json())["paths"][0]["site"] == "gmail"
    assert len(json.loads(restored.to_json())["paths"]) == 1


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        '{"version": 2, "paths": []}',
        '{"version": 1}',
        '{"version": 1, "paths": [{"source": "a"}]}',
        '{"version": 1, "paths": [{"source": 1, "site": "b", "suspended_until": 5,'
        ' "suspend_reason": "x"}]}',
        '{"version": 1, "paths": [{"source": "a", "site": "b", "suspended_until": "soon",'
        ' "suspend_reason": "x"}]}',
        '{"version": 1, "paths": [{"source": "a", "site": "b", "suspended_until": NaN,'
        ' "suspend_reason": "x"}]}',
        '{"version": 1, "paths": [{"source": "a", "site": "b",'
        ' "throttles": [{"factor": 2, "until": 5, "reason": "x"}]}]}',
        '{"version": 1, "paths": [{"source": "a", "site": "b", "suspended_until": 5,'
        ' "suspend_reason": "x", "ends": ["soon"]}]}',
        '{"version": 1, "paths": [{"source": "a", "site": "b", "suspended_until": 5,'
        ' "suspend_reason": "x", "ends": 4}]}',
    ],
)
def test_from_json_refuses_what_to_json_did_not_write(text: str) -> None:
    with pytest.raises(ValueError, match="^suspension state is not") as error:
        Throttles.from_json(text)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("factor", [0, -0.5, 1.01, math.nan, True])
def test_throttle_refuses_a_factor_outside_0_to_1(factor: float) -> None:
    with pytest.raises(ValueError, match="factor must be above 0 and at most 1"):
        Throttles().throttle(GMAIL, factor, T0 + 60, "x")


def test_bad_keys_and_times_are_refused() -> None:
    throttles = Throttles()
    with pytest.raises(ValueError, match="a path is a"):
        throttles.suspend("gmail", T0, "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="until must be a time"):
        throttles.suspend(GMAIL, math.nan, "x")


names = st.sampled_from(["ip1", "ip2", "203.0.113.7"])
sites = st.sampled_from(["gmail", "yahoo", "example.org", 'odd "site"\n'])
times = st.floats(min_value=T0 - 100, max_value=T0 + 10_000) | st.just(math.inf)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("suspend"), names, sites, times, st.text(max_size=10)),
        st.tuples(
            st.just("throttle"),
            names,
            sites,
            times,
            st.text(max_size=10),
            st.floats(min_value=0.01, max_value=1),
        ),
        st.tuples(st.just("resume"), names, sites),
    ),
    max_size=40,
)


def _apply(throttles: Throttles, ops: list[tuple[object, ...]]) -> None:
    for op in ops:
        key = (str(op[1]), str(op[2]))
        if op[0] == "suspend":
            throttles.suspend(key, float(op[3]), str(op[4]))  # type: ignore[arg-type]
        elif op[0] == "throttle":
            throttles.throttle(key, float(op[5]), float(op[3]), str(op[4]))  # type: ignore[arg-type]
        else:
            throttles.resume(key)


@given(operations, st.lists(st.floats(min_value=T0 - 200, max_value=T0 + 20_000), max_size=10))
def test_json_round_trip_keeps_every_answer(
    ops: list[tuple[object, ...]], nows: list[float]
) -> None:
    original = Throttles()
    _apply(original, ops)
    restored = Throttles.from_json(original.to_json())
    assert restored.to_json() == original.to_json()
    for now in sorted(nows):
        assert restored.active(now) == original.active(now)


@given(operations, st.floats(min_value=T0 - 200, max_value=T0 + 20_000))
def test_json_with_now_answers_alike_from_then_on(
    ops: list[tuple[object, ...]], now: float
) -> None:
    original = Throttles()
    _apply(original, ops)
    restored = Throttles.from_json(original.to_json(now=now), now=now)
    for later in (now, now + 1, now + 5000, now + 50_000):
        assert restored.active(later) == original.active(later)


@given(operations, st.floats(min_value=T0 - 200, max_value=T0 + 20_000))
def test_state_agrees_with_active_and_the_helpers(
    ops: list[tuple[object, ...]], now: float
) -> None:
    throttles = Throttles()
    _apply(throttles, ops)
    active = dict(throttles.active(now))
    for source in ["ip1", "ip2", "203.0.113.7"]:
        for site in ["gmail", "yahoo", "example.org", 'odd "site"\n']:
            key = (source, site)
            state = throttles.state(key, now)
            assert state == active.get(key, Restriction())
            assert throttles.is_suspended(key, now) == (state.suspended_until > now)
            assert throttles.factor(key, now) == state.factor
            assert 0 < state.factor <= 1
            if state.throttled_until:
                assert state.throttled_until > now
