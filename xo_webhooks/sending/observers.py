"""What the dispatchers tell observers (metrics, a project's own callback) about hooks.

Every event but :meth:`Observers.accepted` comes from a delivery thread (or a Celery
worker), never from the request path; ``accepted`` comes from the request thread, and
costs a method call when nobody observes. An observer that raises is logged, once per
observer and event, and never stops delivery.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from .._urls import endpoint_of

if TYPE_CHECKING:
    from .delivery import Delivery
    from .policy import Attempt

__all__ = ["DeliveryObserver", "Observers"]

logger = logging.getLogger(__name__)


class DeliveryObserver(Protocol):
    """What happens to hooks, endpoint by endpoint (``origin``, see ``endpoint_of``).
    Implement the events you need; the others are never called if missing."""

    def accepted(self, origin: str) -> None:
        """A hook was accepted (by the thread that submitted it: with the thread
        dispatcher, its intake thread, or the request thread for a ``waitForResponse``
        hook). It may read the dispatcher's counters: a job's nested read does not run
        the jobs after it."""

    def published(self, origin: str) -> None:
        """A hook was handed to the Celery broker (its fate is the workers')."""

    def attempted(self, origin: str, attempt: Attempt, seconds: float) -> None:
        """An attempt ended with *attempt* after *seconds*."""

    def delivered(self, origin: str, delivery: Delivery) -> None:
        """A hook was delivered."""

    def given_up(self, origin: str, delivery: Delivery, record: dict) -> None:
        """A hook was given up on (``delivery.reason`` says why); *record* is its
        redacted dead-letter record, after the store was written."""

    def state_changed(self, origin: str, state: str) -> None:
        """An endpoint's breaker changed state."""


class Observers:
    """The observers of one dispatcher, told each event in turn."""

    def __init__(self) -> None:
        self._observers: tuple[object, ...] = ()
        self._failed: set[tuple[int, str]] = set()

    def add(self, observer: object) -> None:
        """Tell *observer* (a :class:`DeliveryObserver`) the events from now on."""
        self._observers = (*self._observers, observer)

    def __bool__(self) -> bool:
        return bool(self._observers)

    def accepted(self, origin: str) -> None:
        for observer in self._observers:
            self._tell(observer, "accepted", origin)

    def published(self, origin: str) -> None:
        for observer in self._observers:
            self._tell(observer, "published", origin)

    def attempted(self, origin: str, attempt: Attempt, seconds: float) -> None:
        for observer in self._observers:
            self._tell(observer, "attempted", origin, attempt, seconds)

    def delivered(self, origin: str, delivery: Delivery) -> None:
        for observer in self._observers:
            self._tell(observer, "delivered", origin, delivery)

    def given_up(self, origin: str, delivery: Delivery, record: dict) -> None:
        for observer in self._observers:
            self._tell(observer, "given_up", origin, delivery, record)

    def gave_up_on(self, delivery: Delivery, redact_words: Iterable[str]) -> None:
        """:meth:`given_up`, with *delivery*'s endpoint and its redacted dead-letter
        record (redacted already if the store took it)."""
        if self._observers:
            delivery.redact(redact_words)
            self.given_up(endpoint_of(delivery.hook.url), delivery, delivery.to_record())

    def state_changed(self, origin: str, state: str) -> None:
        for observer in self._observers:
            self._tell(observer, "state_changed", origin, state)

    def _tell(self, observer: object, event: str, *args: object) -> None:
        method = getattr(observer, event, None)
        if method is None:
            return
        try:
            method(*args)
        except Exception:
            key = (id(observer), event)
            if key not in self._failed:
                self._failed.add(key)
                logger.exception("observer %r failed on %s (logged once)", observer, event)
