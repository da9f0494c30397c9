"""The requests transport, with requests' adapter mocked by ``responses``: what it sends,
what it asks requests for (no redirects, the CA bundle, proxies, a timeout), how its
failures read, and its sessions (one per thread, made by the factory, released).

Its behaviour against real servers, beside the http.client transport, is in
tests/test_transports_agree.py.
"""

from __future__ import annotations

import threading

import certifi
import pytest
import requests
import responses
import urllib3

from xo_webhooks import load_settings
from xo_webhooks.sending.delivery import Delivery, Sender, make_transport
from xo_webhooks.sending.transport import MAX_RESPONSE, Transport
from xo_webhooks.sending.transport_requests import RequestsTransport, default_session

from .helpers import PRE, SECRET

URL = "http://127.0.0.1:9/hook?x=1"
HEADERS = {"Content-Type": "application/json", "webhook-id": "msg_1"}


@pytest.fixture
def mocked():
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "status, headers, expected",
    [
        pytest.param(204, {}, (204, None), id="2xx"),
        pytest.param(503, {}, (503, None), id="5xx"),
        pytest.param(429, {"Retry-After": "120"}, (429, "120"), id="429-retry-after"),
        pytest.param(302, {"Location": "http://127.0.0.1:9/elsewhere"}, (302, None),
                     id="3xx-not-followed"),
    ],
)  # fmt: skip
def test_answers(status, headers, expected, mocked):
    mocked.post(URL, status=status, headers=headers)
    transport = RequestsTransport(5)
    assert transport.post(URL, b'{"a":1}', dict(HEADERS)) == expected
    assert len(mocked.calls) == 1  # a redirect is not followed
    transport.release()


def test_the_request_is_the_body_and_headers_given_and_nothing_more(mocked):
    mocked.post(URL, status=204)
    transport = RequestsTransport(5)
    transport.post(URL, b'{"a":1}', dict(HEADERS))
    request = mocked.calls[0].request
    assert (request.method, request.url, request.body) == ("POST", URL, b'{"a":1}')
    # requests' default headers (Accept, Accept-Encoding, Connection, its User-Agent)
    # are not added: the receiver gets what the http transport sends.
    assert dict(request.headers) == {**HEADERS, "Content-Length": "7"}
    transport.release()


def test_what_requests_is_asked_for(mocked, tmp_path):
    mocked.post(URL, status=204)
    mocked.post(URL, status=204)
    RequestsTransport(2.5).post(URL, b"{}", {})
    bundle = tmp_path / "ca.pem"
    RequestsTransport(2.5, str(bundle)).post(URL, b"{}", {})
    default, given = (call.request.req_kwargs for call in mocked.calls)
    assert default["verify"] == certifi.where()
    assert given["verify"] == str(bundle)
    assert default["stream"] is True  # the answer is read against the deadline
    assert all(0 < t <= 2.5 for t in default["timeout"])
    assert default["proxies"] == {}  # no proxy in the environment


@pytest.mark.parametrize(
    "no_proxy, expected",
    [
        pytest.param("", "http://127.0.0.1:3128", id="proxied"),
        pytest.param("127.0.0.1", None, id="no-proxy"),
        pytest.param("127.0.0.0/8", "http://127.0.0.1:3128", id="cidr-read-as-urllib-does"),
    ],
)
def test_proxies_are_chosen_as_the_http_transport_chooses_them(
    no_proxy, expected, mocked, monkeypatch
):
    monkeypatch.setenv("HTTP_PROXY", "127.0.0.1:3128")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    mocked.post(URL, status=204)
    RequestsTransport(5).post(URL, b"{}", {})
    assert mocked.calls[0].request.req_kwargs["proxies"].get("http") == expected


@pytest.mark.parametrize(
    "url, proxy",
    [
        pytest.param("ftp://127.0.0.1/", None, id="not-http"),
        pytest.param("http:///nohost", None, id="no-host"),
        pytest.param(URL, "socks5://127.0.0.1:1080", id="socks-proxy"),
    ],
)
def test_unusable_urls_and_proxies_are_refused_as_by_the_http_transport(url, proxy, monkeypatch):
    if proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy)
    for transport in (Transport(5), RequestsTransport(5)):
        with pytest.raises(ValueError):
            transport.post(url, b"{}", {})


def test_a_header_with_a_line_break_is_refused(mocked):
    with pytest.raises(ValueError):
        RequestsTransport(5).post(URL, b"{}", {"X-Evil": "a\r\nInjected: yes"})
    assert len(mocked.calls) == 0


def test_an_oversized_answer_is_read_up_to_the_limit(mocked):
    mocked.post(URL, status=200, body=b"x" * (MAX_RESPONSE + 10))
    assert RequestsTransport(5).post(URL, b"{}", {}) == (200, None)


def reset_error():
    reset = ConnectionResetError(104, "Connection reset by peer")
    return requests.ConnectionError(urllib3.exceptions.ProtocolError("Connection aborted.", reset))


@pytest.mark.parametrize(
    "raised, expected, text",
    [
        pytest.param(requests.ConnectTimeout("connect timed out"), TimeoutError,
                     "connect timed out", id="connect-timeout"),
        pytest.param(requests.ReadTimeout("read timed out"), TimeoutError, "read timed out",
                     id="read-timeout"),
        pytest.param(reset_error(), ConnectionResetError, "[Errno 104] Connection reset by peer",
                     id="reset-unwrapped"),
        pytest.param(requests.ConnectionError("no route"), ConnectionError, "no route",
                     id="connection-error"),
        pytest.param(requests.exceptions.ChunkedEncodingError("bad chunk"), ConnectionError,
                     "bad chunk", id="broken-answer"),
        pytest.param(requests.exceptions.InvalidHeader("in header value: ' Bearer xyz'"),
                     ValueError, "InvalidHeader (not shown: it may quote a secret)",
                     id="bad-input-not-quoted"),
        pytest.param(requests.ConnectionError("Max retries exceeded with url: /h?sig=SECRET"),
                     ConnectionError, "Max retries exceeded with url: …",
                     id="query-masked"),
        pytest.param(requests.ConnectionError("Max retries exceeded with url: /services/T0/B0/X"),
                     ConnectionError, "Max retries exceeded with url: …",
                     id="path-masked"),
    ],
)  # fmt: skip
def test_failures_are_raised_as_http_client_raises_them(raised, expected, text, mocked):
    # judge_failure describes them alike: a timeout, a failed connection, bad input.
    mocked.post(URL, body=raised)
    with pytest.raises(expected) as caught:
        RequestsTransport(5).post(URL, b"{}", {})
    assert type(caught.value) in (expected, *expected.__subclasses__())
    assert str(caught.value) == text
    assert not isinstance(caught.value, requests.RequestException)
    assert caught.value.__cause__ is raised


class CountingSession(requests.Session):
    made: list[CountingSession] = []

    def __init__(self):
        super().__init__()
        self.closed = 0
        CountingSession.made.append(self)

    def close(self):
        self.closed += 1
        super().close()


@pytest.fixture
def counting():
    CountingSession.made = []
    return CountingSession


def test_one_session_per_thread_made_by_the_factory(counting, mocked):
    mocked.post(URL, status=204)
    transport = RequestsTransport(5, session_factory=counting)

    def deliver():
        transport.post(URL, b"{}", {})
        transport.post(URL, b"{}", {})
        transport.release()

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(mocked.calls) == 4
    assert [session.closed for session in counting.made] == [1, 1]


def test_release_closes_and_reset_forgets(counting, mocked):
    mocked.post(URL, status=204)
    transport = RequestsTransport(5, session_factory=counting)
    transport.post(URL, b"{}", {})
    transport.release()
    transport.release()  # nothing left to close
    transport.post(URL, b"{}", {})
    transport.reset()  # as after a fork: forgotten, not closed
    transport.post(URL, b"{}", {})
    assert [session.closed for session in counting.made] == [1, 0, 0]


def test_the_factory_session_keeps_its_auth_verify_and_proxies(mocked):
    def factory():
        session = requests.Session()
        session.auth = ("hooks", "s3cret")
        session.verify = "/etc/hooks/ca.pem"
        session.proxies = {"http": "http://127.0.0.1:3128"}
        return session

    mocked.post(URL, status=204)
    RequestsTransport(5, session_factory=factory).post(URL, b"{}", {})
    request = mocked.calls[0].request
    assert request.headers["Authorization"].startswith("Basic ")
    assert request.req_kwargs["verify"] == "/etc/hooks/ca.pem"
    assert request.req_kwargs["proxies"] == {"http": "http://127.0.0.1:3128"}  # its own


def test_the_default_session_takes_nothing_from_the_environment():
    session = default_session()
    assert (session.trust_env, dict(session.headers)) == (False, {})
    session.close()


def test_the_setting_and_the_factory_choose_the_transport():
    hooks = [{"method": "vm.start", "type": "pre", "url": URL}]
    assert isinstance(make_transport(load_settings(hooks, {})), Transport)
    chosen = load_settings(hooks, {"XO_WEBHOOKS_TRANSPORT": "requests"})
    assert isinstance(make_transport(chosen), RequestsTransport)
    assert isinstance(make_transport(load_settings(hooks, {}), requests.Session),
                      RequestsTransport)  # fmt: skip


def test_a_signed_hook_through_the_sender(mocked):
    settings = load_settings(
        [{"method": "vm.start", "type": "pre", "url": URL, "secret": SECRET}], {},
        transport="requests",
    )  # fmt: skip
    mocked.post(URL, status=204)
    sender = Sender(settings)
    delivery = Delivery(settings.hooks[0], dict(PRE))
    attempt = sender.send(delivery)
    sender.release()
    assert attempt.delivered and attempt.status == 204
    headers = mocked.calls[0].request.headers
    assert headers["webhook-id"] == delivery.id
    assert headers["webhook-signature"].startswith("v1,")


def test_a_session_factory_is_for_the_thread_dispatcher_only():
    """Celery workers build their own sender from the settings: they cannot take a
    callable, and a waitForResponse hook would go out without the user's adapters."""
    from xo_webhooks import ConfigError, WebhookMiddleware

    def app(environ, start_response):  # never called
        raise AssertionError

    hooks = [{"method": "*", "type": "pre", "url": "http://127.0.0.1:9/"}]
    with pytest.raises(ConfigError, match="session_factory: only the thread dispatcher"):
        WebhookMiddleware(
            app, hooks, session_factory=requests.Session, environ={},
            dispatcher="celery", broker_url="redis://127.0.0.1:9/0",
        )  # fmt: skip
    threads = WebhookMiddleware(app, hooks, session_factory=requests.Session, environ={})
    assert type(threads.dispatcher.sender.transport).__name__ == "RequestsTransport"
    threads.close(0)


def test_a_failing_session_factory_or_close_never_reaches_the_caller(mocked, caplog):
    def broken() -> requests.Session:
        raise RuntimeError("no session today")

    with pytest.raises(ValueError, match="session_factory failed: RuntimeError"):
        RequestsTransport(5, session_factory=broken).post(URL, b"{}", {})
    assert "session_factory failed" in caplog.text

    class Unclosable(requests.Session):
        def close(self) -> None:
            raise RuntimeError("cannot close")

    transport = RequestsTransport(5, session_factory=Unclosable)
    mocked.add(responses.POST, URL, status=204)
    transport.post(URL, b"{}", {})
    transport.release()  # logged, not raised
    assert "closing a requests session failed" in caplog.text
