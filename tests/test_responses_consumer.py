"""What a consumer project does: its Flask app, wrapped by the middleware with the
requests transport, tested with ``responses`` mocking outgoing HTTP. The README's
"Mocking with responses" shows the first test.

And what happens with the default transport: ``responses`` does not see the hook,
which goes out on the network (here, to a real receiver on 127.0.0.1).
"""

from __future__ import annotations

import json

import pytest
import responses
from flask import Flask, jsonify, request

from xo_webhooks import WebhookMiddleware
from xo_webhooks.signing import verify

HOOK_URL = "https://hooks.example.com/xo"  # never reached: responses answers
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def create_app(hook_url: str, **settings) -> Flask:
    app = Flask(__name__)

    @app.post("/api")
    def api():
        call = request.get_json()
        result = {"id": call["params"]["id"], "power_state": "Running"}
        return jsonify({"jsonrpc": "2.0", "id": call["id"], "result": result})

    app.wsgi_app = WebhookMiddleware(
        app.wsgi_app,
        hooks=[{"method": "vm.start", "type": "pre/post", "url": hook_url}],
        environ={},  # the developer's own XO_WEBHOOKS_* variables stay out of the test
        **settings,
    )
    return app


@pytest.fixture
def app():
    app = create_app(HOOK_URL, transport="requests", secret=SECRET)
    yield app
    app.wsgi_app.close(5)


CALL = {"jsonrpc": "2.0", "id": 1, "method": "vm.start", "params": {"id": "vm-1"}}


@responses.activate(assert_all_requests_are_fired=True)
def test_hooks_are_seen_by_responses(app):
    responses.post(HOOK_URL, status=204)

    answer = app.test_client().post("/api", json=CALL)
    assert answer.json["result"]["power_state"] == "Running"
    assert app.wsgi_app.flush(5)  # the hooks go out from delivery threads

    pre, post = (json.loads(call.request.body) for call in responses.calls)
    assert (pre["type"], post["type"]) == ("pre", "post")
    assert pre["method"] == post["method"] == "vm.start"
    assert pre["callId"] == post["callId"]
    assert post["result"] == {"id": "vm-1", "power_state": "Running"}
    for call in responses.calls:
        headers = call.request.headers
        assert headers["webhook-id"].startswith("msg_")
        verify(SECRET, call.request.body, headers)  # raises unless signed with SECRET
    assert app.wsgi_app.stats()["delivered"] == 2


@responses.activate
def test_a_failing_receiver_is_retried_through_responses():
    app = create_app(HOOK_URL, transport="requests", retry_schedule=[0.01])
    responses.post(HOOK_URL, status=503)
    responses.post(HOOK_URL, status=204)  # registered twice: answered in turn
    try:
        assert app.test_client().post("/api", json=CALL).json["result"]
        assert app.wsgi_app.flush(5)
        stats = app.wsgi_app.stats()
    finally:
        app.wsgi_app.close(5)
    assert (stats["delivered"], stats["retried"]) == (2, 1)
    assert [c.response.status_code for c in responses.calls].count(503) == 1


def test_the_default_transport_is_not_seen_by_responses(webhook_receiver):
    app = create_app(webhook_receiver.url)  # transport "http", the default
    try:
        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            mock.post(webhook_receiver.url, status=204)
            assert app.test_client().post("/api", json=CALL).json["result"]
            assert app.wsgi_app.flush(5)
            assert len(mock.calls) == 0  # past the mock...
        pre, post = webhook_receiver.wait_for(2)  # ...onto the network
        assert (pre.payload["type"], post.payload["type"]) == ("pre", "post")
    finally:
        app.wsgi_app.close(5)
