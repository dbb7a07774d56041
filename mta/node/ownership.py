"""Which worker process delivers a domain, and how workers hand each other jobs.

With ``[server] workers = N`` every worker accepts mail for any domain (the
kernel spreads SMTP connections over them), but each destination domain is
delivered by exactly one worker, its owner: that worker alone holds the
domain's concurrency slots, so per-domain limits are exact on the node
(docs/architecture.md, invariant 6, says what is not exact yet). The owner
is a hash of the domain, the same in every process and across restarts.

A worker that commits a message whose jobs belong to other workers tells
each owner at once: a datagram holding the job keys, over a Unix socket
pair the supervisor made before starting the workers. The messages of one
group commit are all told in one datagram (``hand_over`` gathers the keys
until the event loop's next turn): a datagram per message cost both the
sender and the owner a system call and a wake-up each. Nothing depends on
that datagram arriving: the jobs are in the spool, and every owner scans
its due jobs at least once a second, so a lost wake-up (the owner's buffer
full, or the owner restarting) costs at most that second.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import zlib
from collections.abc import Callable, Iterable

from mta.spool.records import split_job_key

# Keys per datagram: a few kB, well under the socket's datagram size limit.
_KEYS_PER_DATAGRAM = 256


def owner(domain: str, workers: int) -> int:
    """The index of the worker that delivers ``domain``: stable across processes
    (unlike ``hash()``, which Python salts per process)."""
    return zlib.crc32(domain.encode()) % workers


class Peers:
    """This worker's place among the workers: what it owns, and its wake-up sockets.

    ``inbox`` receives the job keys other workers hand to this one;
    ``outboxes[i]`` sends to worker i (the other end of worker i's inbox).
    """

    def __init__(self, index: int, inbox: socket.socket, outboxes: list[socket.socket]) -> None:
        self.index = index
        self.count = len(outboxes)
        self.inbox = inbox
        self.outboxes = outboxes
        self._gathered: list[bytes] = []  # keys handed over, sent on the loop's next turn
        for sock in (inbox, *outboxes):
            sock.setblocking(False)

    def owns(self, domain: str) -> bool:
        return owner(domain, self.count) == self.index

    def hand_over(self, keys: Iterable[bytes]) -> None:
        """``forward`` these keys, with every other key handed over before the
        event loop's next turn."""
        if not self._gathered:
            asyncio.get_running_loop().call_soon(self._send_gathered)
        self._gathered.extend(keys)

    def _send_gathered(self) -> None:
        keys, self._gathered = self._gathered, []
        self.forward(keys)

    def forward(self, keys: Iterable[bytes]) -> None:
        """Tell the owners of these committed jobs to try them now."""
        by_owner: dict[int, list[bytes]] = {}
        for key in keys:
            index = owner(split_job_key(key)[1], self.count)
            if index != self.index:
                by_owner.setdefault(index, []).append(key)
        for index, owned in by_owner.items():
            for start in range(0, len(owned), _KEYS_PER_DATAGRAM):
                batch = b"\n".join(owned[start : start + _KEYS_PER_DATAGRAM])
                # Buffer full, or the owner restarting: its next scan finds the jobs.
                with contextlib.suppress(OSError):
                    self.outboxes[index].send(batch)

    def listen(self, offer: Callable[[list[bytes]], None]) -> None:
        """Hand every key that arrives in the inbox to ``offer`` (the scheduler's)."""

        def read() -> None:
            while True:
                try:
                    datagram = self.inbox.recv(65536)
                except BlockingIOError:
                    return
                offer(datagram.split(b"\n"))

        asyncio.get_running_loop().add_reader(self.inbox.fileno(), read)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.inbox.fileno())
