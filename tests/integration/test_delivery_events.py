"""Delivery events end to end: the real `mta serve`, a real HTTP server as
the webhook, smtp-sink as the receiving MX.

The webhook (``Hook``: http.server in a thread on a free loopback port)
records every POST; it can refuse connections (stopped), answer 500, or
answer 200. Each message goes to two recipients: one at smtp-sink
(delivered) and one routed to a port nothing listens on (deferred, retried
only after an hour), so every message makes received, delivered and deferred
events.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.harness.client import message, send, unique
from tests.harness.mta import Mta
from tests.harness.poll import eventually
from tests.harness.sink import Sink, free_port

pytestmark = pytest.mark.integration

SINK = "127.0.0.31"
TIMEOUT = 20.0


class Hook:
    """A webhook that records what it is sent: stopped (connections refused),
    or answering ``status`` to every POST."""

    def __init__(self) -> None:
        self.port = free_port("127.0.0.1")
        self.status = 200
        self.posts: list[tuple[int, list[dict[str, Any]]]] = []  # (answered, events)
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events?token=t1"

    def start(self, status: int = 200) -> None:
        self.status = status
        if self.server is not None:
            return
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                assert self.path == "/events?token=t1"
                assert self.headers["Content-Type"] == "application/json"
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with hook.lock:
                    status = hook.status
                    hook.posts.append((status, json.loads(body)))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def accepted(self) -> list[dict[str, Any]]:
        """Every event of every POST answered 2xx, in the order received."""
        with self.lock:
            return [event for status, events in self.posts if status < 300 for event in events]

    def refused_posts(self) -> int:
        with self.lock:
            return sum(1 for status, _ in self.posts if status >= 300)


@pytest.fixture
def hook() -> Iterator[Hook]:
    server = Hook()
    yield server
    server.stop()


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    server = Sink(tmp_path / "sink", SINK).start()
    yield server
    server.stop()


def configure(mta: Mta, hook: Hook, sink: Sink) -> Path:
    """Route sink.test to smtp-sink and parked.test nowhere; events to a file and the hook."""
    mta.park_mail = False
    mta.routes = {
        "sink.test": f"{SINK}:{sink.port}",
        "parked.test": f"127.0.0.1:{mta.parking_port}",
    }
    events_file = mta.root / "events.jsonl"
    mta.extra_config += (
        "[events]\n"
        f'file = "{events_file}"\n'
        f'webhook_url = "{hook.url}"\n'
        "webhook_batch = 4\n"
        "webhook_timeout = 5\n"
        "webhook_retry_max = 1\n"
    )
    return events_file


def send_messages(mta: Mta, count: int) -> list[str]:
    return [
        send(mta, message(unique()), [f"u{n}@sink.test", f"p{n}@parked.test"]) for n in range(count)
    ]


def file_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def pending(mta: Mta) -> float:
    found = re.search(r"^mta_events_pending (\S+)$", mta.metrics(), re.MULTILINE)
    assert found, "no mta_events_pending metric"
    return float(found.group(1))


def expected_kinds(queue_ids: list[str]) -> set[tuple[str, str, str]]:
    kinds = set()
    for n, queue_id in enumerate(queue_ids):
        kinds |= {
            (queue_id, f"u{n}@sink.test", "received"),
            (queue_id, f"p{n}@parked.test", "received"),
            (queue_id, f"u{n}@sink.test", "delivered"),
            (queue_id, f"p{n}@parked.test", "deferred"),
        }
    return kinds


def check_order(events: list[dict[str, Any]]) -> None:
    """Each recipient's reception comes before its delivery attempt."""
    seen: dict[tuple[str, str], list[str]] = {}
    for event in events:
        seen.setdefault((event["queue_id"], event["recipient"]), []).append(event["type"])
    for key, kinds in seen.items():
        assert kinds[0] == "received", (key, kinds)


def test_a_down_webhook_loses_nothing_and_gets_every_event_once(
    mta: Mta, hook: Hook, sink: Sink
) -> None:
    events_file = configure(mta, hook, sink)
    mta.start()  # the hook is not listening yet: connections are refused
    queue_ids = send_messages(mta, 3)
    expected = expected_kinds(queue_ids)
    sink.wait_for_messages(3, timeout=TIMEOUT)
    eventually(
        lambda: len(file_events(events_file)) == len(expected), TIMEOUT, "every event in the file"
    )
    written = file_events(events_file)
    assert {(e["queue_id"], e["recipient"], e["type"]) for e in written} == expected
    assert pending(mta) == len(expected)

    hook.start(status=500)  # up, but failing: the events stay in the spool
    eventually(lambda: hook.refused_posts() >= 2, TIMEOUT, "the webhook retried after a 500")
    assert pending(mta) == len(expected)
    assert hook.accepted() == []

    hook.status = 200
    eventually(lambda: pending(mta) == 0, TIMEOUT, "the spool's events delivered")
    posted = hook.accepted()
    ids = [event["id"] for event in posted]
    assert len(ids) == len(set(ids)), "an event arrived twice"
    assert posted == written  # the same events, the same order, the same fields
    check_order(posted)
    delivered = [e for e in posted if e["type"] == "delivered"]
    assert {e["mx"] for e in delivered} == {f"{SINK}[{SINK}]:{sink.port}"}
    assert all(e["dsn"].startswith("2.") and e["attempt"] == 1 for e in delivered)
    deferred = [e for e in posted if e["type"] == "deferred"]
    assert all(e["dsn"].startswith("4.") and e["classification"] for e in deferred)
    assert mta.stop() == 0, mta.log()


def test_events_pending_at_a_restart_are_delivered_after_it(
    mta: Mta, hook: Hook, sink: Sink
) -> None:
    events_file = configure(mta, hook, sink)
    mta.start()
    queue_ids = send_messages(mta, 2)
    expected = expected_kinds(queue_ids)
    eventually(
        lambda: len(file_events(events_file)) == len(expected), TIMEOUT, "every event in the file"
    )
    assert pending(mta) == len(expected)
    assert mta.stop() == 0, mta.log()

    hook.start()
    mta.start()
    eventually(
        lambda: len(hook.accepted()) >= len(expected), TIMEOUT, "the events after the restart"
    )
    eventually(lambda: pending(mta) == 0, TIMEOUT, "an empty events database")
    posted = hook.accepted()
    assert [e["id"] for e in posted] == [e["id"] for e in file_events(events_file)]
    assert {(e["queue_id"], e["recipient"], e["type"]) for e in posted} == expected
    check_order(posted)
    assert mta.stop() == 0, mta.log()
