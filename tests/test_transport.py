"""The http.client transport: routes, proxies, and kept-alive connections that a server
closes, against raw sockets on 127.0.0.1."""

from __future__ import annotations

import base64
import contextlib
import http.server
import itertools
import select
import socket
import ssl
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
    actions per accepted connection, each

    - "ok": 204, kept alive;
    - "big": a 200 with a body over MAX_RESPONSE;
    - "drop": read the request, close without answering;
    - "drip": answer a byte every 50 ms, an answer that never ends (for DRIP_FOR s at
      most, so that a transport without a deadline fails instead of hanging);
    - "silent": read the request and never answer, until the client hangs up;
    - "close-after": 204, then close the idle connection;
    - "408-later": 204, then, once ``proceed`` is set, an unasked 408 on the idle
      connection (as some servers say "idle too long") and close it.
    """

    DRIP_FOR = 5.0

    def __init__(self, script):
        self.script = list(script)
        self.closed = threading.Semaphore(0)  # released each time a connection is closed
        self.proceed = threading.Event()
        self.stopping = threading.Event()
        self.connections = 0
        self.requests = 0
        self.errors = []  # what went wrong on the server's side, checked by the tests
        self._conn = None
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        for actions in self.script:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # stop() shut the listening socket
                return
            self.connections += 1
            self._conn = conn
            try:
                with conn, conn.makefile("rb") as reader:
                    self._answer(conn, reader, actions)
            except OSError as exc:
                if not self.stopping.is_set():
                    self.errors.append(exc)
            self.closed.release()

    def _answer(self, conn, reader, actions):
        for action in actions:
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
            self.requests += 1
            if action == "drop":
                return
            if action == "silent":
                conn.recv(1)  # b"" once the client hangs up (or stop() shuts it)
                return
            if action == "drip":
                self._drip(conn)
                return
            if action == "big":
                body = b"x" * (MAX_RESPONSE + 10)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                continue
            conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
            if action == "408-later":
                self.proceed.wait(10)
                conn.sendall(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n")

    def _drip(self, conn):
        answer = itertools.chain(b"HTTP/1.1 204 No Content\r\nX-Drip: ", itertools.repeat(97))
        ends = time.monotonic() + self.DRIP_FOR
        try:
            for byte in answer:
                conn.sendall(bytes([byte]))
                # Paces the answer (interrupted by stop()); not a wait for a condition.
                if self.stopping.wait(0.05) or time.monotonic() > ends:
                    return
        except OSError:  # the client hung up: what a deadline does
            return

    def stop(self):
        self.stopping.set()
        self.proceed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self.sock.close()
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RDWR)  # wakes recv()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def scripted():
    servers = []

    def start(script):
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()
    assert [server.errors for server in servers] == [[] for _ in servers]


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
    assert post(transport, server.url)[0] == 204
    assert (server.connections, server.requests) == (2, 2)
    transport.release()


def test_bytes_on_an_idle_connection_are_not_taken_for_the_next_answer(scripted):
    # An idle connection that holds an unasked answer (or was closed) is seen as unusable
    # before a request is sent on it; sent anyway, the request would read that 408.
    server = scripted([["408-later"], ["ok"]])
    transport = Transport(timeout=5)
    assert post(transport, server.url)[0] == 204
    server.proceed.set()  # the first answer has been read in full: now the stray 408
    assert server.closed.acquire(timeout=5)
    assert post(transport, server.url) == (204, None)
    assert (server.connections, server.requests) == (2, 2)
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
    assert (server.connections, server.requests) == (1, 1)  # not sent twice
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


@pytest.mark.parametrize(
    "action",
    [
        pytest.param("drip", id="answer-a-byte-at-a-time"),
        pytest.param("silent", id="never-answers"),
    ],
)
def test_the_timeout_bounds_the_whole_attempt_not_each_read(action, scripted):
    # Each byte of the drip comes well within the timeout; the answer never does. The
    # bound sits between the timeout and twice it: an attempt allowed more than its
    # timeout (a deadline doubled, or one per read) fails it.
    timeout = 1.0
    server = scripted([[action]])
    transport = Transport(timeout=timeout)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        post(transport, server.url)
    elapsed = time.monotonic() - started
    assert 0.9 * timeout <= elapsed < 1.5 * timeout
    assert (server.connections, server.requests) == (1, 1)
    transport.release()


def test_a_proxy_of_another_scheme_is_refused_before_connecting(monkeypatch):
    for name in ("https_proxy", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "socks5://user:s3cret@127.0.0.1:1080")
    transport = Transport(timeout=5)
    with pytest.raises(ValueError, match=r"only http:// proxies are supported") as raised:
        post(transport, "https://127.0.0.1:9/hook")
    assert "socks5://user:***@127.0.0.1:1080" in str(raised.value)
    assert "s3cret" not in str(raised.value)
    transport.release()


# -- https through a proxy's CONNECT tunnel ----------------------------------------------


class TunnelProxy:
    """An HTTP proxy that only tunnels: ``CONNECT 127.0.0.1:<port>``, then relays bytes
    both ways. Records each CONNECT's request line and headers."""

    def __init__(self):
        self.connects = []  # (request line, {header name lower-cased: value})
        self.errors = []
        self._sockets = []
        self._threads = []
        self._lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._start(self._accept)

    def _start(self, target, *args):
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:  # stop() shut the listening socket
                return
            with self._lock:
                self._sockets.append(client)
            self._start(self._tunnel, client)

    def _tunnel(self, client):
        try:
            with client, client.makefile("rb") as reader:
                line = reader.readline().decode("latin-1").rstrip("\r\n")
                headers = {}
                while (header := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                self.connects.append((line, headers))
                method, target, _ = line.split(" ", 2)
                host, _, port = target.rpartition(":")
                if method != "CONNECT" or host != "127.0.0.1":  # loopback only
                    client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                    return
                with socket.create_connection((host, int(port)), timeout=10) as upstream:
                    with self._lock:
                        self._sockets.append(upstream)
                    client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    self._relay(client, upstream)
        except OSError as exc:
            self.errors.append(exc)

    @staticmethod
    def _relay(client, upstream):
        ends = {client: upstream, upstream: client}
        while True:
            readable, _, _ = select.select(list(ends), [], [], 10)
            if not readable:
                return
            for sock in readable:
                try:
                    data = sock.recv(65536)
                    if data:
                        ends[sock].sendall(data)
                except OSError:  # a reset, e.g. after a refused TLS handshake
                    return
                if not data:  # one side hung up: end the tunnel
                    return

    def stop(self):
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(10)
            assert not thread.is_alive()


class _TlsReceiver(http.server.BaseHTTPRequestHandler):
    """Answers 204 to a POST and records its request line and headers; keep-alive."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.seen.append((self.requestline, dict(self.headers)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def tls_receiver(tmp_path):
    """An https receiver on 127.0.0.1 with a certificate of a private CA; yields
    (server, url, path of the CA bundle)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TlsReceiver)
    server.daemon_threads = False  # so that server_close() joins the request threads
    server.seen = []
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server, f"https://127.0.0.1:{server.server_port}/hook?x=1", str(bundle)
    server.shutdown()
    server.server_close()
    thread.join(10)
    assert not thread.is_alive()


@pytest.fixture
def tunnel_proxy():
    proxy = TunnelProxy()
    yield proxy
    proxy.stop()
    assert proxy.errors == []


def test_https_goes_through_the_proxy_tunnel_verified_by_the_ca_bundle(
    tls_receiver, tunnel_proxy, monkeypatch
):
    server, url, bundle = tls_receiver
    for name in ("https_proxy", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", f"http://us%40r:pa55@127.0.0.1:{tunnel_proxy.port}")
    target = f"127.0.0.1:{server.server_port}"

    # Without the bundle, the receiver's certificate is checked, and refused, end to end.
    untrusting = Transport(timeout=5)
    with pytest.raises(ssl.SSLCertVerificationError):
        post(untrusting, url)
    untrusting.release()
    assert server.seen == []

    transport = Transport(timeout=5, ca_bundle=bundle)
    assert [post(transport, url)[0] for _ in range(2)] == [204, 204]
    transport.release()

    # One tunnel for the refused attempt, one kept alive for both hooks.
    login = "Basic " + base64.b64encode(b"us@r:pa55").decode()
    lines = [line.rsplit(" ", 1)[0] for line, _ in tunnel_proxy.connects]  # HTTP/1.0 or 1.1
    assert lines == [f"CONNECT {target}"] * 2
    assert all(h.get("proxy-authorization") == login for _, h in tunnel_proxy.connects)
    # Inside the tunnel: an origin-form request, and the proxy's credentials stay out.
    assert [line for line, _ in server.seen] == ["POST /hook?x=1 HTTP/1.1"] * 2
    for _, headers in server.seen:
        assert headers["Host"] == target
        assert "Proxy-Authorization" not in headers
