"""An asyncio transport in memory, for driving an SMTP Session without a socket.

Shared by the session fuzzer (tests/reliability/test_fuzz.py) and the reply
coalescing tests (tests/integration/test_reply_coalescing.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from mta.inbound.server import Session


class MemoryTransport(asyncio.Transport):
    """What a Session writes, collected; close() ends the connection like a socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.written = bytearray()
        self.closed = asyncio.Event()
        self.protocol: Session | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 25)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closed.is_set():
            self.written += data

    def is_closing(self) -> bool:
        return self.closed.is_set()

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            if self.protocol is not None:
                self.loop.call_soon(self.protocol.connection_lost, None)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0
