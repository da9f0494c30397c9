"""The HTTP side of a delivery: Sender's requests, signing, headers, TLS and proxies,
against real servers on 127.0.0.1."""

from __future__ import annotations

import http.server
import json
import math
import os
import re
import select
import signal
import ssl
import threading
import time

import pytest
from standardwebhooks.webhooks import Webhook

from xo_webhooks import load_settings
from xo_webhooks.request.payload import pre_payload
from xo_webhooks.sending import delivery as delivery_module
from xo_webhooks.sending.delivery import Delivery, Sender, new_id

from .helpers import OTHER_SECRET, POST, PRE, SECRET

URL = "http://127.0.0.1:9/hook"


def make(url=URL, **settings):
    hook = {"method": "vm.start", "type": "pre", "url": url, **settings.pop("hook", {})}
    loaded = load_settings([hook], {}, **settings)
    body = pre_payload("call-1", ("u1", "alice"), "vm.start", {"password": "pw", "id": 1}, 1)
    return Sender(loaded), Delivery(loaded.hooks[0], body)


@pytest.mark.parametrize(
    "status, delivered, retryable",
    [
        pytest.param(200, True, False, id="200"),
        pytest.param(204, True, False, id="204"),
        pytest.param(500, False, True, id="500"),
        pytest.param(503, False, True, id="503"),
        pytest.param(408, False, True, id="408"),
        pytest.param(429, False, True, id="429"),
        pytest.param(301, False, False, id="301-not-followed"),
        pytest.param(404, False, False, id="404"),
        pytest.param(410, False, False, id="410"),
    ],
)
def test_status_classification(status, delivered, retryable, webhook_receiver):
    webhook_receiver.respond_with(status, headers={"Location": webhook_receiver.url + "moved"})
    sender, delivery = make(webhook_receiver.url)
    attempt = sender.send(delivery)
    assert (attempt.delivered, attempt.retryable, attempt.status) == (delivered, retryable, status)
    assert [a.path for a in webhook_receiver.attempts] == ["/"]  # a redirect is never followed
    assert delivery.attempts == 1


def test_request_shape_and_redaction(webhook_receiver):
    sender, delivery = make(webhook_receiver.url, hook={"headers": {"Authorization": "Bearer abc"}})
    assert sender.send(delivery).delivered
    (request,) = webhook_receiver.wait_for(1)
    assert request.headers["content-type"] == "application/json"
    assert request.headers["authorization"] == "Bearer abc"
    assert request.headers["user-agent"].startswith("xo-webhooks/")
    assert request.payload["params"] == {"password": "***", "id": 1}
    assert "webhook-signature" not in request.headers
    assert request.headers["webhook-id"] == delivery.id  # for de-duplication, signed or not


def test_custom_redaction_words_catch_every_spelling(webhook_receiver):
    sender, delivery = make(webhook_receiver.url, redact=["private_key", "x-auth"])
    delivery.payload["params"] = {
        "privateKey": "k1",
        "X_Auth": "a1",
        "nested": [{"PRIVATE-KEY": "k2", "xAuthority": "a2"}],
        "password": "kept: not in the custom list",
    }
    assert sender.send(delivery).delivered
    (request,) = webhook_receiver.wait_for(1)
    assert request.payload["params"] == {
        "privateKey": "***",
        "X_Auth": "***",
        "nested": [{"PRIVATE-KEY": "***", "xAuthority": "***"}],
        "password": "kept: not in the custom list",
    }


def test_connections_are_kept_alive(webhook_receiver):
    sender, delivery = make(webhook_receiver.url)
    for _ in range(5):
        assert sender.send(delivery).delivered
    assert webhook_receiver.connections == 1


def test_timeouts_are_retryable(webhook_receiver):
    webhook_receiver.respond_with(204, delay=2)
    sender, delivery = make(webhook_receiver.url, timeout=0.2)
    attempt = sender.send(delivery)
    assert attempt.retryable and attempt.error == "timed out after 0.2 s"


def test_refused_connections_are_retryable(refused_url):
    sender, delivery = make(refused_url)
    attempt = sender.send(delivery)
    assert attempt.retryable and attempt.error.startswith("connection failed: ")
    assert "refused" in attempt.error.lower()


def test_signed_hooks_verify_with_standardwebhooks(webhook_receiver):
    sender, delivery = make(webhook_receiver.url, secret=SECRET)
    assert sender.send(delivery).delivered
    (hook,) = webhook_receiver.wait_for(1)
    headers = {k: hook.headers[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")}
    assert headers["webhook-id"] == delivery.id
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert Webhook(SECRET).verify(hook.body, headers)["callId"] == "call-1"
    tampered = hook.body.replace(b"call-1", b"call-2")
    with pytest.raises(Exception, match="(?i)signature"):
        Webhook(SECRET).verify(tampered, headers)


def test_a_hook_secret_wins_over_the_global_one(webhook_receiver):
    other = "whsec_" + "C" * 32
    sender, delivery = make(webhook_receiver.url, secret=SECRET, hook={"secret": other})
    assert sender.send(delivery).delivered
    (hook,) = webhook_receiver.wait_for(1)
    assert Webhook(other).verify(hook.body, hook.headers)
    assert SECRET not in repr(delivery) and other not in repr(delivery.hook)


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers 204 and records the request line (an HTTPS receiver or an HTTP proxy)."""

    seen: list[str] = []

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append(self.requestline)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder_server():
    servers = []

    def start(tls_context=None):
        _Recorder.seen = []
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
        if tls_context is not None:
            server.socket = tls_context.wrap_socket(server.socket, server_side=True)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        servers.append((server, thread))
        return server.server_port

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join()


def test_tls_is_verified_and_ca_bundle_trusts_a_private_ca(recorder_server, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    port = recorder_server(context)
    url = f"https://127.0.0.1:{port}/hook"

    sender, delivery = make(url)
    attempt = sender.send(delivery)
    assert not attempt.delivered and "CERTIFICATE_VERIFY_FAILED" in attempt.error

    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    sender, delivery = make(url, ca_bundle=str(bundle))
    assert sender.send(delivery).delivered
    assert _Recorder.seen == ["POST /hook HTTP/1.1"]


def test_outbound_proxy_from_the_environment_is_used(recorder_server, monkeypatch):
    port = recorder_server()
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    sender, delivery = make("http://127.0.0.2:9/via-proxy")  # never reached directly
    assert sender.send(delivery).delivered
    assert _Recorder.seen == ["POST http://127.0.0.2:9/via-proxy HTTP/1.1"]


# -- the Delivery object: ids, construction, redaction once, dead-letter records --------


HOOK = load_settings([{"method": "vm.start", "type": "pre/post", "url": URL}], {}).hooks[0]


def test_ids_are_32_hex_digits_and_unique():
    ids = [new_id() for _ in range(1000)]
    assert all(re.fullmatch("[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert Delivery(HOOK, PRE).id.startswith("msg_")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_worker_does_not_repeat_the_parents_ids():
    parent = new_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one id, then out without running any cleanup
        try:
            os.write(write, new_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 30)
        child = os.read(read, 100).decode() if ready else "(no answer from the child)"
    finally:
        os.close(read)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert re.fullmatch("[0-9a-f]{32}", child)
    assert child[:16] != parent[:16]  # a new random prefix, not the parent's counter


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="nothing"),
        pytest.param({"call_id": "c", "kind": "post"}, id="no-build"),
        pytest.param({"build": lambda: dict(POST), "kind": "post"}, id="no-call-id"),
        pytest.param({"build": lambda: dict(POST), "call_id": "c"}, id="no-kind"),
    ],
)
def test_a_delivery_needs_a_payload_or_a_complete_build(kwargs):
    with pytest.raises(TypeError, match="needs a payload"):
        Delivery(HOOK, **kwargs)


def test_a_built_payload_is_built_once_on_first_use():
    built = []

    def build():
        built.append(1)
        return dict(POST)

    delivery = Delivery(HOOK, build=build, call_id="call-1", kind="post")
    assert (delivery.call_id, delivery.kind, delivery.is_pre, built) == (
        "call-1",
        "post",
        False,
        [],
    )
    assert delivery.payload == POST
    assert delivery.payload == POST
    assert built == [1]


@pytest.mark.parametrize("payload, is_pre", [(PRE, True), (POST, False)], ids=["pre", "post"])
def test_is_pre_and_order_key(payload, is_pre):
    delivery = Delivery(HOOK, payload)
    assert delivery.is_pre is is_pre
    assert delivery.order_key == ("call-1", URL)


def test_a_payload_is_redacted_once():
    delivery = Delivery(HOOK, {**PRE, "params": {"password": "p", "id": "vm-1"}})
    delivery.redact(["password"])
    assert delivery.redacted
    delivery.redact(["id"])  # e.g. a record read back: already redacted
    assert delivery.payload["params"] == {"password": "***", "id": "vm-1"}


SETTINGS = load_settings(
    [
        {"method": "vm.*", "type": "post", "url": URL, "secret": OTHER_SECRET},
        {"method": "*", "type": "post", "url": URL + "/b", "headers": {"X-Team": "b"}},
    ],
    {},
    secret=SECRET,
)


def record(url, **extra):
    return {"url": url, "format": "json", "payload": {**POST, "params": {"token": "t0k"}}, **extra}


@pytest.mark.parametrize(
    "url, secret, headers",
    [
        pytest.param(URL, OTHER_SECRET, (), id="first-hook"),
        pytest.param(URL + "/b", SECRET, (("X-Team", "b"),), id="second-hook-global-secret"),
        pytest.param("http://127.0.0.1:9/gone", SECRET, (), id="no-hook-any-more"),
    ],
)
def test_a_record_gets_the_secret_and_headers_of_the_hook_with_its_url(url, secret, headers):
    delivery = Delivery.from_record(record(url), SETTINGS)
    assert (delivery.hook.url, delivery.hook.secret, delivery.hook.headers) == (
        url,
        secret,
        headers,
    )


def test_a_record_keeps_its_id_attempts_and_payload():
    kept = Delivery.from_record(record(URL, id="msg_1", lastError="HTTP 500"), SETTINGS)
    assert (kept.id, kept.attempts, kept.last_error) == ("msg_1", 0, "HTTP 500")
    assert Delivery.from_record(record(URL, id="msg_1"), SETTINGS, attempts=3).attempts == 3
    fresh = Delivery.from_record(record(URL, id=""), SETTINGS)
    assert re.fullmatch("msg_[0-9a-f]{32}", fresh.id)
    # Records are written redacted: what one holds is sent as it is.
    assert json.loads(kept.prepare(["token"]))["params"] == {"token": "t0k"}
    assert (kept.call_id, kept.kind) == ("call-1", "post")


def test_values_strict_json_cannot_hold_are_sent_as_stand_ins_with_a_note(webhook_receiver):
    sender, delivery = make(webhook_receiver.url)
    delivery.payload["params"] = {"ratio": math.nan, "size": math.inf, "name": "a\ud800"}
    attempt = sender.send(delivery)
    assert attempt.delivered
    (hook,) = webhook_receiver.attempts
    assert hook.payload["params"] == {"ratio": "NaN", "size": "Infinity", "name": "a\ufffd"}
    assert hook.headers["xo-webhooks-replaced"] == "3"
    # A record of it keeps the note for a later attempt (a replay, a Celery worker).
    again = Delivery.from_record(delivery.to_record(), SETTINGS)
    assert sender.headers(again, b"{}")["Xo-Webhooks-Replaced"] == "3"


def test_an_unexpected_error_fails_the_attempt_and_is_logged(webhook_receiver, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(delivery_module, "judge_answer", broken)
    sender, delivery = make(webhook_receiver.url)
    attempt = sender.send(delivery)
    assert (attempt.delivered, attempt.error) == (False, "unexpected error: RuntimeError: a bug")
    assert "unexpected error delivering hook vm.start pre for call call-1" in caplog.text
