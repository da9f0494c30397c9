"""The http.client transport: routes, proxies, and kept-alive connections that a server
closes, against raw sockets on 127.0.0.1."""

from __future__ import annotations

import base64
import contextlib
import socket
import threading
import time

import pytest

from xo_webhooks.sending.transport import MAX_RESPONSE, Route, Transport

PROXY = "http://127.0.0.1:3128"


@pytest.mark.parametrize(
    "url, proxies, expected",
    [
        pytest.param("http://127.0.0.1:8080/h?x=1", {}, (False, "127.0.0.1", 8080, "/h?x=1", None),
                     id="direct-http"),
        pytest.param("https://127.0.0.1/", {}, (True, "127.0.0.1", 443, "/", None),
                     id="direct-https"),
        pytest.param("http://127.0.0.1", {}, (False, "127.0.0.1", 80, "/", None), id="no-path"),
        pytest.param("http://127.0.0.2:9/h", {"http": PROXY},
                     (False, "127.0.0.1", 3128, "http://127.0.0.2:9/h", None), id="http-via-proxy"),
        pytest.param("https://127.0.0.2/h", {"https": "127.0.0.1:3128"},
                     (True, "127.0.0.1", 3128, "/h", ("127.0.0.2", 443)), id="https-tunnel"),
    ],
)  # fmt: skip
def test_routes(url, proxies, expected, monkeypatch):
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    route = Route.of(url, proxies)
    assert (route.https, route.host, route.port, route.target, route.tunnel) == expected


def test_no_proxy_and_proxy_credentials(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.3")
    proxies = {"http": "http://us%40r:p%3Ass@127.0.0.1:3128"}
    assert Route.of("http://127.0.0.3/", proxies).host == "127.0.0.3"
    route = Route.of("http://127.0.0.2/", proxies)
    assert route.proxy_headers == {
        "Proxy-Authorization": "Basic " + base64.b64encode(b"us@r:p:ss").decode()
    }


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/", "http:///nohost", "javascript:alert(1)"])
def test_unusable_urls(url):
    with pytest.raises(ValueError):
        Route.of(url, {})


class ScriptedServer:
    """Answers each request on a raw socket as scripted per connection: a list of
    actions per accepted connection, each "ok" (204, kept alive), "big" (a 200 with a
    body over MAX_RESPONSE), "drop" (read the request, close without answering),
    "drip" (answer a byte at a time) or "close-after" (204, then close the idle
    connection)."""

    def __init__(self, script):
        self.script = list(script)
        self.closed = threading.Semaphore(0)  # released each time a connection is closed
        self.connections = 0
        self.requests = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        for actions in self.script:
            conn, _ = self.sock.accept()
            self.connections += 1
            with conn, conn.makefile("rb") as reader:
                for action in actions:
                    length = 0
                    while (line := reader.readline()) not in (b"\r\n", b""):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    reader.read(length)
                    self.requests += 1
                    if action == "drop":
                        break
                    if action == "drip":  # a byte every 0.1 s: 2.8 s for the answer
                        with contextlib.suppress(OSError):
                            for byte in b"HTTP/1.1 204 No Content\r\n\r\n":
                                conn.sendall(bytes([byte]))
                                time.sleep(0.1)
                        break
                    if action == "big":
                        body = b"x" * (MAX_RESPONSE + 10)
                        conn.sendall(
                            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                        )
                    else:
                        conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
            self.closed.release()

    def stop(self):
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def scripted():
    servers = []

    def start(script):
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def post(transport, url):
    return transport.post(url, b"{}", {"Content-Type": "application/json"})


def test_kept_alive_connection_is_reused(scripted):
    server = scripted([["ok", "ok", "ok"]])
    transport = Transport(timeout=5)
    assert [post(transport, server.url)[0] for _ in range(3)] == [204, 204, 204]
    assert server.connections == 1
    transport.release()


def test_idle_connection_closed_by_the_server_is_replaced(scripted):
    server = scripted([["close-after"], ["ok"]])
    transport = Transport(timeout=5)
    assert post(transport, server.url)[0] == 204
    assert server.closed.acquire(timeout=5)  # the server closed the idle connection
    exchanges = []
    original = transport._exchange
    transport._exchange = lambda *a: exchanges.append(a) or original(*a)
    assert post(transport, server.url)[0] == 204
    assert len(exchanges) == 1  # seen closed before use: no request was lost on it
    assert server.connections == 2
    transport.release()


def test_request_dropped_on_a_reused_connection_is_sent_once_more(scripted):
    server = scripted([["ok", "drop"], ["ok"]])
    transport = Transport(timeout=5)
    assert post(transport, server.url)[0] == 204
    assert post(transport, server.url)[0] == 204  # dropped on the old one, sent on a new one
    assert (server.connections, server.requests) == (2, 3)
    transport.release()


def test_dropped_on_a_new_connection_is_an_error(scripted):
    server = scripted([["drop"]])
    transport = Transport(timeout=5)
    with pytest.raises(ConnectionError):
        post(transport, server.url)
    transport.release()


def test_an_oversized_answer_ends_the_connection(scripted):
    server = scripted([["big"], ["ok"]])
    transport = Transport(timeout=5)
    assert post(transport, server.url)[0] == 200
    assert post(transport, server.url)[0] == 204
    assert server.connections == 2
    transport.release()


def test_a_header_with_a_line_break_is_refused_not_sent(scripted):
    server = scripted([["ok"]])
    transport = Transport(timeout=5)
    with pytest.raises(ValueError, match="line break"):
        transport.post(server.url, b"{}", {"X-Evil": "a\r\nInjected: yes"})
    assert post(transport, server.url)[0] == 204
    assert server.requests == 1
    transport.release()


def test_the_timeout_bounds_the_whole_attempt_not_each_read(scripted):
    server = scripted([["drip"]])
    transport = Transport(timeout=0.5)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        post(transport, server.url)
    assert time.monotonic() - started < 2  # each byte came within 0.5 s; the answer did not
