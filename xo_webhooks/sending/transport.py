"""The HTTP transport of hooks: http.client with one kept-alive connection per thread
and origin.

Why not requests or urllib3: a hook is one small POST to one of a few fixed URLs, and
their per-request layers cost several times the CPU of the request itself, CPU the API
shares (the README's Performance section has the numbers). What this keeps from them:
certificates verified (certifi, or a CA bundle), proxies from ``HTTP_PROXY`` /
``HTTPS_PROXY`` / ``NO_PROXY``, connect and read timeouts, a connection the server
closed while idle detected and replaced, and redirects never followed.
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import select
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import certifi

from .._urls import basic_auth, mask_passwords, parse_http_url, without_userinfo

__all__ = ["Transport", "Route", "MAX_RESPONSE", "SessionFactory"]

MAX_RESPONSE = 64 * 1024  # bytes of a receiver's answer read; a longer one ends the connection

if TYPE_CHECKING:
    import requests


#: Makes the ``requests.Session`` of a delivery thread (mounted adapters, client
#: certificates, auth of the user's own).
SessionFactory = Callable[[], "requests.Session"]


@dataclass(frozen=True)
class Route:
    """How to reach a URL: which server to connect to, and what to ask it for.

    :param key: connections are shared by the URLs with the same key (origin and proxy).
    :param https: whether the connection (to the origin, or tunnelled through the proxy)
        uses TLS.
    :param host: the server connected to: the origin, or the proxy.
    :param target: the request target: the path and query, or the whole URL when an
        http URL goes through a proxy.
    :param host_header: the ``Host`` header: the origin, its port when not the default.
    :param tunnel: ``(host, port)`` to reach through the proxy with ``CONNECT``.
    :param proxy_headers: ``Proxy-Authorization`` when the proxy URL has credentials.
    """

    key: tuple[object, ...]
    https: bool
    host: str
    port: int
    target: str
    host_header: str
    tunnel: tuple[str, int] | None = None
    proxy_headers: dict[str, str] = field(default_factory=dict)
    auth: str | None = None  #: ``Authorization`` from the URL's ``user:password@``

    @classmethod
    def of(cls, url: str, proxies: dict[str, str]) -> Route:
        """The route to *url*, through the proxy *proxies* name for it (as returned by
        :func:`urllib.request.getproxies`), unless ``NO_PROXY`` exempts its host."""
        return dataclasses.replace(cls._of(without_userinfo(url), proxies), auth=basic_auth(url))

    @classmethod
    def _of(cls, url: str, proxies: dict[str, str]) -> Route:
        parts = parse_http_url(url)
        https, port = parts.https, parts.port
        origin = parts.host if ":" not in parts.host else f"[{parts.host}]"
        host = origin if parts.default_port else f"{origin}:{port}"
        proxy = proxies.get("https" if https else "http")
        if not proxy or urllib.request.proxy_bypass(parts.host):
            key: tuple[object, ...] = ("direct", https, parts.host, port)
            return cls(key, https, parts.host, port, parts.target, host)
        via = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        if via.scheme != "http" or not via.hostname:
            raise ValueError(f"only http:// proxies are supported, not {mask_passwords(proxy)!r}")
        headers = {}
        proxy_auth = basic_auth(via.geturl())
        if proxy_auth:
            headers["Proxy-Authorization"] = proxy_auth
        proxy_port = via.port or 80
        key = ("proxy", via.hostname, proxy_port, https, parts.host, port)
        if https:  # TLS to the origin, inside a CONNECT tunnel
            tunnel = (parts.host, port)
            return cls(key, True, via.hostname, proxy_port, parts.target, host, tunnel, headers)
        return cls(key, False, via.hostname, proxy_port, url, host, None, headers)


class Transport:
    """POSTs bodies; each thread keeps its own connections, so they need no lock.

    :param timeout: seconds one attempt may take, connecting, sending and reading the
        answer together (name resolution aside: the system resolver has no timeout).
    :param ca_bundle: a CA bundle file for https receivers (certifi's by default).
    """

    def __init__(self, timeout: float, ca_bundle: str | None = None) -> None:
        self.timeout = timeout
        self._tls = ssl.create_default_context(cafile=ca_bundle or certifi.where())
        self._proxies = urllib.request.getproxies()
        self._routes: dict[str, Route] = {}
        self._local = threading.local()

    def reset(self) -> None:
        """Forget every connection (in a child process after a fork)."""
        self._local = threading.local()

    def release(self) -> None:
        """Close the calling thread's connections (a thread about to end)."""
        for connection in self._connections().values():
            connection.close()
        self._connections().clear()

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str | None]:
        """POST *body* to *url*; return the status and the ``Retry-After`` header.

        :raises TimeoutError: connecting or waiting for the answer took too long.
        :raises OSError: the connection failed (refused, reset, TLS); ``RemoteDisconnected``
            included.
        :raises http.client.HTTPException: the answer was not HTTP.
        :raises ValueError: *url* or the proxy it needs cannot be used.
        """
        route = self._routes.get(url) or self._routes.setdefault(url, Route.of(url, self._proxies))
        if route.proxy_headers and route.tunnel is None:  # the proxy reads this request
            headers = {**headers, **route.proxy_headers}
        if route.auth and not any(name.lower() == "authorization" for name in headers):
            headers = {**headers, "Authorization": route.auth}  # the hook's own header wins
        deadline = time.monotonic() + self.timeout  # for the whole attempt
        connection, reused = self._connection(route)
        try:
            return self._exchange(connection, route, body, headers, deadline)
        except ConnectionError:
            connection.close()
            if not reused:
                raise
            # The server closed the kept-alive connection just as it was reused: it did
            # not take the request, so send it once more on a new connection.
            connection, _ = self._connection(route)
            try:
                return self._exchange(connection, route, body, headers, deadline)
            except BaseException:
                connection.close()
                raise
        except BaseException:
            connection.close()
            raise

    def _connections(self) -> dict[tuple[object, ...], http.client.HTTPConnection]:
        connections = getattr(self._local, "connections", None)
        if connections is None:
            connections = self._local.connections = {}
        return connections

    def _connection(self, route: Route) -> tuple[http.client.HTTPConnection, bool]:
        connections = self._connections()
        connection = connections.get(route.key)
        if connection is not None and connection.sock is not None:
            if not _closed_by_peer(connection.sock):
                return connection, True
            connection.close()
        if connection is None:
            connection = self._new_connection(route)
            connections[route.key] = connection
        return connection, False  # http.client connects at the next request

    def _new_connection(self, route: Route) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection
        if route.https:
            connection = http.client.HTTPSConnection(
                route.host, route.port, timeout=self.timeout, context=self._tls
            )
        else:
            connection = http.client.HTTPConnection(route.host, route.port, timeout=self.timeout)
        if route.tunnel is not None:
            connection.set_tunnel(*route.tunnel, headers=route.proxy_headers)
        return connection

    def _exchange(
        self,
        connection: http.client.HTTPConnection,
        route: Route,
        body: bytes,
        headers: dict[str, str],
        deadline: float,
    ) -> tuple[int, str | None]:
        # http.client connects (TLS, CONNECT tunnel); the request itself is written in
        # one send, not http.client's two (head, then body), and read with its parser.
        lines = [f"POST {route.target} HTTP/1.1", f"Host: {route.host_header}"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                raise ValueError(f"header {name!r} holds a line break")
            lines.append(f"{name}: {value}")
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        if connection.sock is None:
            connection.timeout = _remaining(deadline)
            connection.connect()
        sock = connection.sock
        assert sock is not None
        sock.settimeout(_remaining(deadline))
        sock.sendall("\r\n".join(lines).encode("latin-1") + body)
        response = http.client.HTTPResponse(_Timed(sock, deadline), method="POST")  # type: ignore[arg-type]
        response.begin()
        # Read the answer to the end so that the connection can carry the next hook;
        # past the limit, or when the server says so, drop the connection.
        response.read(MAX_RESPONSE)
        if response.will_close or not response.isclosed():
            connection.close()
        return response.status, response.getheader("Retry-After")


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


class _Timed:
    """A socket as http.client's parser reads it, where every read gets only the time
    left until the attempt's deadline: a receiver that trickles its answer a byte at a
    time cannot hold a delivery thread (or a waiting call) past the timeout."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_TimedReader(self._sock, self._deadline))


class _TimedReader(io.RawIOBase):
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._sock.settimeout(_remaining(self._deadline))
        return self._sock.recv_into(buffer)


def _closed_by_peer(sock: socket.socket) -> bool:
    """An idle kept-alive socket that is readable was closed by the server (or holds
    bytes nobody asked for): either way it cannot carry a request."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))
