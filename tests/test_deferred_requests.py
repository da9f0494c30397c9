"""A hooked request's body is parsed, and its hooks built, on the thread dispatcher's
intake thread, not on the request thread (WebhookMiddleware._track_later,
ThreadDispatcher.defer, xo_webhooks.sending.intake).

What it promises, end to end with the default ThreadDispatcher and a real receiver:

- the request thread only scans the body; ``parse_calls`` runs on ``xo-webhooks-intake``
  (and still on the request thread for a ``waitForResponse`` hook);
- a call's pre hook is submitted before its post hook, whatever the concurrency, and
  whether the intake queues the jobs or, when full, the request thread runs them;
- what only the request thread can note reaches the hooks: the ``user_resolver``'s
  user, the late user the app sets, the incoming trace headers, the active span;
- ``flush()``, ``stats()``, ``endpoint_stats()`` and ``close()`` see the hooks of the
  requests whose jobs still wait;
- the observed response reports once, however the app or the server ends it.

Where a test holds the intake thread on a job of its own (:class:`Held`), it lets it go
only once the thread it watches has entered the intake (:func:`released_once_inside`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from werkzeug.test import Client, EnvironBuilder
from werkzeug.wsgi import ClosingIterator

from xo_webhooks import WebhookMiddleware, _trace
from xo_webhooks.request import middleware as middleware_module
from xo_webhooks.sending.intake import Intake

from .apps import CALL, RESULT, create_app, plain_app
from .helpers import assert_ledger
from .waiting import wait_until

pytestmark = pytest.mark.usefixtures("no_leaked_threads")

INTAKE = "xo-webhooks-intake"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


def hooks_for(url: str, method: str = "vm.start", kind: str = "pre/post", **extra: Any):
    return [{"method": method, "type": kind, "url": url, **extra}]


# -- helpers ------------------------------------------------------------------------------


class Threads:
    """Names of the threads something ran on, in order (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: list[str] = []

    def note(self) -> None:
        with self._lock:
            self._names.append(threading.current_thread().name)

    @property
    def names(self) -> list[str]:
        with self._lock:
            return list(self._names)


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> Threads:
    """The threads the middleware's ``parse_calls`` ran on."""
    threads = Threads()
    original = middleware_module.parse_calls

    def recording(body: bytes) -> Any:
        threads.note()
        return original(body)

    monkeypatch.setattr(middleware_module, "parse_calls", recording)
    return threads


def noting(app: Any, threads: Threads) -> Any:
    """*app*, noting the thread each request runs on."""

    def noted(environ: Any, start_response: Any) -> Any:
        threads.note()
        return app(environ, start_response)

    return noted


class Held:
    """A job deferred to the intake that holds its thread until :meth:`release`."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self._release = threading.Event()

    def __call__(self) -> None:
        self.started.set()
        assert self._release.wait(10), "the held job was never released"

    def release(self) -> None:
        self._release.set()


def hold_intake(middleware: WebhookMiddleware) -> Held:
    """Keep the middleware's intake thread busy (as with an earlier request's job)."""
    held = Held()
    middleware.dispatcher.defer(held)  # type: ignore[attr-defined]
    assert held.started.wait(10)
    return held


@contextlib.contextmanager
def released_once_inside(held: Held, function: Callable[..., Any]) -> Iterator[None]:
    """Release *held* as soon as this thread enters *function* (an Intake method that
    then waits for the job under way), or when the block ends if it never gets there.
    (Watching the thread's stack from another one, with ``sys._current_frames()``, hung
    CPython 3.11 once while a thread was being started.)"""
    name, me = function.__name__, threading.current_thread()
    original = getattr(Intake, name)

    def entered(self: Intake, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is me:
            held.release()
        return original(self, *args, **kwargs)

    setattr(Intake, name, entered)
    try:
        yield
    finally:
        setattr(Intake, name, original)
        held.release()


def post_call(middleware: Any, call: Any = CALL, **kwargs: Any) -> Any:
    """POST *call* in-process, read the whole answer and close it, as a server does:
    then the request is over and its post hooks are handed on."""
    response = Client(middleware).post("/api", json=call, **kwargs)
    try:
        return response.status_code, response.get_data()
    finally:
        response.close()


def by_call(hooks: list[Any]) -> dict[str, list[dict[str, Any]]]:
    """The payloads received, by call id, in arrival order."""
    calls: dict[str, list[dict[str, Any]]] = {}
    for hook in hooks:
        calls.setdefault(hook.payload["callId"], []).append(hook.payload)
    return calls


class CountsFinished:
    """Counts the responses the server has closed: a request is over, its post hooks
    handed on, only then (after the client already has its answer)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._lock = threading.Lock()
        self.finished = 0

    def __call__(self, environ: Any, start_response: Any) -> Any:
        return ClosingIterator(self.app(environ, start_response), self._done)

    def _done(self) -> None:
        with self._lock:
            self.finished += 1


# -- where the body is parsed -------------------------------------------------------------


@pytest.mark.parametrize(
    "wait", [pytest.param(False, id="deferred"), pytest.param(True, id="waitForResponse")]
)
def test_the_body_is_parsed_on_the_intake_thread_unless_a_hook_waits(
    webhook_receiver, serve, wrap, parsed, wait
):
    requests_on = Threads()
    app = create_app()
    hooks = hooks_for(webhook_receiver.url, waitForResponse=wait)
    app.wsgi_app = middleware = wrap(noting(app.wsgi_app, requests_on), hooks=hooks)
    url = serve(app).url + "/api"
    answer = requests.post(url, json=CALL, timeout=10)
    assert answer.json()["result"] == {"id": "vm-1", "power_state": "Running"}
    pre, post = webhook_receiver.wait_for(2)  # nothing here drains the intake
    assert (pre.payload["type"], post.payload["type"]) == ("pre", "post")
    assert post.payload["result"] == {"id": "vm-1", "power_state": "Running"}
    (request_thread,) = requests_on.names
    assert request_thread not in (INTAKE, threading.current_thread().name)
    assert parsed.names == [request_thread if wait else INTAKE]  # parsed once
    assert middleware.flush(10)
    assert parsed.names == [request_thread if wait else INTAKE]


def test_a_body_with_a_json_escape_is_parsed_on_the_request_thread(webhook_receiver, wrap, parsed):
    # The scan cannot read escapes: the body is parsed where it arrives, hooks all the same.
    middleware = wrap(plain_app, hooks=hooks_for(webhook_receiver.url))
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "vm.st\\u0061rt"}'
    response = Client(middleware).post("/api", data=body, content_type="application/json")
    response.get_data()
    response.close()
    assert parsed.names == [threading.current_thread().name]
    pre, post = webhook_receiver.wait_for(2)
    assert pre.payload["method"] == post.payload["method"] == "vm.start"


# -- order --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "max_jobs",
    [
        pytest.param(None, id="default-intake"),
        pytest.param(1, id="intake-of-one-job"),
        pytest.param(0, id="intake-always-full"),
    ],
)
def test_many_concurrent_calls_each_get_pre_then_post(
    webhook_receiver, serve, wrap, parsed, max_jobs
):
    calls = 40
    requests_on = Threads()
    app = create_app()
    middleware = wrap(noting(app.wsgi_app, requests_on), hooks=hooks_for(webhook_receiver.url))
    if max_jobs is not None:  # full: the request thread runs what waits, then its job
        middleware.dispatcher._intake = Intake(max_jobs=max_jobs)  # type: ignore[attr-defined]
    app.wsgi_app = finished = CountsFinished(middleware)
    url = serve(app).url + "/api"

    def call(n: int) -> Any:
        body = {"jsonrpc": "2.0", "id": n, "method": "vm.start", "params": {"id": f"vm-{n}"}}
        return requests.post(url, json=body, timeout=30).json()

    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(call, range(calls)))
    assert [a["result"]["id"] for a in answers] == [f"vm-{n}" for n in range(calls)]

    hooks = webhook_receiver.wait_for(2 * calls, timeout=30)
    received = by_call(hooks)
    assert len(received) == calls
    for payloads in received.values():
        pre, post = payloads  # in arrival order
        assert (pre["type"], post["type"]) == ("pre", "post")
        assert pre["params"] == post["params"]
        assert post["result"] == {"id": pre["params"]["id"], "power_state": "Running"}
    assert sorted(p[0]["params"]["id"] for p in received.values()) == sorted(
        f"vm-{n}" for n in range(calls)
    )
    assert len(parsed.names) == calls  # once per request
    if max_jobs == 0:
        assert set(parsed.names) <= set(requests_on.names)  # never queued
    elif max_jobs is None:
        assert set(parsed.names) == {INTAKE}

    wait_until(lambda: finished.finished == calls, what="every response to be closed")
    assert middleware.flush(10)
    stats = middleware.stats()
    assert stats["accepted"] == stats["delivered"] == 2 * calls
    assert_ledger(stats)


# -- the readers see the hooks of requests whose jobs still wait --------------------------


@pytest.mark.parametrize(
    "read",
    [
        pytest.param(lambda m: m.flush(10), id="flush"),
        pytest.param(lambda m: m.endpoint_stats(), id="endpoint_stats"),
        pytest.param(lambda m: m.stats(), id="stats"),
    ],
)
def test_a_reader_right_after_the_response_counts_its_hooks(webhook_receiver, wrap, read):
    middleware = wrap(plain_app, hooks=hooks_for(webhook_receiver.url))
    held = hold_intake(middleware)  # busy with an earlier request's job
    for _ in range(3):
        assert post_call(middleware) == (200, RESULT)
    with released_once_inside(held, Intake.drain):
        read(middleware)
        stats = middleware.stats()
    assert stats["accepted"] == 2 * 3
    assert_ledger(stats)


# -- which hooks --------------------------------------------------------------------------


def test_a_post_only_hook_gets_its_post_and_the_body_is_parsed_once(webhook_receiver, wrap, parsed):
    middleware = wrap(plain_app, hooks=hooks_for(webhook_receiver.url, kind="post"))
    assert post_call(middleware) == (200, RESULT)
    (post,) = webhook_receiver.wait_for(1)
    assert post.payload["type"] == "post" and post.payload["result"] == "ok"
    assert post.payload["params"] == {"id": "vm-1"}
    assert parsed.names == [INTAKE]  # by the post job: there is no pre job
    assert middleware.flush(10)
    assert middleware.stats()["accepted"] == 1
    assert len(webhook_receiver.attempts) == 1


def test_a_pre_only_hook_leaves_the_response_untouched(webhook_receiver, wrap, parsed):
    answer = [RESULT]

    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "application/json")])
        return answer

    middleware = wrap(app, hooks=hooks_for(webhook_receiver.url, kind="pre"))
    environ = EnvironBuilder(
        method="POST", path="/api", data=json.dumps(CALL), content_type="application/json"
    ).get_environ()
    assert middleware(environ, lambda status, headers, exc_info=None: None) is answer
    (pre,) = webhook_receiver.wait_for(1)
    assert pre.payload["type"] == "pre"
    assert parsed.names == [INTAKE]


def test_a_method_member_inside_params_sends_no_hook(webhook_receiver, wrap, parsed):
    # The scan sees "method": "vm.start" (in the params) and defers; the parse finds
    # that the call is "other".
    body = {"jsonrpc": "2.0", "id": 1, "method": "other", "params": {"method": "vm.start"}}

    def echo(environ: Any, start_response: Any) -> Any:
        got = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'{"jsonrpc": "2.0", "id": 1, "result": ' + got + b"}"]

    middleware = wrap(echo, hooks=hooks_for(webhook_receiver.url))
    status, answer = post_call(middleware, call=body)
    assert (status, answer) == post_call(echo, call=body)  # unchanged
    assert json.loads(answer)["result"] == body
    assert middleware.flush(10)
    assert len(parsed.names) == 1  # by the intake thread, or by flush() if it got there first
    assert middleware.stats()["accepted"] == 0
    assert webhook_receiver.attempts == []


def test_the_intake_counts_the_body_a_post_only_job_holds(webhook_receiver, wrap, parsed):
    middleware = wrap(plain_app, hooks=hooks_for(webhook_receiver.url, kind="post"))
    # A post job holds the request body (no pre job took it) and the captured answer.
    one_job = len(json.dumps(CALL).encode()) + len(RESULT)  # as werkzeug's client sends it
    middleware.dispatcher._intake = Intake(max_bytes=one_job)  # type: ignore[attr-defined]
    held = hold_intake(middleware)
    assert post_call(middleware) == (200, RESULT)  # its job waits, holding the body
    with released_once_inside(held, Intake.put):
        # Room for one job only: this request's thread runs the jobs itself.
        assert post_call(middleware) == (200, RESULT)
    assert len(webhook_receiver.wait_for(2)) == 2
    assert threading.current_thread().name in parsed.names


def test_an_observer_that_reads_endpoint_stats_loses_no_hook(webhook_receiver, wrap):
    middleware = wrap(plain_app, hooks=hooks_for(webhook_receiver.url))

    class Gauge:
        """Exports per-endpoint gauges as hooks are accepted (now on the intake thread)."""

        def accepted(self, origin: str) -> None:
            middleware.endpoint_stats()

    middleware.observe(Gauge())
    held = hold_intake(middleware)
    assert post_call(middleware) == (200, RESULT)  # its pre and post jobs wait
    done = threading.Event()
    middleware.dispatcher.defer(done.set)  # type: ignore[attr-defined]
    held.release()
    assert done.wait(10)  # every job has run
    assert middleware.stats()["accepted"] == 2
    assert [h.payload["type"] for h in webhook_receiver.wait_for(2)] == ["pre", "post"]


# -- users --------------------------------------------------------------------------------


def test_the_resolvers_user_and_the_late_user_reach_the_deferred_hooks(
    webhook_receiver, wrap, parsed
):
    app = create_app()
    hooks = hooks_for(webhook_receiver.url, method="session.signIn")
    middleware = wrap(app.wsgi_app, hooks=hooks, user_resolver=lambda environ: ("u1", "alice"))
    call = {"jsonrpc": "2.0", "id": 1, "method": "session.signIn",
            "params": {"username": "bob@example.org", "password": "pw"}}  # fmt: skip
    assert post_call(middleware, call=call)[0] == 200
    pre, post = (hook.payload for hook in webhook_receiver.wait_for(2))
    assert (pre["userId"], pre["userName"]) == ("u1", "alice")
    assert (post["userId"], post["userName"]) == ("u-42", "bob@example.org")  # set by the app
    assert parsed.names == [INTAKE]


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param({"id": "u1", "name": "alice"}, id="dict"),
        pytest.param(("u1", "alice", "admin"), id="three-items"),
        pytest.param((True, "alice"), id="bool-id"),
        pytest.param(("u1", b"alice"), id="bytes-name"),
    ],
)
def test_a_resolver_giving_garbage_is_logged_once_and_sends_no_user(
    webhook_receiver, wrap, parsed, caplog, garbage
):
    middleware = wrap(plain_app, hooks=hooks_for(webhook_receiver.url),
                      user_resolver=lambda environ: garbage)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="xo_webhooks"):
        for _ in range(3):
            assert post_call(middleware) == (200, RESULT)
        hooks = webhook_receiver.wait_for(6)
        assert middleware.flush(10)
    for hook in hooks:
        assert (hook.payload["userId"], hook.payload["userName"]) == (None, None)
    warnings = [r for r in caplog.records if "unusable user" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].getMessage().startswith("the user_resolver gave an unusable user")
    assert warnings[0].threadName == INTAKE  # checked off the request thread
    assert set(parsed.names) == {INTAKE}


def test_the_pre_hook_has_the_user_as_the_resolver_gave_it(webhook_receiver, wrap):
    # A resolver may give a list (documented: "a pair (tuple or list)"), here one the
    # app fills in at sign-in, as a session object would.
    def app(environ: Any, start_response: Any) -> Any:
        environ["app.user"][:] = ["u-42", "bob"]  # the app signs the caller in
        return plain_app(environ, start_response)

    def resolver(environ: Any) -> Any:
        return environ.setdefault("app.user", [None, "anonymous"])

    middleware = wrap(app, hooks=hooks_for(webhook_receiver.url, kind="pre"),
                      user_resolver=resolver)  # fmt: skip
    held = hold_intake(middleware)  # the intake is busy while the app runs
    assert post_call(middleware) == (200, RESULT)
    held.release()
    (pre,) = webhook_receiver.wait_for(1)
    # On the synchronous path (and before this change) the pre hook had the user as
    # it was when the request arrived.
    assert (pre.payload["userId"], pre.payload["userName"]) == (None, "anonymous")


# -- trace --------------------------------------------------------------------------------


def trace_headers(hook: Any) -> dict[str, str]:
    return {name: hook.headers[name] for name in _trace.HEADERS if name in hook.headers}


def test_the_incoming_trace_headers_reach_the_deferred_hooks(
    monkeypatch, webhook_receiver, wrap, parsed
):
    monkeypatch.setattr(_trace, "_opentelemetry", lambda: None)  # as without OpenTelemetry
    middleware = wrap(plain_app, hooks=hooks_for(webhook_receiver.url))
    held = hold_intake(middleware)  # the hooks are built after the request is over
    incoming = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    assert post_call(middleware, headers=incoming) == (200, RESULT)
    held.release()
    received = webhook_receiver.wait_for(2)
    assert [hook.payload["type"] for hook in received] == ["pre", "post"]
    for hook in received:
        assert trace_headers(hook) == incoming
    assert parsed.names == [INTAKE]


def test_the_active_span_of_the_request_thread_is_the_parent_of_the_deferred_hooks(
    span_exporter, webhook_receiver, wrap, parsed
):
    from opentelemetry import trace

    span_exporter.clear()
    middleware = wrap(plain_app, hooks=hooks_for(webhook_receiver.url))
    held = hold_intake(middleware)
    tracer = trace.get_tracer("tests.test_deferred_requests")
    with tracer.start_as_current_span("server", kind=trace.SpanKind.SERVER) as server:
        # Headers the server span wins over.
        assert post_call(middleware, headers={"traceparent": TRACEPARENT}) == (200, RESULT)
    assert not trace.get_current_span().get_span_context().is_valid
    held.release()  # only now, on another thread, are the hooks built
    received = webhook_receiver.wait_for(2)
    assert middleware.flush(10)  # the attempts, and so their spans, are over
    assert parsed.names == [INTAKE]

    attempts = {
        span.get_span_context().span_id: span
        for span in span_exporter.get_finished_spans()
        if span.name == "POST"
    }
    assert len(attempts) == 2
    server_context = server.get_span_context()
    for hook in received:
        version, trace_id, parent_id, flags = hook.headers["traceparent"].split("-")
        assert trace_id == trace.format_trace_id(server_context.trace_id)
        attempt = attempts.pop(int(parent_id, 16))  # the hook's parent: its attempt
        assert attempt.parent is not None
        assert attempt.parent.span_id == server_context.span_id  # whose parent: the server
    assert attempts == {}


# -- close --------------------------------------------------------------------------------


def test_close_submits_the_hooks_of_the_jobs_still_waiting(webhook_receiver, wrap):
    calls = 5
    middleware = wrap(plain_app, hooks=hooks_for(webhook_receiver.url))
    held = hold_intake(middleware)
    for _ in range(calls):
        assert post_call(middleware) == (200, RESULT)
    assert webhook_receiver.attempts == []  # every job waits behind the held one
    with released_once_inside(held, Intake.close):
        middleware.close(10)
    assert len(webhook_receiver.received) == 2 * calls  # close() waited for them
    stats = middleware.stats()
    assert stats["accepted"] == stats["delivered"] == 2 * calls
    assert stats["failed"] == stats["pending"] == 0
    assert_ledger(stats)
    for payloads in by_call(webhook_receiver.received).values():
        assert [p["type"] for p in payloads] == ["pre", "post"]


def test_a_request_after_close_still_reaches_the_app(webhook_receiver, wrap, parsed):
    middleware = wrap(plain_app, hooks=hooks_for(webhook_receiver.url))
    middleware.close(5)
    assert post_call(middleware) == (200, RESULT)  # its jobs run on this thread
    assert parsed.names == [threading.current_thread().name]
    stats = middleware.stats()
    assert stats["accepted"] == stats["failed"] == 2  # given up: the dispatcher is closed
    assert_ledger(stats)
    assert webhook_receiver.attempts == []


# -- the observed response ----------------------------------------------------------------


class AppError(Exception):
    pass


class Chunks:
    """A response iterable that counts its close() calls, raising at *fail_at*."""

    def __init__(self, chunks: list[bytes], fail_at: int | None = None) -> None:
        self.chunks, self.fail_at, self.closed = chunks, fail_at, 0

    def __iter__(self) -> Iterator[bytes]:
        for n, chunk in enumerate(self.chunks):
            if n == self.fail_at:
                raise AppError("broke mid-response")
            yield chunk

    def close(self) -> None:
        self.closed += 1


def serve_once(middleware: Any, stop_after: int | None = None) -> tuple[str | None, bytes]:
    """Call *middleware* as a WSGI server does: iterate the response (stopping after
    *stop_after* chunks, as when the client went away), then close it."""
    environ = EnvironBuilder(
        method="POST", path="/api", data=json.dumps(CALL), content_type="application/json"
    ).get_environ()
    statuses: list[str] = []
    result = middleware(environ, lambda status, headers, exc_info=None: statuses.append(status))
    chunks = []
    try:
        for chunk in result:
            chunks.append(chunk)
            if stop_after is not None and len(chunks) == stop_after:
                break
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return (statuses[-1] if statuses else None), b"".join(chunks)


def test_an_app_raising_before_it_returns_gives_one_post_with_its_error(
    webhook_receiver, wrap, parsed
):
    def app(environ: Any, start_response: Any) -> Any:
        raise AppError("before any response")

    middleware = wrap(app, hooks=hooks_for(webhook_receiver.url))
    with pytest.raises(AppError, match="before any response"):
        serve_once(middleware)
    pre, post = (hook.payload for hook in webhook_receiver.wait_for(2))
    assert (pre["type"], post["type"]) == ("pre", "post")
    assert post["error"] == {"code": -32603, "message": "AppError: before any response"}
    assert_one_post(middleware, webhook_receiver, parsed)


def test_a_list_response_gives_one_post_with_its_result(webhook_receiver, wrap, parsed):
    middleware = wrap(plain_app, hooks=hooks_for(webhook_receiver.url))
    assert serve_once(middleware) == ("200 OK", RESULT)
    pre, post = (hook.payload for hook in webhook_receiver.wait_for(2))
    assert post["result"] == "ok" and "error" not in post
    assert_one_post(middleware, webhook_receiver, parsed)


@pytest.mark.parametrize(
    ("stop_after", "fail_at", "outcome"),
    [
        pytest.param(None, None, {"result": "ok"}, id="read-to-the-end"),
        pytest.param(
            1, None,
            {"error": {"code": -32603, "message": "the response is not a JSON-RPC response"}},
            id="stopped-early-by-the-server",
        ),
        pytest.param(
            None, 1, {"error": {"code": -32603, "message": "AppError: broke mid-response"}},
            id="raising-mid-response",
        ),
    ],
)  # fmt: skip
def test_a_streamed_response_gives_one_post_and_is_closed_once(
    webhook_receiver, wrap, parsed, stop_after, fail_at, outcome
):
    body = Chunks([RESULT[:10], RESULT[10:]], fail_at=fail_at)

    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "application/json")])
        return body

    middleware = wrap(app, hooks=hooks_for(webhook_receiver.url))
    if fail_at is None:
        status, sent = serve_once(middleware, stop_after)
        assert sent == (RESULT if stop_after is None else RESULT[:10])
    else:
        with pytest.raises(AppError):
            serve_once(middleware, stop_after)
    assert body.closed == 1
    pre, post = (hook.payload for hook in webhook_receiver.wait_for(2))
    assert {k: post[k] for k in ("result", "error") if k in post} == outcome
    assert_one_post(middleware, webhook_receiver, parsed)


def assert_one_post(middleware: Any, webhook_receiver: Any, parsed: Threads) -> None:
    """Nothing more will come: one pre and one post hook, the body parsed once, off the
    request thread."""
    assert middleware.flush(10)
    assert [hook.payload["type"] for hook in webhook_receiver.received] == ["pre", "post"]
    assert middleware.stats()["accepted"] == 2
    assert parsed.names == [INTAKE]


def test_a_dispatcher_of_ones_own_with_defer_gets_the_jobs(webhook_receiver, wrap):
    # The documented signature, defer(job, size, now): here it runs each job at once,
    # on a ThreadDispatcher of its own that sends the hooks.
    class RunsJobsAtOnce:
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.deferred: list[tuple[int, bool]] = []

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def defer(self, job: Callable[[], object], size: int, now: bool) -> None:
            self.deferred.append((size, now))
            job()

    inner = wrap(plain_app, hooks=hooks_for(webhook_receiver.url)).dispatcher
    mine = RunsJobsAtOnce(inner)
    middleware = wrap(plain_app, hooks=hooks_for(webhook_receiver.url), dispatcher=mine)
    assert post_call(middleware) == (200, RESULT)
    pre, post = webhook_receiver.wait_for(2)
    assert (pre.payload["type"], post.payload["type"]) == ("pre", "post")
    (pre_size, pre_now), (post_size, post_now) = mine.deferred
    assert pre_size == len(json.dumps(CALL).encode()) and pre_now is False
    # plain_app answers a list, observed at once: no need to wake the thread before
    # the server has sent it.
    assert post_size == len(RESULT) and post_now is False
