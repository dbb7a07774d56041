"""Queue IDs: unique on a node, and sorting them sorts messages by arrival.

An ID is 80 bits written as 16 characters of Crockford base32 (digits and
upper-case letters, no I, L, O or U, so it survives being read aloud or
grepped): 48 bits of milliseconds since the epoch, 20 bits of the process ID
(worker processes share one spool) and a 12-bit sequence. The alphabet is in
ASCII order, so string order is numeric order and therefore time order.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
LENGTH = 16
_SEQUENCE_BITS = 12
_PID_BITS = 20


def encode(number: int) -> str:
    chars = []
    for _ in range(LENGTH):
        chars.append(ALPHABET[number & 31])
        number >>= 5
    return "".join(reversed(chars))


def is_queue_id(text: str) -> bool:
    return len(text) == LENGTH and all(char in ALPHABET for char in text)


def milliseconds(queue_id: str) -> int:
    """When the ID was made, in milliseconds since the epoch."""
    number = 0
    for char in queue_id:
        number = number * 32 + ALPHABET.index(char)
    return number >> (_PID_BITS + _SEQUENCE_BITS)


class IdGenerator:
    """Makes strictly increasing IDs for one process, thread-safe.

    If the clock stands still or steps back, the sequence carries on from the
    last ID; if the sequence runs out within one millisecond, the generator
    borrows the next millisecond. Either way no ID is ever issued twice.
    """

    def __init__(self, clock: Callable[[], float] = time.time, pid: int | None = None) -> None:
        self._clock = clock
        self._pid = (os.getpid() if pid is None else pid) & ((1 << _PID_BITS) - 1)
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
            number = (
                (self._last_ms << (_PID_BITS + _SEQUENCE_BITS))
                | (self._pid << _SEQUENCE_BITS)
                | self._sequence
            )
        return encode(number)
