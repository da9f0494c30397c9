"""Durable delivery on Celery with a Redis broker (``XO_WEBHOOKS_DISPATCHER=celery``):
the Celery app and the workers' side.

The request path only publishes messages of hooks, one per call
(:class:`~.celery_publisher.CeleryDispatcher`); Celery workers deliver them with the
same payloads, formats, signing, timeouts and retry schedule as the thread dispatcher,
configured from the same ``XO_WEBHOOKS_*`` variables::

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
call, same URL) is still on its way waits for it, polling a marker in Redis (the pre's
*pending* marker, set with its publish and deleted when it is done; from older
publishers, a *done* marker the pre's worker sets), for at most the pre's whole retry
schedule (see :meth:`Worker.hold_limit`).

A task delivers more than its own message: the worker takes more from the queue
(:class:`~.celery_wire.Drain`) and sends their hooks together, in a few threads over
kept-alive connections; each hook is then retried, parked or dead-lettered alone
(:mod:`.celery_batch`). A message holds one hook (``{"message": ...}``, as every
version published) or the hooks of one call (``{"messages": [...]}``).

Needs the ``celery`` extra; the base install never imports this module.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery, Task, bootsteps
from celery.exceptions import Retry

from .._urls import endpoint_of
from ..config import Settings
from .celery_messages import (  # noqa: F401 - re-exported: the workers' names
    COUNTDOWN_LIMIT,
    DEFAULT_BROKER_URL,
    HOLD_FIRST_POLL,
    HOLD_MAX_POLL,
    HOLD_WAIT,
    HOLD_WAIT_POLL,
    PARK_POLL,
    PRE_DONE_KEY,
    PRE_DONE_TTL,
    PRE_PENDING_KEY,
    PUBLISH_TIMEOUT,
    QUEUE,
    RESTORE_INTERVAL,
    TASK_NAME,
    VISIBILITY_TIMEOUT,
    again_message,
    message_summary,
    messages_summary,
    pending_mark,
    pre_keys,
)
from .delivery import Delivery, Sender
from .endpoints import Breaker, Gate, probe_lease
from .endpoints_redis import Parking, SharedBreakers
from .observers import Observers
from .policy import Attempt, DeadLetters, RetryPolicy

__all__ = [
    "Worker",
    "celery_app",
    "message_summary",
    "messages_summary",
    "TASK_NAME",
    "QUEUE",
    "VISIBILITY_TIMEOUT",
    "COUNTDOWN_LIMIT",
]

logger = logging.getLogger(__name__)


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
        def deliver(
            task: Task,
            message: dict[str, Any] | None = None,
            messages: list[dict[str, Any]] | None = None,
        ) -> str:
            """Deliver a message of one hook or of a call's hooks, and more taken from
            the queue: what became of them (``"delivered"``, ``"failed"``,
            ``"parked"``), or a retry."""
            hooks = [message] if message is not None else list(messages or [])
            return worker.run_task(task, hooks)

        def republish(message: dict[str, Any], countdown: float | None) -> None:
            """Publish one hook's message again, alone (a retry, a hold)."""
            app.send_task(
                TASK_NAME,
                kwargs={"message": message},
                kwargsrepr=message_summary(message),
                countdown=countdown,
            )

        worker.republish = republish

        app.steps["worker"].add(_parked_hooks_step(app, worker))
        if settings.metrics_port:
            _export_metrics(worker, settings.metrics_port)
    return app


def _export_metrics(worker: Worker, port: int) -> None:
    """Serve the worker's Prometheus metrics on *port* (all of the pool's processes
    when ``PROMETHEUS_MULTIPROC_DIR`` is set, as the prefork pool needs)."""
    import prometheus_client  # the prometheus extra, imported only when asked for
    from prometheus_client import multiprocess

    from .prometheus import Metrics, SharedStates

    # Pending hooks are the API processes' (they accept them); states are read from
    # the shared breakers at each scrape.
    worker.observers.add(Metrics(pending=False, states=False))
    registry = prometheus_client.REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    origins = list(dict.fromkeys(endpoint_of(hook.url) for hook in worker.settings.hooks))
    registry.register(SharedStates(worker.breakers, origins))
    prometheus_client.start_http_server(port, registry=registry)


def _parked_hooks_step(app: Celery, worker: Worker) -> type[bootsteps.StartStopStep]:
    """A worker bootstep: a thread of the worker's main process that moves due parked
    hooks back to the queue every :data:`PARK_POLL` seconds."""

    def publish(message: dict[str, Any]) -> None:
        app.send_task(TASK_NAME, kwargs={"message": message}, kwargsrepr=message_summary(message))

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
        #: Told what happens to hooks (metrics): see :mod:`.observers`.
        self.observers = Observers()
        self._markers: redis.Redis | None = None
        self._breakers: SharedBreakers | None = None
        self._parking: Parking | None = None
        self._batches: Any = None  # the batch delivery of this process (after a fork)
        #: Publishes one hook's message again (a retry or a hold of a hook that came
        #: with others); set by :func:`celery_app`. Without it, ``task.retry``.
        self.republish: Callable[[dict[str, Any], float | None], None] | None = None

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

    def run_task(self, task: Task, hooks: list[dict[str, Any]]) -> str:
        """The body of the task: deliver the hooks of its message and those of more
        messages taken from the queue (:mod:`.celery_batch`); a lone hook as
        :meth:`run` does."""
        from .celery_batch import Batches

        if self._batches is None or self._batches.pid != os.getpid():
            self._batches = Batches(self)
        return str(self._batches.run(task, hooks))

    def delivery(self, message: dict[str, Any]) -> Delivery:
        """The delivery a message stands for, with the secret and headers configured
        here for its URL (else the global secret)."""
        return Delivery.from_record(message, self.settings, int(message.get("attempts", 0)))

    def run(self, task: Task, message: dict[str, Any]) -> str:
        """Hold, ask the endpoint's breaker, send, then finish, retry or park one
        message (the body of the task)."""
        delivery = self.delivery(message)
        marked = pending_mark(message)
        origin = endpoint_of(delivery.hook.url)
        not_before = float(message.get("notBefore") or 0)
        if not_before > time.time():  # a long retry of a waitForResponse hook
            again = {k: v for k, v in message.items() if k != "notBefore"}
            if self._park(origin, again, not_before, delivery):
                return "parked"
        if message.get("after") or message.get("afterPending"):
            self._hold(task, message, delivery)
        gate, breaker = self._admit(origin)
        if gate is Gate.GONE:
            delivery.last_error = breaker.unavailable(origin)
            self._give_up(delivery, origin, "gone", marked)
            return "failed"
        if gate is Gate.WAIT:
            return self._wait(message, delivery, origin, breaker, marked)
        started = time.monotonic()
        attempt = self.sender.send(delivery)
        if self.observers:
            self.observers.attempted(origin, attempt, time.monotonic() - started)
        breaker = self._record(origin, attempt)
        if attempt.delivered:
            self._done(delivery, marked)
            if self.observers:
                self.observers.delivered(origin, delivery)
            return "delivered"
        delivery.failed(attempt)
        delay = self.policy.next_delay(delivery.attempts, attempt)
        reason = attempt.give_up_reason
        if breaker.state == "disabled":
            delivery.last_error = breaker.unavailable(origin)
            reason = "gone"
        elif delay is not None and delay > COUNTDOWN_LIMIT:
            if self._park(origin, again_message(delivery, marked), time.time() + delay, delivery):
                return "parked"
            reason = "broker"
        elif delay is not None:
            # No "after" any more: the pre hook was done, or waited for long enough.
            again = again_message(delivery, marked)
            try:
                raise task.retry(
                    args=(),
                    kwargs={"message": again},
                    kwargsrepr=message_summary(again),
                    countdown=delay,
                )
            except Retry:
                raise
            except Exception as e:  # the broker is gone: keep the hook all the same
                delivery.last_error = f"{attempt.error}; could not queue the retry: {e}"[:300]
                reason = "broker"
        self._give_up(delivery, origin, reason, marked)
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
            transition, breaker = self.breakers.settle(origin, attempt, self.parking)
        except redis.RedisError:
            logger.warning("could not update the breaker of %s", origin, exc_info=True)
            return Breaker(self.settings.breaker_threshold)
        if transition is not None and self.observers:
            self.observers.state_changed(origin, breaker.state)
        return breaker

    def _wait(
        self,
        message: dict[str, Any],
        delivery: Delivery,
        origin: str,
        breaker: Breaker,
        marked: bool | None = None,
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
                self._released_meanwhile(origin)
                return "parked"
            reason = "broker"
        else:
            delivery.last_error = breaker.unavailable(origin)
            reason = "retries_exhausted"
        self._give_up(delivery, origin, reason, marked)
        return "failed"

    def _released_meanwhile(self, origin: str) -> None:
        """After parking a hook for an endpoint that was down: if its probe succeeded
        (or it was disabled) since this worker asked, the release of its parked hooks
        may have come before this one was parked; release them again, or this one
        waits for a probe that will not come (until the probe's lease has passed)."""
        try:
            if self.breakers.load(origin).state in ("closed", "disabled"):
                self.parking.release(origin)
        except (redis.RedisError, ValueError):
            logger.debug("could not check the breaker of %s again", origin, exc_info=True)

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
        holds = int(message.get("holds", 0))
        if self._pres_done(*pre_keys(message), wait=0.0 if holds else HOLD_WAIT):
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
                args=(),
                kwargs={"message": again},
                kwargsrepr=message_summary(again),
                countdown=countdown,
            )
        except Retry:
            raise
        except Exception:  # the broker is gone: deliver now rather than lose the hook
            logger.warning("could not hold a post hook; sending it now", exc_info=True)

    def _pres_done(self, done: list[str], pending: list[str], wait: float) -> bool:
        """Whether the pre hooks are all done: their *done* markers all set, their
        *pending* markers all gone; checking for up to *wait* s. ``False`` at once when
        Redis cannot say: the post is then held, not sent."""
        deadline = time.monotonic() + wait
        while True:
            try:
                if (not done or self.markers.exists(*done) == len(done)) and (
                    not pending or self.markers.exists(*pending) == 0
                ):
                    return True
            except redis.RedisError:
                logger.warning("could not check whether the pre hook is done", exc_info=True)
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(HOLD_WAIT_POLL)

    def _done(self, delivery: Delivery, marked: bool | None = None) -> None:
        """A delivery is finished: if it is a pre hook, let its post hook go (delete
        its pending marker when the publisher set one, *marked*; set a done marker
        for a pre from an older publisher, which says neither, ``None``)."""
        if not delivery.is_pre:
            return
        try:
            if marked:
                self.markers.delete(PRE_PENDING_KEY.format(delivery.id))
            elif marked is None:  # from an older publisher: its post waits for a done marker
                self.markers.set(PRE_DONE_KEY.format(delivery.id), b"1", ex=PRE_DONE_TTL)
        except redis.RedisError:
            logger.warning("could not mark pre hook %s as done", delivery.id, exc_info=True)

    def _give_up(
        self, delivery: Delivery, origin: str, reason: str, marked: bool | None = None
    ) -> None:
        delivery.reason = reason
        self.dead_letters.keep([delivery])
        self._count(origin, "failed")
        self._done(delivery, marked)
        self.observers.gave_up_on(delivery, self.settings.redact)
