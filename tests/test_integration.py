"""End to end: a Flask JSON-RPC app, configured only through XO_WEBHOOKS_HOOKS, served by
werkzeug's server, sends hooks to a real receiver on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests
from werkzeug.wsgi import ClosingIterator

from xo_webhooks import WebhookMiddleware
from xo_webhooks.schema import validate_payload

from .apps import create_app
from .waiting import wait_until


@pytest.fixture
def api(monkeypatch, webhook_receiver, serve):
    """The Flask app wrapped by a middleware configured from the environment only."""
    hooks = [
        {"method": "vm.*", "type": "pre/post", "url": webhook_receiver.url + "hook?src=xo"},
        {"method": "session.signIn", "type": "post", "url": webhook_receiver.url},
    ]
    monkeypatch.setenv("XO_WEBHOOKS_HOOKS", json.dumps(hooks))
    monkeypatch.setenv("XO_WEBHOOKS_TIMEOUT", "2")
    app = create_app()
    app.wsgi_app = WebhookMiddleware(app.wsgi_app)
    server = serve(app)
    yield server.url + "/api"
    app.wsgi_app.close(5)


def rpc(url, body, **kwargs):
    return requests.post(url, json=body, timeout=10, **kwargs)


def by_type(hooks):
    found = {h.payload["type"]: h.payload for h in hooks}
    assert len(found) == len(hooks), [h.payload for h in hooks]
    for payload in found.values():
        validate_payload(payload)
    return found["pre"], found["post"]


def test_vm_start_sends_pre_and_post(api, webhook_receiver):
    params = {"id": "vm-1", "password": "hunter2"}
    answer = rpc(
        api,
        {"jsonrpc": "2.0", "id": 7, "method": "vm.start", "params": params},
        headers={"User-Agent": "pytest"},
    )
    assert answer.json() == {
        "jsonrpc": "2.0",
        "id": 7,
        "result": {"id": "vm-1", "power_state": "Running"},
    }

    pre, post = by_type(webhook_receiver.wait_for(2))
    assert pre["method"] == post["method"] == "vm.start"
    assert pre["callId"] == post["callId"]
    assert pre["params"] == post["params"] == {"id": "vm-1", "password": "***"}
    assert pre["userId"] is None and pre["userName"] is None
    assert post["result"] == {"id": "vm-1", "power_state": "Running"}
    assert "error" not in post
    assert post["timestamp"] >= pre["timestamp"]
    assert post["timestamp"] - pre["timestamp"] == post["duration"]
    assert abs(pre["timestamp"] - time.time() * 1000) < 60_000
    hook = webhook_receiver.received[0]
    assert hook.method == "POST" and hook.path == "/hook?src=xo"
    assert hook.headers["content-type"] == "application/json"
    assert hook.headers["user-agent"].startswith("xo-webhooks/")


def test_jsonrpc_error_is_carried_by_post(api, webhook_receiver):
    answer = rpc(api, {"jsonrpc": "2.0", "id": "a", "method": "vm.fail"})
    assert answer.json()["error"]["code"] == 13
    pre, post = by_type(webhook_receiver.wait_for(2))
    assert post["error"] == {"code": 13, "message": "VM is locked", "data": {"token": "***"}}
    assert "result" not in post


def test_raising_method_gives_internal_error(api, webhook_receiver):
    answer = rpc(api, {"jsonrpc": "2.0", "id": 1, "method": "vm.explode"})
    assert answer.status_code == 500  # Flask's own answer, unchanged
    pre, post = by_type(webhook_receiver.wait_for(2))
    assert post["error"]["code"] == -32603
    assert "500" in post["error"]["message"]


def test_batch_gives_each_call_its_own_hooks(api, webhook_receiver):
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "vm.start", "params": {"id": "a"}},
        {"jsonrpc": "2.0", "id": 2, "method": "vm.fail"},
        {"jsonrpc": "2.0", "id": 3, "method": "system.noHook"},
    ]
    answer = rpc(api, batch)
    assert [a["id"] for a in answer.json()] == [1, 2, 3]
    hooks = webhook_receiver.wait_for(4)
    calls: dict[str, dict[str, dict]] = {}
    for hook in hooks:
        validate_payload(hook.payload)
        calls.setdefault(hook.payload["callId"], {})[hook.payload["type"]] = hook.payload
    assert len(calls) == 2
    outcomes = {
        c["post"]["method"]: c["post"].get("result", c["post"].get("error")) for c in calls.values()
    }
    assert outcomes == {
        "vm.start": {"id": "a", "power_state": "Running"},
        "vm.fail": {"code": 13, "message": "VM is locked", "data": {"token": "***"}},
    }


def test_notification_gets_post_with_null_result(api, webhook_receiver):
    answer = rpc(api, {"jsonrpc": "2.0", "method": "vm.start", "params": {"id": "n"}})
    assert answer.status_code == 204
    pre, post = by_type(webhook_receiver.wait_for(2))
    assert post["result"] is None


def test_late_user_set_by_the_app(api, webhook_receiver):
    rpc(
        api,
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "session.signIn",
            "params": {"username": "alice@example.org", "password": "pw"},
        },
    )
    (post,) = webhook_receiver.wait_for(1)
    validate_payload(post.payload)
    assert (post.payload["userId"], post.payload["userName"]) == ("u-42", "alice@example.org")
    assert post.payload["params"]["password"] == "***"


def test_remote_user_is_the_default_user(webhook_receiver, serve, wrap):
    hooks = [{"method": "vm.start", "type": "pre", "url": webhook_receiver.url}]
    middleware = wrap(create_app().wsgi_app, hooks=hooks)

    def authenticated(environ, start_response):  # what an auth layer in front does
        environ["REMOTE_USER"] = "bob"
        return middleware(environ, start_response)

    url = serve(authenticated).url
    rpc(url + "/api", {"jsonrpc": "2.0", "id": 1, "method": "vm.start"})
    (pre,) = webhook_receiver.wait_for(1)
    assert (pre.payload["userId"], pre.payload["userName"]) == ("bob", "bob")
    assert pre.payload["params"] == {}


class CountsFinished:
    """Wraps a WSGI app and counts the responses the server has closed: a request is
    over, its hooks (if any) handed to the dispatcher, only once its response is closed,
    which happens after the client has read it."""

    def __init__(self, app):
        self.app = app
        self.finished = 0
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        return ClosingIterator(self.app(environ, start_response), self._done)

    def _done(self):
        with self._lock:
            self.finished += 1


def assert_no_hook_sent(middleware, finished, requests_made, webhook_receiver):
    """Nothing was sent, and nothing will be: every request is over, the dispatcher is
    idle, and it never accepted a hook (so none can arrive late)."""
    wait_until(lambda: finished.finished == requests_made, what="the responses to be closed")
    assert middleware.flush(10)
    assert middleware.stats()["accepted"] == 0
    assert webhook_receiver.attempts == []


@pytest.mark.parametrize(
    "body, content_type",
    [
        pytest.param(
            b'{"jsonrpc": "2.0", "id": 1, "method": "vm.start"',
            "application/json",
            id="truncated-json",
        ),
        pytest.param(b"\xff\xfe not json at all", "application/json", id="binary"),
        pytest.param(b'{"hello": "world"}', "application/json", id="json-not-rpc"),
        pytest.param(
            b'[{"jsonrpc": "2.0", "id": 1, "method": "vm.start"}, 3]',
            "application/json",
            id="batch-with-junk",
        ),
        pytest.param(
            b'{"jsonrpc": "2.0", "id": 1, "method": "vm.start"}',
            "multipart/form-data; boundary=x",
            id="form-content-type",
        ),
        pytest.param(b"", "application/json", id="empty"),
        pytest.param(
            b'{"jsonrpc": "2.0", "id": 1, "method": "vm.start", "params": {"x": "'
            + b"a" * 2_000_000
            + b'"}}',
            "application/json",
            id="over-max-body",
        ),
    ],
)
@pytest.mark.parametrize("transfer", ["content-length", "chunked"])
def test_malformed_bodies_pass_through_byte_for_byte(
    body, content_type, transfer, serve, wrap, webhook_receiver
):
    hooks = [{"method": "*", "type": "pre/post", "url": webhook_receiver.url}]
    bare = serve(create_app().wsgi_app).url + "/echo"
    middleware = wrap(create_app().wsgi_app, hooks=hooks)
    finished = CountsFinished(middleware)
    wrapped = serve(finished).url + "/echo"
    data = body if transfer == "content-length" else iter([body[:10], body[10:]])

    def send(url):
        payload = data if transfer == "content-length" else iter([body[:10], body[10:]])
        return requests.post(url, data=payload, headers={"Content-Type": content_type}, timeout=10)

    expected, got = send(bare), send(wrapped)
    assert got.status_code == expected.status_code == 201
    assert got.content == expected.content == body
    assert {k: v for k, v in got.headers.items() if k != "Date"} == {
        k: v for k, v in expected.headers.items() if k != "Date"
    }
    assert_no_hook_sent(middleware, finished, 1, webhook_receiver)


def test_other_http_methods_pass_through(serve, wrap, webhook_receiver):
    hooks = [{"method": "*", "type": "pre/post", "url": webhook_receiver.url}]
    middleware = wrap(create_app().wsgi_app, hooks=hooks)
    finished = CountsFinished(middleware)
    url = serve(finished).url + "/echo"
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "vm.start"}'
    answer = requests.put(url, data=body, timeout=10)
    assert (answer.status_code, answer.content) == (201, body)
    assert requests.head(url, timeout=10).headers["X-Seen-Method"] == "HEAD"
    assert_no_hook_sent(middleware, finished, 2, webhook_receiver)


def _timed_calls(url, count=10):
    with requests.Session() as session:
        started = time.perf_counter()
        for n in range(count):
            answer = session.post(
                url, json={"jsonrpc": "2.0", "id": n, "method": "vm.start"}, timeout=10
            )
            assert answer.json()["result"]["power_state"] == "Running"
        return time.perf_counter() - started


def test_refused_connections_neither_slow_nor_break_the_api(serve, wrap, refused_url):
    hooks = [{"method": "vm.start", "type": "pre/post", "url": refused_url}]
    middleware = wrap(create_app().wsgi_app, hooks=hooks, retries=0)
    url = serve(middleware).url + "/api"
    elapsed = _timed_calls(url)
    assert elapsed < 5, f"10 calls took {elapsed:.2f} s with the receiver refusing connections"
    # The last post hook is queued when the server closes the response, just after
    # the client has read it.
    wait_until(lambda: middleware.stats()["accepted"] == 20, what="20 hooks accepted")
    assert middleware.flush(10)
    stats = middleware.stats()
    assert stats["failed"] == stats["accepted"] == 20 and stats["delivered"] == 0


def test_slow_receiver_neither_slows_nor_breaks_the_api(serve, wrap, webhook_receiver):
    webhook_receiver.respond_with(204, delay=5)
    hooks = [{"method": "vm.start", "type": "pre/post", "url": webhook_receiver.url}]
    middleware = wrap(create_app().wsgi_app, hooks=hooks, timeout=10, max_workers=2, retries=0)
    url = serve(middleware).url + "/api"
    elapsed = _timed_calls(url)
    # Each hook takes 5 s to be answered; 20 of them on 2 workers would take 50 s if
    # the API waited for any of them.
    assert elapsed < 4, f"10 calls took {elapsed:.2f} s with a receiver answering in 5 s"
    assert middleware.stats()["pending"] > 0  # the hooks were still on their way
    webhook_receiver.stop()  # releases the receiver's delayed answers


def test_wait_for_response_holds_the_call(serve, wrap, webhook_receiver):
    webhook_receiver.respond_with(204, delay=0.5)
    hooks = [
        {"method": "vm.start", "type": "pre", "url": webhook_receiver.url, "waitForResponse": True}
    ]
    url = serve(wrap(create_app().wsgi_app, hooks=hooks)).url + "/api"
    started = time.perf_counter()
    rpc(url, {"jsonrpc": "2.0", "id": 1, "method": "vm.start"})
    assert time.perf_counter() - started >= 0.5
    # The hook was received before the API answered: no waiting needed.
    assert [h.payload["type"] for h in webhook_receiver.received] == ["pre"]
