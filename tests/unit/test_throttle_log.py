"""The fleet's suspension decisions: applied in the stream's order, every node ends alike."""

from __future__ import annotations

import json
from dataclasses import asdict

from hypothesis import given
from hypothesis import strategies as st

from mta.cluster.throttle_log import Decision
from mta.policy.throttle import Restriction, Throttles, domain_key

T0 = 1_800_000_000.0
YAHOO = ("ip1", "yahoo")
GMAIL = ("ip1", "gmail")


def test_a_decision_survives_its_encoding() -> None:
    decision = Decision(
        "throttle",
        domain_key("example.com"),
        "gmail",
        T0 + 600,
        0.5,
        "gmail-domain-rate-limited",
        failover=False,
        classification="rate_limited",
        at=T0,
    )
    assert Decision.decode(decision.encode()) == decision
    held = Decision("suspend", *YAHOO, T0 + 60, reason="op", failover=True, at=T0)
    assert Decision.decode(held.encode()) == held


def test_an_older_nodes_entry_decodes_and_its_suspension_fails_over() -> None:
    older = json.dumps(
        {
            "action": "suspend",
            "source": "ip1",
            "site": "yahoo",
            "until": T0 + 1800,
            "factor": 1.0,
            "reason": "yahoo-tss04",
        }
    ).encode()
    decision = Decision.decode(older)
    assert decision == Decision(
        "suspend", *YAHOO, T0 + 1800, reason="yahoo-tss04", failover=True, classification=""
    )
    assert decision.at is None
    throttles = Throttles()
    decision.apply(throttles)
    assert throttles.state(YAHOO, T0).failover


def test_a_newer_nodes_fields_are_left_out() -> None:
    fields = {**asdict(Decision("resume", *YAHOO)), "region": "eu"}
    assert Decision.decode(json.dumps(fields).encode()) == Decision("resume", *YAHOO)


def test_a_suspension_holds_its_mail_as_the_decision_says() -> None:
    throttles = Throttles()
    Decision("suspend", *YAHOO, T0 + 1800, reason="yahoo-tss04").apply(throttles)
    Decision("suspend", *GMAIL, T0 + 1800, reason="operator", failover=True).apply(throttles)
    assert not throttles.state(YAHOO, T0).failover
    assert throttles.state(GMAIL, T0).failover


def test_a_throttle_applied_again_from_the_stream_does_not_compound() -> None:
    first = Decision("throttle", *GMAIL, T0 + 3600, 0.5, "gmail-rate-limited", at=T0)
    second = Decision("throttle", *GMAIL, T0 + 3700, 0.5, "gmail-rate-limited", at=T0 + 100)
    throttles = Throttles()
    for decision in (first, second, first, second):  # applied here, then read back
        decision.apply(throttles)
    assert throttles.factor(GMAIL, T0 + 100) == 0.25


def test_a_resume_lifts_the_suspension_and_gives_its_ends() -> None:
    throttles = Throttles()
    Decision("suspend", *YAHOO, T0 + 1800, reason="yahoo-tss04").apply(throttles)
    Decision("suspend", *YAHOO, T0 + 1801, reason="yahoo-tss04").apply(throttles)
    assert throttles.state(YAHOO, T0) == Restriction(
        suspended_until=T0 + 1801, reason="yahoo-tss04"
    )
    assert Decision("resume", *YAHOO).apply(throttles) == (T0 + 1800, T0 + 1801)
    assert throttles.state(YAHOO, T0) == Restriction()


def _decision(
    action: str, source: str, at: float, duration: float, factor: float, failover: bool
) -> Decision:
    return Decision(action, source, "yahoo", at + duration, factor, "rule", failover, "", at)


decisions = st.lists(
    st.builds(
        _decision,
        action=st.sampled_from(["suspend", "throttle", "resume"]),
        source=st.sampled_from(["ip1", "ip2"]),
        at=st.floats(min_value=T0, max_value=T0 + 600),
        duration=st.floats(min_value=1, max_value=3600),
        factor=st.sampled_from([0.25, 0.5]),
        failover=st.booleans(),
    ),
    max_size=12,
)


@given(decisions, st.integers(min_value=0, max_value=12))
def test_a_node_that_made_some_decisions_itself_ends_like_the_others(
    stream: list[Decision], made_here: int
) -> None:
    # This node applied its own decisions (a prefix of the stream, say) before
    # they were in the stream; then it applies the whole stream, own ones included.
    here, elsewhere = Throttles(), Throttles()
    for decision in stream[:made_here]:
        decision.apply(here)
    for decision in stream:
        decision.apply(here)
        decision.apply(elsewhere)
    assert here.active(T0) == elsewhere.active(T0)
    assert here.to_json() == elsewhere.to_json()
