"""Where the handler signs: small messages on the event loop, large ones in the pool.

Either way the stored message carries a signature that verifies; the pool
records what it was given, so a change of the threshold shows here.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import dkim
import pytest
from aiosmtpd.smtp import Envelope
from aiosmtpd.smtp import Session as SmtpSession

from mta.config import EgressConfig, ServerConfig
from mta.inbound.handler import INLINE_SIGN_MAX, Handler
from mta.signing.keys import DkimKey, write_key
from mta.signing.signer import Signer
from mta.spool.commit import GroupCommitter
from mta.spool.ids import IdGenerator
from mta.spool.store import Spool


class RecordingPool(ThreadPoolExecutor):
    """A thread pool that notes the size of every message handed to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.sizes: list[int] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.sizes.append(len(args[0]))
        return super().submit(fn, *args, **kwargs)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> DkimKey:
    return write_key("example.test", "s1", tmp_path_factory.mktemp("dkim"), "rsa", 2048)[1]


def message_of(size: int) -> bytes:
    head = b"From: App <app@example.test>\r\nTo: user@example.net\r\nSubject: size\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return head + line * ((size - len(head)) // len(line) + 1)


async def queue_message(handler: Handler, data: bytes) -> str:
    """What handle_DATA answers to one transaction carrying ``data``."""
    session = SmtpSession(asyncio.get_running_loop())
    session.host_name = "client.test"
    session.extended_smtp = True
    envelope = Envelope()
    envelope.mail_from = "app@example.test"
    envelope.rcpt_tos = ["user@example.net"]
    envelope.original_content = data
    server = types.SimpleNamespace(ip="127.0.0.1")
    return await handler.handle_DATA(server, session, envelope)


def test_small_messages_are_signed_on_the_loop_large_ones_in_the_pool(
    spool: Spool, key: DkimKey
) -> None:
    committer, pool = GroupCommitter(spool), RecordingPool()
    handler = Handler(
        ServerConfig(),
        EgressConfig(),
        spool,
        committer,
        Signer([key]),
        pool,
        IdGenerator(node="test"),
        on_queued=lambda message: None,
    )
    small, large = message_of(4096), message_of(INLINE_SIGN_MAX + 4096)

    async def both() -> list[str]:
        return [await queue_message(handler, data) for data in (small, large)]

    try:
        replies = asyncio.run(both())
    finally:
        committer.close()
        pool.shutdown()

    assert [reply[:3] for reply in replies] == ["250", "250"], replies
    assert len(pool.sizes) == 1 and pool.sizes[0] > INLINE_SIGN_MAX  # only the large one
    txt = key.txt_record().encode()
    with spool.read() as txn:
        stored = [spool.body(txn, reply.rsplit(" ", 1)[1]) for reply in replies]
    for body in stored:
        assert body is not None and body.startswith(b"DKIM-Signature:")
        assert dkim.verify(body, dnsfunc=lambda name, timeout=5: txt)
