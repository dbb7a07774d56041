"""Domain ownership among worker processes, and the wake-up datagrams.

Real Unix datagram socket pairs, as the supervisor makes them; no event loop
is needed to see what a worker sends.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Iterator

import pytest

from mta.node.ownership import Peers, owner
from mta.spool.records import job_key


def test_owner_is_stable_and_spreads_domains() -> None:
    assert owner("gmail.com", 2) == owner("gmail.com", 2)  # not salted per process
    assert owner("gmail.com", 4) == 268896735 % 4  # crc32, fixed for good
    spread = Counter(owner(f"d{n}.test", 4) for n in range(1000))
    assert set(spread) == {0, 1, 2, 3}
    assert min(spread.values()) > 200


Pairs = list[tuple[socket.socket, socket.socket]]


@pytest.fixture
def pairs() -> Iterator[Pairs]:
    made = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(3)]
    yield made
    for inbox, outbox in made:
        inbox.close()
        outbox.close()


def peers(index: int, pairs: Pairs) -> Peers:
    return Peers(index, pairs[index][0], [outbox for _, outbox in pairs])


def received(inbox: socket.socket) -> list[bytes]:
    keys: list[bytes] = []
    while True:
        try:
            keys += inbox.recv(65536, socket.MSG_DONTWAIT).split(b"\n")
        except BlockingIOError:
            return keys


def domain_owned_by(index: int, count: int) -> str:
    return next(f"d{n}.test" for n in range(100) if owner(f"d{n}.test", count) == index)


def test_jobs_go_to_their_owner_and_never_back_to_the_sender(pairs: Pairs) -> None:
    me = peers(0, pairs)
    mine, first, second = (domain_owned_by(i, 3) for i in range(3))
    keys = [job_key("ID1", mine), job_key("ID1", first), job_key("ID1", second)]
    me.forward(keys)
    assert received(pairs[0][0]) == []
    assert received(pairs[1][0]) == [job_key("ID1", first)]
    assert received(pairs[2][0]) == [job_key("ID1", second)]


def test_many_jobs_are_split_into_datagrams(pairs: Pairs) -> None:
    me = peers(0, pairs)
    theirs = domain_owned_by(1, 3)
    keys = [job_key(f"ID{n:04}", theirs) for n in range(1000)]
    me.forward(keys)
    assert received(pairs[1][0]) == keys


def test_a_full_inbox_drops_the_wakeup_without_an_error(pairs: Pairs) -> None:
    me = peers(0, pairs)
    theirs = domain_owned_by(1, 3)
    for n in range(5000):  # far beyond what an unread datagram queue holds
        me.forward([job_key(f"ID{n:04}", theirs)])
    assert 0 < len(received(pairs[1][0])) < 5000


def test_keys_handed_over_in_one_loop_turn_go_in_one_datagram(pairs: Pairs) -> None:
    me = peers(0, pairs)
    theirs = domain_owned_by(1, 3)
    keys = [job_key(f"ID{n}", theirs) for n in range(3)]

    async def next_turn() -> None:
        """Once the callbacks scheduled so far (the send) have run."""
        turned = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(turned.set_result, None)
        await turned

    async def one_turn_then_another() -> None:
        for key in keys:
            me.hand_over([key])  # as three messages of one group commit
        await next_turn()
        me.hand_over([job_key("ID9", theirs)])
        await next_turn()

    asyncio.run(one_turn_then_another())
    datagrams = []
    while True:
        try:
            datagrams.append(pairs[1][0].recv(65536, socket.MSG_DONTWAIT))
        except BlockingIOError:
            break
    assert datagrams == [b"\n".join(keys), job_key("ID9", theirs)]
