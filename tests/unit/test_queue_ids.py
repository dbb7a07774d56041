"""Queue IDs: unique, 16 readable characters, and sorted by arrival."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import accumulate

from hypothesis import assume, given
from hypothesis import strategies as st

from mta.spool.ids import ALPHABET, LENGTH, IdGenerator, encode, is_queue_id, milliseconds

START = 1_700_000_000.25  # exact in binary: int(START * 1000) has no rounding surprise
START_MS = 1_700_000_000_250


def frozen(seconds: float = START) -> Callable[[], float]:
    return lambda: seconds


def stepping(milliseconds_seq: Iterable[int]) -> Callable[[], float]:
    """A clock that returns the given milliseconds, one per call."""
    values = iter(milliseconds_seq)
    return lambda: next(values) / 1000


def test_ids_are_16_characters_of_the_alphabet() -> None:
    ids = [IdGenerator(clock=frozen(), pid=4242)() for _ in range(3)]
    for queue_id in ids:
        assert len(queue_id) == LENGTH == 16
        assert set(queue_id) <= set(ALPHABET)
        assert is_queue_id(queue_id)


def test_alphabet_is_crockford_base32_in_ascii_order() -> None:
    assert len(ALPHABET) == 32
    assert list(ALPHABET) == sorted(ALPHABET)
    assert not set("ILOU") & set(ALPHABET)


def test_encode_covers_80_bits() -> None:
    assert encode(0) == "0" * 16
    assert encode(2**80 - 1) == "Z" * 16
    assert encode(31) == "0" * 15 + "Z"


def test_is_queue_id_rejects_other_text() -> None:
    good = IdGenerator(clock=frozen(), pid=1)()
    assert is_queue_id(good)
    assert not is_queue_id(good[:-1])
    assert not is_queue_id(good + "0")
    assert not is_queue_id(good.lower())
    for letter in "ILOU":
        assert not is_queue_id(letter + good[1:])
    assert not is_queue_id("")


def test_milliseconds_recovers_the_time() -> None:
    queue_id = IdGenerator(clock=frozen(), pid=99)()
    assert milliseconds(queue_id) == START_MS


def test_frozen_clock_gives_strictly_increasing_ids_from_the_sequence() -> None:
    generate = IdGenerator(clock=frozen(), pid=7)
    ids = [generate() for _ in range(100)]
    assert len(set(ids)) == 100
    assert ids == sorted(ids)
    assert {milliseconds(queue_id) for queue_id in ids} == {START_MS}


def test_later_time_sorts_after_every_earlier_id() -> None:
    generate = IdGenerator(clock=stepping([START_MS] * 50 + [START_MS + 1]), pid=7)
    earlier = [generate() for _ in range(50)]
    later = generate()
    assert later > max(earlier)
    assert milliseconds(later) == START_MS + 1


def test_clock_stepping_back_keeps_ids_increasing_and_time_does_not_go_back() -> None:
    # NTP steps the clock back by 5 s: IDs must neither repeat nor sort earlier.
    times = [START_MS, START_MS + 10, START_MS - 5000, START_MS - 4999, START_MS + 10]
    generate = IdGenerator(clock=stepping(times), pid=7)
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
    generate = IdGenerator(clock=frozen(), pid=7)
    ids = [generate() for _ in range(4096 + 10)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    # 4096 sequence numbers fit in one millisecond; the rest go to the next one.
    assert [milliseconds(queue_id) for queue_id in ids[:4096]] == [START_MS] * 4096
    assert [milliseconds(queue_id) for queue_id in ids[4096:]] == [START_MS + 1] * 10


def test_after_borrowing_the_real_clock_catching_up_gives_no_duplicate() -> None:
    times = [START_MS] * 4097 + [START_MS + 1] * 3 + [START_MS + 2]
    generate = IdGenerator(clock=stepping(times), pid=7)
    ids = [generate() for _ in times]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert milliseconds(ids[-1]) == START_MS + 2


def test_different_processes_make_different_ids_in_the_same_millisecond() -> None:
    first = IdGenerator(clock=frozen(), pid=100)
    second = IdGenerator(clock=frozen(), pid=101)
    a = [first() for _ in range(10)]
    b = [second() for _ in range(10)]
    assert not set(a) & set(b)
    assert {milliseconds(queue_id) for queue_id in a + b} == {START_MS}


# Clock moves: mostly small steps either way, with standstills (0) to hit the sequence.
_steps = st.lists(
    st.integers(min_value=-2000, max_value=2000) | st.just(0), min_size=1, max_size=300
)


@given(_steps)
def test_any_clock_sequence_gives_unique_sorted_ids(steps: list[int]) -> None:
    times = list(accumulate(steps, initial=START_MS))
    generate = IdGenerator(clock=stepping(times), pid=12345)
    ids = [generate() for _ in times]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    # The embedded time never runs ahead of the clock's high-water mark (no
    # overflow here: at most 301 IDs) and never goes back.
    stamps = [milliseconds(queue_id) for queue_id in ids]
    assert stamps == sorted(stamps)
    assert stamps[-1] == max(times)


@given(
    _steps,
    st.integers(min_value=0, max_value=2**20 - 1),
    st.integers(min_value=0, max_value=2**20 - 1),
)
def test_two_processes_sharing_a_spool_never_collide(
    steps: list[int], pid_a: int, pid_b: int
) -> None:
    assume(pid_a != pid_b)
    times = list(accumulate(steps, initial=START_MS))
    a = IdGenerator(clock=stepping(times), pid=pid_a)
    b = IdGenerator(clock=stepping(times), pid=pid_b)
    assert not {a() for _ in times} & {b() for _ in times}
