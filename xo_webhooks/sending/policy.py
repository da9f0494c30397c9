"""The delivery policy: what an answer means, when to try again, and where a hook that
is given up on goes.

Decided here once and asked by every sender of hooks: the thread dispatcher, the
Celery dispatcher and worker, and ``xo-webhooks replay``. As with urllib3's ``Retry``,
callers never re-derive a decision:

- :func:`judge_answer` and :func:`judge_failure` turn one attempt's HTTP answer (or
  the exception that replaced it) into an :class:`Attempt`: delivered, worth a retry,
  or final;
- :meth:`RetryPolicy.next_delay` says how long to wait before the next attempt, or
  that there is none;
- :class:`DeadLetters` keeps the hooks given up on (the configured store, else they
  are counted lost) and logs it, rate-limited.
"""

from __future__ import annotations

import email.utils
import http.client
import logging
import random
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .._sometimes import Sometimes
from .._text import describe_error
from .deadletter import DeadLetterFile, DeadLetterStore

if TYPE_CHECKING:
    from ..config import Settings
    from .delivery import Delivery

__all__ = [
    "Attempt",
    "RetryPolicy",
    "DeadLetters",
    "judge_answer",
    "judge_failure",
    "parse_retry_after",
    "open_dead_letter",
    "MAX_RETRY_AFTER",
    "RETRY_STATUSES",
    "STAT_NAMES",
    "GIVE_UP_REASONS",
]

logger = logging.getLogger(__name__)

#: Seconds: the cap of a receiver's ``Retry-After``.
MAX_RETRY_AFTER = 3600.0
#: Each retry's delay is drawn between this share of the scheduled one and all of it.
JITTER = 0.8
#: Answers other than 5xx that are worth another attempt: Request Timeout, Too Many
#: Requests. Every other non-2xx answer (3xx included: redirects are never followed) is
#: final.
RETRY_STATUSES = frozenset({408, 429})
#: The counters of a dispatcher's ``stats()``: every hook accepted (or resumed from
#: the spool) is delivered, failed (dead-lettered or lost), handed to the spool (to
#: wait there, or left there at shutdown), or still pending.
STAT_NAMES = (
    "accepted", "delivered", "retried", "failed", "dead_lettered", "lost",
    "spooled", "left", "resumed", "pending",
)  # fmt: skip
#: Why a hook was given up on (``Delivery.reason``, the metrics' ``reason`` label): its
#: schedule ran out (retryable failures, or its endpoint down all along), an answer not
#: worth a retry, the queue (or its endpoint's share) was full, the endpoint answered
#: ``410 Gone``, the dispatcher was shutting down, the Celery broker could not take it,
#: the payload schema rejected the payload (``XO_WEBHOOKS_VALIDATE``: never sent).
GIVE_UP_REASONS = (
    "retries_exhausted", "final_answer", "queue_full", "gone", "shutdown", "broker",
    "invalid_payload",
)  # fmt: skip
#: Seconds between two log lines about hooks given up on, of each kind (kept, lost): a
#: receiver that is down would otherwise write one line per hook.
LOG_INTERVAL = 10.0


@dataclass(frozen=True)
class Attempt:
    """The result of one attempt: delivered, or failed and maybe worth retrying.

    :param delivered: the receiver answered 2xx.
    :param error: why it failed, for logs and the dead-letter record.
    :param retryable: another attempt may succeed.
    :param retry_after: seconds the receiver asked to wait (``Retry-After``), capped.
    :param status: the HTTP status, when there was an answer.
    :param reason: why a final failure gives the hook up, when it is not the answer
        itself (``"final_answer"``): one of :data:`GIVE_UP_REASONS`, e.g.
        ``"invalid_payload"`` for a payload never sent.
    """

    delivered: bool
    error: str | None = None
    retryable: bool = False
    retry_after: float | None = None
    status: int | None = None
    reason: str | None = None

    @property
    def give_up_reason(self) -> str:
        """Why a hook whose last attempt this was, with no retry left, is given up on:
        its schedule ran out, the answer was final, or the attempt's own reason."""
        return "retries_exhausted" if self.retryable else self.reason or "final_answer"


def judge_answer(status: int, retry_after: str | None = None) -> Attempt:
    """What the receiver's answer means: 2xx delivered; 5xx, 408 and 429 worth a retry
    (after *retry_after*, the ``Retry-After`` header, when given); anything else final."""
    if 200 <= status < 300:
        return Attempt(True, status=status)
    error = f"HTTP {status}"
    if status >= 500 or status in RETRY_STATUSES:
        return Attempt(False, error, True, parse_retry_after(retry_after), status)
    return Attempt(False, error, status=status)


def judge_failure(error: Exception, timeout: float) -> Attempt:
    """What an attempt that got no answer means: a timeout or a failed connection
    (refused, reset, TLS, not HTTP) is worth a retry; anything else (a URL or a proxy
    that cannot be used, a payload that cannot be encoded) is final."""
    if isinstance(error, TimeoutError):
        return Attempt(False, f"timed out after {timeout:g} s", retryable=True)
    if isinstance(error, (OSError, http.client.HTTPException)):
        return Attempt(False, f"connection failed: {describe_error(error)}", retryable=True)
    return Attempt(False, f"request failed: {describe_error(error)}")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), capped
    at :data:`MAX_RETRY_AFTER`; ``None`` when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,9}", value):  # not isdigit(): "²" is a digit to it
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when.timestamp() - time.time()), MAX_RETRY_AFTER)


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a failed hook again.

    :param schedule: seconds to wait before each retry (``XO_WEBHOOKS_RETRY_SCHEDULE``);
        its length is the number of retries.
    """

    schedule: tuple[float, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """The policy of ``XO_WEBHOOKS_RETRY_SCHEDULE`` (or its shorthand)."""
        return cls(settings.retry_schedule)

    @property
    def retries(self) -> int:
        """Attempts after the first one, at most."""
        return len(self.schedule)

    def next_delay(self, attempts: int, attempt: Attempt) -> float | None:
        """Seconds before the next attempt after *attempts* made ones, the last of which
        was *attempt*; ``None`` when the hook is delivered or given up on.

        The schedule's next delay, jittered: drawn between :data:`JITTER` and all of it,
        so that hooks failed together do not come back together, and the schedule's
        sum stays the longest a hook waits. A receiver's ``Retry-After`` wins.
        """
        if attempt.delivered or not attempt.retryable or attempts > self.retries:
            return None
        if attempt.retry_after is not None:
            return attempt.retry_after
        return self.schedule[max(0, attempts - 1)] * random.uniform(JITTER, 1.0)

    def remaining(self, attempts: int) -> float:
        """Seconds a hook that made *attempts* attempts may still wait in all: the sum
        of its schedule's delays still ahead. A hook whose endpoint is down is given up
        on when that time has passed."""
        return sum(self.schedule[attempts:])

    def longest_schedule(self, timeout: float) -> float:
        """Seconds the whole schedule can last: every attempt timing out, every wait
        its full delay (``Retry-After`` aside)."""
        return (self.retries + 1) * timeout + sum(self.schedule)


def open_dead_letter(target: str) -> DeadLetterStore:
    """The store for *target*: a ``redis://`` URL (needs the ``celery`` extra) or a path."""
    if target.startswith(("redis://", "rediss://")):
        from .deadletter_redis import RedisDeadLetter  # only with the celery extra

        return RedisDeadLetter(target)
    return DeadLetterFile(target)


class RecordWriter(Protocol):
    """What :class:`DeadLetters` writes to: a :class:`DeadLetterStore`, or a collector."""

    def append(self, records: Iterable[dict[str, Any]]) -> None: ...


class DeadLetters:
    """Keeps the hooks given up on: redacted, as dead-letter records, in the store.

    :param settings: ``dead_letter`` (the store's file or URL; none: hooks given up on
        are lost, and counted so) and ``redact``.
    :param store: a store to use instead of the configured one (``replay`` collects
        what still fails this way).
    """

    def __init__(self, settings: Settings, store: RecordWriter | None = None) -> None:
        self._target = settings.dead_letter
        self._redact = settings.redact
        self._given = store
        self.store: RecordWriter | None = store
        self._say = {"kept": Sometimes(LOG_INTERVAL), "lost": Sometimes(LOG_INTERVAL)}
        self.reopen()

    def reopen(self) -> None:
        """Open the store and the log's lock afresh (in a child process after a fork,
        another thread of the parent may have held either)."""
        for say in self._say.values():
            say.reset()
        if self._given is None:
            self.store = open_dead_letter(self._target) if self._target else None

    def keep(self, deliveries: Sequence[Delivery]) -> bool:
        """Write *deliveries* to the store; return whether they were kept. Never raises:
        a failure is logged and the hooks are lost."""
        if not deliveries:
            return True
        reason = "XO_WEBHOOKS_DEAD_LETTER is not set"
        if self.store is not None:
            try:
                for delivery in deliveries:
                    delivery.redact(self._redact)  # nothing unredacted reaches the disk
                self.store.append(d.to_record() for d in deliveries)
            except Exception as e:
                reason = f"the dead-letter store failed: {describe_error(e)}"
            else:
                self._log("kept", deliveries, f"written to {self.store!r}")
                return True
        self.lose(deliveries, reason)
        return False

    def lose(self, deliveries: Sequence[Delivery], reason: str) -> None:
        """Log (at most every ``LOG_INTERVAL`` seconds) that *deliveries* are lost."""
        self._log("lost", deliveries, f"lost ({reason}); see stats() for the count")

    def _log(self, kind: str, deliveries: Sequence[Delivery], outcome: str) -> None:
        if not self._say[kind]():
            return
        first = deliveries[0]
        logger.log(
            logging.WARNING if kind == "kept" else logging.ERROR,
            "gave up on %d hook(s), e.g. %s: %s; %s",
            len(deliveries), first.describe(), first.last_error, outcome,
        )  # fmt: skip
