"""Queue IDs: unique across a fleet, and sorting them sorts messages by arrival.

An ID is 22 characters of Crockford base32 (digits and upper-case letters,
no I, L, O or U, so it survives being read aloud or grepped). The first 16
are the time-ordered core, 80 bits: milliseconds since the epoch (48), the
process ID (20; a node's worker processes share one spool) and a sequence
(12). The last 6 are the node's tag: 30 bits of a BLAKE2b hash of
the node's name (``[cluster] node``), the same on every ID the node makes.

Guarantee: a generator (one per process) never makes the same ID twice; two
make different IDs if their PIDs differ modulo 2**20 or their nodes' tags do.
Two differently named nodes share a tag with probability 2**-30 per pair
(about 6e-8 for a dozen nodes). A tag depends on the name alone, so whether
two nodes share one is known when they are named: compare the last 6
characters of their IDs.

The alphabet is in ASCII order and the core comes first, so string order is
time order, also between these IDs and the 16-character ones (the core
alone) made before nodes were tagged, which spools may still hold: an old ID
sorts just before a new one with the same core.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CORE_LENGTH = 16  # the whole ID before nodes were tagged
TAG_LENGTH = 6
LENGTH = CORE_LENGTH + TAG_LENGTH
_SEQUENCE_BITS = 12
_PID_BITS = 20


def encode(number: int, width: int) -> str:
    """``number`` as exactly ``width`` characters, most significant first."""
    chars = []
    for _ in range(width):
        chars.append(ALPHABET[number & 31])
        number >>= 5
    return "".join(reversed(chars))


def node_tag(node: str) -> str:
    """The 6 characters that end every ID a node of this name makes."""
    digest = hashlib.blake2b(node.encode(), digest_size=8).digest()
    return encode(int.from_bytes(digest) >> (64 - 5 * TAG_LENGTH), TAG_LENGTH)


def is_queue_id(text: str) -> bool:
    """A queue ID of today's form or the untagged form of older spools."""
    return len(text) in (LENGTH, CORE_LENGTH) and all(char in ALPHABET for char in text)


def milliseconds(queue_id: str) -> int:
    """When the ID was made, in milliseconds since the epoch."""
    number = 0
    for char in queue_id[:CORE_LENGTH]:
        number = number * 32 + ALPHABET.index(char)
    return number >> (_PID_BITS + _SEQUENCE_BITS)


class IdGenerator:
    """Makes strictly increasing IDs for one process of one node, thread-safe.

    If the clock stands still or steps back, the sequence carries on from the
    last ID; if the sequence runs out within one millisecond, the generator
    borrows the next millisecond. Either way no ID is ever issued twice.
    """

    def __init__(
        self, *, node: str, clock: Callable[[], float] = time.time, pid: int | None = None
    ) -> None:
        self._clock = clock
        self._pid = (os.getpid() if pid is None else pid) & ((1 << _PID_BITS) - 1)
        self._tag = node_tag(node)
        self._last_ms = 0
        self._sequence = 0
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            now_ms = int(self._clock() * 1000)
            if now_ms > self._last_ms:
                self._last_ms, self._sequence = now_ms, 0
            else:
                self._sequence += 1
                if self._sequence >> _SEQUENCE_BITS:
                    self._last_ms, self._sequence = self._last_ms + 1, 0
            core = (
                (self._last_ms << (_PID_BITS + _SEQUENCE_BITS))
                | (self._pid << _SEQUENCE_BITS)
                | self._sequence
            )
        return encode(core, CORE_LENGTH) + self._tag
