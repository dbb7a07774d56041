"""Suspensions and throttles per (source, site): expiry, extension, strongest factor, JSON."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.policy.throttle import (
    COMPOUND_AFTER,
    EVERY_SOURCE,
    FLOOR,
    Key,
    Restriction,
    Throttles,
    domain_key,
)

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
        throttled_until=T0 + 600,
        factor=0.5,
        reason="too-many-connections",
        steps=((0.5, T0 + 600),),
    )
    assert not throttles.is_suspended(GMAIL, T0)
    assert throttles.factor(GMAIL, T0 + 600) == 1.0


def test_the_lowest_factor_in_force_wins_and_a_weaker_one_outlasts_it() -> None:
    throttles = Throttles()
    throttles.throttle(GMAIL, 0.8, T0 + 3600, "weak-long")
    throttles.throttle(GMAIL, 0.25, T0 + 600, "strong-short")
    throttles.throttle(GMAIL, 0.5, T0 + 1200, "middle")
    assert throttles.state(GMAIL, T0) == Restriction(
        throttled_until=T0 + 600,
        factor=0.25,
        reason="strong-short",
        steps=((0.25, T0 + 600), (0.5, T0 + 1200), (0.8, T0 + 3600)),
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
    steps = ((0.5, T0 + 3600),)
    assert throttles.state(GMAIL, T0) == Restriction(
        suspended_until=T0 + 600,
        throttled_until=T0 + 3600,
        factor=0.5,
        reason="operator",
        steps=steps,
    )
    assert throttles.state(GMAIL, T0 + 600) == Restriction(
        throttled_until=T0 + 3600, factor=0.5, reason="gmail-rate-limited", steps=steps
    )


# --- failover: whether a suspended path's mail may go from the pool's other sources ---


def test_a_suspension_keeps_its_mail_unless_it_says_it_may_fail_over() -> None:
    throttles = Throttles()
    throttles.suspend(YAHOO, T0 + 1800, "yahoo-tss04")
    throttles.suspend(GMAIL, T0 + 1800, "operator", failover=True)
    assert not throttles.state(YAHOO, T0).failover
    assert throttles.state(GMAIL, T0).failover
    assert not throttles.state(GMAIL, T0 + 1800).failover  # nothing suspended: nothing to move


def test_a_hold_stays_under_a_longer_suspension_that_may_fail_over() -> None:
    throttles = Throttles()
    throttles.suspend(YAHOO, T0 + 600, "yahoo-deferred")  # a reputation hold
    throttles.suspend(YAHOO, T0 + 3600, "operator", failover=True)
    assert throttles.state(YAHOO, T0).reason == "operator"
    assert not throttles.state(YAHOO, T0 + 599).failover
    assert throttles.state(YAHOO, T0 + 600).failover
    # A shorter hold inside a suspension that may fail over holds too.
    throttles.suspend(YAHOO, T0 + 1200, "dnsbl-listed")
    assert not throttles.state(YAHOO, T0 + 1199).failover
    assert throttles.state(YAHOO, T0 + 1199).suspended_until == T0 + 3600


def test_failover_survives_json_and_an_older_record_fails_over() -> None:
    throttles = Throttles()
    throttles.suspend(YAHOO, T0 + 600, "yahoo-deferred")
    throttles.suspend(YAHOO, T0 + 3600, "operator", failover=True)
    restored = Throttles.from_json(throttles.to_json())
    for now in (T0, T0 + 600):
        assert restored.state(YAHOO, now) == throttles.state(YAHOO, now)
    assert not Throttles.from_json(throttles.to_json(now=T0)).state(YAHOO, T0).failover
    assert Throttles.from_json(throttles.to_json(now=T0 + 600)).state(YAHOO, T0 + 600).failover
    older = (
        '{"version": 1, "paths": [{"source": "ip1", "site": "yahoo",'
        f' "suspended_until": {T0 + 1800}, "suspend_reason": "yahoo-tss04"}}]}}'
    )
    assert Throttles.from_json(older).state(YAHOO, T0).failover


# --- keys: a source's path, a sending domain, every source ---


def test_a_domain_and_every_source_have_keys_of_their_own() -> None:
    assert domain_key("News.Example.COM.") == "domain:news.example.com"
    throttles = Throttles()
    throttles.throttle((domain_key("example.com"), "gmail"), 0.5, T0 + 600, "gmail-domain")
    throttles.throttle((EVERY_SOURCE, "gmail"), 0.25, T0 + 600, "gmail-netblock")
    assert throttles.factor(GMAIL, T0) == 1.0
    assert throttles.factor(("domain:example.com", "gmail"), T0) == 0.5
    assert throttles.factor(("*", "gmail"), T0) == 0.25
    assert throttles.factor((domain_key("example.org"), "gmail"), T0) == 1.0


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
        throttles.throttle(GMAIL, 0.06 + n / 107, T0 + n, f"r{n}")
    kept = json.loads(throttles.to_json())["paths"][0]["throttles"]
    assert len(kept) <= 8
    for n in range(0, 99):  # never looser than asked for
        assert throttles.factor(GMAIL, T0 + n) <= max(FLOOR, 0.06 + (n + 1) / 107)


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
        GMAIL: Restriction(
            throttled_until=T0 + 100, factor=0.5, reason="running", steps=((0.5, T0 + 100),)
        )
    }
    assert json.loads(restored.to_json())["paths"][0]["site"] == "gmail"
    assert len(json.loads(restored.to_json())["paths"]) == 1


# --- compounding: a throttle on a throttle, and the way back ---

HOUR = 3600.0


def _decide(throttles: Throttles, at: float, factor: float = 0.5, duration: float = HOUR) -> None:
    throttles.throttle(GMAIL, factor, at + duration, "gmail-rate-limited", at=at)


def test_throttles_compound_down_to_the_floor() -> None:
    throttles = Throttles()
    factors = []
    for n in range(6):
        _decide(throttles, T0 + n * COMPOUND_AFTER)
        factors.append(throttles.factor(GMAIL, T0 + n * COMPOUND_AFTER))
    assert factors == [0.5, 0.25, 0.125, FLOOR, FLOOR, FLOOR]


def test_replies_within_compound_after_do_not_compound() -> None:
    throttles = Throttles()
    _decide(throttles, T0)
    _decide(throttles, T0 + COMPOUND_AFTER - 1)  # a delivery that was under way
    assert throttles.factor(GMAIL, T0 + COMPOUND_AFTER) == 0.5
    assert throttles.state(GMAIL, T0 + HOUR).steps == ((0.5, T0 + COMPOUND_AFTER - 1 + HOUR),)
    _decide(throttles, T0 + COMPOUND_AFTER)  # a minute after the strongest began
    assert throttles.factor(GMAIL, T0 + COMPOUND_AFTER) == 0.25


def test_the_same_decision_applied_twice_counts_once() -> None:
    throttles = Throttles()
    _decide(throttles, T0)
    _decide(throttles, T0 + 100)
    once = throttles.to_json()
    _decide(throttles, T0 + 100)  # read back from the fleet's stream
    _decide(throttles, T0)
    assert throttles.to_json() == once
    assert throttles.factor(GMAIL, T0 + 100) == 0.25
    # The same rule later is another decision.
    _decide(throttles, T0 + 200)
    assert throttles.factor(GMAIL, T0 + 200) == 0.125


def test_recovery_steps_back_one_level_per_duration() -> None:
    throttles = Throttles()
    for n in range(4):
        _decide(throttles, T0 + n * 100)
    last = T0 + 300
    assert throttles.state(GMAIL, last).steps == (
        (FLOOR, last + HOUR),
        (0.125, last + 2 * HOUR),
        (0.25, last + 3 * HOUR),
        (0.5, last + 4 * HOUR),
    )
    # Each level holds to the end of its duration, then the next one up takes over.
    seen = [
        throttles.factor(GMAIL, last + n * HOUR + offset)
        for n in range(5)
        for offset in (0, HOUR - 1)
    ]
    assert seen == [FLOOR, FLOOR, 0.125, 0.125, 0.25, 0.25, 0.5, 0.5, 1.0, 1.0]


def test_a_reply_that_prolongs_a_level_does_not_make_it_begin_again() -> None:
    throttles = Throttles()
    _decide(throttles, T0)
    _decide(throttles, T0 + 30)  # a delivery that was under way: 0.5 until T0 + 30 + HOUR
    throttles.throttle(GMAIL, 0.5, T0 + 40 + HOUR, "too-much-mail", at=T0 + 40)
    assert throttles.state(GMAIL, T0 + 40).steps == ((0.5, T0 + 40 + HOUR),)
    _decide(throttles, T0 + COMPOUND_AFTER)  # a minute after x0.5 began
    assert throttles.factor(GMAIL, T0 + COMPOUND_AFTER) == 0.25


def test_a_throttle_decided_before_the_one_in_force_began_does_not_compound_it() -> None:
    throttles = Throttles()
    _decide(throttles, T0 + 500)  # this node's own, applied at once
    _decide(throttles, T0)  # another node's, earlier in the stream, read after
    assert throttles.factor(GMAIL, T0 + 500) == 0.5


def test_a_gentler_rule_compounds_by_its_own_factor() -> None:
    throttles = Throttles()
    _decide(throttles, T0)
    _decide(throttles, T0 + 100, factor=0.8, duration=600)
    # x0.4 for the gentler rule's 10 minutes; its steps back up end before the
    # first rule's x0.5 does, which takes over.
    assert throttles.state(GMAIL, T0 + 100).steps == ((0.4, T0 + 700), (0.5, T0 + HOUR))
    # 0.32 back to 1 by 0.8 is 6 levels: past _MAX_STEPS, two levels a step.
    _decide(throttles, T0 + 200, factor=0.8, duration=2 * HOUR)
    steps = throttles.state(GMAIL, T0 + 200).steps
    assert [f for f, _ in steps] == pytest.approx([0.32, 0.5, 0.78125])
    assert [until - T0 - 200 for _, until in steps] == [2 * HOUR, 4 * HOUR, 6 * HOUR]


def test_a_rule_near_1_climbs_back_from_the_floor_in_few_steps() -> None:
    throttles = Throttles()
    throttles.throttle(GMAIL, FLOOR, T0 + HOUR, "hard", at=T0)
    # By 0.95 a level, back from the floor would take 55 of its durations.
    throttles.throttle(GMAIL, 0.95, T0 + 100 + HOUR, "gentle", at=T0 + 100)
    steps = throttles.state(GMAIL, T0 + 100).steps
    assert [until - T0 - 100 for _, until in steps] == [HOUR, 2 * HOUR, 3 * HOUR, 4 * HOUR]
    assert [f for f, _ in steps] == pytest.approx([FLOOR * 0.95**-k for k in (0, 14, 28, 42)])


def test_an_open_ended_throttle_compounds_into_one_step() -> None:
    throttles = Throttles()
    throttles.throttle(GMAIL, 0.5, math.inf, "operator", at=T0)
    throttles.throttle(GMAIL, 0.5, math.inf, "operator", at=T0 + 100)
    assert throttles.state(GMAIL, T0 + 100).steps == ((0.25, math.inf),)


def test_a_factor_below_the_floor_is_the_floor_and_a_factor_of_1_is_nothing() -> None:
    throttles = Throttles()
    throttles.throttle(GMAIL, 0.01, T0 + 600, "old-node")
    throttles.throttle(YAHOO, 1.0, T0 + 600, "nothing", at=T0)
    assert throttles.factor(GMAIL, T0) == FLOOR
    assert throttles.active(T0) == {GMAIL: throttles.state(GMAIL, T0)}


def test_the_ladder_and_the_decisions_applied_survive_json() -> None:
    throttles = Throttles()
    _decide(throttles, T0)
    _decide(throttles, T0 + 100)
    restored = Throttles.from_json(throttles.to_json())
    assert restored.to_json() == throttles.to_json()
    assert restored.state(GMAIL, T0 + 100).steps == (
        (0.25, T0 + 100 + HOUR),
        (0.5, T0 + 100 + 2 * HOUR),
    )
    _decide(restored, T0 + 100)  # read back after a restart: still counts once
    assert restored.factor(GMAIL, T0 + 100) == 0.25
    _decide(restored, T0 + 200)  # a new one compounds what was restored
    assert restored.factor(GMAIL, T0 + 200) == 0.125
    later = Throttles.from_json(throttles.to_json(now=T0 + 100 + HOUR), now=T0 + 100 + HOUR)
    assert later.state(GMAIL, T0 + 100 + HOUR).steps == ((0.5, T0 + 100 + 2 * HOUR),)


def test_a_throttle_of_an_older_record_compounds() -> None:
    throttle = {"factor": 0.5, "until": T0 + HOUR, "reason": "gmail-rate-limited"}
    path = {"source": "ip1", "site": "gmail", "throttles": [throttle]}
    older = json.dumps({"version": 1, "paths": [path]})
    throttles = Throttles.from_json(older)
    _decide(throttles, T0)
    assert throttles.factor(GMAIL, T0) == 0.25


@pytest.mark.parametrize("at", [T0 + 600, T0 + 601, math.inf, -math.inf])
def test_a_decision_time_must_be_finite_and_before_the_end(at: float) -> None:
    with pytest.raises(ValueError, match="decided at a finite time before it ends"):
        Throttles().throttle(GMAIL, 0.5, T0 + 600, "x", at=at)


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
        '{"version": 1, "paths": [{"source": "a", "site": "b", "suspended_until": 5,'
        ' "suspend_reason": "x", "held_until": "soon"}]}',
        '{"version": 1, "paths": [{"source": "a", "site": "b",'
        ' "throttles": [{"factor": 0.5, "until": 5, "reason": "x", "since": null}]}]}',
        '{"version": 1, "paths": [{"source": "a", "site": "b",'
        ' "applied": [{"reason": "x", "until": 5}]}]}',
        '{"version": 1, "paths": [{"source": "a", "site": "b",'
        ' "applied": [{"reason": "x", "at": NaN, "until": 5}]}]}',
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
    with pytest.raises(ValueError, match="at must be a time"):
        throttles.throttle(GMAIL, 0.5, T0 + 60, "x", at=math.nan)


@dataclass(frozen=True)
class Op:
    """One call on Throttles, for the properties below."""

    kind: str  # "suspend", "throttle" (an older node's, no time) "decide" or "resume"
    key: Key
    until: float = 0.0
    reason: str = ""
    factor: float = 1.0
    at: float | None = None
    failover: bool = False

    def apply(self, throttles: Throttles) -> None:
        if self.kind == "suspend":
            throttles.suspend(self.key, self.until, self.reason, failover=self.failover)
        elif self.kind in ("throttle", "decide"):
            throttles.throttle(self.key, self.factor, self.until, self.reason, at=self.at)
        else:
            throttles.resume(self.key)


def _decision(key: Key, at: float, duration: float, reason: str, factor: float) -> Op:
    return Op("decide", key, at + duration, reason, factor, at)


SOURCES = ["ip1", "ip2", "203.0.113.7"]
SITES = ["gmail", "yahoo", "example.org", 'odd "site"\n']
keys = st.tuples(st.sampled_from(SOURCES), st.sampled_from(SITES))
times = st.floats(min_value=T0 - 100, max_value=T0 + 10_000) | st.just(math.inf)
factors = st.sampled_from([FLOOR, 0.25, 0.5, 0.8, 0.95]) | st.floats(min_value=0.01, max_value=1)
decisions = st.builds(
    _decision,
    st.sampled_from([GMAIL, YAHOO]),
    st.floats(min_value=T0, max_value=T0 + 10_000),
    st.sampled_from([60.0, 600.0, 3600.0]) | st.floats(min_value=1, max_value=7200),
    st.sampled_from(["gmail-rate-limited", "too-much-mail"]),
    factors,
)
operations = st.lists(
    st.one_of(
        st.builds(
            Op,
            st.just("suspend"),
            keys,
            times,
            st.text(max_size=10),
            failover=st.booleans(),
        ),
        st.builds(Op, st.just("throttle"), keys, times, st.text(max_size=10), factors),
        decisions,
        st.builds(Op, st.just("resume"), keys),
    ),
    max_size=40,
)


def _apply(throttles: Throttles, ops: list[Op]) -> None:
    for op in ops:
        op.apply(throttles)


@given(operations, st.lists(st.floats(min_value=T0 - 200, max_value=T0 + 20_000), max_size=10))
def test_json_round_trip_keeps_every_answer(ops: list[Op], nows: list[float]) -> None:
    original = Throttles()
    _apply(original, ops)
    restored = Throttles.from_json(original.to_json())
    assert restored.to_json() == original.to_json()
    for now in sorted(nows):
        assert restored.active(now) == original.active(now)


@given(operations, st.floats(min_value=T0 - 200, max_value=T0 + 20_000))
def test_json_with_now_answers_alike_from_then_on(ops: list[Op], now: float) -> None:
    original = Throttles()
    _apply(original, ops)
    restored = Throttles.from_json(original.to_json(now=now), now=now)
    for later in (now, now + 1, now + 5000, now + 50_000):
        assert restored.active(later) == original.active(later)


@given(operations, st.floats(min_value=T0 - 200, max_value=T0 + 20_000))
def test_state_agrees_with_active_and_the_helpers(ops: list[Op], now: float) -> None:
    throttles = Throttles()
    _apply(throttles, ops)
    active = dict(throttles.active(now))
    for source in SOURCES:
        for site in SITES:
            key = (source, site)
            state = throttles.state(key, now)
            assert state == active.get(key, Restriction())
            assert throttles.is_suspended(key, now) == (state.suspended_until > now)
            assert throttles.factor(key, now) == state.factor
            assert 0 < state.factor <= 1
            if state.throttled_until:
                assert state.throttled_until > now
                assert state.steps[0] == (state.factor, state.throttled_until)


@given(
    st.lists(decisions, max_size=30),
    st.lists(st.floats(min_value=T0, max_value=T0 + 100_000), max_size=10),
)
def test_compounding_stays_between_the_floor_and_1_and_counts_each_decision_once(
    ops: list[Op], nows: list[float]
) -> None:
    once, twice = Throttles(), Throttles()
    for op in ops:
        op.apply(once)
        op.apply(twice)  # as a node does with its own decision, read back from the stream
        op.apply(twice)
    assert twice.to_json() == once.to_json()
    for now in sorted(nows):
        for restriction in once.active(now).values():
            assert FLOOR <= restriction.factor <= 1
            assert all(FLOOR <= factor < 1 for factor, _ in restriction.steps)
            assert len(restriction.steps) <= 8
