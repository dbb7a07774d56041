"""A receiving SMTP server that records what traffic policy is about.

For each connection: the client's address; for each message: when its MAIL
command came, its Subject, and how many recipients it was accepted for. It
also tracks how many connections are open at once, and can answer the first
N RCPT commands with a chosen reply (a provider's throttling reply, say).
It speaks just enough SMTP for our client, in its own thread and event
loop, on a loopback address.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from tests.harness.threaded_server import ThreadedServer


@dataclass
class Seen:
    open_now: int = 0
    most_open: int = 0
    clients: list[str] = field(default_factory=list)  # one per message: the client address
    mail_times: list[float] = field(default_factory=list)  # monotonic time of each MAIL
    refused: int = 0
    subjects: list[str] = field(default_factory=list)  # one per message accepted
    recipients: int = 0  # recipients of the messages accepted, all told


class CountingPeer(ThreadedServer):
    def __init__(
        self,
        host: str,
        data_delay: float = 0.0,
        refuse: str = "",
        refuse_count: int = 0,
        port: int = 0,  # one port on several addresses: peers for a resolver's MX hosts
    ) -> None:
        super().__init__(host, port)
        self.data_delay = data_delay  # seconds before answering the end of data
        self.refuse = refuse  # a reply for RCPT, e.g. "421 4.7.0 [TSS04] ..."
        self.refuse_count = refuse_count
        self.seen = Seen()
        self._lock = threading.Lock()

    def snapshot(self) -> Seen:
        with self._lock:
            return Seen(
                self.seen.open_now,
                self.seen.most_open,
                list(self.seen.clients),
                list(self.seen.mail_times),
                self.seen.refused,
                list(self.seen.subjects),
                self.seen.recipients,
            )

    def _count_open(self, delta: int) -> None:
        with self._lock:
            self.seen.open_now += delta
            self.seen.most_open = max(self.seen.most_open, self.seen.open_now)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._count_open(+1)
        client = writer.get_extra_info("peername")[0]
        accepted = 0  # recipients of the message under way
        try:
            writer.write(b"220 peer.test ESMTP\r\n")
            while line := await reader.readline():
                command = line.decode("ascii", "replace").strip()
                if command.upper() == "DATA":
                    writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    await writer.drain()
                    reply = await self._data(reader, client, accepted)
                else:
                    reply = self._answer(command)
                    if command[:4].upper() in ("MAIL", "RSET"):
                        accepted = 0
                    elif command[:4].upper() == "RCPT" and reply.startswith("250"):
                        accepted += 1
                writer.write(reply.encode() + b"\r\n")
                await writer.drain()
                if reply.startswith(("221", "421")):
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._count_open(-1)
            writer.close()

    async def _data(self, reader: asyncio.StreamReader, client: str, recipients: int) -> str:
        subject = ""
        while (line := await reader.readline()) not in (b".\r\n", b""):
            if not subject and line.startswith(b"Subject: "):
                subject = line[9:].decode("utf-8", "replace").strip()
        await asyncio.sleep(self.data_delay)
        with self._lock:
            self.seen.clients.append(client)
            self.seen.subjects.append(subject)
            self.seen.recipients += recipients
        return "250 2.0.0 Ok: queued"

    def _answer(self, command: str) -> str:
        verb = command[:4].upper()
        if verb == "EHLO":
            return "250-peer.test\r\n250 8BITMIME"
        if verb == "MAIL":
            with self._lock:
                self.seen.mail_times.append(time.monotonic())
            return "250 2.1.0 Ok"
        if verb == "RCPT":
            with self._lock:
                if self.seen.refused < self.refuse_count:
                    self.seen.refused += 1
                    return self.refuse
            return "250 2.1.5 Ok"
        if verb == "QUIT":
            return "221 2.0.0 Bye"
        return "250 2.0.0 Ok"  # RSET, NOOP
