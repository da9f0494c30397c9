"""The receiver's HTTP server: werkzeug's threaded server, guarded against slow and
greedy clients.

werkzeug's server waits as long as a client likes for its request and gives every
connection a thread and a file descriptor. Idle connections that send their headers
slowly then use up the open-file limit, every ``accept()`` fails with ``EMFILE`` while
the listening socket stays readable, and the accept loop spins. This one:

- gives each request *read_timeout* seconds to arrive, headers and body together (a
  total, not a limit per read: a byte every few seconds does not keep it alive);
- serves at most *max_connections* at once and answers any more with a fast ``503``
  and ``Retry-After``, from the accept loop, without reading them;
- when ``accept()`` fails for want of file descriptors, waits a moment before trying
  again instead of spinning, and says so once in the log.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import math
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from .._sometimes import Sometimes
from ..errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer
    from _typeshed.wsgi import WSGIApplication

__all__ = ["ReceiverServer", "READ_TIMEOUT", "MAX_CONNECTIONS"]

logger = logging.getLogger(__name__)

READ_TIMEOUT = 10.0  # seconds a request has to arrive, headers and body
MAX_CONNECTIONS = 256  # connections served at once
RETRY_AFTER = 5  # seconds, in the 503 answered beyond MAX_CONNECTIONS
# Seconds between accept() attempts while file descriptors run out: the listening socket
# stays readable then, so trying again at once would spin.
ACCEPT_BACKOFF = 0.1
WARN_EVERY = 60.0  # seconds between two warnings of a flood (refused, out of descriptors)
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

_BUSY_BODY = b"too many connections, retry later\n"
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"X-Content-Type-Options: nosniff\r\n"
    b"Retry-After: %d\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: close\r\n\r\n%s" % (RETRY_AFTER, len(_BUSY_BODY), _BUSY_BODY)
)


class ReceiverServer(ThreadedWSGIServer):
    """werkzeug's threaded server with a read deadline, a cap on connections and an
    accept loop that does not spin when file descriptors run out.

    :param host: the address to listen on.
    :param port: the TCP port; 0 picks a free one (then see ``server_port``).
    :param app: the WSGI app to serve.
    :param read_timeout: seconds each connection has to send its whole request,
        headers and body; past it the connection is closed (``408`` if the body was
        being read). Writing the answer is bounded by it too.
    :param max_connections: most connections served at once; each one more is
        answered ``503`` with ``Retry-After`` at once and closed.
    :raises ConfigError: *read_timeout* or *max_connections* is out of range.

    Run it with ``serve_forever()``; stop it with ``shutdown()`` from another thread,
    then ``server_close()``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        app: WSGIApplication,
        *,
        read_timeout: float = READ_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        if not (isinstance(read_timeout, (int, float)) and 0 < read_timeout < math.inf):
            raise ConfigError("read_timeout: must be a number of seconds > 0")
        if not (isinstance(max_connections, int) and max_connections >= 1):
            raise ConfigError("max_connections: must be an integer >= 1")
        self.read_timeout = float(read_timeout)
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        # Used by the accept loop only, so without a lock.
        self._warn_full = Sometimes(WARN_EVERY)
        self._warn_starved = Sometimes(WARN_EVERY)
        super().__init__(host, port, app, handler=_DeadlineHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection; when descriptors run out, wait a moment first."""
        try:
            return super().get_request()
        except OSError as e:
            if e.errno in _OUT_OF_DESCRIPTORS:
                self._starve(e)
            raise  # socketserver drops the attempt and comes back to select()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve *request* on a thread of its own, or refuse it when all slots are taken."""
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        # From here, shutdown_request() runs exactly once (at the end of the thread, or
        # from socketserver if the thread cannot start) and gives the slot back.
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        """Close a connection that was served, and free its slot."""
        try:
            super().shutdown_request(request)
        finally:
            self._slots.release()

    def _refuse(self, connection: socket.socket) -> None:
        """Answer 503 at once and close, on the accept loop: no thread, nothing read."""
        if self._warn_full():
            logger.warning(
                "%d connections open, the most allowed: answering 503 to more "
                "(said at most every %g s)",
                self.max_connections,
                WARN_EVERY,
            )
        with contextlib.suppress(OSError):  # the client may be gone already
            connection.setblocking(False)
            connection.send(_BUSY)  # far smaller than a socket's buffer: never waits
            connection.shutdown(socket.SHUT_WR)
        connection.close()

    def _starve(self, error: OSError) -> None:
        """Wait a moment before the next accept(), which would fail the same way now."""
        if self._warn_starved():
            logger.warning(
                "cannot accept connections: %s; trying again every %g s; raise the "
                "open-file limit or lower the most connections (said at most every %g s)",
                error.strerror or error,
                ACCEPT_BACKOFF,
                WARN_EVERY,
            )
        time.sleep(ACCEPT_BACKOFF)


class _DeadlineHandler(WSGIRequestHandler):
    """werkzeug's request handler, reading its connection against a deadline per request."""

    server: ReceiverServer
    rfile: io.BufferedReader

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.read_timeout)
        self.rfile.close()  # the plain one: it would keep the socket from closing
        # The first request's deadline starts with the connection.
        self._input = _DeadlineReader(self.connection, self.server.read_timeout)
        self.rfile = io.BufferedReader(self._input)

    def handle_one_request(self) -> None:
        super().handle_one_request()
        if self.close_connection:  # the usual: werkzeug answers "Connection: close"
            return
        # Kept alive, as http.server does otherwise: the next request must not inherit
        # what is left of this one's deadline. Waiting for it counts as reading headers
        # (read_timeout at most, then closed); from its first byte, it has its own.
        self._input.restart()
        try:
            self.rfile.peek(1)
        except TimeoutError:
            self.close_connection = True
            return
        self._input.restart()


class _DeadlineReader(io.RawIOBase):
    """A socket's input, each read waiting only until *timeout* seconds after the last
    :meth:`restart`, then raising :class:`TimeoutError` (werkzeug's handler and the
    receiver know it).

    Writes go on with the socket's last timeout: an answer of a few hundred bytes fits
    in the socket's buffer and does not wait.
    """

    def __init__(self, connection: socket.socket, timeout: float) -> None:
        self._connection = connection
        self._timeout = timeout
        self.restart()

    def restart(self) -> None:
        """Give the reads from now on *timeout* seconds in all."""
        self._deadline = time.monotonic() + self._timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._connection.settimeout(remaining)
        return self._connection.recv_into(buffer)
