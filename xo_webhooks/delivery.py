"""One hook on its way to a receiver, and the HTTP client that sends it.

:class:`Delivery` is a hook plus its payload and its delivery history; :class:`Sender`
makes one attempt over HTTP and says whether it worked, and if not whether and when to
try again. Scheduling attempts is the dispatcher's job.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from . import __version__, signing
from .config import Hook, Settings
from .payload import redact_payload, serialize

__all__ = ["Delivery", "Attempt", "Sender", "backoff_delay", "USER_AGENT"]

USER_AGENT = f"xo-webhooks/{__version__} (+python-requests/{requests.__version__})"
MAX_DELAY = 60.0  # seconds: cap of the backoff and of a receiver's Retry-After
RETRY_STATUSES = frozenset({408, 429})


@dataclass
class Delivery:
    """A hook payload to deliver to one hook's URL.

    :param hook: the configured hook (URL, format, secret, headers).
    :param payload: the payload as built on the request path, not yet redacted.
    :param id: the message id, the same for every attempt (the ``webhook-id`` header).
    """

    hook: Hook
    payload: dict[str, Any]
    id: str = field(default_factory=lambda: "msg_" + uuid.uuid4().hex)
    attempts: int = 0
    last_error: str | None = None
    body: bytes | None = field(default=None, repr=False)

    @property
    def is_pre(self) -> bool:
        """Whether this is a ``pre`` hook."""
        return self.payload.get("type") == "pre"

    @property
    def order_key(self) -> tuple[Any, str]:
        """A call's post hook to a URL waits for its pre hook to the same URL."""
        return (self.payload.get("callId"), self.hook.url)

    def prepare(self, redact_words: Iterable[str]) -> bytes:
        """Redact and serialise the payload once; return the request body."""
        if self.body is None:
            self.payload = redact_payload(self.payload, redact_words)
            self.body = serialize(self.payload, self.hook.format)
        return self.body

    def to_record(self) -> dict[str, Any]:
        """The dead-letter record of this delivery (no secret, no header values)."""
        return {
            "id": self.id,
            "url": self.hook.url,
            "format": self.hook.format,
            "payload": self.payload,
            "attempts": self.attempts,
            "lastError": self.last_error,
            "failedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


@dataclass(frozen=True)
class Attempt:
    """The result of one attempt: delivered, or failed and maybe worth retrying."""

    delivered: bool
    error: str | None = None
    retryable: bool = False
    retry_after: float | None = None
    status: int | None = None


class Sender:
    """Sends deliveries over HTTP with one keep-alive session per thread.

    :param settings: timeout, CA bundle, worker count (the connection pool size) and
        redaction words come from here.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=8, pool_maxsize=self.settings.max_workers)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = USER_AGENT
            self._local.session = session
        return session

    def headers(self, delivery: Delivery, body: bytes) -> dict[str, str]:
        """The request headers of *delivery*: content type, the hook's own, its
        ``webhook-id``, and the Standard Webhooks signature when the hook has a secret."""
        headers = {
            "Content-Type": "application/json",
            **dict(delivery.hook.headers),
            "webhook-id": delivery.id,  # always: lets receivers drop a retried duplicate
        }
        if delivery.hook.secret:
            timestamp = int(time.time())
            headers["webhook-timestamp"] = str(timestamp)
            headers["webhook-signature"] = signing.sign(
                delivery.hook.secret, delivery.id, timestamp, body
            )
        return headers

    def send(self, delivery: Delivery) -> Attempt:
        """Make one attempt; never raises."""
        delivery.attempts += 1
        try:
            body = delivery.prepare(self.settings.redact)
        except Exception as e:  # e.g. a payload nested too deeply to encode
            return Attempt(False, f"cannot encode the payload: {type(e).__name__}")
        try:
            response = self._session().post(
                delivery.hook.url,
                data=body,
                headers=self.headers(delivery, body),
                timeout=self.settings.timeout,
                allow_redirects=False,
                # Per request: requests lets REQUESTS_CA_BUNDLE override session.verify.
                verify=self.settings.ca_bundle or True,
            )
        except requests.Timeout:
            return Attempt(False, f"timed out after {self.settings.timeout:g} s", retryable=True)
        except requests.ConnectionError as e:
            return Attempt(False, f"connection failed: {_reason(e)}", retryable=True)
        except requests.RequestException as e:
            return Attempt(False, f"request failed: {_reason(e)}")
        status = response.status_code
        if 200 <= status < 300:
            return Attempt(True, status=status)
        error = f"HTTP {status}"
        if status >= 500 or status in RETRY_STATUSES:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            return Attempt(False, error, retryable=True, retry_after=retry_after, status=status)
        return Attempt(False, error, status=status)


def _reason(error: Exception) -> str:
    # requests nests the useful part several exceptions deep; keep the innermost.
    while error.args and isinstance(error.args[0], Exception):
        error = error.args[0]
    reason = getattr(error, "reason", None)
    return str(reason or error)[:200]


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), capped."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_DELAY)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when.timestamp() - time.time()), MAX_DELAY)


def backoff_delay(attempts: int, base: float, retry_after: float | None = None) -> float:
    """Seconds before the next attempt after *attempts* failed ones: exponential with
    jitter (between half and all of ``base * 2 ** (attempts - 1)``), capped; a receiver's
    ``Retry-After`` wins when it gives one."""
    if retry_after is not None:
        return retry_after
    ceiling = min(MAX_DELAY, base * 2 ** max(0, attempts - 1))
    return ceiling * random.uniform(0.5, 1.0)
