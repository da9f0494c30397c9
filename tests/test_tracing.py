"""W3C trace context (xo_webhooks._trace): captured on the request thread, carried with
each hook (through retries, dead-letter records and ``replay``, Celery messages) and sent
with each attempt; and ``on_give_up``, the callback told of each hook given up on.

OpenTelemetry's SDK records the spans in memory. Its global tracer provider can be set
only once per process (the library asks ``trace.get_tracer``), so the module sets it once,
or adds its exporter to an SDK provider set before, and each test clears the exporter.
"Without OpenTelemetry" replaces the library's cached import with one that finds nothing.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import context, propagate, trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from werkzeug.test import Client

from xo_webhooks import WebhookMiddleware, _trace, load_settings
from xo_webhooks.sending.deadletter import read_records
from xo_webhooks.sending.policy import GIVE_UP_REASONS
from xo_webhooks.sending.replay import ReplayReport, replay

from .apps import CALL
from .helpers import assert_ledger
from .waiting import wait_until

#: An incoming request's context (the W3C specification's example).
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"

#: A call whose params hold a secret: records show it redacted.
SECRET_CALL = {**CALL, "params": {"id": "vm-1", "password": "hunter2"}}


# -- OpenTelemetry ------------------------------------------------------------------------


class Tracing:
    """The SDK's tracer for the test's own spans, and the spans finished so far."""

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        self.exporter = exporter
        self.tracer = trace.get_tracer("tests.test_tracing")

    def posts(self) -> list[ReadableSpan]:
        """The finished attempt spans ("POST"), in the order they started."""
        spans = self.exporter.get_finished_spans()
        return sorted((s for s in spans if s.name == "POST"), key=lambda s: s.start_time or 0)


@pytest.fixture
def otel(span_exporter: InMemorySpanExporter) -> Tracing:
    """OpenTelemetry's SDK recording spans, none recorded yet, no span active."""
    span_exporter.clear()
    assert not trace.get_current_span().get_span_context().is_valid
    return Tracing(span_exporter)


@pytest.fixture
def without_otel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The library behaves as if OpenTelemetry were not installed."""
    monkeypatch.setattr(_trace, "_opentelemetry", lambda: None)


def parse_traceparent(value: str) -> tuple[str, str, str]:
    """The trace id, parent id and flags of a version-00 ``traceparent``."""
    version, trace_id, parent_id, flags = value.split("-")
    assert (version, len(trace_id), len(parent_id), len(flags)) == ("00", 32, 16, 2), value
    return trace_id, parent_id, flags


def trace_hex(span: Any) -> str:
    return trace.format_trace_id(span.get_span_context().trace_id)


def span_hex(span: Any) -> str:
    return trace.format_span_id(span.get_span_context().span_id)


def traceparent_of(span: Any) -> str:
    """The ``traceparent`` of *span*'s context (the SDK may set flags beyond sampled)."""
    flags = int(span.get_span_context().trace_flags)
    return f"00-{trace_hex(span)}-{span_hex(span)}-{flags:02x}"


def sampled(flags: str) -> bool:
    return bool(int(flags, 16) & 0x01)


def trace_headers(hook: Any) -> dict[str, str]:
    """The W3C trace headers a receiver got."""
    return {name: hook.headers[name] for name in _trace.HEADERS if name in hook.headers}


def attempt_attributes(url: str, resend_count: int, status: int | None) -> dict[str, Any]:
    """The attributes of an attempt's span to the receiver at *url*."""
    port = int(url.rsplit(":", 1)[1].strip("/"))
    attributes = {
        "http.request.method": "POST",
        "server.address": "127.0.0.1",
        "server.port": port,
        "http.request.resend_count": resend_count,
    }
    if status is not None:
        attributes["http.response.status_code"] = status
    return attributes


# -- making calls -------------------------------------------------------------------------


def post_call(
    middleware: WebhookMiddleware, headers: dict[str, str] | None = None, call: Any = CALL
) -> None:
    """POST *call* through *middleware*, read the answer and close it (which queues the
    post hooks)."""
    response = Client(middleware).post("/api", json=call, headers=headers or {})
    try:
        assert response.status_code == 200
        assert response.get_json()["result"]["power_state"] == "Running"
    finally:
        response.close()


def make_call(middleware: WebhookMiddleware, how: str) -> None:
    """Trigger vm.start's hooks through a request, or ``middleware.call``."""
    if how == "call":
        with middleware.call("vm.start", params={"id": "vm-1"}) as call:
            call.result = {"power_state": "Running"}
    else:
        post_call(middleware)


# -- 1. an active span: each attempt is a client span under it ----------------------------


@pytest.mark.parametrize(
    ("how", "wait"),
    [
        pytest.param("request", False, id="request"),
        pytest.param("request", True, id="request-pre-hook-waited-for-on-the-request-thread"),
        pytest.param("call", False, id="middleware.call"),
    ],
)
def test_each_attempt_is_a_client_span_under_the_active_span_and_its_context_is_sent(
    otel, wrap, flask_app, webhook_receiver, how, wait
):
    hooks = [{"method": "vm.start", "type": "pre/post", "url": webhook_receiver.url,
              "waitForResponse": wait}]  # fmt: skip
    middleware = wrap(flask_app.wsgi_app, hooks=hooks)
    with otel.tracer.start_as_current_span("server", kind=SpanKind.SERVER) as server:
        make_call(middleware, how)
        # An attempt made on this thread ended its span and gave the server's back.
        assert trace.get_current_span() is server
    received = webhook_receiver.wait_for(2)
    assert middleware.flush(5)  # the attempts, and so their spans, are over

    posts = otel.posts()
    assert len(posts) == 2
    by_id = {span_hex(span): span for span in posts}
    assert sorted(hook.payload["type"] for hook in received) == ["post", "pre"]
    for hook in received:
        trace_id, parent_id, flags = parse_traceparent(hook.headers["traceparent"])
        assert trace_id == trace_hex(server) and sampled(flags)
        span = by_id.pop(parent_id)  # each hook's parent is its own attempt's span
        assert hook.headers["traceparent"] == traceparent_of(span)
        assert span.parent is not None
        assert span.parent.span_id == server.get_span_context().span_id
        assert span.kind is SpanKind.CLIENT
        assert dict(span.attributes or {}) == attempt_attributes(webhook_receiver.url, 0, 204)
        assert span.status.status_code is StatusCode.UNSET
        assert "tracestate" not in hook.headers  # the server span has none
    assert by_id == {}


@pytest.mark.parametrize(
    "continues",
    [
        pytest.param(True, id="server-span-continues-the-incoming-trace"),
        pytest.param(False, id="server-span-starts-its-own-trace"),
    ],
)
def test_the_active_span_wins_over_the_incoming_headers(
    otel, wrap, flask_app, webhook_receiver, continues
):
    # What a server instrumentation does: a server span under the incoming context (its
    # tracestate inherited), or a new trace when it does not trust the caller.
    incoming = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    parent = propagate.extract(incoming) if continues else context.Context()
    hooks = [{"method": "vm.start", "type": "pre", "url": webhook_receiver.url}]
    middleware = wrap(flask_app.wsgi_app, hooks=hooks)
    with otel.tracer.start_as_current_span("server", context=parent) as server:
        post_call(middleware, headers=incoming)
    (hook,) = webhook_receiver.wait_for(1)
    assert middleware.flush(5)
    (span,) = otel.posts()
    assert span.parent is not None
    assert span.parent.span_id == server.get_span_context().span_id
    assert hook.headers["traceparent"] == traceparent_of(span)
    if continues:
        assert trace_hex(span) == TRACE_ID
        assert hook.headers["tracestate"] == TRACESTATE
    else:
        assert trace_hex(span) != TRACE_ID
        assert "tracestate" not in hook.headers


def test_a_retried_hook_has_one_client_span_per_attempt(otel, wrap, flask_app, webhook_receiver):
    webhook_receiver.respond_with(503, 204)
    hooks = [{"method": "vm.start", "type": "pre", "url": webhook_receiver.url}]
    middleware = wrap(flask_app.wsgi_app, hooks=hooks, retry_schedule="10ms")
    with otel.tracer.start_as_current_span("server", kind=SpanKind.SERVER) as server:
        post_call(middleware)
    webhook_receiver.wait_for(1)
    assert middleware.flush(5)

    failed, delivered = otel.posts()
    for span in (failed, delivered):
        assert span.parent is not None
        assert span.parent.span_id == server.get_span_context().span_id
        assert span.kind is SpanKind.CLIENT
    assert dict(failed.attributes or {}) == attempt_attributes(webhook_receiver.url, 0, 503)
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "HTTP 503"
    assert dict(delivered.attributes or {}) == attempt_attributes(webhook_receiver.url, 1, 204)
    assert delivered.status.status_code is StatusCode.UNSET

    # Each attempt went out with its own span as the parent, under the same trace.
    attempts = webhook_receiver.attempts
    assert [a.status for a in attempts] == [503, 204]
    assert [a.headers["traceparent"] for a in attempts] == [
        traceparent_of(failed),
        traceparent_of(delivered),
    ]
    assert {trace_hex(failed), trace_hex(delivered)} == {trace_hex(server)}
    assert attempts[0].headers["webhook-id"] == attempts[1].headers["webhook-id"]


def test_an_attempt_without_an_answer_is_an_error_span_without_a_status_code(
    otel, wrap, flask_app, refused_url
):
    hooks = [{"method": "vm.start", "type": "pre", "url": refused_url}]
    middleware = wrap(flask_app.wsgi_app, hooks=hooks, retries=0)
    with otel.tracer.start_as_current_span("server", kind=SpanKind.SERVER):
        post_call(middleware)
    assert middleware.flush(5)
    (span,) = otel.posts()
    assert dict(span.attributes or {}) == attempt_attributes(refused_url, 0, None)
    assert span.status.status_code is StatusCode.ERROR
    assert (span.status.description or "").startswith("connection failed")


@pytest.mark.parametrize(
    ("url", "address", "port"),
    [
        pytest.param("http://127.0.0.1:8080/hook?token=s3cret", "127.0.0.1", 8080, id="port"),
        pytest.param("http://127.0.0.1/hook", "127.0.0.1", 80, id="http-default-port"),
        pytest.param("https://127.0.0.1/hook", "127.0.0.1", 443, id="https-default-port"),
        pytest.param("http://[::1]:9000/", "::1", 9000, id="ipv6"),
    ],
)
def test_an_attempt_span_names_the_endpoint_never_the_path_or_query(otel, url, address, port):
    # No request is made: the span is opened and finished as the sender would.
    with _trace.attempt_span({"traceparent": TRACEPARENT}, url, 3) as span:
        headers = span.headers
        span.finish(None, "timed out after 10 s")
    (post,) = otel.posts()
    assert dict(post.attributes or {}) == {
        "http.request.method": "POST",
        "server.address": address,
        "server.port": port,
        "http.request.resend_count": 2,
    }
    assert not any("hook" in str(v) or "s3cret" in str(v) for v in post.attributes.values())
    assert post.status.status_code is StatusCode.ERROR
    assert headers == {"traceparent": traceparent_of(post)}  # tracestate: none carried
    assert not trace.get_current_span().get_span_context().is_valid  # nothing left active


def test_an_attempt_span_without_a_context_is_none(otel):
    with _trace.attempt_span(None, "http://127.0.0.1:9/", 1) as span:
        assert span.headers == {}
        span.finish(204, None)
    assert otel.posts() == []


# -- 2. without OpenTelemetry: the incoming headers, as they are --------------------------


@pytest.mark.parametrize(
    ("incoming", "expected"),
    [
        pytest.param(
            {"traceparent": TRACEPARENT, "tracestate": TRACESTATE},
            {"traceparent": TRACEPARENT, "tracestate": TRACESTATE},
            id="traceparent-and-tracestate",
        ),
        pytest.param(
            {"traceparent": TRACEPARENT}, {"traceparent": TRACEPARENT}, id="traceparent-only"
        ),
        pytest.param(
            {"traceparent": "not-a-traceparent"},
            {"traceparent": "not-a-traceparent"},
            id="not-even-valid-forwarded-as-it-is",
        ),
        pytest.param({"tracestate": TRACESTATE}, {}, id="tracestate-alone-is-no-context"),
        pytest.param({}, {}, id="no-headers-none-sent"),
    ],
)
def test_without_opentelemetry_pre_and_post_hooks_forward_the_incoming_headers_unchanged(
    without_otel, wrap, flask_app, webhook_receiver, incoming, expected
):
    hooks = [{"method": "vm.start", "type": "pre/post", "url": webhook_receiver.url}]
    middleware = wrap(flask_app.wsgi_app, hooks=hooks)
    post_call(middleware, headers=incoming)
    received = webhook_receiver.wait_for(2)
    assert sorted(hook.payload["type"] for hook in received) == ["post", "pre"]
    for hook in received:
        assert trace_headers(hook) == expected


def test_without_opentelemetry_middleware_call_sends_no_trace_headers(
    without_otel, wrap, flask_app, webhook_receiver
):
    hooks = [{"method": "vm.start", "type": "pre/post", "url": webhook_receiver.url}]
    middleware = wrap(flask_app.wsgi_app, hooks=hooks)
    make_call(middleware, "call")
    for hook in webhook_receiver.wait_for(2):
        assert trace_headers(hook) == {}


# -- 3. OpenTelemetry, but no active span: the incoming context is the parent -------------


def test_without_an_active_span_the_incoming_context_is_each_attempts_parent(
    otel, wrap, flask_app, webhook_receiver
):
    hooks = [{"method": "vm.start", "type": "pre/post", "url": webhook_receiver.url}]
    middleware = wrap(flask_app.wsgi_app, hooks=hooks)
    post_call(middleware, headers={"traceparent": TRACEPARENT, "tracestate": TRACESTATE})
    received = webhook_receiver.wait_for(2)
    assert middleware.flush(5)

    by_id = {span_hex(span): span for span in otel.posts()}
    assert len(by_id) == 2
    for hook in received:
        # The incoming trace and its state go on; the parent is the attempt's span,
        # itself the child of the caller's (remote) span.
        trace_id, parent_id, flags = parse_traceparent(hook.headers["traceparent"])
        assert trace_id == TRACE_ID and sampled(flags)
        assert hook.headers["tracestate"] == TRACESTATE
        span = by_id.pop(parent_id)
        assert span.parent is not None and span.parent.is_remote
        assert trace.format_span_id(span.parent.span_id) == PARENT_ID
        assert span.kind is SpanKind.CLIENT
    assert by_id == {}


def test_with_the_api_but_no_sdk_the_incoming_headers_are_forwarded_unchanged(
    monkeypatch, wrap, flask_app, webhook_receiver
):
    # opentelemetry-api alone: its tracer makes no spans, the attempt keeps the carried
    # context as it is. (The SDK set globally by this module stands aside.)
    api_only = types.SimpleNamespace(
        get_current_span=trace.get_current_span,
        get_tracer=lambda *args, **kwargs: trace.NoOpTracer(),
        SpanKind=SpanKind,
    )
    monkeypatch.setattr(_trace, "_opentelemetry", lambda: (api_only, propagate))
    monkeypatch.setattr(_trace, "_tracer", api_only.get_tracer)  # it is cached
    incoming = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    hooks = [{"method": "vm.start", "type": "pre/post", "url": webhook_receiver.url}]
    middleware = wrap(flask_app.wsgi_app, hooks=hooks)
    post_call(middleware, headers=incoming)
    for hook in webhook_receiver.wait_for(2):
        assert trace_headers(hook) == incoming


def test_without_an_active_span_or_incoming_headers_no_context_and_no_span(
    otel, wrap, flask_app, webhook_receiver
):
    hooks = [{"method": "vm.start", "type": "pre/post", "url": webhook_receiver.url}]
    middleware = wrap(flask_app.wsgi_app, hooks=hooks)
    post_call(middleware)
    for hook in webhook_receiver.wait_for(2):
        assert trace_headers(hook) == {}
    assert middleware.flush(5)
    assert otel.posts() == []


# -- 4. the context travels: dead letters and replay, Celery messages ---------------------


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("active-span", id="opentelemetry-active-span"),
        pytest.param("incoming-headers", id="without-opentelemetry-incoming-headers"),
    ],
)
def test_the_context_travels_through_a_dead_letter_record_and_replay(
    otel, monkeypatch, wrap, flask_app, webhook_receiver, tmp_path, source
):
    dead = str(tmp_path / "dead.jsonl")
    hooks = [{"method": "vm.start", "type": "pre", "url": webhook_receiver.url}]
    webhook_receiver.respond_with(404)  # a final answer: given up on at once
    middleware = wrap(flask_app.wsgi_app, hooks=hooks, dead_letter=dead)
    if source == "active-span":
        with otel.tracer.start_as_current_span("server", kind=SpanKind.SERVER) as server:
            post_call(middleware)
        expected = {"traceparent": traceparent_of(server)}
    else:
        monkeypatch.setattr(_trace, "_opentelemetry", lambda: None)
        post_call(middleware, headers={"traceparent": TRACEPARENT, "tracestate": TRACESTATE})
        expected = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    middleware.close(5)  # the record is written
    (record,) = read_records(dead)
    assert record["trace"] == expected  # the carried context, not an attempt's

    webhook_receiver.clear()
    webhook_receiver.respond_with(204)
    otel.exporter.clear()
    assert replay(dead, load_settings(hooks, {})) == ReplayReport(read=1, delivered=1, failed=0)
    (hook,) = webhook_receiver.wait_for(1)
    assert hook.headers["webhook-id"] == record["id"]
    if source == "active-span":
        (span,) = otel.posts()  # the replayed attempt: a child of the original server span
        assert span.parent is not None
        assert span.parent.span_id == server.get_span_context().span_id
        assert trace_headers(hook) == {"traceparent": traceparent_of(span)}
        assert span.attributes is not None
        assert span.attributes["http.request.resend_count"] == 0
    else:
        assert trace_headers(hook) == expected
    assert not os.path.exists(dead) or read_records(dead) == []  # nothing written back


@pytest.fixture
def celery_worker(redis_server, webhook_receiver, tmp_path) -> Iterator[Any]:
    """An in-process Celery worker delivering to the receiver, its markers and breakers
    in the module's redis-server (skipped without one, or without the celery extra)."""
    pytest.importorskip("celery", reason="the celery extra is not installed")
    from xo_webhooks.sending.celery import Worker

    client = redis_server.client()
    client.flushall()  # no breaker state from another test
    client.close()
    hooks = [{"method": "vm.*", "type": "pre/post", "url": webhook_receiver.url}]
    settings = load_settings(
        hooks, {}, broker_url=redis_server.url, retries=2, backoff=0.5, timeout=2,
        dead_letter=str(tmp_path / "dead.jsonl"),
    )  # fmt: skip
    worker = Worker(settings)
    yield worker
    worker.sender.release()
    if worker._markers is not None:
        worker._markers.close()


@pytest.mark.parametrize(
    "with_otel", [pytest.param(True, id="opentelemetry"), pytest.param(False, id="without")]
)
def test_the_context_travels_in_a_celery_message_and_its_retry(
    otel, monkeypatch, celery_worker, webhook_receiver, with_otel
):
    from celery.exceptions import Retry

    from .test_celery_worker import FakeTask, message

    if not with_otel:
        monkeypatch.setattr(_trace, "_opentelemetry", lambda: None)
    carried = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    webhook_receiver.respond_with(503, 204)
    task = FakeTask()
    with pytest.raises(Retry):
        celery_worker.run(task, message(celery_worker, "post", trace=carried))
    ((asked),) = task.retries
    again = asked["kwargs"]["message"]
    assert again["trace"] == carried  # the retry's message carries it on
    assert celery_worker.run(FakeTask(), again) == "delivered"

    attempts = webhook_receiver.wait_for_attempts(2)
    if not with_otel:
        assert [trace_headers(a) for a in attempts] == [carried, carried]
        return
    posts = otel.posts()
    assert [p.attributes["http.request.resend_count"] for p in posts if p.attributes] == [0, 1]
    for attempt, span in zip(attempts, posts, strict=True):
        assert trace_headers(attempt) == {
            "traceparent": traceparent_of(span),
            "tracestate": TRACESTATE,
        }
        assert trace_hex(span) == TRACE_ID and span.parent is not None
        assert trace.format_span_id(span.parent.span_id) == PARENT_ID


# -- 5. on_give_up ------------------------------------------------------------------------


class Reasons:
    """An observer noting why each hook was given up on."""

    def __init__(self) -> None:
        self.reasons: list[str | None] = []

    def given_up(self, origin: str, delivery: Any, record: dict[str, Any]) -> None:
        self.reasons.append(delivery.reason)


@pytest.mark.parametrize(
    "store", [pytest.param(True, id="dead-letter-file"), pytest.param(False, id="no-store")]
)
def test_on_give_up_gets_each_given_up_hooks_redacted_record(
    wrap, flask_app, refused_url, tmp_path, store
):
    dead = str(tmp_path / "dead.jsonl")
    records: list[dict[str, Any]] = []
    stored_first: list[bool] = []

    def on_give_up(record: dict[str, Any]) -> None:
        if store:  # called once the store was written
            stored_first.append(record["id"] in {r["id"] for r in read_records(dead)})
        records.append(record)

    hooks = [{"method": "vm.start", "type": "pre/post", "url": refused_url}]
    settings = {"dead_letter": dead} if store else {}
    middleware = wrap(flask_app.wsgi_app, hooks=hooks, on_give_up=on_give_up, retries=0, **settings)
    reasons = Reasons()
    middleware.observe(reasons)
    post_call(middleware, headers={"traceparent": TRACEPARENT}, call=SECRET_CALL)
    middleware.close(5)  # joins the thread that records given-up hooks and calls back

    assert sorted(r["payload"]["type"] for r in records) == ["post", "pre"]
    for record in records:
        assert set(record) == {
            "id", "url", "format", "payload", "attempts", "lastError", "failedAt", "trace", "hook"
        }  # fmt: skip
        assert record["url"] == refused_url and record["format"] == "json"
        assert record["payload"]["params"] == {"id": "vm-1", "password": "***"}
        assert record["lastError"]
        assert record["trace"] == {"traceparent": TRACEPARENT}
    assert reasons.reasons and set(reasons.reasons) <= set(GIVE_UP_REASONS)
    stats = middleware.stats()
    assert_ledger(stats)
    assert (stats["failed"], stats["dead_lettered"], stats["lost"]) == (
        (2, 2, 0) if store else (2, 0, 2)
    )
    if store:
        assert stored_first == [True, True]
        written = read_records(dead)
        assert sorted(r["id"] for r in written) == sorted(r["id"] for r in records)
        assert all(r["payload"]["params"]["password"] == "***" for r in written)


def test_an_on_give_up_that_raises_is_logged_once_and_delivery_goes_on(
    wrap, flask_app, refused_url, webhook_receiver, caplog
):
    called: list[dict[str, Any]] = []

    def on_give_up(record: dict[str, Any]) -> None:
        called.append(record)
        raise RuntimeError("the pager is down")

    hooks = [
        {"method": "vm.start", "type": "pre/post", "url": refused_url},
        {"method": "vm.start", "type": "post", "url": webhook_receiver.url},
    ]
    middleware = wrap(flask_app.wsgi_app, hooks=hooks, on_give_up=on_give_up, retries=0)
    caplog.set_level(logging.ERROR, logger="xo_webhooks")
    post_call(middleware)
    wait_until(lambda: len(called) == 2, what="the first call's hooks to be given up on")
    for _ in range(2):  # after the callback raised
        post_call(middleware)
    webhook_receiver.wait_for(3)
    wait_until(lambda: len(called) == 6, what="every call's hooks to be given up on")
    assert middleware.flush(5)
    assert all(r["lastError"] and "trace" not in r for r in called)  # no context: no key

    stats = middleware.stats()
    assert_ledger(stats)
    assert (stats["accepted"], stats["delivered"], stats["failed"], stats["pending"]) == (
        9, 3, 6, 0,
    )  # fmt: skip
    logged = [r for r in caplog.records if "given_up" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert logged[0].exc_info is not None
    assert "the pager is down" in str(logged[0].exc_info[1])
