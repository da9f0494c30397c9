"""The WSGI pitfalls (STYLE.md), each checked inside werkzeug's LintMiddleware and
wsgiref's validator, in-process. A recording dispatcher stands in for delivery here:
these tests are about the request path; delivery has its own, over real HTTP."""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings
from wsgiref.util import FileWrapper
from wsgiref.validate import validator

import pytest
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import Client, EnvironBuilder

from xo_webhooks import WebhookMiddleware
from xo_webhooks.request.wsgi import Capture, read_body

from .apps import CALL, RESULT, late_start_app, plain_app
from .helpers import HOOKS, RecordingDispatcher


class Closing:
    """A response iterable that counts its close() calls."""

    def __init__(self, chunks, fail_at=None):
        self.chunks, self.fail_at, self.closed = chunks, fail_at, 0

    def __iter__(self):
        for n, chunk in enumerate(self.chunks):
            if n == self.fail_at:
                raise ValueError("broke mid-response")
            yield chunk

    def close(self):
        self.closed += 1


def write_app(environ, start_response):
    write = start_response("200 OK", [("Content-Type", "application/json")])
    write(RESULT[:20])
    return [RESULT[20:]]


def raising_app(environ, start_response):
    raise KeyError("before any response")


def exc_info_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/json")])
    try:
        raise RuntimeError("changed my mind")
    except RuntimeError:
        start_response(
            "500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info()
        )
    return [b"oops"]


def wrappers():
    return [
        pytest.param(lambda app: LintMiddleware(app), id="lint-outside"),
        pytest.param(lambda app: validator(app), id="validator-outside"),
    ]


def build(app, outer, dispatcher=None):
    dispatcher = dispatcher or RecordingDispatcher()
    middleware = WebhookMiddleware(validator(app), hooks=HOOKS, dispatcher=dispatcher, environ={})
    return Client(outer(middleware)), dispatcher


def post(client, body=None):
    data = json.dumps(CALL).encode() if body is None else body
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lint warns about things the *client* does
        response = client.post("/", data=data, content_type="application/json")
        try:
            response.get_data()
        finally:
            response.close()  # as a server does, also when the body raises
    return response


@pytest.mark.parametrize("outer", wrappers())
@pytest.mark.parametrize(
    "app", [plain_app, late_start_app, write_app], ids=["plain", "late-start-response", "write"]
)
def test_response_unchanged_and_post_has_result(app, outer):
    client, dispatcher = build(app, outer)
    response = post(client)
    assert response.status_code == 200
    assert response.get_data() == RESULT
    assert [p["result"] for p in dispatcher.payloads("post")] == ["ok"]
    assert len(dispatcher.payloads("pre")) == 1


@pytest.mark.parametrize("outer", wrappers())
def test_app_raising_before_response_propagates_unchanged(outer):
    client, dispatcher = build(raising_app, outer)
    with pytest.raises(KeyError, match="before any response"):
        post(client)
    (payload,) = dispatcher.payloads("post")
    assert payload["error"]["code"] == -32603
    assert "KeyError" in payload["error"]["message"]


@pytest.mark.parametrize("outer", wrappers())
def test_exc_info_reaches_a_server_that_reraises_it(outer):
    # werkzeug's test client re-raises any exc_info it is given: it arrives intact.
    client, dispatcher = build(exc_info_app, outer)
    with pytest.raises(RuntimeError, match="changed my mind"):
        post(client)


def test_exc_info_reaches_a_server_that_accepts_it():
    calls = []

    def start_response(status, headers, exc_info=None):
        calls.append((status, exc_info))
        return lambda data: None

    dispatcher = RecordingDispatcher()
    middleware = WebhookMiddleware(exc_info_app, hooks=HOOKS, dispatcher=dispatcher, environ={})
    environ = EnvironBuilder(method="POST", json=CALL).get_environ()
    response = middleware(environ, start_response)
    assert response == [b"oops"]  # a list is handed on as it is
    assert [status for status, _ in calls] == ["200 OK", "500 Internal Server Error"]
    assert calls[0][1] is None and calls[1][1][0] is RuntimeError
    (payload,) = dispatcher.payloads("post")
    assert "500" in payload["error"]["message"]


@pytest.mark.parametrize("fail_at", [None, 1], ids=["complete", "raises-mid-iteration"])
def test_app_iterable_closed_exactly_once(fail_at):
    iterables = []

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/json")])
        iterables.append(Closing([RESULT[:5], RESULT[5:]], fail_at=fail_at))
        return iterables[-1]

    dispatcher = RecordingDispatcher()
    middleware = WebhookMiddleware(app, hooks=HOOKS, dispatcher=dispatcher, environ={})
    environ = EnvironBuilder(method="POST", json=CALL).get_environ()
    response = middleware(environ, lambda status, headers, exc_info=None: None)
    try:
        if fail_at is None:
            assert b"".join(response) == RESULT
        else:
            with pytest.raises(ValueError, match="broke mid-response"):
                list(response)
    finally:
        response.close()
        response.close()  # a second close is harmless and does not reach the app twice
    assert iterables[0].closed == 1
    (payload,) = dispatcher.payloads("post")
    if fail_at is None:
        assert payload["result"] == "ok"
    else:
        assert "ValueError" in payload["error"]["message"]


def test_file_wrapper_is_returned_untouched():
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/json")])
        return environ["wsgi.file_wrapper"](io.BytesIO(RESULT))

    dispatcher = RecordingDispatcher()
    middleware = WebhookMiddleware(app, hooks=HOOKS, dispatcher=dispatcher, environ={})
    environ = EnvironBuilder(method="POST", json=CALL).get_environ()
    environ["wsgi.file_wrapper"] = FileWrapper
    response = middleware(environ, lambda status, headers, exc_info=None: None)
    assert isinstance(response, FileWrapper)
    (payload,) = dispatcher.payloads("post")
    assert payload["error"]["message"].startswith("response not inspected")


def test_response_over_the_limit_is_streamed_not_buffered():
    chunks = [b"x" * 1000] * 50

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/json")])
        return iter(chunks)

    dispatcher = RecordingDispatcher()
    middleware = WebhookMiddleware(
        app, hooks=HOOKS, dispatcher=dispatcher, environ={}, max_body=10_000
    )
    environ = EnvironBuilder(method="POST", json=CALL).get_environ()
    response = middleware(environ, lambda status, headers, exc_info=None: None)
    assert list(response) == chunks
    response.close()
    (payload,) = dispatcher.payloads("post")
    assert "larger than maxBody" in payload["error"]["message"]


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "OPTIONS"])
def test_non_post_requests_are_not_inspected(method):
    seen = []

    def app(environ, start_response):
        seen.append(environ["wsgi.input"])
        start_response("204 No Content", [])
        return []

    dispatcher = RecordingDispatcher()
    middleware = WebhookMiddleware(app, hooks=HOOKS, dispatcher=dispatcher, environ={})
    environ = EnvironBuilder(method=method, json=CALL).get_environ()
    original = environ["wsgi.input"]
    assert middleware(environ, lambda *a: None) == []
    assert seen == [original] and dispatcher.deliveries == []


class OneShotInput:
    """A server's input stream: reads at most what is asked, never seeks."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)
        self.sizes = []

    def read(self, size=-1):
        self.sizes.append(size)
        return self._data.read(size)


@pytest.mark.parametrize(
    "environ_extra, body, expected",
    [
        pytest.param({"CONTENT_LENGTH": "5"}, b"hello world", b"hello", id="content-length"),
        pytest.param({"wsgi.input_terminated": True}, b"chunked", b"chunked", id="terminated"),
        pytest.param({}, b"ignored", None, id="unknown-length-not-terminated"),
        pytest.param({"CONTENT_LENGTH": "nope"}, b"x", None, id="bad-content-length"),
        pytest.param({"CONTENT_LENGTH": "20"}, b"x" * 20, None, id="over-limit"),
        pytest.param({"CONTENT_LENGTH": "0"}, b"", b"", id="empty"),
        pytest.param({"CONTENT_LENGTH": "-1"}, b"x", None, id="negative-content-length"),
        pytest.param({"wsgi.input_terminated": True}, b"x" * 40, None, id="terminated-over"),
    ],
)
def test_read_body(environ_extra, body, expected):
    stream = OneShotInput(body)
    environ = {"wsgi.input": stream, **environ_extra}
    assert read_body(environ, limit=16) == expected
    # Never read() unbounded, nor more than one byte past the cap.
    assert all(size is not None and 0 <= size <= 17 for size in stream.sizes)
    if expected is None:  # not inspected: the app still sees every byte
        assert environ["wsgi.input"].read(100) == body
    else:
        assert environ["wsgi.input"].read(100) == expected
        assert environ["CONTENT_LENGTH"] == str(len(expected))


def test_chunked_body_over_the_limit_reaches_the_app_whole():
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "vm.start", "params": "' + b"a" * 100 + b'"}'
    environ = {"wsgi.input": OneShotInput(body), "wsgi.input_terminated": True}
    assert read_body(environ, limit=32) is None
    assert environ["wsgi.input"].read(1000) + environ["wsgi.input"].read(1000) == body


def test_post_hook_once_the_body_is_read_even_if_never_closed():
    # Flask's and werkzeug's test clients do not close unbuffered responses.
    from .apps import create_app

    dispatcher = RecordingDispatcher()
    app = create_app()
    app.wsgi_app = WebhookMiddleware(app.wsgi_app, hooks=HOOKS, dispatcher=dispatcher, environ={})
    response = app.test_client().post("/api", json=CALL)
    assert response.get_json()["result"]["power_state"] == "Running"
    (payload,) = dispatcher.payloads("post")
    assert payload["result"] == {"id": "vm-1", "power_state": "Running"}
    response.close()
    assert len(dispatcher.payloads("post")) == 1


class FailingOnce(OneShotInput):
    """A server's input that times out once, on its second read."""

    def read(self, size=-1):
        if len(self.sizes) == 1:
            self.sizes.append("failed")
            raise TimeoutError("the client is slow")
        return super().read(size)


def test_an_input_error_mid_read_loses_no_byte_for_the_app():
    body = bytes(range(256)) * 400  # 100 KiB: more than one read
    environ = {"wsgi.input": FailingOnce(body), "CONTENT_LENGTH": str(len(body))}
    with pytest.raises(TimeoutError):
        read_body(environ, limit=1 << 20)
    stream = environ["wsgi.input"]
    assert b"".join(iter(lambda: stream.read(65536), b"")) == body


@pytest.mark.parametrize("outer", wrappers())
@pytest.mark.parametrize("fail_at", [None, 1], ids=["complete", "raises-mid-iteration"])
def test_closed_exactly_once_inside_lint_and_validator(fail_at, outer):
    iterables = []

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/json")])
        iterables.append(Closing([RESULT[:5], RESULT[5:]], fail_at=fail_at))
        return iterables[-1]

    client, dispatcher = build(app, outer)
    if fail_at is None:
        assert post(client).get_data() == RESULT
    else:
        with pytest.raises(ValueError, match="broke mid-response"):
            post(client)
    assert iterables[0].closed == 1
    assert len(dispatcher.payloads("post")) == 1


def recording_app(bodies):
    """A JSON-RPC app that keeps the request bodies it reads (to the end of the input)."""

    def app(environ, start_response):
        stream = environ["wsgi.input"]
        bodies.append(b"".join(iter(lambda: stream.read(16), b"")))
        start_response("200 OK", [("Content-Type", "application/json")])
        return [RESULT]

    return app


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(
    "spare, inspected",
    [
        pytest.param(0, True, id="exactly-max-body"),
        pytest.param(1, True, id="one-byte-under"),
        pytest.param(-1, False, id="one-byte-over"),
    ],
)
def test_request_body_cap_is_inclusive(chunked, spare, inspected):
    body = json.dumps(CALL).encode()
    bodies = []
    dispatcher = RecordingDispatcher()
    middleware = WebhookMiddleware(
        recording_app(bodies),
        hooks=HOOKS,
        dispatcher=dispatcher,
        environ={},
        max_body=len(body) + spare,
    )
    environ = EnvironBuilder(method="POST", data=body, content_type="application/json")
    environ = environ.get_environ()
    if chunked:
        del environ["CONTENT_LENGTH"]
        environ["wsgi.input_terminated"] = True
    assert b"".join(middleware(environ, lambda *a: None)) == RESULT
    assert bodies == [body]  # inspected or not, the app reads every byte
    if inspected:
        assert [p["params"] for p in dispatcher.payloads("pre")] == [CALL["params"]]
        assert [p["result"] for p in dispatcher.payloads("post")] == ["ok"]
    else:
        assert dispatcher.deliveries == []


PADDED = RESULT + b" " * 100  # longer than the request: only the response meets the cap


def padded_list_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/json")])
    return [PADDED]


def padded_streamed_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/json")])
    return iter([PADDED[:50], PADDED[50:]])


@pytest.mark.parametrize(
    "spare, inspected",
    [
        pytest.param(0, True, id="exactly-max-body"),
        pytest.param(-1, False, id="one-byte-over"),
    ],
)
@pytest.mark.parametrize("app", [padded_list_app, padded_streamed_app], ids=["list", "streamed"])
def test_response_body_cap_is_inclusive(app, spare, inspected):
    dispatcher = RecordingDispatcher()
    middleware = WebhookMiddleware(
        app, hooks=HOOKS, dispatcher=dispatcher, environ={}, max_body=len(PADDED) + spare
    )
    environ = EnvironBuilder(method="POST", json=CALL).get_environ()
    response = middleware(environ, lambda *a: None)
    assert b"".join(response) == PADDED
    getattr(response, "close", lambda: None)()
    (post,) = dispatcher.payloads("post")
    if inspected:
        assert post["result"] == "ok"
    else:
        assert post["error"]["message"] == "response not inspected: larger than maxBody"


@pytest.mark.parametrize(
    "status, code",
    [
        pytest.param("200 OK", 200, id="ok"),
        pytest.param("404", 404, id="no-reason"),
        pytest.param(None, 0, id="before-start-response"),
        pytest.param("", 0, id="empty"),
        pytest.param("OK", 0, id="not-a-number"),
    ],
)
def test_capture_status_code(status, code):
    capture = Capture(limit=10)
    capture.status = status
    assert capture.status_code == code


def test_capture_keeps_nothing_once_over_its_limit():
    capture = Capture(limit=10)
    capture.add(b"12345")
    capture.add(b"67890")
    assert (capture.body, capture.overflow) == (b"1234567890", False)
    capture.add(b"!")
    assert (capture.body, capture.overflow) == (b"", True)
    capture.add(b"")  # still over
    assert (capture.body, capture.overflow) == (b"", True)


def test_an_app_that_never_starts_a_response_gets_a_post_hook():
    def app(environ, start_response):  # breaks WSGI: no start_response at all
        return iter([])

    dispatcher = RecordingDispatcher()
    middleware = WebhookMiddleware(app, hooks=HOOKS, dispatcher=dispatcher, environ={})
    environ = EnvironBuilder(method="POST", json=CALL).get_environ()
    response = middleware(environ, lambda *a: None)
    assert list(response) == []
    response.close()
    (post,) = dispatcher.payloads("post")
    assert post["error"] == {"code": -32603, "message": "the application answered HTTP (none)"}


@pytest.mark.parametrize("when", ["before-response", "mid-iteration"])
def test_the_error_of_a_post_hook_is_cut_to_500_characters(when):
    message = "".join(f"{n:03d}," for n in range(200))  # 800 characters, each place distinct

    def app(environ, start_response):
        if when == "before-response":
            raise RuntimeError(message)
        start_response("200 OK", [("Content-Type", "application/json")])

        def body():
            yield RESULT
            raise RuntimeError(message)

        return body()

    dispatcher = RecordingDispatcher()
    middleware = WebhookMiddleware(app, hooks=HOOKS, dispatcher=dispatcher, environ={})
    environ = EnvironBuilder(method="POST", json=CALL).get_environ()
    with pytest.raises(RuntimeError):
        response = middleware(environ, lambda *a: None)
        try:
            list(response)
        finally:
            response.close()
    (post,) = dispatcher.payloads("post")
    assert post["error"]["message"] == f"RuntimeError: {message}"[:500]


def test_a_response_read_then_closed_reports_once_and_logs_nothing(caplog):
    dispatcher = RecordingDispatcher()
    middleware = WebhookMiddleware(late_start_app, hooks=HOOKS, dispatcher=dispatcher, environ={})
    environ = EnvironBuilder(method="POST", json=CALL).get_environ()
    response = middleware(environ, lambda *a: None)
    assert b"".join(response) == RESULT  # reports at the end of the body
    response.close()  # and not again here
    response.close()
    assert [p["result"] for p in dispatcher.payloads("post")] == ["ok"]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


class Trickle(io.RawIOBase):
    """A server's input that hands out at most 3 bytes a read, as a socket may."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk, self.data = self.data[: min(size, 3)], self.data[min(size, 3) :]
        return chunk


def test_read_body_reads_the_rest_of_a_short_read_and_tells_an_early_end():
    body = json.dumps(CALL).encode()
    environ = {"wsgi.input": Trickle(body), "CONTENT_LENGTH": str(len(body))}
    assert read_body(environ, 1 << 20) == body
    assert environ["wsgi.input"].read() == body and environ["CONTENT_LENGTH"] == str(len(body))
    # The client went away after 10 bytes: the app sees those, and a length that says so.
    environ = {"wsgi.input": io.BytesIO(body[:10]), "CONTENT_LENGTH": str(len(body))}
    assert read_body(environ, 1 << 20) == body[:10]
    assert environ["CONTENT_LENGTH"] == "10"


def test_a_response_stopped_early_is_no_failure_and_next_works_without_iter():
    # The observed response is a generator underneath: the server giving up on it
    # (GeneratorExit) is not the app's failure, and next() on the response itself works.
    dispatcher = RecordingDispatcher()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/json")])
        return iter([b'{"jsonrpc": "2.0", ', b'"id": 1, "result": 2}'])

    middleware = WebhookMiddleware(app, HOOKS, dispatcher=dispatcher, environ={})
    builder = EnvironBuilder(method="POST", data=json.dumps(CALL), content_type="application/json")
    response = middleware(builder.get_environ(), lambda status, headers, exc_info=None: None)
    assert next(response) == b'{"jsonrpc": "2.0", '  # type: ignore[call-overload]
    response.close()  # type: ignore[attr-defined]  # drops the suspended generator
    (post,) = dispatcher.payloads("post")
    assert post["error"]["message"] == "the response is not a JSON-RPC response"


def test_what_the_post_hooks_keep_holds_nothing_of_the_server():
    # While post hooks wait (a receiver down: thousands of them), they keep a plain
    # Capture, not the observed response that holds the server's start_response.
    from xo_webhooks.request.wsgi import ObservedResponse

    class Observed(ObservedResponse):
        def done(self) -> None:
            pass

    def server_start_response(status, headers, exc_info=None):
        return lambda data: None

    response = Observed(100, server_start_response)
    response.start_response("201 Created", [])
    response.add(b'{"id": 1}')
    kept = response.kept()
    assert type(kept) is Capture
    assert (kept.status, kept.body, kept.overflow, kept.error) == (
        "201 Created", b'{"id": 1}', False, None,
    )  # fmt: skip
    assert server_start_response not in [getattr(kept, n, None) for n in dir(kept)]
