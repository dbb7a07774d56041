"""A TCP server with its own event loop in a thread, for scripted test peers.

Subclasses implement ``_session(reader, writer)``; ``with`` starts the server
on ``host`` and a free port (or the one given; ``.port``) and, on exit, cancels every session
still open and stops the loop, so no test leaves a thread or socket behind.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class ThreadedServer:
    def __init__(self, host: str, port: int = 0, **server_options: Any) -> None:
        self.host = host
        self.port = port
        self._options = server_options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> Any:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._session, self.host, self.port, **self._options), self._loop
        )
        self._server = started.result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        sessions = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in sessions:
            task.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError
