"""Queue IDs: unique across nodes, 22 readable characters, sorted by arrival."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import accumulate

from hypothesis import assume, given
from hypothesis import strategies as st

from mta.spool.ids import (
    ALPHABET,
    CORE_LENGTH,
    LENGTH,
    IdGenerator,
    encode,
    is_queue_id,
    milliseconds,
    node_tag,
)

START = 1_700_000_000.25  # exact in binary: int(START * 1000) has no rounding surprise
START_MS = 1_700_000_000_250
OLD_ID = "06H13HS0N80M1W00"  # made before nodes were tagged (docs/operations.md's example)


def frozen(seconds: float = START) -> Callable[[], float]:
    return lambda: seconds


def stepping(milliseconds_seq: Iterable[int]) -> Callable[[], float]:
    """A clock that returns the given milliseconds, one per call."""
    values = iter(milliseconds_seq)
    return lambda: next(values) / 1000


def old_id(ms: int, pid: int, sequence: int) -> str:
    """An ID as made before nodes were tagged: 48 bits of ms, 20 of PID, 12 of sequence."""
    return encode((ms << 32) | (pid << 12) | sequence, 16)


def test_ids_are_22_characters_of_the_alphabet_ending_in_the_node_tag() -> None:
    ids = [IdGenerator(node="mx1", clock=frozen(), pid=4242)() for _ in range(3)]
    for queue_id in ids:
        assert len(queue_id) == LENGTH == 22
        assert set(queue_id) <= set(ALPHABET)
        assert is_queue_id(queue_id)
        assert queue_id.endswith(node_tag("mx1"))


def test_alphabet_is_crockford_base32_in_ascii_order() -> None:
    assert len(ALPHABET) == 32
    assert list(ALPHABET) == sorted(ALPHABET)
    assert not set("ILOU") & set(ALPHABET)


def test_encode_fills_the_width_most_significant_first() -> None:
    assert encode(0, 16) == "0" * 16
    assert encode(2**80 - 1, 16) == "Z" * 16
    assert encode(31, 16) == "0" * 15 + "Z"
    assert encode(32, 6) == "000010"


def test_the_node_tag_is_fixed_by_the_name_alone() -> None:
    # Pinned: a tag that changed between versions or processes (Python's
    # randomised hash()) would give one node two tags.
    assert node_tag("mx1") == "A0NYTQ"
    assert node_tag("mx2") == "CYDRJ6"
    assert len(node_tag("a-very-long.node_name-0123456789")) == 6


def test_a_thousand_node_names_get_a_thousand_tags() -> None:
    assert len({node_tag(f"mx{number}") for number in range(1000)}) == 1000


def test_is_queue_id_rejects_other_text() -> None:
    good = IdGenerator(node="mx1", clock=frozen(), pid=1)()
    assert is_queue_id(good)
    for length in (CORE_LENGTH - 1, CORE_LENGTH + 1, LENGTH - 1, LENGTH + 1):
        assert not is_queue_id((good * 2)[:length])
    assert not is_queue_id(good.lower())
    for letter in "ILOU":
        assert not is_queue_id(letter + good[1:])
    assert not is_queue_id("")


def test_ids_made_before_nodes_were_tagged_are_still_queue_ids() -> None:
    assert is_queue_id(OLD_ID)
    assert milliseconds(OLD_ID) == 1_795_594_592_426  # 2026-11-25T08:16:32.426Z
    # The tagged ID's first 16 characters are the old layout, so the two kinds
    # sort by time together: an old ID just before a new one of the same core.
    new = IdGenerator(node="mx1", clock=frozen(), pid=7)()
    assert new[:CORE_LENGTH] == old_id(START_MS, 7, 0)
    assert old_id(START_MS, 7, 0) < new < old_id(START_MS, 7, 1)


def test_milliseconds_recovers_the_time() -> None:
    queue_id = IdGenerator(node="mx1", clock=frozen(), pid=99)()
    assert milliseconds(queue_id) == START_MS
    assert milliseconds(old_id(START_MS, 99, 5)) == START_MS


def test_frozen_clock_gives_strictly_increasing_ids_from_the_sequence() -> None:
    generate = IdGenerator(node="mx1", clock=frozen(), pid=7)
    ids = [generate() for _ in range(100)]
    assert len(set(ids)) == 100
    assert ids == sorted(ids)
    assert {milliseconds(queue_id) for queue_id in ids} == {START_MS}


def test_later_time_sorts_after_every_earlier_id() -> None:
    generate = IdGenerator(node="mx1", clock=stepping([START_MS] * 50 + [START_MS + 1]), pid=7)
    earlier = [generate() for _ in range(50)]
    later = generate()
    assert later > max(earlier)
    assert milliseconds(later) == START_MS + 1


def test_clock_stepping_back_keeps_ids_increasing_and_time_does_not_go_back() -> None:
    # NTP steps the clock back by 5 s: IDs must neither repeat nor sort earlier.
    times = [START_MS, START_MS + 10, START_MS - 5000, START_MS - 4999, START_MS + 10]
    generate = IdGenerator(node="mx1", clock=stepping(times), pid=7)
    ids = [generate() for _ in times]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert [milliseconds(queue_id) for queue_id in ids] == [
        START_MS,
        START_MS + 10,
        START_MS + 10,
        START_MS + 10,
        START_MS + 10,
    ]


def test_sequence_overflow_borrows_the_next_millisecond() -> None:
    generate = IdGenerator(node="mx1", clock=frozen(), pid=7)
    ids = [generate() for _ in range(4096 + 10)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    # 4096 sequence numbers fit in one millisecond; the rest go to the next one.
    assert [milliseconds(queue_id) for queue_id in ids[:4096]] == [START_MS] * 4096
    assert [milliseconds(queue_id) for queue_id in ids[4096:]] == [START_MS + 1] * 10


def test_after_borrowing_the_real_clock_catching_up_gives_no_duplicate() -> None:
    times = [START_MS] * 4097 + [START_MS + 1] * 3 + [START_MS + 2]
    generate = IdGenerator(node="mx1", clock=stepping(times), pid=7)
    ids = [generate() for _ in times]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert milliseconds(ids[-1]) == START_MS + 2


def test_different_processes_make_different_ids_in_the_same_millisecond() -> None:
    first = IdGenerator(node="mx1", clock=frozen(), pid=100)
    second = IdGenerator(node="mx1", clock=frozen(), pid=101)
    a = [first() for _ in range(10)]
    b = [second() for _ in range(10)]
    assert not set(a) & set(b)
    assert {milliseconds(queue_id) for queue_id in a + b} == {START_MS}


# Clock moves: mostly small steps either way, with standstills (0) to hit the sequence.
_steps = st.lists(
    st.integers(min_value=-2000, max_value=2000) | st.just(0), min_size=1, max_size=300
)
_pids = st.integers(min_value=0, max_value=2**20 - 1)
_node_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", fullmatch=True)


@given(_steps)
def test_any_clock_sequence_gives_unique_sorted_ids(steps: list[int]) -> None:
    times = list(accumulate(steps, initial=START_MS))
    generate = IdGenerator(node="mx1", clock=stepping(times), pid=12345)
    ids = [generate() for _ in times]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    # The embedded time never runs ahead of the clock's high-water mark (no
    # overflow here: at most 301 IDs) and never goes back.
    stamps = [milliseconds(queue_id) for queue_id in ids]
    assert stamps == sorted(stamps)
    assert stamps[-1] == max(times)


@given(_steps, _pids, _pids)
def test_two_processes_sharing_a_spool_never_collide(
    steps: list[int], pid_a: int, pid_b: int
) -> None:
    assume(pid_a != pid_b)
    times = list(accumulate(steps, initial=START_MS))
    a = IdGenerator(node="mx1", clock=stepping(times), pid=pid_a)
    b = IdGenerator(node="mx1", clock=stepping(times), pid=pid_b)
    assert not {a() for _ in times} & {b() for _ in times}


@given(_steps, _pids, _node_names, _node_names)
def test_two_nodes_with_equal_pids_and_clocks_never_collide(
    steps: list[int], pid: int, node_a: str, node_b: str
) -> None:
    # Containers: every node's worker may have the same PID at the same moment.
    assume(node_a != node_b)
    times = list(accumulate(steps, initial=START_MS))
    a = IdGenerator(node=node_a, clock=stepping(times), pid=pid)
    b = IdGenerator(node=node_b, clock=stepping(times), pid=pid)
    from_a, from_b = [a() for _ in times], [b() for _ in times]
    assert not set(from_a) & set(from_b)
    # Same moment, same process: only the tag tells them apart.
    assert [queue_id[:CORE_LENGTH] for queue_id in from_a] == [
        queue_id[:CORE_LENGTH] for queue_id in from_b
    ]


@given(
    st.lists(
        st.tuples(
            st.integers(min_value=START_MS, max_value=START_MS + 5000),
            _pids,
            st.integers(min_value=0, max_value=4095),
            st.booleans(),
        ),
        min_size=1,
        max_size=50,
    ),
    _node_names,
)
def test_old_and_new_ids_sort_together_by_time(
    made: list[tuple[int, int, int, bool]], node: str
) -> None:
    # A spool holds untagged IDs from before an upgrade beside tagged ones.
    ids = [
        IdGenerator(node=node, clock=stepping([ms]), pid=pid)()
        if tagged
        else old_id(ms, pid, sequence)
        for ms, pid, sequence, tagged in made
    ]
    stamps = [milliseconds(queue_id) for queue_id in sorted(ids)]
    assert stamps == sorted(stamps)
    assert all(is_queue_id(queue_id) for queue_id in ids)
