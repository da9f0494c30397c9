"""The request path's side of delivery on Celery: :class:`CeleryDispatcher` publishes
the hooks for the workers (:mod:`.celery`), and makes a ``waitForResponse`` hook's first
attempt itself.

A publish is one ``LPUSH`` of a Celery task message on a kept connection
(:mod:`.celery_wire`), answered before ``submit()`` returns: the hook is in Redis when
the call goes on. :meth:`CeleryDispatcher.submit_many` puts the hooks of one call in one
message. A pre hook that a post hook to the same URL will follow also gets a *pending*
marker in the same round trip (:data:`.celery.PRE_PENDING_KEY`), which its worker
deletes once it is done: the post waits while it exists.

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
    PRE_PENDING_KEY,
    PUBLISH_TIMEOUT,
    QUEUE,
    RESTORE_INTERVAL,
    TASK_NAME,
    VISIBILITY_TIMEOUT,
    celery_app,
    message_summary,
    messages_summary,
)
from .celery_wire import Broker, pack, task_message
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
    """Publishes Celery messages of hooks; workers deliver them.

    :param settings: the broker URL, redaction words, dead-letter target, and for
        ``waitForResponse`` pre hooks the timeout and retry schedule.
    :param app: a Celery app to publish with, through its ``send_task`` (a project's
        own setup; slower). By default messages are written straight to the broker of
        *settings* (:mod:`.celery_wire`), on connections kept by this process.

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
        # Seconds a pending marker lives at most: as long as a post hook waits for it.
        schedule = self.policy.longest_schedule(settings.timeout)
        self._pending_ttl = int(schedule + VISIBILITY_TIMEOUT + RESTORE_INTERVAL) + 1
        self._followed = {hook.url for hook in settings.hooks if hook.post}
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
        self._broker: Broker | None = None  # a forked child forgets the parent's sockets

    def submit(self, delivery: Delivery) -> None:
        """Publish *delivery*; on failure dead-letter it. Never raises; waits at most
        about :data:`PUBLISH_TIMEOUT` twice (connect, answer) for the broker."""
        self._accept(delivery)
        self._hand_over(delivery)

    def submit_many(self, deliveries: list[Delivery]) -> None:
        """Publish *deliveries* (the pre hooks of a call, or the post hooks of a
        response) in one round trip to the broker: one message per call, holding its
        hooks. Each hook keeps its own ``webhook-id``, retries and dead letter; on
        failure each is dead-lettered. Never raises; waits as :meth:`submit` does."""
        if not deliveries:
            return
        for delivery in deliveries:
            self._accept(delivery)
        if len(deliveries) == 1 or self._given_app is not None:
            for delivery in deliveries:
                self._hand_over(delivery)
            return
        ready = []
        for delivery in deliveries:
            try:
                delivery.redact(self.settings.redact)
            except Exception as e:  # the middleware's own failure never reaches the app
                logger.exception("could not publish a hook")
                delivery.last_error = f"could not publish: {type(e).__name__}"
                self._give_up(delivery, "broker")
            else:
                ready.append(delivery)
        calls: dict[Any, list[Delivery]] = {}
        for delivery in ready:
            calls.setdefault(delivery.call_id, []).append(delivery)
        try:
            self._push(list(calls.values()))
        except Exception as e:  # a bug: as in _hand_over, never reaches the app
            logger.exception("could not publish hooks")
            self._settle(ready, f"could not publish: {type(e).__name__}", "broker")

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
        if self._broker is not None:
            self._broker.close()

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
        if self._given_app is None:
            self._push([[delivery]], countdown)
            return
        key = delivery.order_key
        message = delivery.to_message()
        if countdown is not None and countdown > COUNTDOWN_LIMIT:
            # Longer than a worker may hold a message: the first worker parks it.
            message["notBefore"], countdown = time.time() + countdown, None
        with self._cond:
            if not delivery.is_pre and key in self._pres:
                message["after"] = list(self._pres[key])
            error, reason = self._refusal()
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
            self._settle([delivery], error, reason)
            return
        self._published([delivery])

    def _refusal(self) -> tuple[str | None, str]:
        """Why not to publish now, if so, and the reason to give up. Holds the lock."""
        if self._closed:
            return "dispatcher closed", "shutdown"
        if time.monotonic() < self._down_until:
            return "broker unreachable (a publish failed less than a second ago)", "broker"
        return None, "broker"

    def _push(self, calls: list[list[Delivery]], countdown: float | None = None) -> None:
        """Write the messages of *calls* (one per call, holding its hooks) to the broker
        in one round trip, with the pending markers of their pre hooks; then count them
        published, or give them up."""
        eta = not_before = None
        if countdown is not None and countdown > COUNTDOWN_LIMIT:
            not_before = time.time() + countdown  # longer than a worker may hold it: parked
        elif countdown is not None:
            eta = time.time() + countdown
        with self._cond:  # what needs the lock; the payloads are encoded outside it
            error, reason = self._refusal()
            afters = {
                id(d): list(self._pres[d.order_key])
                for deliveries in calls
                for d in deliveries
                if not d.is_pre and d.order_key in self._pres
            }
        markers: list[str] = []
        sent: list[Delivery] = []
        messages: list[bytes] = []
        refused: list[tuple[Delivery, str, str]] = []
        for deliveries in calls:
            if error is not None:
                refused += [(d, error, reason) for d in deliveries]
                continue
            bodies, marked = [], []
            for delivery in deliveries:
                message = delivery.to_message()
                if not_before is not None:
                    message["notBefore"] = not_before
                if id(delivery) in afters:
                    message["afterPending"] = afters[id(delivery)]
                elif delivery.is_pre:  # said either way: absent means an older publisher
                    message["pendingMark"] = delivery.hook.url in self._followed
                    if message["pendingMark"]:
                        marked.append(delivery.id)
                bodies.append(message)
            if len(bodies) == 1:
                kwargs: dict[str, Any] = {"message": bodies[0]}
                summary = message_summary(bodies[0])
            else:
                kwargs, summary = {"messages": bodies}, messages_summary(bodies)
            try:
                messages.append(task_message(TASK_NAME, QUEUE, kwargs, summary, eta))
            except (TypeError, ValueError, RecursionError) as e:  # the payload's fault
                failure = f"cannot encode the payload: {type(e).__name__}"
                refused += [(d, failure, "final_answer") for d in deliveries]
                continue
            markers += marked
            sent += deliveries
        for delivery, why, because in refused:
            self._settle([delivery], why, because)
        if not messages:
            return
        commands = [
            pack("SET", PRE_PENDING_KEY.format(m), b"1", "EX", self._pending_ttl) for m in markers
        ]
        commands.append(pack("LPUSH", QUEUE, *messages))
        try:
            self._wire().execute(commands)
        except Exception as e:
            self._down_until = time.monotonic() + BROKER_DOWN_SECONDS
            self._settle(
                sent, f"could not publish to the broker: {describe_error(e, limit=270)}", "broker"
            )
            return
        self._published(sent)

    def _wire(self) -> Broker:
        with self._cond:
            if self._broker is None:
                url = self.settings.broker_url or DEFAULT_BROKER_URL
                self._broker = Broker(url, PUBLISH_TIMEOUT)
            return self._broker

    def _settle(self, deliveries: list[Delivery], error: str, reason: str) -> None:
        """Give up on *deliveries*, which could not be published for *error*."""
        for delivery in deliveries:
            if delivery.last_error is not None:  # a waitForResponse attempt failed first
                delivery.last_error = f"{delivery.last_error}; {error}"
            else:
                delivery.last_error = error
            self._give_up(delivery, reason)

    def _published(self, deliveries: list[Delivery]) -> None:
        with self._cond:
            self._counters["published"] += len(deliveries)
            for delivery in deliveries:
                if delivery.is_pre:
                    key = delivery.order_key
                    self._pres.setdefault(key, []).append(delivery.id)
                    self._pres.move_to_end(key)
                    if len(self._pres) > self.settings.queue_size:
                        self._pres.popitem(last=False)
            self._release(len(deliveries))
        if self.observers:
            for delivery in deliveries:
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
