"""The fleet's suspension decisions: applied in the stream's order, every node ends alike."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mta.cluster.throttle_log import Decision
from mta.policy.throttle import Restriction, Throttles

T0 = 1_800_000_000.0
YAHOO = ("ip1", "yahoo")


def test_a_decision_survives_its_encoding() -> None:
    decision = Decision("throttle", "ip1", "gmail", T0 + 600, 0.5, "gmail-rate-limited")
    assert Decision.decode(decision.encode()) == decision


def test_a_resume_lifts_the_suspension_and_gives_its_ends() -> None:
    throttles = Throttles()
    Decision("suspend", *YAHOO, T0 + 1800, reason="yahoo-tss04").apply(throttles)
    Decision("suspend", *YAHOO, T0 + 1801, reason="yahoo-tss04").apply(throttles)
    assert throttles.state(YAHOO, T0) == Restriction(
        suspended_until=T0 + 1801, reason="yahoo-tss04"
    )
    assert Decision("resume", *YAHOO).apply(throttles) == (T0 + 1800, T0 + 1801)
    assert throttles.state(YAHOO, T0) == Restriction()


decisions = st.lists(
    st.builds(
        Decision,
        action=st.sampled_from(["suspend", "throttle", "resume"]),
        source=st.sampled_from(["ip1", "ip2"]),
        site=st.just("yahoo"),
        until=st.floats(min_value=T0 + 1, max_value=T0 + 3600),
        factor=st.sampled_from([0.25, 0.5]),
        reason=st.just("rule"),
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
