"""A real HTTP receiver of web hooks, for tests (this project's and its consumers').

:class:`WebhookReceiver` listens on a loopback port from a background thread, records
every request, checks hook payloads against ``schemas/hook-payload.schema.json`` and
answers as scripted with :meth:`WebhookReceiver.respond_with`: a status, a dropped
connection, a delay, extra headers. Tests wait for deliveries with
:meth:`WebhookReceiver.wait_for`, which blocks on a condition instead of sleeping.

The ``webhook_receiver`` pytest fixture (:mod:`xo_webhooks.pytest_plugin`) wraps it.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from jsonschema.exceptions import best_match

from .schema import error_message, validator

__all__ = ["ReceivedHook", "WebhookReceiver", "CLOSE"]

logger = logging.getLogger(__name__)

CLOSE = "close"
"""A scripted response that drops the connection without answering."""

Response = int | str
Responder = Callable[[int, "ReceivedHook"], Response]

#: Seconds an idle keep-alive connection is kept open.
IDLE_TIMEOUT = 30.0
#: Seconds :meth:`WebhookReceiver.stop` waits for each connection thread.
JOIN_TIMEOUT = 5.0


@dataclass(frozen=True)
class ReceivedHook:
    """One request the receiver got.

    :param method: the HTTP method, e.g. ``"POST"``.
    :param path: the request path with its query string, e.g. ``"/hook?x=1"``.
    :param headers: the request headers, names lower-cased (repeated ones joined by ``", "``).
    :param body: the raw request body.
    :param payload: the body parsed as JSON, or ``None`` if it is not JSON.
    :param status: the status the receiver answered with; ``0`` if it dropped the
        connection (scripted ``"close"``, or the receiver stopped during a delay).
    :param error: why the payload failed schema validation (``"<json path>: <message>"``),
        or ``None``.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    payload: Any
    status: int
    error: str | None = None


class WebhookReceiver:
    """An HTTP server on a background thread that records the web hooks it receives.

    :param host: the address to listen on; keep the loopback default in tests.
    :param port: the port; ``0`` (default) picks a free ephemeral port, see :attr:`url`.
    :param validate: check every JSON payload that has a ``"type"`` key against the
        hook-payload schema; :meth:`wait_for` then fails on the first invalid one.
        Other bodies (Slack messages, MessageCards, non-JSON) are recorded unchecked.

    Usage::

        with WebhookReceiver() as receiver:
            receiver.respond_with(500, "close", 204)   # then 204 for every later request
            app = WebhookMiddleware(app, hooks=[{"method": "vm.start", "type": "post",
                                                 "url": receiver.url}])
            ...
            (post,) = receiver.wait_for(1)
            assert len(receiver.attempts) == 3
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, validate: bool = True) -> None:
        self._address = (host, port)
        self._validate = validate
        self._cond = threading.Condition()
        self._attempts: list[tuple[int, ReceivedHook]] = []  # (arrival number, hook)
        self._received: list[tuple[int, ReceivedHook]] = []
        self._invalid: list[ReceivedHook] = []
        self._failures: list[str] = []  # exceptions raised by a respond_with callable
        self._arrivals = 0
        self._script: tuple[Response, ...] | Responder = (204,)
        self._script_count = 0
        self._delay = 0.0
        self._headers: dict[str, str] = {}
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> WebhookReceiver:
        """Bind the port and start serving on a daemon thread; return ``self``."""
        if self._server is not None:
            raise RuntimeError("the receiver is already running")
        self._stopping = threading.Event()
        server = _Server(self._address, _Handler)
        server.receiver = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},  # how long stop() may wait for the loop
            name=f"webhook-receiver:{server.server_port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections, interrupt delays and join every thread."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        server.close_connections(JOIN_TIMEOUT)
        thread.join(JOIN_TIMEOUT)
        self._server = self._thread = None

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>/``; valid once started."""
        if self._server is None:
            raise RuntimeError("the receiver is not running; call start() first")
        return f"http://{self._address[0]}:{self._server.server_port}/"

    # -- what arrived --------------------------------------------------------------

    @property
    def connections(self) -> int:
        """How many TCP connections were accepted since start (keep-alive reuses one)."""
        return self._server.accepted if self._server is not None else 0

    @property
    def received(self) -> list[ReceivedHook]:
        """A copy of the requests answered with a 2xx status, in arrival order."""
        with self._cond:
            return [hook for _, hook in self._received]

    @property
    def attempts(self) -> list[ReceivedHook]:
        """A copy of every request, whatever it was answered, in arrival order."""
        with self._cond:
            return [hook for _, hook in self._attempts]

    def wait_for(self, count: int, timeout: float = 5.0) -> list[ReceivedHook]:
        """Wait until *count* requests have been answered with 2xx; return :attr:`received`.

        :param count: how many hooks to wait for.
        :param timeout: seconds to wait.
        :raises AssertionError: on timeout, listing what arrived; or as soon as a
            received payload fails schema validation (when ``validate=True``).
        """
        return self._wait(self._received, count, timeout, "hook(s) answered with 2xx")

    def wait_for_attempts(self, count: int, timeout: float = 5.0) -> list[ReceivedHook]:
        """Wait until *count* requests have arrived, whatever they were answered.

        :param count: how many requests to wait for.
        :param timeout: seconds to wait.
        :raises AssertionError: on timeout, listing what arrived; or as soon as a
            payload fails schema validation (when ``validate=True``).
        :returns: :attr:`attempts`.
        """
        return self._wait(self._attempts, count, timeout, "request(s)")

    def clear(self) -> None:
        """Forget every recorded request and validation error (the script is kept)."""
        with self._cond:
            self._attempts.clear()
            self._received.clear()
            self._invalid.clear()
            self._failures.clear()

    # -- how to answer -------------------------------------------------------------

    def respond_with(
        self,
        *responses: Response | Responder,
        delay: float = 0.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Script the answers to the next requests.

        Each response is a status code or ``"close"`` (drop the connection without
        answering); they are used in order, one per request, and the last one repeats
        forever. Alternatively, a single callable ``(request_number, hook) -> response``
        decides each answer; *request_number* counts from 1 since this call, and
        ``hook.status`` is ``0`` as the answer is not known yet. It may be called from
        several threads at once; if it raises, the request gets a 500 and :meth:`wait_for`
        fails.

        :param responses: statuses and ``"close"``, or one callable; default ``204``.
        :param delay: seconds to wait before each answer (``stop()`` interrupts it).
        :param headers: extra response headers, e.g. ``{"Retry-After": "1"}``.
        """
        if not responses:
            responses = (204,)
        if any(callable(r) for r in responses):
            if len(responses) != 1:
                raise ValueError("a callable must be the only response")
            script: tuple[Response, ...] | Responder = responses[0]  # type: ignore[assignment]
        else:
            for response in responses:
                _check_response(response)
            script = responses  # type: ignore[assignment]
        if delay < 0:
            raise ValueError("delay must be >= 0")
        with self._cond:
            self._script, self._script_count = script, 0
            self._delay = delay
            self._headers = dict(headers or {})

    # -- used by the request handler -------------------------------------------------

    def _arrive(self) -> int:
        with self._cond:
            self._arrivals += 1
            return self._arrivals

    def _answer(self, hook: ReceivedHook) -> tuple[Response, float, dict[str, str]]:
        """Return the scripted (response, delay, headers) for the next request."""
        with self._cond:
            self._script_count += 1
            script, number = self._script, self._script_count
            delay, headers = self._delay, self._headers
        if not callable(script):
            return script[min(number, len(script)) - 1], delay, headers
        try:
            response = script(number, hook)
            _check_response(response)
        except Exception as exc:  # reported by wait_for, not lost in a server thread
            with self._cond:
                self._failures.append(f"the respond_with callable failed: {exc!r}")
                self._cond.notify_all()
            return 500, delay, headers
        return response, delay, headers

    def _check(self, payload: Any) -> str | None:
        if not (self._validate and _is_hook_payload(payload)):
            return None  # another format (a Teams or Slack message): not the schema's
        error = best_match(validator("hook-payload").iter_errors(payload))
        return None if error is None else f"{error.json_path}: {error_message(error)}"

    def _record(self, arrival: int, hook: ReceivedHook) -> None:
        with self._cond:
            bisect.insort(self._attempts, (arrival, hook))
            if 200 <= hook.status < 300:
                bisect.insort(self._received, (arrival, hook))
            if hook.error is not None:
                self._invalid.append(hook)
            self._cond.notify_all()

    def _wait(
        self, hooks: list[tuple[int, ReceivedHook]], count: int, timeout: float, what: str
    ) -> list[ReceivedHook]:
        deadline = time.monotonic() + timeout
        with self._cond:
            # Fail fast on an invalid payload: waiting longer will not make it valid.
            while len(hooks) < count and not self._problems(hooks):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            problems = self._problems(hooks)
            if problems:
                raise AssertionError("\n".join(problems))
            if len(hooks) < count:
                raise AssertionError(self._timeout_message(count, timeout, what))
            return [hook for _, hook in hooks]

    def _problems(self, hooks: list[tuple[int, ReceivedHook]]) -> list[str]:
        problems = list(self._failures)
        if hooks is self._received:
            invalid = [h for h in self._invalid if 200 <= h.status < 300]
        else:
            invalid = self._invalid
        problems += [f"invalid hook payload ({_describe(h)}): {h.error}" for h in invalid]
        return problems

    def _timeout_message(self, count: int, timeout: float, what: str) -> str:
        lines = [
            f"expected {count} {what} within {timeout:g} s; {len(self._attempts)} request(s)"
            f" arrived, {len(self._received)} answered with 2xx" + (":" if self._attempts else "")
        ]
        lines += [f"  {_describe(hook)}" for _, hook in self._attempts]
        return "\n".join(lines)


class _Server(ThreadingHTTPServer):
    """Tracks its connections so that :meth:`close_connections` can end every thread."""

    daemon_threads = True
    request_queue_size = 128
    receiver: WebhookReceiver

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._connections_lock = threading.Lock()
        self.accepted = 0  # connections accepted since start
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True
        )
        with self._connections_lock:
            self._connections[thread] = request
            self.accepted += 1
        thread.start()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.pop(threading.current_thread(), None)

    def close_connections(self, timeout: float) -> None:
        """Shut down every open connection (idle keep-alive ones included) and join."""
        with self._connections_lock:
            connections = list(self._connections.items())
        for _, sock in connections:
            with contextlib.suppress(OSError):  # already closed by its handler
                sock.shutdown(socket.SHUT_RDWR)
        for thread, _ in connections:
            thread.join(timeout)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up, or stop() closing a connection: not worth a traceback.
        logger.debug(
            "webhook receiver: error on a connection from %s", client_address, exc_info=True
        )


class _Handler(BaseHTTPRequestHandler):
    """Reads one request, records it and answers as scripted; keep-alive capable."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = IDLE_TIMEOUT
    server: _Server

    def _handle(self) -> None:
        receiver = self.server.receiver
        arrival = receiver._arrive()
        body = self._read_body()
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            name = name.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        hook = ReceivedHook(
            self.command, self.path, headers, body, payload, 0, receiver._check(payload)
        )
        response, delay, extra = receiver._answer(hook)
        if delay and receiver._stopping.wait(delay):
            response = CLOSE  # stopping: do not answer, do not hold stop() up
        status = response if isinstance(response, int) else 0
        # Recorded before answering, so a client that has its answer sees the record.
        receiver._record(arrival, replace(hook, status=status))
        if status == 0:
            self.close_connection = True
            with contextlib.suppress(OSError):  # stop() got there first
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(status)
        for name, value in extra.items():
            self.send_header(name, value)
        if status >= 200 and status not in (204, 304):
            self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET = _handle

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("webhook receiver: %s", format % args)


def _check_response(response: object) -> None:
    if response != CLOSE and not (
        isinstance(response, int) and not isinstance(response, bool) and 100 <= response <= 599
    ):
        raise ValueError(f"a response is a status code or {CLOSE!r}, not {response!r}")


def _is_hook_payload(body: Any) -> bool:
    """Whether *body* is a ``json``-format hook payload (a pre or a post)."""
    return isinstance(body, dict) and body.get("type") in ("pre", "post")


def _describe(hook: ReceivedHook) -> str:
    """``vm.start pre callId=abc -> 204``, for assertion messages."""
    p = hook.payload
    if _is_hook_payload(p):
        what = f"{p.get('method')} {p.get('type')} callId={p.get('callId')}"
    else:
        what = f"{hook.method} {hook.path} {hook.body[:60]!r}"
    return f"{what} -> {hook.status or 'connection dropped'}"
