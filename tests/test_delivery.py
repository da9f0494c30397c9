"""The HTTP side of a delivery: Sender's requests, signing, headers, TLS and proxies,
against real servers on 127.0.0.1."""

from __future__ import annotations

import http.server
import ssl
import threading
import time

import pytest
from standardwebhooks.webhooks import Webhook

from xo_webhooks import load_settings
from xo_webhooks.request.payload import pre_payload
from xo_webhooks.sending.delivery import Delivery, Sender

from .helpers import SECRET

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
