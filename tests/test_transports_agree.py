"""The two transports agree: the same cases, through the http.client transport and the
requests one, against real servers on 127.0.0.1, judged by the delivery policy.

Each case runs once per transport, each time against a fresh server, and compares
what the policy makes of the attempt (the whole :class:`Attempt`: status, retry,
``Retry-After``, the error's text), how long it took when the server never finishes,
and what the servers saw (request line and headers).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import itertools
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field

import pytest

from xo_webhooks.sending.policy import Attempt, judge_answer, judge_failure
from xo_webhooks.sending.transport import Transport
from xo_webhooks.sending.transport_requests import RequestsTransport

from .helpers import free_port
from .test_transport import ScriptedServer, TunnelProxy, _TlsReceiver

TIMEOUT = 1.0
TRANSPORTS = {"http": Transport, "requests": RequestsTransport}
HEADERS = {
    "User-Agent": "xo-webhooks-test",
    "Content-Type": "application/json",
    "Authorization": "Bearer t0k3n",
    "webhook-id": "msg_1",
}
#: What urllib3 adds on its own and http.client's raw request does not: the same
#: meaning to a receiver that does not compress (every receiver the tests run).
ADDED_BY_URLLIB3 = {"accept-encoding": "identity"}


class Stage:
    """A raw HTTP server on 127.0.0.1 that answers every connection with *action*:

    - ``(status line, headers)``: that answer (with ``Content-Length: 0``);
    - ``"reset"``: read the request, then reset the connection (RST);
    - ``"drop"``: read the request, close without answering;
    - ``"silent"``: read the request, never answer (until the client hangs up);
    - ``"drip"``: answer a byte every 50 ms, headers that never end;
    - ``"drip-body"``: complete headers, then a body a byte every 50 ms.

    With *tls*, a server-side SSL context, connections are TLS. Records each request
    line and headers (lower-cased names) in ``seen``.
    """

    DRIP_FOR = 5.0  # at most: a transport without a deadline fails instead of hanging

    def __init__(self, action: object, tls: ssl.SSLContext | None = None) -> None:
        self.action, self.tls = action, tls
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}/hook?x=1"
        self._start(self._accept)

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # stop() shut the listening socket
                return
            with self._lock:
                self._conns.append(conn)
            self._start(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                try:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):  # the client refused the certificate
                    conn.close()
                    return
            with conn, conn.makefile("rb") as reader:
                self._answer(conn, reader)
        except OSError as exc:
            if not self.stopping.is_set():
                self.errors.append(exc)

    def _answer(self, conn: socket.socket, reader) -> None:
        line = reader.readline().decode("latin-1").rstrip("\r\n")
        headers = {}
        while (header := reader.readline()) not in (b"\r\n", b""):
            name, _, value = header.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        reader.read(int(headers.get("content-length", 0)))
        self.seen.append((line, headers))
        action = self.action
        if action == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif action == "drop":
            pass
        elif action == "silent":
            conn.recv(1)  # b"" once the client hangs up (or stop() shuts it)
        elif action in ("drip", "drip-body"):
            head = b"HTTP/1.1 200 OK\r\nX-Drip: " if action == "drip" else (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
            )  # fmt: skip
            conn.sendall(head)
            self._drip(conn)
        else:
            status, extra = action  # type: ignore[misc]
            lines = [status, *(f"{k}: {v}" for k, v in extra.items()), "Content-Length: 0"]
            conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def _drip(self, conn: socket.socket) -> None:
        ends = time.monotonic() + self.DRIP_FOR
        with contextlib.suppress(OSError):  # the client hung up: what a deadline does
            for _ in itertools.count():
                conn.sendall(b"a")
                # Paces the answer (interrupted by stop()); not a wait for a condition.
                if self.stopping.wait(0.05) or time.monotonic() > ends:
                    return

    def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self.sock.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes recv()
        for thread in threads:
            thread.join(10)
            assert not thread.is_alive()


@dataclass(frozen=True)
class Case:
    """One row: what the server does, and how the transport reaches it.

    :param via: ``direct``; ``proxy`` (``HTTP_PROXY`` names a server that answers in
        the origin's place, the origin being a port where nothing listens);
        ``no-proxy`` (``HTTP_PROXY`` set, ``NO_PROXY`` naming the host); ``tunnel``
        (https through a CONNECT proxy); ``refused`` (nothing listens).
    :param tls: the server speaks TLS with a certificate of a private CA.
    :param bundle: the transport is given that CA's bundle.
    :param no_proxy: ``NO_PROXY`` with a proxy (none when empty).
    :param expected: the attempt the policy judges, both transports alike.
    :param bounded: the attempt must end within the timeout (a server that never does).
    """

    action: object = ("HTTP/1.1 204 No Content", {})
    via: str = "direct"
    tls: bool = False
    bundle: bool = False
    no_proxy: str = ""
    expected: Attempt = field(default_factory=lambda: judge_answer(204))
    bounded: bool = False


def refused() -> Attempt:
    return judge_failure(ConnectionRefusedError(111, "Connection refused"), TIMEOUT)


def reset() -> Attempt:
    return judge_failure(ConnectionResetError(104, "Connection reset by peer"), TIMEOUT)


DROPPED = http.client.RemoteDisconnected("Remote end closed connection without response")
TIMED_OUT = judge_failure(TimeoutError("timed out"), TIMEOUT)
CASES = [
    pytest.param(Case(("HTTP/1.1 200 OK", {})), judge_answer(200), id="2xx"),
    pytest.param(Case(("HTTP/1.1 302 Found", {"Location": "/elsewhere"})), judge_answer(302),
                 id="3xx-not-followed"),
    pytest.param(Case(("HTTP/1.1 404 Not Found", {})), judge_answer(404), id="4xx"),
    pytest.param(Case(("HTTP/1.1 503 Service Unavailable", {})), judge_answer(503), id="5xx"),
    pytest.param(Case(("HTTP/1.1 429 Too Many Requests", {"Retry-After": "120"})),
                 judge_answer(429, "120"), id="429-retry-after"),
    pytest.param(Case(via="refused"), refused(), id="refused"),
    pytest.param(Case("reset"), reset(), id="reset"),
    pytest.param(Case("drop"), judge_failure(DROPPED, TIMEOUT), id="dropped"),
    pytest.param(Case("silent", bounded=True), TIMED_OUT, id="hangs"),
    pytest.param(Case("drip", bounded=True), TIMED_OUT, id="dribbles-headers"),
    pytest.param(Case("drip-body", bounded=True), TIMED_OUT, id="dribbles-body"),
    pytest.param(Case(tls=True, bundle=True), judge_answer(204), id="tls-private-ca"),
    pytest.param(Case(tls=True), "SSLCertVerificationError", id="tls-untrusted"),
    pytest.param(Case(via="proxy"), judge_answer(204), id="http-proxy"),
    pytest.param(Case(via="no-proxy", no_proxy="127.0.0.1"), judge_answer(204),
                 id="no-proxy"),
    pytest.param(Case(via="no-proxy", no_proxy="localhost, 127.0.0.1"), judge_answer(204),
                 id="no-proxy-list"),
    pytest.param(Case(via="no-proxy", no_proxy="*"), judge_answer(204), id="no-proxy-star"),
    # urllib's NO_PROXY reading has no CIDR (requests' own would bypass): through the proxy.
    pytest.param(Case(via="proxy", no_proxy="127.0.0.0/8"), judge_answer(204),
                 id="no-proxy-cidr-not-read"),
    pytest.param(Case(via="tunnel", tls=True, bundle=True), judge_answer(204),
                 id="https-through-tunnel"),
]  # fmt: skip


@pytest.fixture
def private_ca(tmp_path):
    """(server-side SSL context with a certificate for 127.0.0.1, path of the CA bundle)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    return context, str(bundle)


@pytest.fixture
def stages():
    started: list[Stage | TunnelProxy] = []

    def start(server):
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
    assert [server.errors for server in started] == [[] for _ in started]


@pytest.fixture
def clean_proxy_env(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def attempt_through(name, case, stages, env, private_ca):
    """Run *case* through the transport *name*; return (attempt, seconds, request lines
    and headers each server saw)."""
    tls = private_ca[0] if case.tls else None
    servers = []
    if case.via == "refused":
        url = f"http://127.0.0.1:{free_port()}/hook?x=1"
    else:
        origin = stages(Stage(case.action, tls))
        servers.append(origin)
        url = origin.url
    if case.via in ("proxy", "no-proxy"):
        proxy = stages(Stage(("HTTP/1.1 204 No Content", {})))
        servers.append(proxy)
        env.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        if case.no_proxy:
            env.setenv("NO_PROXY", case.no_proxy)
        if case.via == "proxy":
            origin.stop()  # only the proxy can answer
            url = f"http://127.0.0.1:{free_port()}/hook?x=1"
    if case.via == "tunnel":
        tunnel = stages(TunnelProxy())
        env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{tunnel.port}")
    transport = TRANSPORTS[name](TIMEOUT, private_ca[1] if case.bundle else None)
    started = time.monotonic()
    try:
        status, retry_after = transport.post(url, b'{"type":"pre"}', dict(HEADERS))
    except Exception as error:
        attempt = judge_failure(error, TIMEOUT)
    else:
        attempt = judge_answer(status, retry_after)
    elapsed = time.monotonic() - started
    transport.release()
    if case.via == "tunnel":
        servers.append(tunnel)
    return attempt, elapsed, [seen_of(server, url) for server in servers]


def seen_of(server, url):
    """What *server* saw, with the ports of this run replaced by names."""
    if isinstance(server, TunnelProxy):
        return [line.rsplit(" ", 1)[0].split(":")[0] for line, _ in server.connects]
    requests = []
    for line, headers in server.seen:
        headers = {k: v for k, v in headers.items() if ADDED_BY_URLLIB3.get(k) != v}
        headers["host"] = "origin" if headers["host"] == url.split("/")[2] else "other"
        requests.append((line.replace(url, "<url>").replace(url.split("/", 3)[3], "<path>"),
                         headers))  # fmt: skip
    return requests


@pytest.mark.parametrize("case, expected", CASES)
def test_transports_agree(case, expected, stages, clean_proxy_env, private_ca):
    outcomes = {
        name: attempt_through(name, case, stages, clean_proxy_env, private_ca)
        for name in TRANSPORTS
    }
    (http_attempt, http_time, http_seen), (req_attempt, req_time, req_seen) = outcomes.values()
    assert req_attempt == http_attempt
    assert req_seen == http_seen
    if isinstance(expected, str):  # the text of the error depends on the platform's OpenSSL
        assert http_attempt.retryable and expected in (http_attempt.error or "")
    else:
        assert http_attempt == expected
    if case.bounded:  # the whole attempt, not each read: between the timeout and 1.5x
        for elapsed in (http_time, req_time):
            assert 0.9 * TIMEOUT <= elapsed < 1.5 * TIMEOUT


# -- kept-alive connections ---------------------------------------------------------------


@pytest.mark.parametrize(
    "script, posts, expected",
    [
        pytest.param([["ok", "ok", "ok"]], 3, (1, 3), id="reused"),
        pytest.param([["big"], ["ok"]], 2, (2, 2), id="oversized-answer-drops-it"),
        pytest.param([["ok", "drop"], ["ok"]], 2, (2, 3), id="dropped-when-reused-sent-again"),
        pytest.param([["close-after"], ["ok"]], 2, (2, 2), id="closed-while-idle-replaced"),
    ],
)  # fmt: skip
def test_kept_alive_connections_agree(script, posts, expected, clean_proxy_env):
    # (connections, requests) the server saw; every hook answered.
    for make in TRANSPORTS.values():
        server = ScriptedServer(script)
        try:
            transport = make(5)
            statuses = []
            for _ in range(posts):
                statuses.append(transport.post(server.url, b"{}", dict(HEADERS))[0])
                if script[0] == ["close-after"] and len(statuses) == 1:
                    assert server.closed.acquire(timeout=5)  # closed by the server
            transport.release()
            assert server.closed.acquire(timeout=5)  # the last connection ended
            assert statuses[-1] == 204 and all(s in (200, 204) for s in statuses)
            assert (server.connections, server.requests) == expected, make.__name__
        finally:
            server.stop()
        assert server.errors == []


class _CountingServer(http.server.ThreadingHTTPServer):
    daemon_threads = False  # so that server_close() joins the request threads

    def process_request(self, request, client_address):
        self.connections += 1
        super().process_request(request, client_address)


def test_tls_connections_are_kept_alive_alike(private_ca, clean_proxy_env):
    context, bundle = private_ca
    for make in TRANSPORTS.values():
        server = _CountingServer(("127.0.0.1", 0), _TlsReceiver)
        server.connections, server.seen = 0, []
        server.socket = context.wrap_socket(server.socket, server_side=True)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            transport = make(5, bundle)
            url = f"https://127.0.0.1:{server.server_port}/hook"
            assert [transport.post(url, b"{}", dict(HEADERS))[0] for _ in range(3)] == [204] * 3
            transport.release()
        finally:
            server.shutdown()
            server.server_close()
            thread.join(10)
        assert (server.connections, len(server.seen)) == (1, 3), make.__name__
