"""WSGI plumbing: reading a request body safely and observing a response unchanged."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable, Iterator
from io import BytesIO
from typing import TYPE_CHECKING, Any

from .._streams import CHUNK, read_at_most
from .._text import describe_error

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["read_body", "Capture", "ObservedResponse"]

logger = logging.getLogger(__name__)


def read_body(environ: WSGIEnvironment, limit: int) -> bytes | None:
    """Read a request body of at most *limit* bytes and put an equivalent stream back.

    Returns ``None``, leaving the app's view of the input as it was, when the body
    cannot be read safely: too large, or of unknown length on a server that does not
    mark the end of the input (``wsgi.input_terminated``).
    """
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH", "")
    if length:
        try:
            expected = int(length)
        except ValueError:
            return None
        if not 0 <= expected <= limit:
            return None
        if expected <= CHUNK:  # the common case, in one read (the request path's cost)
            body = stream.read(expected)  # if it raises, the app still has the stream
            if len(body) != expected:
                body = _read_rest(environ, stream, body, expected)
        else:
            body = _read_rest(environ, stream, b"", expected)
        environ["wsgi.input"] = BytesIO(body)
        return body
    elif environ.get("wsgi.input_terminated"):  # chunked: read to the end, up to a cap
        body = _read_or_restore(environ, stream, limit + 1)
        if len(body) > limit:
            environ["wsgi.input"] = _PrefixedInput.wrap(body, stream)
            return None
    else:
        return None
    environ["wsgi.input"] = BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    return body


def _read_rest(environ: WSGIEnvironment, stream: Any, body: bytes, expected: int) -> bytes:
    """*body*, what a first read gave (none for a large body), read on to the *expected*
    length: the rest from a server that hands out less per read; if the client went
    away early, what came, with ``CONTENT_LENGTH`` made true for the app."""
    if len(body) < expected and (body or expected > CHUNK):
        body += _read_or_restore(environ, stream, expected - len(body), body)
    if len(body) != expected:
        environ["CONTENT_LENGTH"] = str(len(body))
    return body


def _read_or_restore(
    environ: WSGIEnvironment, stream: Any, size: int, already: bytes = b""
) -> bytes:
    parts: list[bytes] = []
    try:
        return read_at_most(stream, size, parts)
    except Exception:
        # The app must still see every byte: what was read, then the rest.
        environ["wsgi.input"] = _PrefixedInput.wrap(already + b"".join(parts), stream)
        raise


class _PrefixedInput(io.RawIOBase):
    """The bytes already read, then the rest of the original stream."""

    def __init__(self, prefix: bytes, stream: Any) -> None:
        self._prefix = memoryview(prefix)
        self._stream = stream

    @classmethod
    def wrap(cls, prefix: bytes, stream: Any) -> io.BufferedReader:
        return io.BufferedReader(cls(prefix, stream))

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class Capture:
    """What the app answered: status, a capped copy of the body, and the exception it
    raised, if any, as text (the exception itself, with its frames, stays here).

    :param limit: the most body bytes kept; past it ``overflow`` is set.
    """

    __slots__ = ("limit", "status", "error", "overflow", "_chunks", "_size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.status: str | None = None
        self.error: str | None = None
        self.overflow = False
        self._chunks: list[bytes] = []
        self._size = 0

    def fail(self, error: BaseException) -> None:
        """Record that the app raised *error*."""
        self.error = describe_error(error, limit=500)

    def add(self, chunk: bytes) -> None:
        """Keep *chunk* while under the limit."""
        if self.overflow:
            return
        self._size += len(chunk)
        if self._size > self.limit:
            self.overflow = True
            self._chunks.clear()
        else:
            self._chunks.append(chunk)

    def kept(self) -> Capture:
        """What was captured, in a plain :class:`Capture` that holds nothing else: what
        the post hooks keep while they wait (a subclass holds the server's objects)."""
        kept = Capture(self.limit)
        kept.status, kept.error, kept.overflow = self.status, self.error, self.overflow
        kept._chunks, kept._size = self._chunks, self._size
        return kept

    @property
    def body(self) -> bytes:
        """The captured body (empty once it overflowed)."""
        return b"".join(self._chunks)

    @property
    def status_code(self) -> int:
        """The numeric status, or 0 before ``start_response`` was called."""
        try:
            return int((self.status or "0").split(None, 1)[0])
        except ValueError:
            return 0


class ObservedResponse(Capture):
    """The app's response, handed to the server unchanged while a copy is captured.

    :meth:`respond` calls the app with this object's :meth:`start_response` in place of
    the server's, and returns what the server gets: the app's own list or file wrapper
    (observed at once), or this object, which the server iterates and closes. One
    object per observed request: bound methods rather than closures, and a generator,
    which resumes for each chunk for less than a ``__next__`` method costs to call.

    Subclasses say in :meth:`done` what to do with the outcome; it is reported once,
    as soon as the body is complete, or at ``close()`` if that comes first, and
    ``close()`` closes the app's iterable exactly once. Reporting at the end of the
    body means clients that never close the response, such as Flask's test client,
    still get post hooks.

    :param limit: the most body bytes kept (see :class:`Capture`).
    :param start_response: the server's ``start_response``, which this one calls.
    """

    __slots__ = ("_start_response", "_write", "_app_iter", "_reported", "_closed", "_chunks_out")

    def __init__(self, limit: int, start_response: StartResponse) -> None:
        # Capture's fields set here, not through super(): one call less per request
        self.limit = limit
        self.status = self.error = None
        self.overflow = self._reported = self._closed = False
        self._chunks = []
        self._size = 0
        self._start_response: StartResponse | None = start_response
        self._write: Callable[[bytes], object] | None = None
        self._app_iter: Iterable[bytes] = ()
        self._chunks_out: Iterator[bytes] | None = None

    def done(self) -> None:
        """Told once the outcome is known (on the server's thread); must not block."""
        raise NotImplementedError

    @property
    def streamed(self) -> bool:
        """Whether the server iterated this object (so, once :meth:`done` is told, it
        has taken every byte), rather than the app's own list or file, or nothing."""
        return self._chunks_out is not None

    def respond(self, app: WSGIApplication, environ: WSGIEnvironment) -> Iterable[bytes]:
        """Call *app* and return what the server gets in place of its answer."""
        try:
            app_iter = app(environ, self.start_response)
        except Exception as e:
            self.fail(e)
            self.report()
            raise
        file_wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(file_wrapper, type) and isinstance(app_iter, file_wrapper):
            # A file is streamed by the server itself; never buffer it.
            self.overflow = True
            self.report()
            return app_iter
        if isinstance(app_iter, (list, tuple)) and self.status is not None:
            # Already in memory: observed at once, and handed on as it is, so that the
            # server still sees a one-item list and can set Content-Length.
            for chunk in app_iter:
                self.add(chunk)
            self.report()
            return app_iter
        self._app_iter = app_iter
        return self

    def start_response(self, status: str, headers: Any, exc_info: Any = None) -> Any:
        """Record the status, pass ``exc_info`` on, and return a ``write()`` that still
        writes, keeping a copy."""
        self.status = status
        assert self._start_response is not None, "start_response() after the answer ended"
        if exc_info is None:
            self._write = self._start_response(status, headers)
        else:
            self._write = self._start_response(status, headers, exc_info)
        return self.write

    def write(self, data: bytes) -> Any:
        """The app's ``write()``: keep a copy, then write."""
        self.add(data)
        assert self._write is not None, "write() before start_response()"
        return self._write(data)

    def __iter__(self) -> Iterator[bytes]:
        if self._chunks_out is None:  # one pass over the app's iterable, however often asked
            self._chunks_out = self._observe()
        return self._chunks_out

    def __next__(self) -> bytes:
        """For a caller that takes ``next()`` of the response without ``iter()``."""
        return next(iter(self))

    def _observe(self) -> Iterator[bytes]:
        add = self.add
        try:
            for chunk in self._app_iter:
                add(chunk)
                yield chunk
        except GeneratorExit:  # the server stopped iterating: not the app's failure
            raise
        except BaseException as e:
            self.fail(e)
            raise
        self.report()

    def close(self) -> None:
        """Close the app's iterable (once), then report the outcome if not done yet."""
        if self._closed:
            return
        self._closed = True
        self._chunks_out = iter(())  # the generator refers to self: no cycle left for the GC
        try:
            close = getattr(self._app_iter, "close", None)
            if close is not None:
                close()
        finally:
            self.report()

    def report(self) -> None:
        """Report the outcome (:meth:`done`) now, unless it was; never raises."""
        if self._reported:
            return
        self._reported = True
        self._start_response = self._write = None  # the server's: no use any more
        try:
            self.done()
        except Exception:  # the middleware's own failure never reaches the client
            logger.exception("xo-webhooks could not send the post hooks of a call")
