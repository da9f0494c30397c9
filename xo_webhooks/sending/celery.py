"""Durable delivery on Celery with a Redis broker (``XO_WEBHOOKS_DISPATCHER=celery``).

The request path only publishes one message per hook (:class:`CeleryDispatcher`);
Celery workers deliver them with the same payloads, formats, signing, timeouts and
retry schedule as the thread dispatcher, configured from the same ``XO_WEBHOOKS_*``
variables::

    XO_WEBHOOKS_BROKER_URL=redis://127.0.0.1:6379/0 \\
    XO_WEBHOOKS_HOOKS='[...]' XO_WEBHOOKS_DEAD_LETTER=redis://127.0.0.1:6379/0 \\
        celery -A xo_webhooks.celery worker

A message is a dead-letter record in flight: the delivery id (the ``webhook-id``, the
same on every attempt and redelivery), the URL, the format, the redacted payload, the
attempts so far. It never holds a secret or a header: the worker takes both from its
own configuration, from the hook with that URL, else the global secret.

At least once: messages are acknowledged after delivery and redelivered when a worker
dies (:data:`VISIBILITY_TIMEOUT`), with one exception that kombu's Redis transport
leaves open: a worker takes a message with ``BRPOP``, which removes it from the queue,
and records it as unacknowledged in a second command; a worker killed in between (a
millisecond, more when it is busy) loses that message. So a message is taken as few
times as possible (see :meth:`Worker._hold`). Ordering: a post hook whose pre hook (same
call, same URL) is still on its way waits for it, polling a marker the pre's worker sets
in Redis, for at most the pre's whole retry schedule (see :meth:`Worker.hold_limit`).

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
from celery import Celery, Task, bootsteps
from celery.exceptions import Retry
from kombu import pools
from kombu.exceptions import EncodeError

from .._text import describe_error
from .._urls import endpoint_of
from ..config import Settings
from .delivery import Delivery, Sender
from .endpoints import Breaker, Gate, probe_lease
from .endpoints_redis import Parking, SharedBreakers
from .policy import STAT_NAMES, Attempt, DeadLetters, RetryPolicy

__all__ = [
    "CeleryDispatcher",
    "Worker",
    "celery_app",
    "TASK_NAME",
    "QUEUE",
    "VISIBILITY_TIMEOUT",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

TASK_NAME = "xo_webhooks.deliver"
QUEUE = "xo-webhooks"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
#: Seconds before a message a worker took but never acknowledged (it was killed) is
#: given to another worker. Longer than the longest wait a worker holds a message for
#: (a retry's countdown, at most :data:`COUNTDOWN_LIMIT`, plus one attempt; a held
#: post's, less), short enough for a redelivery within 2 minutes. A message held longer
#: is delivered twice: longer waits are parked in Redis instead.
VISIBILITY_TIMEOUT = 90
#: Seconds: a retry due sooner waits as a Celery countdown; a later one is parked.
COUNTDOWN_LIMIT = 60.0
#: Seconds between a worker's moves of due parked hooks back to the queue.
PARK_POLL = 1.0
#: Seconds between a worker's sweeps for such messages (kombu's default is 100).
RESTORE_INTERVAL = 5
#: Seconds the request path waits to connect to the broker, and for its answer.
PUBLISH_TIMEOUT = 0.2
#: After a failed publish, seconds during which hooks are dead-lettered at once.
BROKER_DOWN_SECONDS = 1.0
#: Marks a delivered or given-up pre hook, for its post hook (``SET ... EX``).
PRE_DONE_KEY = "xo-webhooks:pre-done:{}"
PRE_DONE_TTL = 3600
#: Seconds a post hook first waits in its task for its pre hook (a pre being delivered
#: right now), checking every ``HOLD_WAIT_POLL``, before it is put back in the queue.
HOLD_WAIT, HOLD_WAIT_POLL = 1.0, 0.05
#: Seconds before a held post's later checks: doubling, so that a long hold is taken
#: from the queue a few times, not every few seconds; capped below the visibility timeout.
HOLD_FIRST_POLL, HOLD_MAX_POLL = 1.0, 30.0


def celery_app(settings: Settings, *, publisher: bool = False) -> Celery:
    """A Celery app for *settings*: the workers' (``publisher=False``, with the
    delivery task) or the request path's (short broker timeouts, no publish retry).

    :param settings: the broker URL, and for workers the whole delivery configuration.
    :param publisher: build the app that only publishes.
    """
    app = Celery("xo_webhooks", set_as_current=not publisher)
    socket_timeout = PUBLISH_TIMEOUT if publisher else 10.0
    # kombu retries a failed connect until broker_connection_timeout, first after 2 s:
    # the request path tries once.
    retries = {"max_retries": 0} if publisher else {}
    app.conf.update(
        broker_url=settings.broker_url or DEFAULT_BROKER_URL,
        broker_connection_timeout=socket_timeout,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": VISIBILITY_TIMEOUT,
            "unacked_restore_interval": RESTORE_INTERVAL,
            "unacked_restore_throttle": 1,  # sweep every interval, not every tenth
            "unacked_mutex_expire": 60,  # a sweeper killed mid-sweep blocks no longer
            "socket_connect_timeout": socket_timeout,
            "socket_timeout": socket_timeout,
            **retries,
        },
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # The request path never waits for a broker that is down: the hook is
        # dead-lettered instead. A worker's retry publish may wait a little.
        task_publish_retry=not publisher,
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_max": 1},
    )
    if not publisher:
        worker = Worker(settings)

        @app.task(name=TASK_NAME, bind=True, max_retries=None, acks_late=True)
        def deliver(task: Task, message: dict[str, Any]) -> str:
            """Deliver one hook message: ``"delivered"``, ``"failed"``, ``"parked"``, or
            a retry."""
            return worker.run(task, message)

        app.steps["worker"].add(_parked_hooks_step(app, worker))
    return app


def _parked_hooks_step(app: Celery, worker: Worker) -> type[bootsteps.StartStopStep]:
    """A worker bootstep: a thread of the worker's main process that moves due parked
    hooks back to the queue every :data:`PARK_POLL` seconds."""

    def publish(message: dict[str, Any]) -> None:
        app.send_task(TASK_NAME, kwargs={"message": message}, kwargsrepr=_summary(message))

    class MoveParkedHooks(bootsteps.StartStopStep):
        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.stopping = threading.Event()
            self.thread: threading.Thread | None = None

        def start(self, parent: Any) -> None:
            self.thread = threading.Thread(target=self.run, name="xo-webhooks-unpark", daemon=True)
            self.thread.start()

        def run(self) -> None:
            failing = False
            while not self.stopping.wait(PARK_POLL):
                try:
                    worker.parking.move_due(publish)
                except Exception:  # Redis or the broker is down: the hooks stay parked
                    if not failing:
                        logger.warning("could not move parked hooks to the queue", exc_info=True)
                    failing = True
                else:
                    failing = False

        def stop(self, parent: Any) -> None:
            self.stopping.set()
            if self.thread is not None:
                self.thread.join(10)

    return MoveParkedHooks


class Worker:
    """The worker side: turns a message back into a :class:`Delivery`, sends it, and
    retries, holds or dead-letters it. Connections open lazily, in the process (a
    prefork child) that delivers.

    :param settings: the worker's configuration (from its ``XO_WEBHOOKS_*`` variables).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sender = Sender(settings)
        self.policy = RetryPolicy.from_settings(settings)
        self.dead_letters = DeadLetters(settings)
        self._markers: redis.Redis | None = None
        self._breakers: SharedBreakers | None = None
        self._parking: Parking | None = None

    @property
    def breakers(self) -> SharedBreakers:
        """The endpoints' breakers, shared by every worker in Redis."""
        if self._breakers is None:
            lease = probe_lease(self.settings.timeout)
            self._breakers = SharedBreakers(self.markers, self.settings.breaker_threshold, lease)
        return self._breakers

    @property
    def parking(self) -> Parking:
        """The hooks parked in Redis."""
        if self._parking is None:
            self._parking = Parking(self.markers)
        return self._parking

    @property
    def hold_limit(self) -> float:
        """Seconds a post hook waits for its pre hook at most: the pre's whole retry
        schedule (every attempt timing out, every wait at the cap), plus one redelivery."""
        schedule = self.policy.longest_schedule(self.settings.timeout)
        return schedule + VISIBILITY_TIMEOUT + RESTORE_INTERVAL

    @property
    def markers(self) -> redis.Redis:
        if self._markers is None:
            url = self.settings.broker_url or DEFAULT_BROKER_URL
            self._markers = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
        return self._markers

    def delivery(self, message: dict[str, Any]) -> Delivery:
        """The delivery a message stands for, with the secret and headers configured
        here for its URL (else the global secret)."""
        return Delivery.from_record(message, self.settings, int(message.get("attempts", 0)))

    def run(self, task: Task, message: dict[str, Any]) -> str:
        """Hold, ask the endpoint's breaker, send, then finish, retry or park one
        message (the body of the task)."""
        delivery = self.delivery(message)
        origin = endpoint_of(delivery.hook.url)
        not_before = float(message.get("notBefore") or 0)
        if not_before > time.time():  # a long retry of a waitForResponse hook
            again = {k: v for k, v in message.items() if k != "notBefore"}
            if self._park(origin, again, not_before, delivery):
                return "parked"
        if message.get("after"):
            self._hold(task, message, delivery)
        gate, breaker = self._admit(origin)
        if gate is Gate.GONE:
            delivery.last_error = breaker.unavailable(origin)
            self._give_up(delivery, origin)
            return "failed"
        if gate is Gate.WAIT:
            return self._wait(message, delivery, origin, breaker)
        attempt = self.sender.send(delivery)
        breaker = self._record(origin, attempt)
        if attempt.delivered:
            self._done(delivery)
            return "delivered"
        delivery.failed(attempt)
        delay = self.policy.next_delay(delivery.attempts, attempt)
        if breaker.state == "disabled":
            delivery.last_error = breaker.unavailable(origin)
        elif delay is not None and delay > COUNTDOWN_LIMIT:
            if self._park(origin, delivery.to_message(), time.time() + delay, delivery):
                return "parked"
        elif delay is not None:
            # No "after" any more: the pre hook was done, or waited for long enough.
            again = delivery.to_message()
            try:
                raise task.retry(
                    args=(), kwargs={"message": again}, kwargsrepr=_summary(again), countdown=delay
                )
            except Retry:
                raise
            except Exception as e:  # the broker is gone: keep the hook all the same
                delivery.last_error = f"{attempt.error}; could not queue the retry: {e}"[:300]
        self._give_up(delivery, origin)
        return "failed"

    def _admit(self, origin: str) -> tuple[Gate, Breaker]:
        """The breaker's word on sending to *origin* now; send when Redis cannot say
        (the breaker spares receivers, delivery comes first)."""
        try:
            return self.breakers.admit(origin)
        except redis.RedisError:
            logger.warning("could not read the breaker of %s; sending", origin, exc_info=True)
            return Gate.SEND, Breaker(self.settings.breaker_threshold)

    def _record(self, origin: str, attempt: Attempt) -> Breaker:
        """Count *attempt* on the shared breaker (see :meth:`SharedBreakers.settle`)."""
        try:
            return self.breakers.settle(origin, attempt, self.parking)
        except redis.RedisError:
            logger.warning("could not update the breaker of %s", origin, exc_info=True)
            return Breaker(self.settings.breaker_threshold)

    def _wait(
        self, message: dict[str, Any], delivery: Delivery, origin: str, breaker: Breaker
    ) -> str:
        """Park a hook whose endpoint is down until its next probe, for as long as its
        own schedule lasts; then give it up."""
        now = time.time()
        give_up_at = float(
            message.get("giveUpAt") or now + self.policy.remaining(delivery.attempts)
        )
        if now < give_up_at:
            due = breaker.next_probe()  # a closed or disabled endpoint releases it sooner
            if self._park(
                origin, {**message, "giveUpAt": give_up_at}, min(due, give_up_at), delivery
            ):
                self._note_waiting(origin, delivery.id)
                return "parked"
        else:
            delivery.last_error = breaker.unavailable(origin)
        self._give_up(delivery, origin)
        return "failed"

    def _park(self, origin: str, message: dict[str, Any], due: float, delivery: Delivery) -> bool:
        """Park *message* until *due*; ``False`` (the hook's error says why) if Redis
        cannot take it."""
        try:
            self.parking.park(origin, message, due)
        except redis.RedisError as e:
            delivery.last_error = f"{delivery.last_error}; could not park the hook: {e}"[:300]
            return False
        return True

    def _note_waiting(self, origin: str, delivery_id: str) -> None:
        try:
            self.breakers.note_waiting(origin, delivery_id)
        except redis.RedisError:
            logger.debug("could not count a waiting hook of %s", origin, exc_info=True)

    def _count(self, origin: str, field: str) -> None:
        try:
            self.breakers.count(origin, field)
        except redis.RedisError:
            logger.debug("could not count a hook of %s", origin, exc_info=True)

    def _hold(self, task: Task, message: dict[str, Any], delivery: Delivery) -> None:
        """Hold a post hook while its pre hook is not done, up to the limit.

        Putting a post back in the queue means one more take of its message, and a
        worker killed while taking a message loses it (see the module docstring). So a
        post first waits here for a pre that is being delivered right now (most holds),
        and is put back only for one that is slower, or retrying.
        """
        keys = [PRE_DONE_KEY.format(pre_id) for pre_id in message["after"]]
        holds = int(message.get("holds", 0))
        if self._pres_done(keys, wait=0.0 if holds else HOLD_WAIT):
            return
        now = time.time()
        until = float(message.get("holdUntil") or now + self.hold_limit)
        if now >= until:
            logger.warning("hook %s sent although its pre hook is not done", delivery.describe())
            return
        again = {**message, "holdUntil": until, "holds": holds + 1}
        countdown = min(HOLD_MAX_POLL, HOLD_FIRST_POLL * 2**holds)
        try:
            raise task.retry(
                args=(), kwargs={"message": again}, kwargsrepr=_summary(again), countdown=countdown
            )
        except Retry:
            raise
        except Exception:  # the broker is gone: deliver now rather than lose the hook
            logger.warning("could not hold a post hook; sending it now", exc_info=True)

    def _pres_done(self, keys: list[str], wait: float) -> bool:
        """Whether the pre hooks of *keys* are all done, checking for up to *wait* s.
        ``False`` at once when Redis cannot say: the post is then held, not sent."""
        deadline = time.monotonic() + wait
        while True:
            try:
                if self.markers.exists(*keys) == len(keys):
                    return True
            except redis.RedisError:
                logger.warning("could not check whether the pre hook is done", exc_info=True)
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(HOLD_WAIT_POLL)

    def _done(self, delivery: Delivery) -> None:
        """A delivery is finished: if it is a pre hook, let its post hook go."""
        if not delivery.is_pre:
            return
        try:
            self.markers.set(PRE_DONE_KEY.format(delivery.id), b"1", ex=PRE_DONE_TTL)
        except redis.RedisError:
            logger.warning("could not mark pre hook %s as done", delivery.id, exc_info=True)

    def _give_up(self, delivery: Delivery, origin: str) -> None:
        self.dead_letters.keep([delivery])
        self._count(origin, "failed")
        self._done(delivery)


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
        self._accept()
        self._hand_over(delivery)

    def deliver_now(self, delivery: Delivery) -> bool:
        """Make the first attempt in this thread (``waitForResponse``), then publish the
        retry, if any, for the workers. An endpoint whose shared breaker is open gets no
        attempt: the hook goes to the workers, who park it. Returns whether it was
        delivered."""
        self._accept()
        origin = endpoint_of(delivery.hook.url)
        breakers = self._breakers()
        unknown: tuple[Gate, Breaker | None] = (Gate.SEND, None)
        gate, breaker = self._ask(lambda: breakers.admit(origin), unknown)
        if gate is Gate.WAIT:
            self._hand_over(delivery)
            return False
        if gate is Gate.GONE and breaker is not None:
            delivery.last_error = breaker.unavailable(origin)
            self._give_up(delivery)
            return False
        attempt = self.sender.send(delivery)
        self._ask(lambda: breakers.settle(origin, attempt, Parking(breakers.client)), None)
        if attempt.delivered:
            with self._cond:
                self._counters["delivered"] += 1
                self._release(1)
            return True
        delivery.failed(attempt)
        delay = self.policy.next_delay(delivery.attempts, attempt)
        if delay is not None:
            self._hand_over(delivery, countdown=delay)
        else:
            self._give_up(delivery)
        return False

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

    def _accept(self) -> None:
        with self._cond:
            self._counters["accepted"] += 1
            self._in_flight += 1

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
            self._give_up(delivery)

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
            if error is None and time.monotonic() < self._down_until:
                error = "broker unreachable (a publish failed less than a second ago)"
        if error is None:
            try:
                self._celery().send_task(
                    TASK_NAME,
                    kwargs={"message": message},
                    kwargsrepr=_summary(message),
                    countdown=countdown,
                    retry=False,
                )
            except EncodeError as e:  # this payload's fault, not the broker's
                error = f"cannot encode the payload: {type(e).__name__}"
            except Exception as e:
                self._down_until = time.monotonic() + BROKER_DOWN_SECONDS
                error = f"could not publish to the broker: {describe_error(e, limit=270)}"
        if error is not None:
            if delivery.last_error is not None:  # a waitForResponse attempt failed first
                error = f"{delivery.last_error}; {error}"
            delivery.last_error = error
            self._give_up(delivery)
            return
        with self._cond:
            self._counters["published"] += 1
            if delivery.is_pre:
                self._pres.setdefault(key, []).append(delivery.id)
                self._pres.move_to_end(key)
                if len(self._pres) > self.settings.queue_size:
                    self._pres.popitem(last=False)
            self._release(1)

    def _give_up(self, delivery: Delivery) -> None:
        """Dead-letter (else count as lost) an accepted delivery."""
        kept = self.dead_letters.keep([delivery])
        with self._cond:
            self._counters["failed"] += 1
            self._counters["dead_lettered" if kept else "lost"] += 1
            self._release(1)

    def __repr__(self) -> str:
        return f"<CeleryDispatcher {self.stats()}>"


def _summary(message: dict[str, Any]) -> str:
    """What Celery logs and shows of a message (its ``kwargsrepr``): by default a repr
    of the whole payload, costly to build on the request path and sent twice."""
    payload = message["payload"]
    return (
        f"{{'message': '{payload.get('method')} {payload.get('type')} "
        f"call {payload.get('callId')} {message['id']} attempts {message['attempts']}'}}"
    )
