"""W3C trace context for hooks: captured on the request thread, carried with each hook
(through retries, Celery messages and dead-letter records), and sent with each attempt.

With OpenTelemetry's API installed (the ``otel`` extra) and a span active when a hook
is queued, the context is that span's, written by OpenTelemetry's propagator, and each
attempt is a client span under it whose own context goes out in the headers. Without
it, the incoming request's ``traceparent`` and ``tracestate`` headers are forwarded as
they are. OpenTelemetry is imported on first use, and only if it is installed.

Shared by the request path (:func:`capture`, or :func:`snapshot` then :func:`captured`
off the request thread) and sending (:func:`attempt_span`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["capture", "snapshot", "captured", "attempt_span", "AttemptSpan", "HEADERS"]

#: The W3C Trace Context headers carried with a hook.
HEADERS = ("traceparent", "tracestate")


@functools.lru_cache(maxsize=1)
def _opentelemetry() -> Any:
    """OpenTelemetry's ``trace`` and ``propagate`` modules, or ``None`` without it."""
    try:
        from opentelemetry import propagate, trace
    except ImportError:
        return None
    return trace, propagate


@functools.lru_cache(maxsize=1)
def _tracer() -> Any:
    """This package's tracer (building one per attempt costs more than the span)."""
    trace, _ = _opentelemetry()
    return trace.get_tracer("xo_webhooks")


def capture(environ: Mapping[str, Any] | None = None) -> dict[str, str] | None:
    """The trace context to carry with the hooks queued now: the active OpenTelemetry
    span's, else the ``traceparent``/``tracestate`` of the request in *environ*;
    ``None`` when there is neither."""
    found = _active_span()
    if found is not None or environ is None:
        return found
    return _forwarded(environ.get("HTTP_TRACEPARENT"), environ.get("HTTP_TRACESTATE"))


#: What :func:`capture` reads, taken now for :func:`captured` to read on another thread.
Snapshot = tuple[contextvars.Context | None, Any, Any]


def snapshot(environ: Mapping[str, Any]) -> Snapshot:
    """What :func:`capture` would read in *environ* now, for :func:`captured` to turn
    into the trace context later, on another thread: a copy of the running code's
    context, where OpenTelemetry keeps the active span (as cheap as a reference: it is
    immutable), and the request's trace headers."""
    context = contextvars.copy_context() if _opentelemetry() is not None else None
    return context, environ.get("HTTP_TRACEPARENT"), environ.get("HTTP_TRACESTATE")


def captured(taken: Snapshot) -> dict[str, str] | None:
    """The trace context :func:`capture` would have returned when *taken* was."""
    context, parent, state = taken
    found = None if context is None else context.run(_active_span)
    return found if found is not None else _forwarded(parent, state)


def _active_span() -> dict[str, str] | None:
    """The active OpenTelemetry span's context as headers, if there is one."""
    otel = _opentelemetry()
    if otel is None:
        return None
    trace, propagate = otel
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return {name: carrier[name] for name in HEADERS if name in carrier} or None


def _forwarded(parent: Any, state: Any) -> dict[str, str] | None:
    """A request's own ``traceparent`` (and ``tracestate``), when it has one."""
    if not isinstance(parent, str) or not parent:
        return None
    context = {"traceparent": parent}
    if isinstance(state, str) and state:
        context["tracestate"] = state
    return context


class AttemptSpan:
    """One attempt's trace: the headers to send, and where its outcome is noted."""

    def __init__(self, headers: dict[str, str], span: Any = None) -> None:
        self.headers = headers
        self._span = span

    def finish(self, status: int | None, error: str | None) -> None:
        """Note the answer's status, or the error that replaced it, on the span."""
        if self._span is None:
            return
        if status is not None:
            self._span.set_attribute("http.response.status_code", status)
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            self._span.set_status(Status(StatusCode.ERROR, error))


@contextlib.contextmanager
def attempt_span(
    context: Mapping[str, str] | None, url: str, attempt: int
) -> Iterator[AttemptSpan]:
    """The trace of one attempt of a hook that carries *context*: with OpenTelemetry, a
    client span ``POST`` under it (with the endpoint, never the path or query, which
    may hold a token); else the carried headers as they are."""
    if not context:
        yield AttemptSpan({})
        return
    otel = _opentelemetry()
    if otel is None:
        yield AttemptSpan(dict(context))
        return
    trace, propagate = otel
    parts = urllib.parse.urlsplit(url)
    attributes = {
        "http.request.method": "POST",
        "server.address": parts.hostname or "",
        "server.port": parts.port or (443 if parts.scheme == "https" else 80),
        "http.request.resend_count": max(0, attempt - 1),
    }
    tracer = _tracer()
    parent = propagate.extract(dict(context))
    with tracer.start_as_current_span(
        "POST", context=parent, kind=trace.SpanKind.CLIENT, attributes=attributes
    ) as span:
        headers: dict[str, str] = {}
        propagate.inject(headers)
        yield AttemptSpan({k: v for k, v in headers.items() if k in HEADERS}, span)
