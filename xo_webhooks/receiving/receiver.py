"""The receiving end of web hooks: the plugin's Node.js example, done safely.

The reference receiver logs each hook and runs ``./hook-scripts/${method}-${type}.sh``
through a shell, so a method called ``vm.start;rm -rf ~`` runs a command. This one
checks the request (size, UTF-8 JSON, signature, schema, replays) and runs the script
without a shell, inside the scripts folder only, off the request thread, with a time
limit::

    from xo_webhooks.receiver import make_receiver
    app = make_receiver("./hook-scripts", secret="whsec_...")   # any WSGI server

A script receives the payload JSON on its stdin and ``XO_HOOK_TYPE``,
``XO_HOOK_METHOD`` and ``XO_HOOK_CALL_ID`` in its environment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from jsonschema.exceptions import ValidationError
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Request, Response

from .._streams import read_at_most
from .._text import STRICT_JSON, shorten
from ..errors import ConfigError, SignatureError
from ..schema import error_message, validator
from ..signing import DEFAULT_TOLERANCE, parse_secret, verify
from .scripts import ScriptJob, ScriptRunner
from .server import MAX_CONNECTIONS, READ_TIMEOUT, ReceiverServer

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from _typeshed.wsgi import StartResponse, WSGIEnvironment

__all__ = ["HookReceiver", "make_receiver", "serve"]

logger = logging.getLogger(__name__)

METHOD_RE = re.compile(r"[A-Za-z0-9_.-]+")
MAX_METHOD_LENGTH = 200
# Most webhook-ids remembered to refuse replays, each until its signature expires
# (tolerance seconds after its webhook-timestamp): 333 hooks a second for the default
# 300 s, about 20 MB. Beyond, hooks are refused (503) rather than an id forgotten early.
SEEN_IDS = 100_000
_LOG_LIMIT = 200  # characters of a payload value shown in the log
_MAX_REASONS = 3  # schema problems named in a 400 answer
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class HookReceiver:
    """A WSGI application that accepts web hooks and runs a script for each.

    Every POST is checked in this order: size (413), body readable (400, or 411 for a
    chunked body the server cannot frame), signature when a secret is set (401),
    UTF-8 JSON (400), the hook-payload schema (400, the body says where and why).
    A valid hook gets 204 at once; a ``webhook-id`` seen before gets 204 and nothing
    runs. The script ``<scripts_dir>/<method>-<type>.sh`` then runs on a worker thread.

    A ``webhook-id`` is remembered until a replay of its request would fail the
    signature check anyway (*tolerance* seconds after its ``webhook-timestamp``;
    without a secret, *tolerance* seconds after it came), for at most
    :data:`SEEN_IDS` ids at a time: beyond, hooks are answered 503 (``Retry-After``
    says when an id expires) rather than an id forgotten while it could be replayed.

    :param scripts_dir: the folder of hook scripts; ``None`` only logs the hooks.
    :param secret: a ``whsec_`` secret; when set, requests must carry a valid
        Standard Webhooks signature.
    :param max_body: the largest body accepted, in bytes.
    :param script_timeout: seconds a script may run before its process group is killed.
    :param tolerance: seconds ``webhook-timestamp`` may differ from the clock, and
        how long a ``webhook-id`` is remembered against replays.
    :param max_workers: how many scripts run at the same time.
    :param max_queue: how many scripts may be queued or running; beyond that a hook
        is answered 503 so that the sender retries later.

    Example, with any WSGI server::

        receiver = HookReceiver("./hook-scripts", secret=os.environ["HOOK_SECRET"])
        ...
        receiver.close(timeout=30)
    """

    def __init__(
        self,
        scripts_dir: str | os.PathLike[str] | None = None,
        secret: str | None = None,
        *,
        max_body: int = 1024 * 1024,
        script_timeout: float = 30.0,
        tolerance: float = DEFAULT_TOLERANCE,
        max_workers: int = 2,
        max_queue: int = 1000,
    ) -> None:
        _require(max_body >= 0, "max_body must be >= 0")
        _require(script_timeout > 0, "script_timeout must be > 0")
        _require(math.isfinite(tolerance) and tolerance >= 0, "tolerance must be finite, >= 0")
        _require(max_workers >= 1, "max_workers must be >= 1")
        _require(max_queue >= 1, "max_queue must be >= 1")
        if secret is not None:
            try:
                parse_secret(secret)
            except ValueError as e:
                raise ConfigError(f"secret: {e}") from None
        self.scripts_dir: str | None = None
        if scripts_dir is not None:
            self.scripts_dir = os.path.realpath(scripts_dir)
            if not os.path.isdir(self.scripts_dir):
                raise ConfigError(f"scripts_dir: {os.fspath(scripts_dir)!r} is not a folder")
        self._secret = secret
        self.max_body = max_body
        self.script_timeout = script_timeout
        self.tolerance = tolerance
        self._seen = _SeenIds(SEEN_IDS)
        self._runner = ScriptRunner(max_workers, max_queue, script_timeout, self.scripts_dir)

    def __repr__(self) -> str:  # the secret stays out of it
        signed = "signed" if self._secret is not None else "unsigned"
        return f"<HookReceiver scripts_dir={self.scripts_dir!r} {signed}>"

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        try:
            response = self._handle(request)
        except Exception:  # a bug here must not take the server down or leak a traceback
            logger.exception("the receiver failed on a request")
            response = _text(500, "internal error")
        return response(environ, start_response)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued script has finished.

        :param timeout: seconds to wait at most; ``None`` waits as long as it takes.
        :return: whether nothing is left to run.
        """
        return self._runner.drain(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Stop accepting hooks (503), let queued scripts finish, stop the worker threads.

        :param timeout: seconds to wait at most; ``None`` waits as long as it takes.
        :return: whether every worker thread has stopped.
        """
        return self._runner.close(timeout)

    def _handle(self, request: Request) -> Response:
        if request.method != "POST":
            return _text(405, "only POST is accepted", Allow="POST")
        if self._runner.closed:
            return _text(503, "the receiver is shutting down", **{"Retry-After": "5"})
        try:
            body = _read_body(request.environ, self.max_body)
        except _Refused as refused:
            return _text(refused.status, refused.reason)
        if self._secret is not None:
            try:
                verify(self._secret, body, request.headers, tolerance=self.tolerance)
            except SignatureError as e:
                logger.warning("refused a hook from %s: %s", request.remote_addr, e)
                return _text(401, f"invalid signature: {e}")
        try:
            payload = _parse(body)
        except _Refused as refused:
            return _text(refused.status, refused.reason)

        msg_id = request.headers.get("webhook-id")
        if msg_id and (seen := self._remember(msg_id, request)) is not None:
            return seen
        job = self._job_for(payload, body)
        if job is not None and not self._runner.submit(job):
            if msg_id:
                self._seen.discard(msg_id)  # not run, so a retry must be accepted
            logger.warning("refused a hook: the script queue is full or closed")
            return _text(503, "too many hook scripts pending, retry later", **{"Retry-After": "5"})
        if logger.isEnabledFor(logging.INFO):
            logger.info("%s", _describe(payload))
        return _no_content()

    def _remember(self, msg_id: str, request: Request) -> Response | None:
        """Remember *msg_id*; return the answer if it is a replay or there is no room."""
        now = time.monotonic()
        try:
            first = self._seen.add(msg_id, self._forget_at(request, now), now)
        except _ReplaysFull as full:
            logger.warning("refused a hook: %d recent webhook-ids kept, no room", SEEN_IDS)
            retry_after = {"Retry-After": str(full.retry_after)}
            return _text(503, "too many recent webhook-ids to remember, retry later", **retry_after)
        if first:
            return None
        logger.info("ignored a replayed webhook-id %s", _loggable(msg_id))
        return _no_content()

    def _forget_at(self, request: Request, now: float) -> float:
        """When (on the monotonic clock, read at *now*) a replay of *request* would fail
        the signature check anyway, so that its ``webhook-id`` can be forgotten."""
        if self._secret is None:  # no signature expires: keep it the same time
            return now + self.tolerance
        signed_at = int(request.headers["webhook-timestamp"])  # checked by verify()
        # A second more: the wall clock and the monotonic one are not read together.
        return now + max(0.0, signed_at + self.tolerance - time.time()) + 1

    def _job_for(self, payload: Mapping[str, Any], body: bytes) -> ScriptJob | None:
        """Return the script to run for *payload*, or ``None`` (and say why in the log)."""
        if self.scripts_dir is None:
            return None
        method, hook_type, call_id = payload["method"], payload["type"], payload["callId"]
        if len(method) > MAX_METHOD_LENGTH or not METHOD_RE.fullmatch(method):
            logger.warning(
                "no script for method %s: only letters, digits, '_', '.' and '-' "
                "are allowed, up to %d characters",
                _loggable(method),
                MAX_METHOD_LENGTH,
            )
            return None
        name = f"{method}-{hook_type}.sh"
        path = os.path.realpath(os.path.join(self.scripts_dir, name))
        if os.path.commonpath([path, self.scripts_dir]) != self.scripts_dir:
            logger.warning("refused script %s: it resolves outside the scripts folder", name)
            return None
        if not os.path.isfile(path):
            logger.debug("no script %s", name)
            return None
        if not os.access(path, os.X_OK):
            logger.warning("script %s is not executable; not run", name)
            return None
        if "\x00" in call_id or not _encodable(call_id):
            logger.warning(
                "script %s not run: callId %s cannot go in an environment variable",
                name,
                _loggable(call_id),
            )
            return None
        # The script inherits the receiver's environment minus its own settings
        # (XO_WEBHOOKS_SECRET above all), plus the three variables of the contract.
        env = {k: v for k, v in os.environ.items() if not k.startswith("XO_WEBHOOKS_")}
        env.update(XO_HOOK_TYPE=hook_type, XO_HOOK_METHOD=method, XO_HOOK_CALL_ID=call_id)
        return ScriptJob(name=name, path=path, stdin=body, env=env)


def make_receiver(
    scripts_dir: str | os.PathLike[str] | None = None,
    secret: str | None = None,
    **options: Any,
) -> HookReceiver:
    """Return a :class:`HookReceiver` (a WSGI app).

    :param scripts_dir: the folder of ``<method>-<type>.sh`` scripts, or ``None``.
    :param secret: the ``whsec_`` secret signatures are checked with, or ``None``.
    :param options: ``max_body``, ``script_timeout``, ``tolerance``, ``max_workers``,
        ``max_queue``, as documented on :class:`HookReceiver`.
    :raises ConfigError: an argument is invalid.
    """
    return HookReceiver(scripts_dir, secret, **options)


def serve(
    host: str = "127.0.0.1",
    port: int = 3000,
    scripts_dir: str | os.PathLike[str] | None = None,
    secret: str | None = None,
    *,
    read_timeout: float = READ_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    **kwargs: Any,
) -> None:
    """Serve a receiver with werkzeug's threaded server until interrupted (Ctrl-C),
    guarded against slow and greedy clients (see :mod:`.server`).

    :param host: the address to listen on; keep the default unless a proxy is in front.
    :param port: the TCP port; 0 picks a free one.
    :param scripts_dir: the folder of hook scripts, or ``None`` to only log hooks.
    :param secret: the ``whsec_`` secret, or ``None`` to accept unsigned hooks.
    :param read_timeout: seconds a client has to send its whole request, headers and
        body (default 10); past it the connection is closed.
    :param max_connections: most connections served at once (default 256); each one
        more is answered 503 with ``Retry-After`` at once.
    :param kwargs: further keyword arguments of :func:`make_receiver`.
    :raises ConfigError: an argument is invalid.
    """
    receiver = make_receiver(scripts_dir, secret, **kwargs)
    server = ReceiverServer(
        host, port, receiver, read_timeout=read_timeout, max_connections=max_connections
    )
    logger.info(
        "receiving hooks on http://%s:%d/ (scripts: %s; signatures: %s)",
        host,
        server.server_port,
        receiver.scripts_dir or "none",
        "required" if secret is not None else "not checked",
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if not receiver.close(timeout=receiver.script_timeout + 1):
            logger.warning("stopped with hook scripts still queued or running")


class _Refused(Exception):
    """A request the receiver answers with a 4xx status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _ReplaysFull(Exception):
    """:class:`_SeenIds` has no room for another id before one expires."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"retry after {retry_after} s")
        self.retry_after = retry_after


class _SeenIds:
    """Webhook-ids, each until a time of the monotonic clock; at most *size* at once.

    Ids are kept as digests, so that long ones cost no more memory, in the order they
    came, and expired ones go from the front: an id that expires before one that came
    earlier (a sender's clock running ahead makes an id live longer) leaves with it.
    So room may be freed a little late, but an id is never forgotten early.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._ids: OrderedDict[bytes, float] = OrderedDict()  # digest -> when it expires
        self._lock = threading.Lock()

    def add(self, msg_id: str, until: float, now: float) -> bool:
        """Remember *msg_id* until *until*; return ``False`` if it is already known.

        :raises _ReplaysFull: *size* ids are kept and none has expired at *now*.
        """
        key = _digest(msg_id)
        with self._lock:
            while self._ids and next(iter(self._ids.values())) < now:
                self._ids.popitem(last=False)
            known = self._ids.pop(key, None)
            if known is not None and known >= now:
                self._ids[key] = max(known, until)  # a new signature of it lives longer
                return False
            if len(self._ids) >= self._size:
                first = next(iter(self._ids.values()))
                raise _ReplaysFull(max(1, math.ceil(first - now)))
            self._ids[key] = until
            return True

    def discard(self, msg_id: str) -> None:
        """Forget *msg_id*."""
        with self._lock:
            self._ids.pop(_digest(msg_id), None)


def _read_body(environ: WSGIEnvironment, limit: int) -> bytes:
    """Read the request body, at most *limit* bytes, without trusting the client."""
    stream = environ["wsgi.input"]
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    raw_length = environ.get("CONTENT_LENGTH", "")
    try:
        if raw_length and not chunked:
            if not re.fullmatch(r"[0-9]{1,18}", raw_length):
                raise _Refused(400, "invalid Content-Length")
            length = int(raw_length)
            if length > limit:
                raise _Refused(413, f"the body is larger than {limit} bytes")
            body = read_at_most(stream, length)
            if len(body) < length:
                raise _Refused(400, "the body is shorter than its Content-Length")
            return body
        if environ.get("wsgi.input_terminated"):  # the server framed it (chunked): read to EOF
            body = read_at_most(stream, limit + 1)
            if len(body) > limit:
                raise _Refused(413, f"the body is larger than {limit} bytes")
            return body
    except TimeoutError:  # the server's read deadline (see .server)
        raise _Refused(408, "the body did not arrive in time") from None
    except (OSError, ValueError, HTTPException):
        raise _Refused(400, "the body could not be read") from None
    if chunked:  # reading an unframed chunked body could block or overrun: refuse it
        raise _Refused(411, "a Content-Length is required")
    return b""


def _parse(body: bytes) -> Any:
    """Return the hook payload in *body*, or raise :class:`_Refused` saying what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refused(400, "the body is not UTF-8") from None
    try:
        payload = STRICT_JSON.decode(text)
    except RecursionError:
        raise _Refused(400, "the body is not JSON: nested too deeply") from None
    except ValueError as e:
        raise _Refused(400, f"the body is not JSON: {shorten(str(e))}") from None
    try:
        # A few problems, the most specific first: the first alone can mislead (a
        # wrong "type" also breaks the rules of "post" hooks at the top level).
        errors = sorted(validator("hook-payload").iter_errors(payload), key=_specific_first)
        reasons = [f"{e.json_path}: {error_message(e)}" for e in errors[:_MAX_REASONS]]
    except RecursionError:  # messages quote the value, and repr() of a deep one recurses
        reasons = ["$: nested too deeply"]
    if reasons:
        raise _Refused(400, "not a valid hook payload: " + "; ".join(reasons))
    return payload


def _specific_first(error: ValidationError) -> tuple[bool, int, list[str]]:
    weak = error.validator in ("anyOf", "oneOf")  # "matches none of": says least
    return (weak, -len(error.path), [str(part) for part in error.path])


def _describe(payload: Mapping[str, Any]) -> str:
    """The log line of a hook, like the reference example's: time [method|type] → result."""
    try:
        when = (_EPOCH + timedelta(milliseconds=payload["timestamp"])).isoformat(
            timespec="milliseconds"
        )
        when = when.replace("+00:00", "Z")
    except (OverflowError, ValueError):
        when = f"timestamp={payload['timestamp']!r}"
    line = f"{when} [{_loggable(payload['method'])}|{payload['type']}] {_json(payload['params'])}"
    if "error" in payload:
        line += f" → error: {_json(payload['error'])}"
    elif "result" in payload:
        line += f" → result: {_json(payload['result'])}"
    return line


def _json(value: Any) -> str:
    try:
        return shorten(json.dumps(value, ensure_ascii=True))  # ASCII: no control characters
    except (RecursionError, ValueError):
        return "(too deep to show)"


def _loggable(text: str) -> str:
    """*text* as is when it is short and printable, else quoted and escaped (no log injection)."""
    if len(text) <= _LOG_LIMIT and text.isprintable():
        return text
    return ascii(text[:_LOG_LIMIT]) + ("..." if len(text) > _LOG_LIMIT else "")


def _encodable(text: str) -> bool:
    try:
        os.fsencode(text)
    except UnicodeError:
        return False
    return True


def _digest(msg_id: str) -> bytes:
    return hashlib.sha256(msg_id.encode("utf-8", "surrogatepass")).digest()


def _no_content() -> Response:
    response = Response(status=204)
    del response.headers["Content-Type"]  # no body, so no type (RFC 9110, wsgiref.validate)
    return response


def _text(status: int, message: str, **headers: str) -> Response:
    response = Response(message + "\n", status=status, mimetype="text/plain", headers=headers)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
