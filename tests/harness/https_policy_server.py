"""An HTTPS server on loopback that serves what a test tells it to, and a test CA's files.

``CaFiles`` keeps a test CA's (tests.harness.ca) certificate, which a client
trusts through its ``ca_file``, and the servers' keys and chains in a
directory. ``HttpsServer`` is aiohttp's web server with TLS, on its own event
loop in a thread (the client under test runs its own loop), answering each
GET with the reply set for its path (404 otherwise) and noting the paths
asked for.

Usage::

    ca = CaFiles(tmp_path)
    with HttpsServer("127.0.0.80", ca.issue(["mta-sts.example.test"])) as server:
        server.serve("/.well-known/mta-sts.txt", b"version: STSv1\\n...")
        MtaSts(spool, ..., port=server.port, ca_file=str(ca.ca_file))
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from tests.harness.ca import CertificateAuthority
from tests.harness.service import Service

START_TIMEOUT = 10.0


class CaFiles:
    """A test CA (tests.harness.ca) whose files go to ``directory``: its certificate
    (``ca_file``) and, per ``issue``, a server's key and chain."""

    def __init__(self, directory: Path, name: str = "MTA Test CA") -> None:
        self.directory = directory
        self._ca = CertificateAuthority(name)
        self.ca_file = self._ca.write(directory / f"{name.replace(' ', '-')}.pem")

    def issue(self, names: Sequence[str]) -> Path:
        """A PEM file with a new key and its certificate for ``names``, from this CA."""
        return self._ca.issue(*names).pem(self.directory)


@dataclass(frozen=True)
class Reply:
    body: bytes
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)


class HttpsServer(Service):
    """``with HttpsServer(host, certificate) as server``: serving on ``server.port``."""

    def __init__(self, host: str, certificate: Path, port: int = 0) -> None:
        self.host = host
        self.port = port
        self.requests: list[str] = []  # the paths asked for, in order
        self._replies: dict[str, Reply] = {}
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(certificate)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def serve(
        self, path: str, body: bytes, content_type: str = "text/plain", status: int = 200
    ) -> None:
        """Answer GET ``path`` with ``body`` from now on."""
        self._replies[path] = Reply(body, status, {"Content-Type": content_type})

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        self._replies[path] = Reply(b"", status, {"Location": location})

    def start(self) -> HttpsServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(START_TIMEOUT)
        return self

    def stop(self) -> None:
        """Stop serving: connections to the port are refused from now on."""
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(START_TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(START_TIMEOUT)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/{path:.*}", self._answer)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self._tls)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _answer(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        reply = self._replies.get(request.path, Reply(b"not found\n", 404))
        return web.Response(body=reply.body, status=reply.status, headers=reply.headers)
