"""AUTH password checks off the event loop, bounded, and alike for unknown users.

scrypt takes about 50 ms by design; on the event loop, every wrong password
stalled every other session of the worker (issue 20, item 1), and a user name
not in the file was answered without it, at once (item 8: which names exist
could be told by the time of the answer). These tests stand in for scrypt with
a gate that holds each check until the test releases it, so they count loop
turns, replies and calls, never time. (The gate gives up after ``GIVE_UP``
seconds only so that a check wrongly run on the event loop, which would
block the test's own releasing, fails the test instead of hanging it.)
"""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Any

import pytest

import mta.inbound.auth as auth
from mta.inbound.auth import AuthBusy, Authenticator, dummy_hash, hash_password
from mta.inbound.server import Session, Sessions
from tests.harness.memory_transport import MemoryTransport
from tests.harness.poll import loop_turns

CHEAP = 16  # scrypt n for tests
GIVE_UP = 5.0
USERS = {"alice": hash_password("alice-pw", n=CHEAP), "bob": hash_password("bob-pw", n=CHEAP)}


class Gate:
    """Stands in for ``auth.check_password``: each call waits for ``release``,
    then gives the real answer. Counts calls, and the most running at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls: list[tuple[str, str]] = []
        self.running = 0
        self.most_running = 0
        self.threads: set[int] = set()
        self._lock = threading.Lock()

    def __call__(self, password: str, stored: str) -> bool:
        with self._lock:
            self.calls.append((password, stored))
            self.threads.add(threading.get_ident())
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        self.entered.set()
        try:
            released = self.release.wait(GIVE_UP)
        finally:
            with self._lock:
                self.running -= 1
        return released and REAL_CHECK(password, stored)


REAL_CHECK = auth.check_password


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    instance = Gate()
    monkeypatch.setattr(auth, "check_password", instance)
    return instance


async def entered(gate: Gate) -> None:
    """Until a check has started (waited for in a thread: the loop stays free)."""
    assert await asyncio.to_thread(gate.entered.wait, GIVE_UP)
    gate.entered.clear()


async def turns(count: int) -> None:
    await loop_turns(count)


# --- the check runs in a thread, not on the event loop ---


def test_the_event_loop_keeps_turning_while_a_check_runs(gate: Gate) -> None:
    authenticator = Authenticator(dict(USERS))

    async def main() -> None:
        check = asyncio.ensure_future(authenticator.verify_off_loop("alice", "guess"))
        await entered(gate)
        await turns(1000)  # a check on the loop would have blocked every one of these
        assert not check.done()
        gate.release.set()
        assert await check is False

    asyncio.run(main())
    assert len(gate.calls) == 1
    assert threading.get_ident() not in gate.threads


# --- the same through a session: another session is answered meanwhile ---


def plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


async def open_session(authenticator: Authenticator) -> tuple[Session, MemoryTransport]:
    session = Session(
        object(),
        Sessions(10, 10),
        hostname="mta.test",
        auth_require_tls=False,
        authenticator=authenticator,
    )
    transport = MemoryTransport(asyncio.get_running_loop())
    transport.protocol = session
    session.connection_made(transport)
    await turns(50)
    await feed(session, b"EHLO client.test\r\n")
    transport.written.clear()
    return session, transport


async def feed(session: Session, data: bytes) -> None:
    session.data_received(data)
    await turns(50)


async def reply(transport: MemoryTransport) -> str:
    """The first reply written, once there is one (a check's thread must finish first)."""
    loop = asyncio.get_running_loop()
    for _ in range(100_000):
        if b"\r\n" in transport.written:
            break
        await loop.run_in_executor(None, lambda: None)  # a thread's turn, not a sleep
    line, _, rest = bytes(transport.written).partition(b"\r\n")
    transport.written[:] = rest
    return line.decode()


def test_other_sessions_are_answered_while_a_password_is_checked(gate: Gate) -> None:
    authenticator = Authenticator(dict(USERS))

    async def main() -> tuple[str, list[str]]:
        guesser, guesser_out = await open_session(authenticator)
        other, other_out = await open_session(authenticator)
        guesser.data_received(b"AUTH PLAIN " + plain("alice", "guess") + b"\r\n")
        await entered(gate)
        noops = []
        for _ in range(5):
            await feed(other, b"NOOP\r\n")
            noops.append(await reply(other_out))
        assert guesser_out.written == b""  # its check is still running
        gate.release.set()
        return await reply(guesser_out), noops

    answer, noops = asyncio.run(main())
    assert noops == ["250 2.0.0 OK"] * 5
    assert answer == "535 5.7.8 Authentication credentials invalid"


# --- bounded: a few at once, a few waiting, then 454 ---


def test_at_most_checks_at_once_run_and_the_rest_wait_their_turn(gate: Gate) -> None:
    authenticator = Authenticator(dict(USERS), checks_at_once=2, checks_waiting=3)

    async def main() -> list[bool]:
        checks = [
            asyncio.ensure_future(authenticator.verify_off_loop("alice", f"guess-{number}"))
            for number in range(5)
        ]
        await turns(50)
        assert authenticator.checks == 5
        with pytest.raises(AuthBusy):  # 2 running and 3 waiting: no room for a sixth
            await authenticator.verify_off_loop("bob", "guess")
        gate.release.set()
        return await asyncio.gather(*checks)

    assert asyncio.run(main()) == [False] * 5
    assert len(gate.calls) == 5
    assert gate.most_running == 2
    assert authenticator.checks == 0


def test_auth_beyond_the_queue_gets_454_and_may_try_again(gate: Gate) -> None:
    authenticator = Authenticator(dict(USERS), checks_at_once=1, checks_waiting=0)

    async def main() -> tuple[str, str, str]:
        guesser, guesser_out = await open_session(authenticator)
        other, other_out = await open_session(authenticator)
        guesser.data_received(b"AUTH PLAIN " + plain("alice", "guess") + b"\r\n")
        await entered(gate)
        await feed(other, b"AUTH PLAIN " + plain("bob", "bob-pw") + b"\r\n")
        busy = await reply(other_out)
        gate.release.set()
        refused = await reply(guesser_out)
        await feed(other, b"AUTH PLAIN " + plain("bob", "bob-pw") + b"\r\n")
        return busy, refused, await reply(other_out)

    busy, refused, again = asyncio.run(main())
    assert busy == "454 4.7.0 Temporary authentication failure"
    assert refused == "535 5.7.8 Authentication credentials invalid"
    assert again == "235 2.7.0 Authentication successful"
    assert [password for password, _ in gate.calls] == ["guess", "bob-pw"]


def test_a_remembered_login_needs_no_check_and_never_waits(gate: Gate) -> None:
    authenticator = Authenticator(dict(USERS), checks_at_once=1, checks_waiting=0)

    async def main() -> str:
        gate.release.set()
        assert await authenticator.verify_off_loop("alice", "alice-pw")  # checked once
        gate.release.clear()
        gate.entered.clear()  # that check's: the next entered() is the guess's
        guesser, _ = await open_session(authenticator)
        client, client_out = await open_session(authenticator)
        guesser.data_received(b"AUTH PLAIN " + plain("bob", "guess") + b"\r\n")
        await entered(gate)  # the one check slot is taken, none may wait
        await feed(client, b"AUTH PLAIN " + plain("alice", "alice-pw") + b"\r\n")
        answer = await reply(client_out)
        gate.release.set()
        await turns(50)
        return answer

    assert asyncio.run(main()) == "235 2.7.0 Authentication successful"
    assert [password for password, _ in gate.calls] == ["alice-pw", "guess"]


def test_a_password_changed_while_it_was_checked_is_refused(gate: Gate) -> None:
    authenticator = Authenticator(dict(USERS))

    async def main() -> bool:
        check = asyncio.ensure_future(authenticator.verify_off_loop("alice", "alice-pw"))
        await entered(gate)
        authenticator.replace_users(USERS | {"alice": hash_password("new-pw", n=CHEAP)})
        gate.release.set()
        return await check

    assert asyncio.run(main()) is False
    gate.calls.clear()
    gate.release.set()
    assert not authenticator.verify("alice", "alice-pw")
    assert len(gate.calls) == 1  # checked again: the refused login was not remembered


# --- unknown users cost the same check (no user enumeration by timing) ---


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []

    def counting(password: str, stored: str) -> bool:
        calls.append((password, stored))
        return REAL_CHECK(password, stored)

    monkeypatch.setattr(auth, "check_password", counting)
    return calls


def cost(stored: str) -> str:
    return stored.split("$")[2]


def test_an_unknown_user_goes_through_the_same_scrypt_check(
    counted: list[tuple[str, str]],
) -> None:
    authenticator = Authenticator(dict(USERS))
    assert not authenticator.verify("alice", "guess")
    assert not authenticator.verify("mallory", "guess")
    assert not asyncio.run(authenticator.verify_off_loop("mallory", "guess"))
    assert not asyncio.run(authenticator.verify_off_loop("Alice", "alice-pw"))
    assert [password for password, _ in counted] == ["guess"] * 3 + ["alice-pw"]
    assert {cost(stored) for _, stored in counted} == {f"n={CHEAP},r=8,p=1"}
    known, unknown = counted[0][1], counted[1][1]
    assert unknown not in USERS.values() and known == USERS["alice"]


def test_the_aiosmtpd_call_checks_unknown_users_too(counted: list[tuple[str, str]]) -> None:
    authenticator = Authenticator(dict(USERS))
    result: Any = authenticator(None, None, None, "PLAIN", auth.LoginPassword(b"eve", b"pw"))
    assert not result.success
    assert len(counted) == 1


def test_the_dummy_hash_has_the_users_cost_and_matches_no_password() -> None:
    users = {"a": hash_password("x", n=CHEAP), "b": hash_password("y", n=CHEAP)}
    users["c"] = hash_password("z", n=32)
    dummy = dummy_hash(users)
    assert cost(dummy) == f"n={CHEAP},r=8,p=1"  # what most users have
    assert cost(dummy_hash({})) == "n=16384,r=8,p=1"  # the cost `mta user add` uses
    assert dummy != dummy_hash(users)  # a random salt and key each time
    for password in ("", "x", "y", "z"):
        assert not REAL_CHECK(password, dummy)


def test_a_reload_gives_the_dummy_the_new_users_cost(counted: list[tuple[str, str]]) -> None:
    authenticator = Authenticator(dict(USERS))
    authenticator.replace_users({"carol": hash_password("pw", n=32)})
    assert not authenticator.verify("alice", "alice-pw")  # removed: now unknown
    assert cost(counted[0][1]) == "n=32,r=8,p=1"
