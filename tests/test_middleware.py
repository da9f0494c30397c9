"""The middleware's own API and its failure handling: call() for events that are not
API calls, user resolution, and failures of its own that must never reach the client."""

from __future__ import annotations

import io
import json
from wsgiref.util import FileWrapper

import pytest
from werkzeug.test import Client, EnvironBuilder

from xo_webhooks import ConfigError, WebhookMiddleware
from xo_webhooks.schema import validate_payload

from .apps import CALL, RESULT, late_start_app, plain_app
from .helpers import HOOKS, RecordingDispatcher


def test_call_sends_pre_and_post_with_the_result(webhook_receiver, wrap):
    hooks = [{"method": "backup.*", "type": "pre/post", "url": webhook_receiver.url}]
    middleware = wrap(plain_app, hooks=hooks)
    with middleware.call("backup.run", params={"job": "nightly"}, user=("u-1", "cron")) as call:
        call.result = {"written": 42}
    pre, post = (h.payload for h in webhook_receiver.wait_for(2))
    for payload in (pre, post):
        validate_payload(payload)
        assert (payload["userId"], payload["userName"]) == ("u-1", "cron")
        assert payload["params"] == {"job": "nightly"}
    assert pre["callId"] == post["callId"]
    assert post["result"] == {"written": 42}


def test_call_reports_and_reraises_an_error(webhook_receiver, wrap):
    hooks = [{"method": "backup.run", "type": "post", "url": webhook_receiver.url}]
    middleware = wrap(plain_app, hooks=hooks)
    with pytest.raises(OSError, match="disk full"), middleware.call("backup.run"):
        raise OSError("disk full")
    (post,) = webhook_receiver.wait_for(1)
    assert post.payload["error"] == {"code": -32603, "message": "OSError: disk full"}
    assert post.payload["params"] == {}


def test_call_without_a_matching_hook_sends_nothing():
    dispatcher = RecordingDispatcher()
    middleware = WebhookMiddleware(plain_app, hooks=[], dispatcher=dispatcher, environ={})
    with middleware.call("backup.run") as call:
        call.result = 1
    assert dispatcher.deliveries == []


def test_endpoint_stats_of_a_dispatcher_without_them_are_empty(wrap):
    own = wrap(plain_app, hooks=HOOKS, dispatcher=RecordingDispatcher())
    assert own.endpoint_stats() == {}
    threads = wrap(plain_app, hooks=HOOKS)  # the thread dispatcher: every configured endpoint
    ((origin, endpoint),) = threads.endpoint_stats().items()
    assert origin == "http://127.0.0.1:9"
    assert (endpoint["state"], endpoint["pending"], endpoint["opened_at"]) == ("closed", 0, None)


def test_no_hooks_returns_the_apps_own_iterable():
    sentinel = [RESULT]

    def app(environ, start_response):
        start_response("200 OK", [])
        return sentinel

    middleware = WebhookMiddleware(app, environ={})
    environ = EnvironBuilder(method="POST", json=CALL).get_environ()
    assert middleware(environ, lambda *a: None) is sentinel


def test_pre_only_hooks_do_not_observe_the_response():
    sentinel = [RESULT]

    def app(environ, start_response):
        start_response("200 OK", [])
        return sentinel

    dispatcher = RecordingDispatcher()
    hooks = [{"method": "vm.start", "type": "pre", "url": "http://127.0.0.1:9/"}]
    middleware = WebhookMiddleware(app, hooks=hooks, dispatcher=dispatcher, environ={})
    environ = EnvironBuilder(method="POST", json=CALL).get_environ()
    assert middleware(environ, lambda *a: None) is sentinel
    assert [d.payload["type"] for d in dispatcher.deliveries] == ["pre"]


@pytest.mark.parametrize(
    ("content_type", "hooked"),
    [
        ("application/json", True),
        ("application/json-rpc; charset=utf-8", True),
        ("Text/Plain", True),
        ("", True),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
    ],
)
def test_only_a_body_labelled_as_json_or_not_at_all_is_read(content_type, hooked):
    dispatcher = RecordingDispatcher()
    middleware = WebhookMiddleware(plain_app, hooks=HOOKS, dispatcher=dispatcher, environ={})
    for _ in range(2):  # the second time, from the content types it knows
        environ = EnvironBuilder(method="POST", data=json.dumps(CALL)).get_environ()
        environ["CONTENT_TYPE"] = content_type
        assert b"".join(middleware(environ, lambda *a: None)) == RESULT
    assert len(dispatcher.deliveries) == (4 if hooked else 0)  # a pre and a post per call


class BrokenDispatcher(RecordingDispatcher):
    def submit(self, delivery):
        raise RuntimeError("the dispatcher is broken")


def test_own_failures_never_reach_the_client(caplog):
    hooks = [{"method": "vm.start", "type": "pre/post", "url": "http://127.0.0.1:9/"}]
    middleware = WebhookMiddleware(
        plain_app, hooks=hooks, dispatcher=BrokenDispatcher(), environ={}
    )
    environ = EnvironBuilder(method="POST", json=CALL).get_environ()
    assert b"".join(middleware(environ, lambda *a: None)) == RESULT
    assert "passing it through" in caplog.text


class PostFailingDispatcher(RecordingDispatcher):
    def submit(self, delivery):
        if delivery.payload["type"] == "post":
            raise RuntimeError("the dispatcher broke mid-call")
        super().submit(delivery)


class AppError(Exception):
    pass


def raising_app(environ, start_response):
    raise AppError("the app's own failure")


def file_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/json")])
    return environ["wsgi.file_wrapper"](io.BytesIO(RESULT))


@pytest.mark.parametrize(
    "app",
    [
        pytest.param(plain_app, id="list"),
        pytest.param(late_start_app, id="streamed"),
        pytest.param(file_app, id="file-wrapper"),
        pytest.param(raising_app, id="app-raises"),
    ],
)
def test_failures_after_the_response_never_reach_the_client(app, caplog):
    hooks = [{"method": "vm.start", "type": "pre/post", "url": "http://127.0.0.1:9/"}]
    middleware = WebhookMiddleware(app, hooks=hooks, dispatcher=PostFailingDispatcher(), environ={})
    environ = EnvironBuilder(method="POST", json=CALL).get_environ()
    environ["wsgi.file_wrapper"] = FileWrapper
    if app is raising_app:
        with pytest.raises(AppError):  # the app's exception, not the dispatcher's
            middleware(environ, lambda *a: None)
    else:
        response = middleware(environ, lambda *a: None)
        assert b"".join(response) == RESULT
        getattr(response, "close", lambda: None)()
    assert "could not send the post hooks" in caplog.text


def test_a_list_response_is_handed_on_as_it_is():
    # A server sets Content-Length itself only for a one-item list: keep it one.
    dispatcher = RecordingDispatcher()
    middleware = WebhookMiddleware(plain_app, hooks=HOOKS, dispatcher=dispatcher, environ={})
    environ = EnvironBuilder(method="POST", json=CALL).get_environ()
    response = middleware(environ, lambda *a: None)
    assert response == [RESULT]
    assert dispatcher.payloads("post")[0]["result"] == "ok"


def test_a_failing_user_resolver_sends_no_user(caplog):
    def resolver(environ):
        raise LookupError("no session store")

    dispatcher = RecordingDispatcher()
    hooks = [{"method": "vm.start", "type": "pre", "url": "http://127.0.0.1:9/"}]
    middleware = WebhookMiddleware(
        plain_app, hooks=hooks, dispatcher=dispatcher, environ={}, user_resolver=resolver
    )
    environ = EnvironBuilder(method="POST", json=CALL).get_environ()
    assert b"".join(middleware(environ, lambda *a: None)) == RESULT
    (pre,) = dispatcher.payloads("pre")
    assert (pre["userId"], pre["userName"]) == (None, None)
    assert "user_resolver failed" in caplog.text


@pytest.mark.parametrize(
    "late_user, expected",
    [
        pytest.param(("u-9", "eve"), ("u-9", "eve"), id="tuple"),
        pytest.param(["u-9", None], ("u-9", None), id="list-with-null"),
        pytest.param("eve", ("bob", "bob"), id="not-a-pair-ignored"),
        pytest.param((1, 2), ("bob", "bob"), id="not-strings-ignored"),
    ],
)
def test_late_user_from_the_environ(late_user, expected):
    def app(environ, start_response):
        environ["xo_webhooks.user"] = late_user
        return plain_app(environ, start_response)

    dispatcher = RecordingDispatcher()
    hooks = [{"method": "vm.start", "type": "post", "url": "http://127.0.0.1:9/"}]
    middleware = WebhookMiddleware(app, hooks=hooks, dispatcher=dispatcher, environ={})
    environ = EnvironBuilder(method="POST", json=CALL, environ_base={"REMOTE_USER": "bob"})
    response = middleware(environ.get_environ(), lambda *a: None)
    b"".join(response)
    (post,) = dispatcher.payloads("post")
    assert (post["userId"], post["userName"]) == expected


def test_configuration_errors_are_raised_at_construction():
    with pytest.raises(ConfigError, match=r"XO_WEBHOOKS_HOOKS\[0\]\.type: 'pré' is not one of"):
        WebhookMiddleware(
            plain_app,
            environ={"XO_WEBHOOKS_HOOKS": '[{"method": "a", "type": "pré", "url": "http://h/"}]'},
        )


def test_hooks_still_queued_are_flushed_at_interpreter_exit(webhook_receiver, tmp_path):
    import subprocess
    import sys

    webhook_receiver.respond_with(204, delay=0.2)  # still pending when the script ends
    script = tmp_path / "exit_early.py"
    script.write_text(
        "import sys\n"
        "from xo_webhooks import WebhookMiddleware\n"
        f"url = {webhook_receiver.url!r}\n"
        "hooks = [{'method': 'backup.run', 'type': 'pre/post', 'url': url}]\n"
        "middleware = WebhookMiddleware(lambda e, s: [], hooks=hooks, environ={})\n"
        "with middleware.call('backup.run') as call:\n"
        "    call.result = 'done'\n"
        "assert middleware.stats()['pending'] == 2\n"
        "sys.exit(0)  # no close(): the atexit handler flushes\n"
    )
    done = subprocess.run([sys.executable, str(script)], timeout=60)
    assert done.returncode == 0
    assert sorted(h.payload["type"] for h in webhook_receiver.received) == ["post", "pre"]


@pytest.mark.parametrize(
    "path, inspected",
    [
        pytest.param("/api", True, id="listed"),
        pytest.param("/api/v2/rpc", True, id="below-a-listed-prefix"),
        pytest.param("/admin/rpc", False, id="elsewhere"),
    ],
)
def test_only_the_configured_paths_are_inspected(path, inspected):
    dispatcher = RecordingDispatcher()
    hooks = [{"method": "vm.start", "type": "pre", "url": "http://127.0.0.1:9/"}]
    environ = {"XO_WEBHOOKS_PATHS": "/api, /rpc"}
    middleware = WebhookMiddleware(plain_app, hooks=hooks, dispatcher=dispatcher, environ=environ)
    assert middleware.settings.paths == ("/api", "/rpc")
    request = EnvironBuilder(method="POST", path=path, json=CALL).get_environ()
    original_input = request["wsgi.input"]
    assert b"".join(middleware(request, lambda *a: None)) == RESULT
    assert bool(dispatcher.deliveries) is inspected
    assert (request["wsgi.input"] is original_input) is not inspected  # body untouched


def test_call_with_a_result_that_cannot_be_copied(webhook_receiver, wrap, caplog):
    import threading

    hooks = [{"method": "backup.run", "type": "post", "url": webhook_receiver.url}]
    middleware = wrap(plain_app, hooks=hooks)
    with middleware.call("backup.run") as call:  # the block succeeded: no exception
        call.result = {"lock": threading.Lock()}
    (post,) = webhook_receiver.wait_for(1)
    assert post.payload["error"]["message"] == "the result could not be copied for the hook"
    assert "could not be copied" in caplog.text


# -- how post hooks find their answers (and what they say when there is none) ---------


def answering(body: bytes, status: str = "200 OK"):
    """An app that answers every request with *body*, after reading the request."""

    def app(environ, start_response):
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response(status, [("Content-Type", "application/json")])
        return [body]

    return app


def run(app, request: bytes, hooks=HOOKS) -> RecordingDispatcher:
    """Send *request* through the middleware around *app*; return what it handed over."""
    dispatcher = RecordingDispatcher()
    middleware = WebhookMiddleware(app, hooks=hooks, dispatcher=dispatcher, environ={})
    environ = EnvironBuilder(
        method="POST", data=request, content_type="application/json"
    ).get_environ()
    response = middleware(environ, lambda *a: None)
    try:
        b"".join(response)
    finally:
        getattr(response, "close", lambda: None)()
    return dispatcher


def outcomes(dispatcher: RecordingDispatcher) -> list:
    """Each post hook's ``params["n"]`` with its result or error, in call order."""
    return [
        (p["params"].get("n"), p["error"] if "error" in p else p["result"])
        for p in dispatcher.payloads("post")
    ]


def vm_start(request_id, n, **member):
    return {"jsonrpc": "2.0", "id": request_id, "method": "vm.start", "params": {"n": n}, **member}


def test_batch_answers_are_found_by_id_whatever_its_json_type():
    ids = [1, "1", {"vm": 1, "pool": "a"}, [2, "x"], None, 1.5]
    request = json.dumps([vm_start(request_id, n) for n, request_id in enumerate(ids)])
    # Answered in reverse, object keys in another order: only the id ties them.
    answers = [{"jsonrpc": "2.0", "id": i, "result": f"answer {n}"} for n, i in enumerate(ids)]
    answers[2]["id"] = {"pool": "a", "vm": 1}
    dispatcher = run(answering(json.dumps(answers[::-1]).encode()), request.encode())
    assert outcomes(dispatcher) == [(n, f"answer {n}") for n in range(len(ids))]


NULL_ID_ERROR = {"code": -32600, "message": "Invalid Request"}
NO_RESPONSE = {"code": -32603, "message": "no response for this call"}
NOT_JSON_RPC = {"code": -32603, "message": "the response is not a JSON-RPC response"}


@pytest.mark.parametrize(
    "request_document, answer, expected",
    [
        pytest.param(
            vm_start(7, 0),
            {"jsonrpc": "2.0", "id": None, "error": NULL_ID_ERROR},
            [(0, NULL_ID_ERROR)],
            id="single-call-null-id-error-is-its-answer",
        ),
        pytest.param(
            [vm_start(1, 0), vm_start(2, 1)],
            [{"jsonrpc": "2.0", "id": None, "error": NULL_ID_ERROR}],
            [(0, NULL_ID_ERROR), (1, NULL_ID_ERROR)],
            id="batch-with-one-null-id-error-only",
        ),
        pytest.param(
            [vm_start(1, 0), vm_start(2, 1)],
            [
                {"jsonrpc": "2.0", "id": 1, "result": "ok"},
                {"jsonrpc": "2.0", "id": None, "error": NULL_ID_ERROR},
            ],
            [(0, "ok"), (1, NO_RESPONSE)],
            id="null-id-error-beside-other-answers-is-nobodys",
        ),
        pytest.param(
            [vm_start(1, 0), vm_start(2, 1)],
            [{"jsonrpc": "2.0", "id": 2, "result": "two"}],
            [(0, NO_RESPONSE), (1, "two")],
            id="batch-answer-missing-a-call",
        ),
        pytest.param(
            [vm_start(1, 0), vm_start(2, 1)],
            [{"jsonrpc": "2.0", "id": 1, "result": "one"}, {"jsonrpc": "2.0", "result": "two"}],
            [(0, NOT_JSON_RPC), (1, NOT_JSON_RPC)],
            id="batch-answer-member-without-id",
        ),
        pytest.param(
            vm_start(1, 0),
            {"status": "ok", "vm": "vm-1"},
            [(0, NOT_JSON_RPC)],
            id="json-but-not-json-rpc",
        ),
        pytest.param(
            [vm_start(1, 0), {"jsonrpc": "2.0", "method": "vm.start", "params": {"n": 1}}],
            "<html>Bad gateway</html>",
            [(0, NOT_JSON_RPC), (1, None)],
            id="not-json-a-notification-still-ends-with-null",
        ),
    ],
)
def test_post_hooks_say_what_the_answer_was(request_document, answer, expected):
    body = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
    dispatcher = run(answering(body), json.dumps(request_document).encode())
    assert outcomes(dispatcher) == expected
    for payload in dispatcher.payloads("post"):
        validate_payload(payload)


def test_an_http_error_answer_is_the_error_of_every_call():
    answer = json.dumps([{"jsonrpc": "2.0", "id": 1, "result": "ok"}]).encode()
    request = json.dumps([vm_start(1, 0), vm_start(2, 1)]).encode()
    dispatcher = run(answering(answer, "502 Bad Gateway"), request)
    error = {"code": -32603, "message": "the application answered HTTP 502 Bad Gateway"}
    assert outcomes(dispatcher) == [(0, error), (1, error)]


# -- the quick scan for method names, and the bodies it cannot read --------------------


def seen_by(bodies: list[bytes]):
    """An app that keeps the request bodies it gets."""

    def app(environ, start_response):
        bodies.append(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))
        start_response("200 OK", [("Content-Type", "application/json")])
        return [RESULT]

    return app


@pytest.mark.parametrize(
    "request_body, method",
    [
        pytest.param(
            rb'{"jsonrpc": "2.0", "id": 1, "method": "vm.st\u0061rt", "params": {"n": 0}}',
            "vm.start",
            id="escaped-method-name",
        ),
        pytest.param(
            rb'{"jsonrpc": "2.0", "id": 1, "m\u0065thod": "vm.start", "params": {"n": 0}}',
            "vm.start",
            id="escaped-member-name",
        ),
        pytest.param(
            rb'{"jsonrpc": "2.0", "id": 1, "method": "vm.start", "params": {"n": 0, "s": "a\"b"}}',
            "vm.start",
            id="escape-elsewhere",
        ),
        pytest.param(
            rb'[{"jsonrpc": "2.0", "method": "log", "params": {"t": "\n"}},'
            rb' {"jsonrpc": "2.0", "id": 1, "method": "vm.\u0073tart", "params": {"n": 0}}]',
            "vm.start",
            id="batch-escaped-in-second-call",
        ),
        pytest.param(
            rb'{"jsonrpc": "2.0", "id": 1, "method": "vm.st\u006fp", "params": {"n": 0}}',
            None,
            id="escaped-name-without-a-hook",
        ),
        pytest.param(
            rb'{"jsonrpc": "2.0", "id": 1, "method": "vm.stop", "params": {"n": 0}}',
            None,
            id="plain-name-without-a-hook",
        ),
        pytest.param(
            rb'{"jsonrpc": "2.0", "id": 1, "method": "vm.start\u0000", "params": {}}',
            None,
            id="escape-makes-another-name",
        ),
    ],
)
def test_method_names_written_with_json_escapes(request_body, method):
    bodies: list[bytes] = []
    dispatcher = run(seen_by(bodies), request_body)
    assert bodies == [request_body]  # the app gets the body as it was sent
    if method is None:
        assert dispatcher.deliveries == []
    else:
        (pre,) = dispatcher.payloads("pre")
        (post,) = dispatcher.payloads("post")
        assert pre["method"] == post["method"] == method
        assert (pre["params"]["n"], post["result"]) == (0, "ok")


class StartedDispatcher(RecordingDispatcher):
    """Records when the middleware starts it."""

    def __init__(self) -> None:
        super().__init__()
        self.starts = 0

    def start(self) -> None:
        self.starts += 1


def test_the_first_request_starts_the_dispatcher_once():
    """A process that serves requests sends what waits in the spool before a call of its
    own has a hook: the first request of any kind starts its dispatcher, once."""
    dispatcher = StartedDispatcher()
    middleware = WebhookMiddleware(plain_app, hooks=HOOKS, dispatcher=dispatcher, environ={})
    assert dispatcher.starts == 0  # building the app (a gunicorn master) starts nothing
    for method in ("GET", "POST", "POST"):
        environ = EnvironBuilder(method=method, json=CALL).get_environ()
        b"".join(middleware(environ, lambda *a: None))
    assert dispatcher.starts == 1
    # A dispatcher of the user's own without start() is called as before.
    plain = WebhookMiddleware(plain_app, hooks=HOOKS, dispatcher=RecordingDispatcher(), environ={})
    environ = EnvironBuilder(method="POST", json=CALL).get_environ()
    assert b"".join(plain(environ, lambda *a: None)) == RESULT


class BatchingDispatcher(RecordingDispatcher):
    """A dispatcher that takes several hooks at once (as the Celery one does)."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def submit_many(self, deliveries):
        self.batches.append([d.kind for d in deliveries])
        self.deliveries += deliveries


def test_a_dispatcher_with_submit_many_gets_a_requests_hooks_in_one_go():
    dispatcher = BatchingDispatcher()
    hooks = [{"method": "vm.*", "type": "pre/post", "url": "http://127.0.0.1:9/a"},
             {"method": "vm.start", "type": "pre/post", "url": "http://127.0.0.1:9/b"}]  # fmt: skip
    middleware = WebhookMiddleware(plain_app, hooks=hooks, dispatcher=dispatcher, environ={})
    client = Client(middleware)
    client.post("/", json=[dict(CALL, id=1), dict(CALL, id=2)])
    assert dispatcher.batches == [["pre"] * 4, ["post"] * 4]
    client.post("/", json=dict(CALL, method="vm.stop"))  # one hook: submit() as before
    assert len(dispatcher.batches) == 2 and len(dispatcher.deliveries) == 10
