"""/metrics, /healthz and /readyz over HTTP, in a background thread."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess
from prometheus_client.core import REGISTRY
from prometheus_client.registry import Collector

from mta.config import HostPort


def worker_registry(directory: str) -> CollectorRegistry:
    """A registry that sums the metrics the worker processes write to ``directory``
    (their PROMETHEUS_MULTIPROC_DIR)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return registry


Readiness = Callable[[], str | None]  # why the daemon should not get traffic now, or None


def serve(
    listen: HostPort,
    not_ready: Readiness,
    collectors: Iterable[Collector] = (),
    registry: CollectorRegistry = REGISTRY,
) -> None:
    """/metrics, /healthz and /readyz over HTTP on ``listen``, in a background thread.

    /healthz answers 200 while the process can answer at all (a liveness
    probe); /readyz answers 200 only while the daemon accepts mail it can
    keep (listening, spool below its limits), else 503 with the reason, so a
    load balancer sends new mail elsewhere. With worker processes, the
    supervisor serves ``worker_registry``'s sum of what the workers count.
    """
    for collector in collectors:
        registry.register(collector)
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return _plain(start_response, "200 OK", "ok")
        if path == "/readyz":
            reason = not_ready()
            if reason is None:
                return _plain(start_response, "200 OK", "ready")
            return _plain(start_response, "503 Service Unavailable", reason)
        return metrics_app(environ, start_response)

    server = make_server(
        listen.host, listen.port, app, ThreadingWSGIServer, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()


def _plain(start_response: Callable[..., Any], status: str, text: str) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [text.encode() + b"\n"]


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # scrapes every few seconds are not events
