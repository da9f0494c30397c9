"""Shared fixtures: real servers on 127.0.0.1 with ephemeral ports, stopped afterwards.

The ``webhook_receiver`` fixture comes from the package's own pytest plugin, through its
entry point, as in a consumer project.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from werkzeug.serving import make_server

from xo_webhooks import WebhookMiddleware

from .apps import create_app
from .helpers import RedisServer, free_port, skip_without_redis


class ServedApp:
    """A WSGI app served by werkzeug's threaded server on a background thread."""

    def __init__(self, app: Any) -> None:
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def serve() -> Iterator[Callable[[Any], ServedApp]]:
    """``serve(app)`` starts a real server for *app* and returns it (``.url``)."""
    served: list[ServedApp] = []

    def start(app: Any) -> ServedApp:
        served.append(ServedApp(app))
        return served[-1]

    yield start
    for server in served:
        server.stop()


@pytest.fixture
def flask_app():
    """A fresh Flask JSON-RPC app (see tests/apps.py)."""
    return create_app()


@pytest.fixture
def wrap() -> Iterator[Callable[..., WebhookMiddleware]]:
    """``wrap(app, **kwargs)`` builds a middleware with an empty environment (so the
    developer's own variables never leak in) and closes it at teardown."""
    built: list[WebhookMiddleware] = []

    def make(app: Any, **kwargs: Any) -> WebhookMiddleware:
        kwargs.setdefault("environ", {})
        built.append(WebhookMiddleware(app, **kwargs))
        return built[-1]

    yield make
    for middleware in built:
        middleware.close(5)


@pytest.fixture
def refused_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (the port was just freed)."""
    return f"http://127.0.0.1:{free_port()}/"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server for the test module (skipped, saying why, when there is none)."""
    skip_without_redis()
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a thread running (after giving each 10 s to end)."""
    before = set(threading.enumerate())
    yield
    for thread in set(threading.enumerate()) - before:
        thread.join(10)
        assert not thread.is_alive(), f"thread {thread.name} still running"


@pytest.fixture(scope="module")
def span_exporter() -> Iterator[Any]:
    """An in-memory exporter on the global SDK tracer provider, which can be set only
    once per process (skipped without opentelemetry-sdk)."""
    pytest.importorskip("opentelemetry.sdk", reason="opentelemetry-sdk is not installed")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        pytest.skip(f"another global tracer provider was set: {provider!r}")
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # the provider cannot be unset: from now on it keeps nothing
