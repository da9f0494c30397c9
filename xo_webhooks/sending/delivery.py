"""One hook on its way to a receiver, and the HTTP client that sends it.

:class:`Delivery` is a hook plus its payload and its delivery history; :class:`Sender`
makes one attempt over HTTP and has the policy (:mod:`.policy`) judge the answer.
Scheduling attempts is the dispatcher's job.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .. import signing
from .._text import describe_error
from .._trace import HEADERS as TRACE_HEADERS
from .._trace import attempt_span
from .._urls import is_masked, masked_url, short_url
from .._version import __version__
from ..config import Hook, Settings
from .formats import serialize
from .policy import Attempt, judge_answer, judge_failure
from .redaction import clean_payload
from .transport import SessionFactory, Transport
from .validation import INVALID_PAYLOAD, PayloadCheck

__all__ = ["Delivery", "Sender", "new_id", "make_transport", "USER_AGENT", "REPLACED_HEADER"]

if TYPE_CHECKING:
    from .transport_requests import RequestsTransport

logger = logging.getLogger(__name__)

USER_AGENT = f"xo-webhooks/{__version__}"
#: Sent with a hook whose payload holds stand-ins for values that are not strict JSON
#: (see :mod:`.redaction`): how many values were replaced.
REPLACED_HEADER = "Xo-Webhooks-Replaced"


def new_id() -> str:
    """A unique id (32 hex digits): a random per-process prefix and a counter, so that
    the request path makes no system call for it."""
    return f"{_id_prefix}{next(_id_counter):016x}"


def _reseed_ids() -> None:
    global _id_prefix, _id_counter
    _id_prefix, _id_counter = os.urandom(8).hex(), itertools.count()


_id_prefix, _id_counter = os.urandom(8).hex(), itertools.count()
os.register_at_fork(after_in_child=_reseed_ids)  # a forked worker must not repeat ids


class Delivery:
    """A hook payload to deliver to one hook's URL.

    :param hook: the configured hook (URL, format, secret, headers).
    :param payload: the payload, not yet redacted; or ``None`` with *build*.
    :param id: the message id, the same for every attempt (the ``webhook-id`` header);
        a new random one by default.
    :param attempts: attempts already made (a replayed or redelivered hook).
    :param last_error: why the last attempt failed.
    :param build: makes the payload on first use, so that a post hook's payload (and
        the parsing of the response it needs) is built by a delivery thread, not on
        the request path. Then *call_id* and *kind* must be given.
    :param trace: the W3C trace context of the call that caused the hook
        (``traceparent``, ``tracestate``), sent with each attempt.
    """

    __slots__ = ("hook", "_payload", "_build", "id", "attempts", "last_error", "body",
                 "call_id", "kind", "redacted", "replaced", "trace", "reason", "created",
                 "after")  # fmt: skip

    def __init__(
        self,
        hook: Hook,
        payload: dict[str, Any] | None = None,
        id: str | None = None,  # noqa: A002 - the Standard Webhooks name
        attempts: int = 0,
        last_error: str | None = None,
        *,
        build: Callable[[], dict[str, Any]] | None = None,
        call_id: str | None = None,
        kind: str | None = None,
        trace: dict[str, str] | None = None,
    ) -> None:
        if payload is None and (build is None or call_id is None or kind is None):
            raise TypeError("a Delivery needs a payload, or build with call_id and kind")
        self.hook = hook
        self._payload = payload
        self._build = build
        self.id = id or "msg_" + new_id()
        self.attempts = attempts
        self.last_error = last_error
        self.body: bytes | None = None
        self.redacted = False
        self.replaced = 0  # values replaced by a stand-in: not strict JSON (see .redaction)
        self.call_id = call_id if payload is None else payload.get("callId")
        self.kind = kind if payload is None else payload.get("type")
        self.trace = trace
        self.reason: str | None = None  # why it was given up on (see policy.GIVE_UP_REASONS)
        self.created = time.time()  # when it was accepted (a spooled one: first accepted)
        self.after: str | None = None  # a post hook: the id of its pre hook in the spool

    @property
    def payload(self) -> dict[str, Any]:
        """The payload, built on first use."""
        payload = self._payload
        if payload is None:
            build = self._build  # a delivery thread and the spooler may ask at once: each
            if build is None:  # may build it (equal dicts), and either one is kept
                return self._payload  # type: ignore[return-value]  # built meanwhile
            payload = build()
            self._payload, self._build = payload, None
        return payload

    @payload.setter
    def payload(self, value: dict[str, Any]) -> None:
        self._payload = value

    @property
    def is_pre(self) -> bool:
        """Whether this is a ``pre`` hook."""
        return self.kind == "pre"

    @property
    def order_key(self) -> tuple[Any, str]:
        """A call's post hook to a URL waits for its pre hook to the same URL."""
        return (self.call_id, self.hook.url)

    def redact(self, words: Iterable[str]) -> None:
        """Redact the payload, and replace what strict JSON cannot hold by stand-ins
        (once: a record read back is already clean)."""
        if not self.redacted:
            self.payload, self.replaced = clean_payload(self.payload, words)
            self.redacted = True

    def prepare(self, redact_words: Iterable[str]) -> bytes:
        """Redact and serialise the payload once; return the request body."""
        if self.body is None:
            self.redact(redact_words)
            self.body = serialize(self.payload, self.hook.format)
        return self.body

    @classmethod
    def from_record(cls, record: dict[str, Any], settings: Settings, attempts: int = 0) -> Delivery:
        """The delivery a dead-letter record (or a Celery message: the same shape) stands
        for, keeping its id. It goes to the configured hook with the record's
        fingerprint (``hook``), else with its URL, and is signed and gets the headers of
        that hook (else the global secret): records never hold either.

        :raises LookupError: when the record's URL is masked (a password or query
            values: ``***``) and no configured hook has its fingerprint, so that it
            cannot be sent anywhere.
        """
        payload = record["payload"]
        configured = _configured_hook(record, settings.hooks)
        url = configured.url if configured else record["url"]
        if configured is None and is_masked(url):
            raise LookupError(
                f"no configured hook has the fingerprint {record.get('hook')} of "
                f"{short_url(url)}: its URL was masked in the record"
            )
        hook = Hook(
            method=str(payload.get("method", "*")),
            type=str(payload.get("type", "post")),
            url=url,
            format=record.get("format", "json"),
            secret=configured.secret if configured else settings.secret,
            headers=configured.headers if configured else (),
            index=configured.index if configured else None,
        )
        trace = record.get("trace")
        delivery = cls(
            hook, payload, record.get("id") or None, attempts, record.get("lastError"),
            trace=_trace_headers(trace),
        )  # fmt: skip
        delivery.redacted = True  # records and messages are written redacted
        replaced = record.get("replaced")
        delivery.replaced = replaced if isinstance(replaced, int) else 0
        return delivery

    def failed(self, attempt: Attempt) -> None:
        """Note a failed attempt: its error, and a warning in the log."""
        self.last_error = attempt.error
        # An invalid payload is logged once per method where it is found, not per hook.
        level = logging.DEBUG if attempt.reason == INVALID_PAYLOAD else logging.WARNING
        logger.log(
            level,
            "hook %s failed (attempt %d): %s",
            self.describe(),
            self.attempts,
            self.last_error,
        )

    def describe(self) -> str:
        """``vm.start post for call <id> to hooks[2] https://host/…``: for logs (never
        params, results, nor the URL's path, query or password)."""
        method = self._payload.get("method") if self._payload else self.hook.method
        return f"{method} {self.kind} for call {self.call_id} to {self.hook.label}"

    def to_message(self) -> dict[str, Any]:
        """This delivery as a Celery message carries it: a dead-letter record without
        its ``failedAt`` (no secret, no header values; redact first)."""
        message = {
            "id": self.id,
            "url": self.hook.url,
            "format": self.hook.format,
            "payload": self.payload,
            "attempts": self.attempts,
            "lastError": self.last_error,
        }
        if self.trace:
            message["trace"] = self.trace
        if self.replaced:
            message["replaced"] = self.replaced
        return message

    def to_record(self) -> dict[str, Any]:
        """The dead-letter record of this delivery: :meth:`to_message` with the URL's
        password and query values masked, the ``hook`` fingerprint of the whole URL,
        and the time it was given up on."""
        record = self.to_message()
        record["url"] = masked_url(self.hook.url)
        record["hook"] = self.hook.fingerprint
        record["failedAt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return record

    def __repr__(self) -> str:
        return (
            f"Delivery({self.kind} call {self.call_id} to {self.hook.label!r}, id={self.id!r}, "
            f"attempts={self.attempts})"
        )


def make_transport(
    settings: Settings, session_factory: SessionFactory | None = None
) -> Transport | RequestsTransport:
    """The transport *settings* ask for: ``http`` (:class:`Transport`), or ``requests``
    (also whenever a *session_factory* is given)."""
    if settings.transport == "requests" or session_factory is not None:
        from .transport_requests import RequestsTransport

        return RequestsTransport(settings.timeout, settings.ca_bundle, session_factory)
    return Transport(settings.timeout, settings.ca_bundle)


class Sender:
    """Makes one delivery attempt over HTTP (see :mod:`.transport`).

    :param settings: timeout, CA bundle, transport, redaction words and whether to
        validate ``json`` payloads against the payload schema come from here.
    :param session_factory: makes the ``requests.Session`` of each delivery thread
        (then the ``requests`` transport is used, whatever the setting).
    """

    def __init__(self, settings: Settings, session_factory: SessionFactory | None = None) -> None:
        self.settings = settings
        self.transport = make_transport(settings, session_factory)
        #: The schema check of ``json`` payloads (``XO_WEBHOOKS_VALIDATE``), or ``None``.
        self.check = PayloadCheck() if settings.validate else None

    def reset(self) -> None:
        """Forget every connection, e.g. in a child process after a fork."""
        self.transport.reset()

    def release(self) -> None:
        """Close the calling thread's connections."""
        self.transport.release()

    def headers(self, delivery: Delivery, body: bytes) -> dict[str, str]:
        """The request headers of *delivery*: content type, the hook's own, its
        ``webhook-id``, and the Standard Webhooks signature when the hook has a secret."""
        headers = {
            "User-Agent": USER_AGENT,
            "Content-Type": "application/json",
            **dict(delivery.hook.headers),
            "webhook-id": delivery.id,  # always: lets receivers drop a retried duplicate
        }
        if delivery.replaced:  # the note that stand-ins are in the payload
            headers[REPLACED_HEADER] = str(delivery.replaced)
        if delivery.hook.secret:
            timestamp = int(time.time())
            headers["webhook-timestamp"] = str(timestamp)
            headers["webhook-signature"] = signing.sign(
                delivery.hook.secret, delivery.id, timestamp, body
            )
        return headers

    def send(self, delivery: Delivery) -> Attempt:
        """Make one attempt; never raises."""
        try:
            return self._send(delivery)
        except Exception as e:  # a bug must not kill the delivery thread
            logger.exception("unexpected error delivering hook %s", delivery.describe())
            return Attempt(False, f"unexpected error: {describe_error(e)}")

    def _send(self, delivery: Delivery) -> Attempt:
        delivery.attempts += 1
        if delivery.body is None and self.check is not None and delivery.hook.format == "json":
            # Checked as it will be sent (redacted), before it is serialised and
            # signed; once per delivery: a retry sends the body already checked.
            delivery.redact(self.settings.redact)
            invalid = self.check.check(delivery.payload)
            if invalid is not None:
                return invalid
        body = delivery.prepare(self.settings.redact)
        with attempt_span(delivery.trace, delivery.hook.url, delivery.attempts) as span:
            headers = {**self.headers(delivery, body), **span.headers}
            try:
                status, retry_after = self.transport.post(delivery.hook.url, body, headers)
            except Exception as e:
                attempt = judge_failure(e, self.settings.timeout)
            else:
                attempt = judge_answer(status, retry_after)
            span.finish(attempt.status, None if attempt.delivered else attempt.error)
        return attempt


def _configured_hook(record: dict[str, Any], hooks: Iterable[Hook]) -> Hook | None:
    """The configured hook a record names: by its fingerprint, else by its URL."""
    wanted = record.get("hook")
    if wanted:
        found = next((h for h in hooks if h.fingerprint == wanted), None)
        if found is not None:
            return found
    return next((h for h in hooks if h.url == record["url"]), None)


def _trace_headers(value: Any) -> dict[str, str] | None:
    """The trace context of a record or message, if it holds a usable one."""
    if not isinstance(value, dict):
        return None
    found = {k: v for k, v in value.items() if k in TRACE_HEADERS and isinstance(v, str)}
    return found or None
