"""The requests transport of hooks (``XO_WEBHOOKS_TRANSPORT=requests``): a
``requests.Session`` per delivery thread.

Why it exists, next to the faster http.client :class:`.Transport`: projects whose
tests mock outgoing HTTP at requests' adapter (``responses``, ``requests-mock``) see
their hooks there instead of on the network, and projects that mount adapters of
their own (client certificates, auth) hand them over with ``session_factory``, which
must return a new session on each call (one per thread, closed when the thread ends).

It keeps the default transport's semantics, so that choosing it changes nothing a
receiver or the delivery policy can tell: the timeout bounds the whole attempt (not
each read, as requests' own timeout does: the answer is read against a deadline),
redirects are not followed, no retries of its own, certificates verified with the CA
bundle (certifi's by default), proxies from ``HTTP_PROXY`` / ``HTTPS_PROXY`` /
``NO_PROXY`` chosen as :class:`.Route` chooses them, at most :data:`.MAX_RESPONSE`
bytes of an answer read, and failures raised as the exceptions http.client raises
(``TimeoutError``, ``ConnectionRefusedError``, ``ssl.SSLError``...), which
:func:`.judge_failure` describes alike.
"""

from __future__ import annotations

import http.client
import io
import logging
import re
import socket
import threading
import time
import urllib.request
from typing import Any

import certifi
import requests
import urllib3
import urllib3.poolmanager
from requests.adapters import HTTPAdapter
from requests.utils import select_proxy

from .transport import MAX_RESPONSE, Route, SessionFactory

__all__ = ["RequestsTransport", "default_session"]

logger = logging.getLogger(__name__)

# The attempt the calling thread is making: its deadline, read by the response parser
# of the connections below (a pool's connections cannot be handed one), and whether it
# was sent on a kept-alive connection, which they note.
_attempt = threading.local()


def default_session() -> requests.Session:
    """The session of a delivery thread when no ``session_factory`` is given: requests'
    adapters (no retries), and nothing from the environment that the http transport
    would not use either: no default headers, no ``.netrc`` credentials, no
    ``REQUESTS_CA_BUNDLE`` (proxies are chosen by the transport)."""
    session = requests.Session()
    session.headers.clear()
    session.trust_env = False
    return session


class RequestsTransport:
    """POSTs bodies through a ``requests.Session`` of the calling thread.

    :param timeout: seconds one attempt may take, connecting, sending and reading the
        answer together.
    :param ca_bundle: a CA bundle file for https receivers; without it, the session's
        own ``verify`` when the factory set one, else certifi's.
    :param session_factory: makes each thread's session (:func:`default_session` by
        default). A session with ``proxies`` of its own, or ``trust_env`` off, keeps
        them; otherwise the environment's proxies are used as the http transport uses
        them. The deadline covers reading the answer with requests' ``HTTPAdapter``
        (mounted ones included); other adapters get a read timeout of the time left.

    ::

        def session():
            s = requests.Session()
            s.cert = ("/etc/hooks/client.pem", "/etc/hooks/client.key")
            return s

        WebhookMiddleware(app, transport="requests", session_factory=session)
    """

    def __init__(
        self,
        timeout: float,
        ca_bundle: str | None = None,
        session_factory: SessionFactory | None = None,
    ) -> None:
        self.timeout = timeout
        self._ca_bundle = ca_bundle
        self._factory = session_factory or default_session
        self._proxies = urllib.request.getproxies()  # read once, as the http transport does
        self._routes: dict[str, Route] = {}
        self._local = threading.local()

    def reset(self) -> None:
        """Forget every session (in a child process after a fork)."""
        self._local = threading.local()

    def release(self) -> None:
        """Close the calling thread's session (a thread about to end)."""
        state = getattr(self._local, "state", None)
        self._local.state = None
        if state is not None:
            try:  # a session of the user's: its close() must not reach the request path
                state[0].close()
            except Exception:
                logger.exception("closing a requests session failed")

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str | None]:
        """POST *body* to *url*; return the status and the ``Retry-After`` header.

        :raises TimeoutError: the attempt took longer than the timeout.
        :raises OSError: the connection failed (refused, reset, TLS).
        :raises http.client.HTTPException: the answer was not HTTP.
        :raises ValueError: *url*, a header or the proxy it needs cannot be used.
        """
        # Checked as the http transport checks them (ValueError), proxy choice included.
        route = self._routes.get(url) or self._routes.setdefault(url, Route.of(url, self._proxies))
        session, verify, own_proxies = self._state()
        proxies = None if own_proxies else self._proxies_of(route)
        try:
            _use_deadline(session, url, proxies)
        except Exception as e:  # e.g. a socks:// proxy without PySocks: bad input, final
            raise _plain(e) from e
        deadline = time.monotonic() + self.timeout  # for the whole attempt
        _attempt.deadline, _attempt.reused = deadline, False
        try:
            try:
                return _exchange(session, url, body, headers, verify, proxies, deadline)
            except ConnectionError:
                if not _attempt.reused:
                    raise
                # The server closed the kept-alive connection just as it was reused: it
                # did not take the request, so send it once more on a new connection.
                _attempt.reused = False
                return _exchange(session, url, body, headers, verify, proxies, deadline)
        finally:
            _attempt.deadline = None

    def _state(self) -> tuple[requests.Session, Any, bool]:
        state = getattr(self._local, "state", None)
        if state is None:
            try:
                session = self._factory()
            except Exception as e:  # every hook would fail alike: say why, with the trace
                logger.exception("session_factory failed")
                raise ValueError(f"session_factory failed: {type(e).__name__}") from e
            own = self._factory is not default_session
            verify = self._ca_bundle or (
                session.verify if own and session.verify is not True else certifi.where()
            )
            own_proxies = own and (bool(session.proxies) or not session.trust_env)
            state = self._local.state = (session, verify, own_proxies)
        return state

    def _proxies_of(self, route: Route) -> dict[str, Any]:
        # Explicit for the URL's scheme: requests would otherwise add the environment's
        # (with a NO_PROXY of its own reading); None means direct.
        scheme = "https" if route.https else "http"
        proxy = self._proxies.get(scheme) if route.key[0] == "proxy" else None
        if proxy and "://" not in proxy:
            proxy = "http://" + proxy
        return {scheme: proxy, "all": None}


def _exchange(
    session: requests.Session,
    url: str,
    body: bytes,
    headers: dict[str, str],
    verify: Any,
    proxies: dict[str, Any] | None,
    deadline: float,
) -> tuple[int, str | None]:
    try:
        left = _remaining(deadline)
        response = session.post(
            url, data=body, headers=headers, timeout=(left, left), verify=verify,
            proxies=proxies, allow_redirects=False, stream=True,
        )  # fmt: skip
        try:
            # Read the answer to the end, so that its connection goes back to the pool;
            # past the limit, closing the response drops the connection.
            response.raw.read(MAX_RESPONSE, decode_content=False)
        finally:
            response.close()
        return response.status_code, response.headers.get("Retry-After")
    except (requests.RequestException, urllib3.exceptions.HTTPError) as error:
        raise _plain(error) from error


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


# -- the deadline, inside requests' HTTPAdapter ---------------------------------------


class _DeadlineReader(io.RawIOBase):
    """A response's socket file as http.client's parser reads it, where every read gets
    only the time left until the attempt's deadline: a receiver that trickles its answer
    cannot hold a delivery thread past the timeout."""

    def __init__(self, sock: socket.socket, inner: Any, deadline: float) -> None:
        self._sock, self._inner, self._deadline = sock, inner, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._sock.settimeout(_remaining(self._deadline))
        return int(self._inner.readinto1(buffer))

    def close(self) -> None:
        self._inner.close()  # the socket file: lets the socket close
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        deadline = getattr(_attempt, "deadline", None)
        if deadline is not None:
            self.fp = io.BufferedReader(_DeadlineReader(sock, self.fp, deadline))


class _HTTPConnection(urllib3.connection.HTTPConnection):
    """Reads answers against the deadline; tells the attempt whether it was sent on a
    kept-alive connection (one that a server may have closed meanwhile)."""

    response_class = _DeadlineResponse
    _fresh = False  # connected for the request about to be sent

    def connect(self) -> None:
        super().connect()
        self._fresh = True

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attempt.reused = self.sock is not None and not self._fresh
        super().request(*args, **kwargs)  # connects, when not connected yet
        self._fresh = False


class _HTTPSConnection(_HTTPConnection, urllib3.connection.HTTPSConnection):
    """The same, over TLS."""


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_DEADLINE_POOLS: dict[str, Any] = {"http": _HTTPPool, "https": _HTTPSPool}


def _use_deadline(session: requests.Session, url: str, proxies: dict[str, Any] | None) -> None:
    """Have the pools that will carry *url* read answers against the deadline, when the
    adapter is requests' own and its pool manager uses urllib3's default pools."""
    adapter = session.get_adapter(url)
    if not isinstance(adapter, HTTPAdapter):
        return
    proxy = select_proxy(url, proxies if proxies is not None else session.proxies)
    manager = adapter.proxy_manager_for(proxy) if proxy else adapter.poolmanager
    if manager.pool_classes_by_scheme is urllib3.poolmanager.pool_classes_by_scheme:
        manager.pool_classes_by_scheme = _DEADLINE_POOLS


# -- exceptions ---------------------------------------------------------------------------


_QUERY = re.compile(r"\?[^\s'\")]*")
# urllib3's "Max retries exceeded with url: /services/T0/B0/X" quotes the path.
_URL_PATH = re.compile(r"(with url: )\S+")


def _plain(error: BaseException) -> Exception:
    """The exception http.client would have raised for *error*: the first one in its
    chain that is not requests' or urllib3's wrapper (``ConnectionRefusedError``,
    ``TimeoutError``, ``ssl.SSLCertVerificationError``, ``RemoteDisconnected``), copied;
    else one of the same kind (timeout, bad input, failed connection)."""
    seen: set[int] = set()
    queue: list[Any] = [error]
    while queue:
        current = queue.pop(0)
        if not isinstance(current, Exception) or id(current) in seen:
            continue
        seen.add(id(current))
        if not type(current).__module__.startswith(("requests", "urllib3")):
            try:
                return type(current)(*current.args)
            except Exception:  # a constructor of its own: describe it instead
                break
        queue += [*current.args, getattr(current, "reason", None)]
        queue += [current.__cause__, current.__context__]
    # requests' own texts may quote a URL's path (a Slack hook's) and query (a Teams
    # sig=, a token=), cut here, and a bad header's value: a ValueError says which
    # kind of input, not the text.
    text = _URL_PATH.sub(r"\1…", _QUERY.sub("?...", str(error)))
    if isinstance(error, (requests.Timeout, urllib3.exceptions.TimeoutError)):
        return TimeoutError(text)
    if isinstance(error, ValueError):  # InvalidURL, InvalidHeader, InvalidSchema...
        return ValueError(f"{type(error).__name__} (not shown: it may quote a secret)")
    return ConnectionError(text)
