"""The WSGI middleware: sends a web hook before and after configured JSON-RPC calls.

Requests that cannot trigger a hook (no hooks, not a POST, not JSON, too large, not
JSON-RPC, no matching method) go to the app untouched. For the others the body is read
once, the app gets an identical copy, pre hooks are queued, and the app's response is
streamed to the client unchanged while a capped copy of it feeds the post hooks.
"""

from __future__ import annotations

import copy
import decimal
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._text import describe_error
from .._trace import capture as capture_trace
from .._trace import captured, snapshot
from ..config import Hook, Settings, load_settings
from ..errors import ConfigError
from ..sending.delivery import Delivery, new_id
from ..sending.dispatcher import Dispatcher, make_dispatcher
from .jsonrpc import Call, Outcome, internal_error, outcome_key, parse_calls, parse_outcomes
from .matching import HookTable
from .overlimit import OverLimit
from .payload import User, post_payload, pre_payload
from .waiting import deliver_first_attempts
from .wsgi import Capture, ObservedResponse, read_body

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from ..sending.transport import SessionFactory

    OutcomeOf = Callable[["_TrackedCall"], Outcome]

__all__ = ["WebhookMiddleware", "remote_user", "USER_ENVIRON_KEY"]

logger = logging.getLogger(__name__)

USER_ENVIRON_KEY = "xo_webhooks.user"
UserResolver = Callable[["WSGIEnvironment"], User | None]
NO_USER: User = (None, None)
_LATE_USER = f'environ["{USER_ENVIRON_KEY}"]'  # where the app sets a late user, for the log
# How a request's method names stand in its bytes when it has no JSON escapes.
_METHOD_MEMBER = re.compile(rb'"method"\s*:\s*"([^"\\]*)"')
# What the hooks of a request's calls ask of the request path (WebhookMiddleware._scan):
# pre hooks, post hooks, a pre hook that waits for its answer, or parsing to tell.
_PRE, _POST, _WAITS, _PARSE = 1, 2, 4, 8
# Bytes the quick scan looks for, as ints: "in" finds an int with memchr alone.
_BACKSLASH, _NUL = ord("\\"), 0
_NAMES_KNOWN = 4096  # method names whose hooks are remembered
_NO_ENVIRON: dict[str, Any] = {}  # what a deferred request holds once it is answered


def remote_user(environ: WSGIEnvironment) -> User | None:
    """The default user resolver: ``REMOTE_USER`` gives both the id and the name."""
    user = environ.get("REMOTE_USER")
    return (user, user) if user else None


@dataclass
class _TrackedCall:
    """A call that triggers hooks, with what its post hooks will need."""

    call: Call
    hooks: tuple[Hook, ...]
    call_id: str
    user: User
    start_ms: int
    start: float  # monotonic, for the duration
    trace: dict[str, str] | None  # the W3C trace context its hooks carry

    def post_builder(
        self, end: float, outcome_of: OutcomeOf, user: User
    ) -> Callable[[], dict[str, Any]]:
        """Make this call's post payload later, once, for all its post hooks."""
        built: list[dict[str, Any]] = []

        def build() -> dict[str, Any]:
            if not built:  # two threads may race here: both build the same payload
                duration = int((end - self.start) * 1000)
                built.append(post_payload(
                    self.call_id, user, self.call.method, self.call.params,
                    self.start_ms, self.start_ms + duration, outcome_of(self),
                ))  # fmt: skip
            return built[0]

        return build


class _ObservedCalls(ObservedResponse):
    """The answer to a request whose hooked calls were tracked on the request thread:
    their post hooks are queued once it is complete."""

    __slots__ = ("middleware", "tracked", "environ")

    def __init__(
        self,
        middleware: WebhookMiddleware,
        tracked: list[_TrackedCall],
        environ: WSGIEnvironment,
        start_response: StartResponse,
    ) -> None:
        super().__init__(middleware._max_body, start_response)
        self.middleware = middleware
        self.tracked = tracked
        self.environ = environ

    def done(self) -> None:
        self.middleware._queue_posts(
            self.tracked, self, self.environ.get(USER_ENVIRON_KEY), time.monotonic()
        )


class _DeferredRequest(ObservedResponse):
    """A request that may hold hooked calls, whose hooks are built on the dispatcher's
    intake thread: what only the request thread can note (the user, the trace, the
    time), then the app's answer, observed as :class:`ObservedResponse` does."""

    __slots__ = ("middleware", "environ", "request_body", "user", "trace", "start_ms",
                 "start", "tracked", "end", "late_user")  # fmt: skip

    def __init__(
        self,
        middleware: WebhookMiddleware,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        body: bytes,
        user: Any,
    ) -> None:
        super().__init__(middleware._max_body, start_response)
        self.middleware = middleware
        self.environ = environ  # for the user the app may set (USER_ENVIRON_KEY)
        self.request_body = body
        # As the user_resolver gave it, checked off the request thread; a list (which
        # the app might change during the call) is copied.
        self.user = tuple(user) if type(user) is list else user
        self.trace = snapshot(environ)  # read off the request thread (see _trace.snapshot)
        self.start_ms, self.start = int(time.time() * 1000), time.monotonic()
        self.tracked: list[_TrackedCall] | None = None
        # Set by done(), before send_post() runs:
        self.end: float
        self.late_user: Any

    def send_pre(self) -> None:
        """Parse the body, track its hooked calls and queue their pre hooks."""
        self.tracked = self.middleware._track(self)

    def done(self) -> None:
        """The app answered (on the request thread): have the post hooks queued."""
        self.end = time.monotonic()
        late_user = self.environ.get(USER_ENVIRON_KEY)
        # A list (the app may change it later) is copied, as the resolver's is.
        self.late_user = tuple(late_user) if type(late_user) is list else late_user
        self.environ = _NO_ENVIRON  # the job to come needs no more of the request
        # The bytes the job holds while it waits: the answer kept (none past the cap),
        # and the body if no pre job has taken it yet.
        held = (0 if self.overflow else self._size) + len(self.request_body)
        # The thread is woken once the server has taken the whole answer; for an
        # answer observed at once (a list, a file, an exception), at its next look.
        self.middleware._defer(self.send_post, held, self.streamed)  # type: ignore[misc]

    def send_post(self) -> None:
        """Queue the post hooks (parsing the body first if no pre hook did)."""
        tracked = self.tracked if self.tracked is not None else self.middleware._track(self)
        if tracked:
            self.middleware._queue_posts(tracked, self, self.late_user, self.end)


class WebhookMiddleware:
    """Send Xen Orchestra-style web hooks for the JSON-RPC calls of a WSGI app.

    :param app: the WSGI application to wrap (for Flask, ``app.wsgi_app``).
    :param hooks: hooks as dicts ``{"method", "type", "url", "format",
        "waitForResponse", "secret", "headers"}``; when ``None`` they come from
        ``XO_WEBHOOKS_HOOKS`` or the file named by ``XO_WEBHOOKS_CONFIG``.
    :param user_resolver: ``f(environ) -> (user_id, user_name) | None``; by default
        ``REMOTE_USER``. The app may also set ``environ["xo_webhooks.user"]`` during a
        call, and the post hook uses it. Each of id and name is a ``str`` or ``None``
        (the payload schema's ``userId`` and ``userName``); an id that is an integer or a
        UUID (the keys of many user tables) is converted with ``str()``. Anything else
        (not a pair, a ``dict``, a ``bool`` or ``bytes`` id, a name that is not a
        string) is logged once and the hook gets no user (``null``, ``null``); if the
        resolver raises, likewise.
    :param dispatcher: what delivers the hooks; by default a :class:`ThreadDispatcher`
        (or the Celery one with ``XO_WEBHOOKS_DISPATCHER=celery``, or
        ``dispatcher="celery"``: a string is that setting).
    :param on_give_up: ``f(record)``, called from a delivery thread with the redacted
        dead-letter record of each hook given up on, once the store was written (also
        when there is none, or it failed); for alerting, or a store of your own. If it
        raises, that is logged and delivery goes on.
    :param session_factory: a callable returning a new ``requests.Session`` on each
        call, which a delivery thread sends with (your adapters, client certificates,
        auth); giving it selects the ``requests`` transport (thread dispatcher only).
    :param environ: the environment to configure from (``os.environ`` by default).
    :param settings: any setting in snake_case (``timeout=2.5``, ``max_workers=8``,
        ``max_body=...``, ``retries=...``, ``dead_letter=...``); wins over the
        environment and the file.
    :raises ConfigError: when the configuration is invalid, naming the bad field.

    Usage::

        from xo_webhooks import WebhookMiddleware
        app.wsgi_app = WebhookMiddleware(app.wsgi_app, hooks=[
            {"method": "vm.start", "type": "pre/post", "url": "http://127.0.0.1:3000/"}])
    """

    def __init__(
        self,
        app: WSGIApplication,
        hooks: Iterable[Mapping[str, Any]] | None = None,
        *,
        user_resolver: UserResolver | None = None,
        dispatcher: Dispatcher | str | None = None,
        on_give_up: Callable[[dict[str, Any]], object] | None = None,
        session_factory: SessionFactory | None = None,
        environ: Mapping[str, str] | None = None,
        **settings: Any,
    ) -> None:
        self.app = app
        if isinstance(dispatcher, str):  # the setting (thread or celery), not an object
            settings["dispatcher"], dispatcher = dispatcher, None
        self.settings: Settings = load_settings(
            None if hooks is None else list(hooks), environ, **settings
        )
        if session_factory is not None and (dispatcher or self.settings.dispatcher != "thread"):
            raise ConfigError(
                "session_factory: only the thread dispatcher sends from this process; "
                "Celery workers (or a dispatcher of your own) cannot take a callable"
            )
        self.table = HookTable(self.settings.hooks)
        self._name_needs: dict[bytes, int] = {}  # see _scan: a dict costs less than lru_cache
        self._enabled = bool(self.table)
        self._max_body = self.settings.max_body
        self._paths = self.settings.paths or None  # None: every path
        self.user_resolver = user_resolver or remote_user
        self._bad_users: set[str] = set()  # where an unusable user came from, logged once
        self._bad_users_lock = threading.Lock()
        self.dispatcher: Dispatcher = dispatcher or make_dispatcher(self.settings, session_factory)
        self._submit_many = getattr(self.dispatcher, "submit_many", None)
        # The thread dispatcher builds a request's hooks off the request thread.
        self._defer: Callable[[Callable[[], object], int, bool], None] | None = getattr(
            self.dispatcher, "defer", None
        )
        self._over_limit = OverLimit(self.settings)
        # The threads that make waitForResponse first attempts side by side, at most
        # max_workers in the process (see .waiting).
        self._wait_slots = threading.BoundedSemaphore(self.settings.max_workers)
        # Called on the first request: a process that serves calls sends what waits in
        # the spool even before a call of its own has a hook (never one that only forks).
        self._first_request: Callable[[], None] | None = getattr(self.dispatcher, "start", None)
        if on_give_up is not None:
            self.observe(_GiveUpCallback(on_give_up))
        if self._enabled:
            capture_trace()  # imports OpenTelemetry, if installed, now and not in a request

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self._first_request is not None:
            start, self._first_request = self._first_request, None
            try:
                start()
            except Exception:  # the middleware's own failure never reaches the client
                logger.exception("xo-webhooks could not start delivering")
        # Cheap checks first: most requests never have their body touched.
        if (
            not self._enabled
            or environ.get("REQUEST_METHOD") != "POST"
            or not (environ.get("CONTENT_TYPE", "") in _JSON_TYPES or _may_be_json(environ))
            or (self._paths and not environ.get("PATH_INFO", "").startswith(self._paths))
        ):
            return self.app(environ, start_response)
        body = None
        try:
            body = read_body(environ, self._max_body)
            needs = self._scan(body) if body else 0
        except Exception:  # the middleware's own failure never reaches the client
            logger.exception("xo-webhooks could not inspect a request; passing it through")
            needs = 0
        if not needs:
            return self.app(environ, start_response)
        assert body is not None
        if needs & (_WAITS | _PARSE) or self._defer is None:
            return self._track_now(environ, start_response, body)
        return self._track_later(environ, start_response, body, needs)

    # -- public helpers -----------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued hook is delivered or given up; say whether it was."""
        return self.dispatcher.flush(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush for up to *timeout* seconds (default ``XO_WEBHOOKS_SHUTDOWN_TIMEOUT``),
        stop delivering, and dead-letter what is left. Also runs at interpreter exit."""
        self.dispatcher.close(timeout)
        self._over_limit.close(timeout)

    def stats(self) -> dict[str, int]:
        """Delivery counters since start: accepted, delivered, retried, failed,
        dead_lettered, lost, pending, recording; with a spool, spooled, left, resumed
        and spool_errors too; and over_limit, the hooks of calls beyond
        ``XO_WEBHOOKS_MAX_CALLS`` in one request, never accepted (see the README's
        Delivery guarantees)."""
        return {**self.dispatcher.stats(), "over_limit": self._over_limit.hooks}

    def endpoint_stats(self) -> dict[str, dict[str, Any]]:
        """For each endpoint (a hook URL's scheme, host and port): its ``state``
        (``closed``, ``open``, ``half-open``, ``disabled``), ``pending``, ``delivered``,
        ``failed``, ``consecutive_failures``, ``last_error``, ``last_success`` and
        ``opened_at`` (epoch seconds or ``None``), and (the thread dispatcher) where its
        waiting hooks are kept, ``spool``: ``"spool"`` or ``"memory"``. Empty for a
        dispatcher of your own that has no ``endpoint_stats()``."""
        endpoint_stats = getattr(self.dispatcher, "endpoint_stats", None)
        return endpoint_stats() if endpoint_stats is not None else {}

    def observe(self, observer: object) -> None:
        """Tell *observer* what happens to hooks from now on: any of ``accepted``,
        ``attempted``, ``delivered``, ``given_up`` and ``state_changed`` (see
        ``xo_webhooks.sending.observers.DeliveryObserver``). ``xo_webhooks.metrics``
        registers itself this way.

        :raises TypeError: for a dispatcher of your own that has no ``observers``.
        """
        observers = getattr(self.dispatcher, "observers", None)
        if observers is None:
            raise TypeError(f"{self.dispatcher!r} cannot be observed: it has no observers")
        observers.add(observer)

    @contextmanager
    def call(
        self,
        method: str,
        params: Any = None,
        user: User | None = None,
    ) -> Iterator[CallResult]:
        """Send pre and post hooks around a block of the app's own work, as for an API
        call (the plugin does this for backup jobs)::

            with middleware.call("backup.run", params={"job": "nightly"}) as call:
                call.result = run_backup()

        If the block raises, the post hook carries the error and the exception goes on.

        :param method: the name the hooks match, as a JSON-RPC method (non-empty).
        :param params: as JSON-RPC has them: a ``dict`` (by name) or a ``list`` (by
            position; a ``tuple`` or another mapping is converted); ``None`` sends ``{}``.
        :param user: ``(user_id, user_name)``, as a ``user_resolver`` returns it (an id
            that is an integer or a UUID is converted with ``str()``).
        :raises ValueError: when *method* is empty.
        :raises TypeError: when *method* is not a string, *params* is a scalar (wrap it:
            ``{"job": "nightly"}`` or ``["nightly"]``), or *user* is not such a pair.
            These are raised on entering the block, whether or not a hook matches: the
            hooks' consumers would reject such a payload.
        """
        if not isinstance(method, str):
            raise TypeError(f"middleware.call(): method must be a str, not {type(method).__name__}")
        if not method:
            raise ValueError("middleware.call(): method must not be empty, e.g. 'backup.run'")
        user = _user_of(user)
        record = CallResult()
        # Copies: the payloads are serialised later, on another thread.
        entry = Call(method, _copy(_call_params(params), "params", {}))
        tracked = self._start(
            self._matched([entry]), user or NO_USER, capture_trace(),
            int(time.time() * 1000), time.monotonic(),
        )  # fmt: skip
        try:
            yield record
        except Exception as e:
            failure = internal_error(describe_error(e, limit=500))
            self._finish(tracked, lambda _: failure, None, time.monotonic())
            raise
        result = _copy(record.result, "result", _UNCOPIED)
        outcome = (
            internal_error("the result could not be copied for the hook")
            if result is _UNCOPIED
            else Outcome(result=result)
        )
        self._finish(tracked, lambda _: outcome, None, time.monotonic())

    # -- the request path ---------------------------------------------------------------

    def _track_now(
        self, environ: WSGIEnvironment, start_response: StartResponse, body: bytes
    ) -> Iterable[bytes]:
        """Parse *body* and queue its pre hooks on this thread: for a ``waitForResponse``
        hook, a body the scan cannot read, or a dispatcher that cannot defer."""
        try:
            matched = self._over_limit.split(self._matched(parse_calls(body) or []))
            tracked = self._start(
                matched, self._user(self._resolve_user(environ), "the user_resolver"),
                capture_trace(environ), int(time.time() * 1000), time.monotonic(),
            ) if matched else []  # fmt: skip
        except Exception:  # the middleware's own failure never reaches the client
            logger.exception("xo-webhooks could not inspect a request; passing it through")
            tracked = []
        if not tracked:
            return self.app(environ, start_response)
        if not any(h.post for entry in tracked for h in entry.hooks):
            return self.app(environ, start_response)
        return _ObservedCalls(self, tracked, environ, start_response).respond(self.app, environ)

    def _track_later(
        self, environ: WSGIEnvironment, start_response: StartResponse, body: bytes, needs: int
    ) -> Iterable[bytes]:
        """Leave the parsing of *body*, and the building of its hooks, to the
        dispatcher's intake thread (see ``ThreadDispatcher.defer``): this thread only
        notes what must be read here (the user, the trace, the time)."""
        try:
            request = _DeferredRequest(
                self, environ, start_response, body, self._resolve_user(environ)
            )
            if needs & _PRE:  # not woken for it: see Intake.put
                self._defer(request.send_pre, len(body), False)  # type: ignore[misc]
        except Exception:  # the middleware's own failure never reaches the client
            logger.exception("xo-webhooks could not inspect a request; passing it through")
            return self.app(environ, start_response)
        if not needs & _POST:
            return self.app(environ, start_response)
        return request.respond(self.app, environ)

    def _track(self, request: _DeferredRequest) -> list[_TrackedCall]:
        """Parse a deferred request's body, match its calls and queue their pre hooks
        (on the intake thread)."""
        body, request.request_body = request.request_body, b""
        matched = self._over_limit.split(self._matched(parse_calls(body) or []))
        if not matched:
            return []
        user = self._user(request.user, "the user_resolver")
        trace = captured(request.trace)
        return self._start(matched, user, trace, request.start_ms, request.start)

    def _resolve_user(self, environ: WSGIEnvironment) -> Any:
        """What the ``user_resolver`` says of *environ*, not yet checked."""
        try:
            return self.user_resolver(environ)
        except Exception:
            logger.exception("the xo-webhooks user_resolver failed; sending no user")
            return None

    def _user(self, value: Any, source: str) -> User:
        """*value* as a usable user, or no user (see :meth:`_usable_user`)."""
        return self._usable_user(value, source) or NO_USER

    def _usable_user(self, value: Any, source: str) -> User | None:
        """*value* as ``(user_id, user_name)`` (see :func:`_user_of`); ``None``, logged
        once per *source*, when it cannot be one."""
        try:
            return _user_of(value)
        except TypeError as e:
            with self._bad_users_lock:  # once: it is the app's bug, the same every call
                first = source not in self._bad_users
                self._bad_users.add(source)
            if first:
                logger.warning("%s gave an unusable user (%s); sending no user "
                               "(logged once)", source, e)  # fmt: skip
            return None

    def _matched(self, calls: list[Call]) -> list[tuple[Call, tuple[Hook, ...]]]:
        """The calls that trigger hooks, each with its hooks."""
        return [(call, hooks) for call in calls if (hooks := self.table.match(call.method))]

    def _scan(self, body: bytes) -> int:
        """What the hooks of the calls *body* may hold ask of the request path (``_PRE``,
        ``_POST``, ``_WAITS`` bits; ``_PARSE`` when only parsing can tell; 0 when no
        call can have a hook), told without parsing it.

        In UTF-8 (with or without a BOM) and without a backslash (a JSON escape), every
        method name of a request stands in the bytes as ``"method": "<name>"``, which
        one linear regex pass lists (never a pattern built from the hooks' globs: those
        could backtrack on a hostile body); the hooks of those names are a superset of
        the calls' hooks. UTF-16 and UTF-32, which Python's ``json`` reads too, put a
        zero byte in the first four (JSON text starts with an ASCII character): those
        bodies are parsed.

        A single call, spelled as ``json.dumps`` or ``JSON.stringify`` spell it, is read
        with two ``bytes.split`` and no regex, the checks before it with ``in`` on a
        byte over the whole body (a slice would cost more than the search; a zero byte
        past the fourth is invalid JSON anyway, which the parser then says): this runs
        on every POST of an app whose calls have no hook, and a ``bytes.find`` parses
        its arguments at the cost of the whole search. Under callgrind, in a Flask
        call, this scan adds 3,600 instructions; the regex, 6,000.
        """
        if _BACKSLASH in body or _NUL in body:  # a JSON escape; UTF-16 or UTF-32
            return _PARSE
        parts = body.split(b'"method"', 2)
        if len(parts) == 1:
            return 0
        if len(parts) == 2:  # the only one: name it without the regex
            spelled = parts[1].split(b'"', 2)  # colon, name, rest
            if len(spelled) == 3 and (spelled[0] == b": " or spelled[0] == b":"):
                name = spelled[1]
                needs = self._name_needs.get(name)
                return self._learn_name(name) if needs is None else needs
        return self._needs_of_names(_METHOD_MEMBER.findall(body))

    def _needs_of_names(self, names: list[bytes]) -> int:
        """What the hooks of method *names* ask (see :meth:`_scan`)."""
        needs = 0
        known = self._name_needs
        for name in names:
            found = known.get(name)
            needs |= self._learn_name(name) if found is None else found
        return needs

    def _learn_name(self, name: bytes) -> int:
        """What the hooks of the method *name* ask (see :meth:`_scan`), remembered for
        the next request: at most :data:`_NAMES_KNOWN` names of up to 256 bytes, then
        it starts over (a client sending ever new or huge names pins no memory)."""
        needs = self._needs_of(name)
        if len(name) <= 256:
            if len(self._name_needs) >= _NAMES_KNOWN:
                self._name_needs.clear()
            self._name_needs[name] = needs
        return needs

    def _needs_of(self, name: bytes) -> int:
        try:
            hooks = self.table.match(name.decode("utf-8"))
        except UnicodeDecodeError:
            return _PARSE  # let the JSON parser judge
        needs = 0
        for hook in hooks:
            needs |= (_PRE if hook.pre else 0) | (_POST if hook.post else 0)
            needs |= _WAITS if hook.pre and hook.wait_for_response else 0
        return needs

    def _start(
        self,
        matched: list[tuple[Call, tuple[Hook, ...]]],
        user: User,
        trace: dict[str, str] | None,
        start_ms: int,
        start: float,
    ) -> list[_TrackedCall]:
        """Track the calls that trigger hooks, called at *start_ms* (epoch ms; *start*
        on the monotonic clock), and send their pre hooks."""
        tracked = [
            _TrackedCall(call, hooks, new_id(), user, start_ms, start, trace)
            for call, hooks in matched
        ]
        waiting: list[Delivery] = []
        queued: list[Delivery] = []
        for entry in tracked:
            pre = pre_payload(entry.call_id, user, entry.call.method, entry.call.params, start_ms)
            for hook in entry.hooks:
                if hook.pre:
                    delivery = Delivery(hook, pre, trace=trace)
                    (waiting if hook.wait_for_response else queued).append(delivery)
        self._submit(queued)
        if waiting:  # by design, the call waits for these: one timeout at most
            deliver_first_attempts(
                self.dispatcher, waiting, self._wait_slots, self.settings.timeout
            )
        return tracked

    def _queue_posts(
        self, tracked: list[_TrackedCall], capture: Capture, late_user: Any, end: float
    ) -> None:
        """Queue the post hooks of *tracked* calls, which ended at *end* (monotonic)
        with what *capture* holds; *late_user* is what the app set in the environ."""
        # The response is parsed, and the post payloads built, by a delivery thread.
        # Until then the hooks keep only what was captured: not the request's object,
        # which holds the environ and the server's start_response (thousands of them,
        # with a receiver down, would weigh on memory and on every garbage collection).
        capture = capture.kept()
        outcomes: dict[str, Outcome] = {}

        def outcome_of(entry: _TrackedCall) -> Outcome:
            if not outcomes:
                outcomes.update(_outcomes(tracked, capture))
            return outcomes[entry.call_id]

        self._finish(tracked, outcome_of, late_user, end)

    def _finish(
        self, tracked: list[_TrackedCall], outcome_of: OutcomeOf, late_user: Any, end: float
    ) -> None:
        """Queue the post hooks of *tracked* calls (see :meth:`_queue_posts`)."""
        user = self._usable_user(late_user, _LATE_USER)
        posts = []
        for entry in tracked:
            build = entry.post_builder(end, outcome_of, user or entry.user)
            posts += [
                Delivery(hook, build=build, call_id=entry.call_id, kind="post", trace=entry.trace)
                for hook in entry.hooks
                if hook.post
            ]
        self._submit(posts)

    def _submit(self, deliveries: list[Delivery]) -> None:
        """Queue *deliveries*: in one go when the dispatcher can (the Celery one
        publishes them in one round trip, a message per call), else one by one."""
        if len(deliveries) > 1 and self._submit_many is not None:
            self._submit_many(deliveries)
            return
        for delivery in deliveries:
            self.dispatcher.submit(delivery)


class _GiveUpCallback:
    """The ``on_give_up`` callback, as an observer."""

    def __init__(self, callback: Callable[[dict[str, Any]], object]) -> None:
        self.callback = callback

    def given_up(self, origin: str, delivery: Delivery, record: dict[str, Any]) -> None:
        self.callback(record)

    def __repr__(self) -> str:
        return f"on_give_up={self.callback!r}"


@dataclass
class CallResult:
    """The result of a :meth:`WebhookMiddleware.call` block; set ``result`` in it."""

    result: Any = None


def _outcomes(tracked: list[_TrackedCall], capture: Capture) -> dict[str, Outcome]:
    """The outcome of each tracked call, by call id, from what the app answered."""
    failure = None
    if capture.error is not None:
        failure = internal_error(capture.error)
    elif not 200 <= capture.status_code < 300:
        failure = internal_error(f"the application answered HTTP {capture.status or '(none)'}")
    if failure is not None:
        return {entry.call_id: failure for entry in tracked}
    answers = None
    if not capture.overflow:
        answers = parse_outcomes(capture.body)
    outcomes = {}
    for entry in tracked:
        if entry.call.is_notification:
            outcomes[entry.call_id] = Outcome(result=None)
        elif capture.overflow:
            outcomes[entry.call_id] = internal_error("response not inspected: larger than maxBody")
        elif answers is None:
            outcomes[entry.call_id] = internal_error("the response is not a JSON-RPC response")
        else:
            answer = answers.get(outcome_key(entry.call.id))
            if answer is None and len(answers) == 1 and None in answers:
                answer = answers[None]  # an error the server could not tie to an id
            outcomes[entry.call_id] = answer or internal_error("no response for this call")
    return outcomes


_UNCOPIED: Any = object()


def _copy(value: Any, what: str, fallback: Any) -> Any:
    """A deep copy of *value*, or *fallback* (logged) when it cannot be copied."""
    try:
        return copy.deepcopy(value)
    except Exception:
        logger.exception("middleware.call(): the %s could not be copied for the hooks", what)
        return fallback


#: User ids converted with ``str()``: the integer and UUID keys of user tables.
_ID_TYPES = (int, decimal.Decimal, uuid.UUID)  # not float: NaN would become "nan"


def _user_of(value: Any) -> User | None:
    """*value* (a ``user_resolver``'s result, ``environ["xo_webhooks.user"]``, or
    ``call(user=...)``) as the payload's ``(userId, userName)``: ``None`` for ``None``;
    a pair (tuple or list) of ``str`` or ``None``, its id converted with ``str()`` when
    it is an integer, a ``Decimal`` or a UUID (never a ``bool``: ``True`` is no id; never
    a float: NaN is no id either).

    :raises TypeError: for anything else, saying what it is (never its value: it may
        be a session object).
    """
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"expected (user_id, user_name) or None, got {_kind(value)}")
    user_id, user_name = value
    if isinstance(user_id, _ID_TYPES) and not isinstance(user_id, bool):
        user_id = str(user_id)
    if not (user_id is None or isinstance(user_id, str)):
        raise TypeError(f"the user id is {type(user_id).__name__}, not str or None")
    if not (user_name is None or isinstance(user_name, str)):
        raise TypeError(f"the user name is {type(user_name).__name__}, not str or None")
    return (user_id, user_name)


def _kind(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return type(value).__name__


def _call_params(params: Any) -> dict[str, Any] | list[Any]:
    """``call()``'s *params* as the payload schema has them: an object or an array."""
    if params is None:
        return {}
    if isinstance(params, (dict, list)):
        return params
    if isinstance(params, tuple):
        return list(params)
    if isinstance(params, Mapping):
        return dict(params)
    raise TypeError(
        f"middleware.call(): params must be a dict (by name) or a list (by position), "
        f"as in JSON-RPC, not {type(params).__name__}; wrap it, e.g. "
        f"params={{'job': ...}} or [...]"
    )


#: Content-Type values seen that may label JSON (see _may_be_json), up to 64: a set
#: costs less than lru_cache on every POST.
_JSON_TYPES: set[str] = set()


def _may_be_json(environ: WSGIEnvironment) -> bool:
    """Whether the request's body may be JSON: JSON-RPC clients send JSON, sometimes
    labelled text/plain or not at all. A yes is remembered in :data:`_JSON_TYPES`."""
    content_type = environ.get("CONTENT_TYPE", "")
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind and "json" not in kind and kind != "text/plain":
        return False
    if len(_JSON_TYPES) >= 64:
        _JSON_TYPES.clear()
    _JSON_TYPES.add(content_type)
    return True
