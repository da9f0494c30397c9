"""The request path's side of delivery on Celery: :class:`CeleryDispatcher` publishes
one message per hook for the workers (:mod:`.celery`), and makes a ``waitForResponse``
hook's first attempt itself.

Needs the ``celery`` extra; the base install never imports this module.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from celery import Celery
from kombu import pools
from kombu.exceptions import EncodeError

from .._text import describe_error
from .._urls import endpoint_of
from ..config import Settings
from .celery import (
    COUNTDOWN_LIMIT,
    DEFAULT_BROKER_URL,
    PUBLISH_TIMEOUT,
    TASK_NAME,
    celery_app,
    message_summary,
)
from .delivery import Delivery, Sender
from .endpoints import Breaker, Gate, probe_lease
from .endpoints_redis import Parking, SharedBreakers
from .observers import Observers
from .policy import STAT_NAMES, DeadLetters, RetryPolicy

__all__ = ["CeleryDispatcher"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: After a failed publish, seconds during which hooks are dead-lettered at once.
BROKER_DOWN_SECONDS = 1.0


class CeleryDispatcher:
    """Publishes one Celery message per hook; workers deliver them.

    :param settings: the broker URL, redaction words, dead-letter target, and for
        ``waitForResponse`` pre hooks the timeout and retry schedule.
    :param app: the Celery app to publish with (by default one built from *settings*
        on first use, in the process that publishes).

    ``stats()`` counts in this process: ``published`` is the hooks handed to the broker
    (their fate is the workers'), so ``accepted == delivered + published + failed +
    pending``; ``delivered`` counts only ``waitForResponse`` first attempts, and
    ``failed`` the hooks that could not be published (dead-lettered or lost).
    """

    def __init__(self, settings: Settings, *, app: Celery | None = None) -> None:
        self.settings = settings
        self.sender = Sender(settings)
        self.policy = RetryPolicy.from_settings(settings)
        self.dead_letters = DeadLetters(settings)
        #: Told what happens to hooks (metrics, ``on_give_up``): see :mod:`.observers`.
        self.observers = Observers()
        self._given_app = app
        self._reset()
        # A forked child (gunicorn --preload) must not share the parent's broker
        # connections: start afresh, as kombu itself does in multiprocessing children.
        ref = weakref.ref(self)

        def reset_in_child() -> None:
            dispatcher = ref()
            if dispatcher is not None:
                dispatcher._reset()
                pools.connections.clear()
                pools.producers.clear()

        os.register_at_fork(after_in_child=reset_in_child)

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._app = self._given_app
        self._counters: Counter[str] = Counter()
        self._in_flight = 0
        # (callId, url) -> ids of the published pre hooks its post hooks wait for
        self._pres: OrderedDict[tuple[Any, str], list[str]] = OrderedDict()
        self._down_until = 0.0
        self._closed = False
        self._shared: SharedBreakers | None = None

    def submit(self, delivery: Delivery) -> None:
        """Publish *delivery*; on failure dead-letter it. Never raises; waits at most
        about :data:`PUBLISH_TIMEOUT` twice (connect, answer) for the broker."""
        self._accept(delivery)
        self._hand_over(delivery)

    def deliver_now(self, delivery: Delivery) -> bool:
        """Make the first attempt in this thread (``waitForResponse``), then publish the
        retry, if any, for the workers. An endpoint whose shared breaker is open gets no
        attempt: the hook goes to the workers, who park it. Returns whether it was
        delivered."""
        self._accept(delivery)
        origin = endpoint_of(delivery.hook.url)
        breakers = self._breakers()
        unknown: tuple[Gate, Breaker | None] = (Gate.SEND, None)
        gate, breaker = self._ask(lambda: breakers.admit(origin), unknown)
        if gate is Gate.WAIT:
            self._hand_over(delivery)
            return False
        if gate is Gate.GONE and breaker is not None:
            delivery.last_error = breaker.unavailable(origin)
            self._give_up(delivery, "gone")
            return False
        started = time.monotonic()
        attempt = self.sender.send(delivery)
        if self.observers:
            self.observers.attempted(origin, attempt, time.monotonic() - started)
        settled = self._ask(
            lambda: breakers.settle(origin, attempt, Parking(breakers.client)), None
        )
        if settled is not None and settled[0] is not None and self.observers:
            self.observers.state_changed(origin, settled[1].state)
        if attempt.delivered:
            with self._cond:
                self._counters["delivered"] += 1
                self._release(1)
            if self.observers:
                self.observers.delivered(origin, delivery)
            return True
        delivery.failed(attempt)
        delay = self.policy.next_delay(delivery.attempts, attempt)
        if delay is not None:
            self._hand_over(delivery, countdown=delay)
        else:
            self._give_up(delivery, attempt.give_up_reason)
        return False

    def start(self) -> None:
        """Nothing to start here: the workers deliver, and publishing needs no thread."""

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until no publish is under way (delivery itself is the workers' job)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._in_flight == 0, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Wait for publishes under way; later hooks are dead-lettered. Safe to call
        twice. The broker connections stay in kombu's process-wide pool, which every
        app with the same broker URL and options shares (closing them here would break
        the others); they close at exit."""
        self.flush(self.settings.shutdown_timeout if timeout is None else timeout)
        with self._cond:
            self._closed = True
            app, self._app = self._app, self._given_app
        if app is not None and app is not self._given_app:
            app.close()

    def endpoint_stats(self) -> dict[str, dict[str, Any]]:
        """Each configured endpoint's shared breaker and counters, as every worker
        sees them in Redis; ``pending`` counts its hooks parked there (hooks in the
        Celery queue belong to no endpoint yet)."""
        breakers = self._breakers()
        parking = Parking(breakers.client)
        origins = dict.fromkeys(endpoint_of(hook.url) for hook in self.settings.hooks)
        return {origin: breakers.stats(origin, parking.count(origin)) for origin in origins}

    def stats(self) -> dict[str, int]:
        """Counters since start, in this process (see the class docstring)."""
        with self._cond:
            counters = {name: self._counters[name] for name in (*STAT_NAMES, "published")}
            counters["pending"] = self._in_flight
        return counters

    # -- internals --------------------------------------------------------------------

    def _accept(self, delivery: Delivery) -> None:
        with self._cond:
            self._counters["accepted"] += 1
            self._in_flight += 1
        if self.observers:
            self.observers.accepted(endpoint_of(delivery.hook.url))

    def _release(self, count: int) -> None:
        """Drop *count* deliveries from the in-flight ones. Holds the lock."""
        self._in_flight -= count
        if self._in_flight == 0:
            self._cond.notify_all()

    def _breakers(self) -> SharedBreakers:
        """The shared breakers, through a client with the request path's short timeouts."""
        with self._cond:
            if self._shared is None:
                client = redis.Redis.from_url(
                    self.settings.broker_url or DEFAULT_BROKER_URL,
                    socket_connect_timeout=PUBLISH_TIMEOUT,
                    socket_timeout=PUBLISH_TIMEOUT,
                )
                lease = probe_lease(self.settings.timeout)
                self._shared = SharedBreakers(client, self.settings.breaker_threshold, lease)
            return self._shared

    def _ask(self, question: Callable[[], T], otherwise: T) -> T:
        """*question*'s answer, or *otherwise* when Redis cannot give it (the breaker
        spares receivers; the call never waits on it)."""
        try:
            return question()
        except Exception:  # Redis down, or a value it holds that cannot be read
            logger.debug("could not use the shared breakers", exc_info=True)
            return otherwise

    def _celery(self) -> Celery:
        with self._cond:
            if self._app is None:
                self._app = celery_app(self.settings, publisher=True)
            return self._app

    def _hand_over(self, delivery: Delivery, countdown: float | None = None) -> None:
        """Publish, or give up on, an accepted delivery; never raises."""
        try:
            delivery.redact(self.settings.redact)
            self._publish(delivery, countdown)
        except Exception as e:  # the middleware's own failure never reaches the app
            logger.exception("could not publish a hook")
            delivery.last_error = f"could not publish: {type(e).__name__}"
            self._give_up(delivery, "broker")

    def _publish(self, delivery: Delivery, countdown: float | None = None) -> None:
        """Publish *delivery* for the workers, or give it up; it leaves the in-flight ones."""
        key = delivery.order_key
        message = delivery.to_message()
        if countdown is not None and countdown > COUNTDOWN_LIMIT:
            # Longer than a worker may hold a message: the first worker parks it.
            message["notBefore"], countdown = time.time() + countdown, None
        with self._cond:
            if not delivery.is_pre and key in self._pres:
                message["after"] = list(self._pres[key])
            error = "dispatcher closed" if self._closed else None
            reason = "shutdown"
            if error is None and time.monotonic() < self._down_until:
                error = "broker unreachable (a publish failed less than a second ago)"
                reason = "broker"
        if error is None:
            try:
                self._celery().send_task(
                    TASK_NAME,
                    kwargs={"message": message},
                    kwargsrepr=message_summary(message),
                    countdown=countdown,
                    retry=False,
                )
            except EncodeError as e:  # this payload's fault, not the broker's
                error = f"cannot encode the payload: {type(e).__name__}"
                reason = "final_answer"
            except Exception as e:
                self._down_until = time.monotonic() + BROKER_DOWN_SECONDS
                error = f"could not publish to the broker: {describe_error(e, limit=270)}"
                reason = "broker"
        if error is not None:
            if delivery.last_error is not None:  # a waitForResponse attempt failed first
                error = f"{delivery.last_error}; {error}"
            delivery.last_error = error
            self._give_up(delivery, reason)
            return
        with self._cond:
            self._counters["published"] += 1
            if delivery.is_pre:
                self._pres.setdefault(key, []).append(delivery.id)
                self._pres.move_to_end(key)
                if len(self._pres) > self.settings.queue_size:
                    self._pres.popitem(last=False)
            self._release(1)
        if self.observers:
            self.observers.published(endpoint_of(delivery.hook.url))

    def _give_up(self, delivery: Delivery, reason: str) -> None:
        """Dead-letter (else count as lost) an accepted delivery, given up for *reason*."""
        delivery.reason = reason
        kept = self.dead_letters.keep([delivery])
        with self._cond:
            self._counters["failed"] += 1
            self._counters["dead_lettered" if kept else "lost"] += 1
            self._release(1)
        self.observers.gave_up_on(delivery, self.settings.redact)

    def __repr__(self) -> str:
        return f"<CeleryDispatcher {self.stats()}>"
