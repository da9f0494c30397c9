"""The thread dispatcher: delivers hooks from a pool of worker threads.

It keeps a bounded set of pending hooks (ready, waiting for a retry, or held until
their call's pre hook is done), never blocks the caller, retries with backoff without
holding a thread, and hands every hook it gives up on to the dead-letter file. Threads
start lazily in the process that submits, so a server that forks after building the
app (gunicorn ``--preload``) never inherits them.
"""

from __future__ import annotations

import atexit
import functools
import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from collections import Counter, deque
from typing import Any, Protocol

from ..config import Settings
from .delivery import Delivery, Sender
from .policy import STAT_NAMES, Attempt, DeadLetters, RetryPolicy
from .recorder import Recorder

__all__ = ["Dispatcher", "ThreadDispatcher", "make_dispatcher"]

logger = logging.getLogger(__name__)


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


class Dispatcher(Protocol):
    """What the middleware needs from a dispatcher."""

    def submit(self, delivery: Delivery) -> None:
        """Queue *delivery*; never blocks, never raises."""

    def deliver_now(self, delivery: Delivery) -> bool:
        """Make the first attempt in the calling thread (``waitForResponse``); queue any
        retry. Returns whether it was delivered."""

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending; return whether that happened in time."""

    def close(self, timeout: float | None = None) -> None:
        """Flush, stop, and dead-letter what is left."""

    def stats(self) -> dict[str, int]:
        """Integer counters since start (see :data:`STAT_NAMES`)."""


def _reset_after_fork(ref: weakref.ref[ThreadDispatcher]) -> None:
    dispatcher = ref()
    if dispatcher is not None:
        dispatcher._reset()
        dispatcher.sender.reset()
        dispatcher.dead_letters.reopen()  # its lock may be held


class ThreadDispatcher:
    """Delivers hooks from ``settings.max_workers`` threads.

    :param settings: retries, backoff, queue size, dead-letter store, timeouts.
    :param sender: the transport (a :class:`Sender` by default).
    :param dead_letters: where hooks given up on go (by default the configured store;
        ``xo-webhooks replay`` collects them with its own).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        sender: Sender | None = None,
        dead_letters: DeadLetters | None = None,
    ) -> None:
        self.settings = settings
        self.sender = sender or Sender(settings)
        self.policy = RetryPolicy.from_settings(settings)
        self.dead_letters = dead_letters or DeadLetters(settings)
        self._reset()
        # Keep a fork from inheriting locks that another thread held, or queued hooks
        # the parent process will deliver itself.
        os.register_at_fork(after_in_child=functools.partial(_reset_after_fork, weakref.ref(self)))

    def _reset(self) -> None:
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # workers wait here for hooks to send
        self._idle = threading.Condition(lock)  # flush() waits here for nothing pending
        self._ready: deque[Delivery] = deque()
        self._delayed: list[tuple[float, int, Delivery]] = []  # heap by due time
        self._held: dict[tuple[Any, str], list[Delivery]] = {}  # posts waiting for a pre
        self._open_pres: Counter[tuple[Any, str]] = Counter()
        self._held_count = 0
        self._in_flight = 0
        self._seq = itertools.count()
        self._counters: Counter[str] = Counter()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._closed = False
        self._recorder = Recorder(
            self.dead_letters.keep, self._count_given_up, self.settings.queue_size
        )

    # -- the caller's side ------------------------------------------------------------

    def submit(self, delivery: Delivery) -> None:
        """Queue *delivery*; never blocks (beyond a short lock), never raises."""
        with self._cond:
            self._start_workers()
            self._counters["accepted"] += 1
            if self._closed or self._pending() >= self.settings.queue_size:
                self._in_flight += 1
                reason = "dispatcher closed" if self._closed else "queue full"
                rejected = True
            else:
                rejected = False
                key = delivery.order_key
                if delivery.is_pre:
                    self._open_pres[key] += 1
                    self._ready.append(delivery)
                elif self._open_pres[key]:
                    self._held.setdefault(key, []).append(delivery)
                    self._held_count += 1
                else:
                    self._ready.append(delivery)
                self._cond.notify()
        if rejected:
            delivery.last_error = reason
            self._give_up([delivery])

    def deliver_now(self, delivery: Delivery) -> bool:
        """Make the first attempt in this thread, bounded by the timeout; retries, if
        any, go on in the background. Returns whether the hook was delivered."""
        with self._cond:
            self._counters["accepted"] += 1
            self._in_flight += 1
            if delivery.is_pre:
                self._open_pres[delivery.order_key] += 1
        try:
            attempt = self._attempt(delivery)
        finally:
            self.sender.release()  # a server thread: it may not live to send another
        self._settle(delivery, attempt)
        return attempt.delivered

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until no hook is pending; return whether that happened within *timeout*."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending() == 0, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush for up to *timeout* seconds (default ``shutdown_timeout``), stop the
        workers, and give up on whatever is still pending. Safe to call twice."""
        timeout = self.settings.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        with self._cond:
            self._closed = self._stopping = True
            left = list(self._ready) + [d for _, _, d in self._delayed]
            left += [d for held in self._held.values() for d in held]
            self._in_flight += len(left)
            self._ready.clear()
            self._delayed.clear()
            self._held.clear()
            self._held_count = 0
            self._cond.notify_all()
            threads, self._threads = self._threads, []
        for delivery in left:
            delivery.last_error = delivery.last_error or "still pending at shutdown"
        self._give_up(left)
        for thread in threads:
            thread.join(_left(deadline))
        self._recorder.close(_left(deadline) + 5)  # kept hooks must reach the file
        atexit.unregister(self.close)

    def stats(self) -> dict[str, int]:
        """Counters since start: ``accepted == delivered + failed + pending`` and
        ``failed == dead_lettered + lost`` hold at every moment."""
        with self._cond:
            counters = {name: self._counters[name] for name in STAT_NAMES}
            counters["pending"] = self._pending()
        return counters

    # -- internals --------------------------------------------------------------------

    def _pending(self) -> int:
        return len(self._ready) + len(self._delayed) + self._held_count + self._in_flight

    def _start_workers(self) -> None:
        if self._threads or self._closed:
            return
        for n in range(self.settings.max_workers):
            thread = threading.Thread(target=self._work, name=f"xo-webhooks-{n}", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # e.g. a process limit: hooks wait, the next submit retries
                logger.exception("could not start a delivery thread")
                break
            self._threads.append(thread)
        atexit.register(self.close)

    def _work(self) -> None:
        try:
            while True:
                with self._cond:
                    delivery = self._next_delivery()
                    if delivery is None:
                        return
                self._settle(delivery, self._attempt(delivery))
        finally:
            self.sender.release()

    def _attempt(self, delivery: Delivery) -> Attempt:
        try:
            return self.sender.send(delivery)
        except Exception as e:  # a sender of the caller's: its bug must not stop delivery
            logger.exception("the sender failed on hook %s", delivery.describe())
            return Attempt(False, f"unexpected error: {type(e).__name__}")

    def _next_delivery(self) -> Delivery | None:
        """Wait for a delivery that is due; ``None`` once stopping. Holds the lock."""
        while not self._stopping:
            now = time.monotonic()
            while self._delayed and self._delayed[0][0] <= now:
                self._ready.append(heapq.heappop(self._delayed)[2])
            if self._ready:
                self._in_flight += 1
                return self._ready.popleft()
            self._cond.wait(self._delayed[0][0] - now if self._delayed else None)
        return None

    def _settle(self, delivery: Delivery, attempt: Attempt) -> None:
        """Count an attempt's result, then finish the delivery or schedule its retry."""
        if delivery.attempts > 1:
            with self._cond:
                self._counters["retried"] += 1
        if attempt.delivered:
            with self._cond:
                self._counters["delivered"] += 1
                self._in_flight -= 1
                self._finish(delivery)
            return
        delivery.failed(attempt)
        delay = self.policy.next_delay(delivery.attempts, attempt)
        with self._cond:
            if delay is not None and not self._closed:
                self._start_workers()
                heapq.heappush(self._delayed, (time.monotonic() + delay, next(self._seq), delivery))
                self._in_flight -= 1
                self._cond.notify()
                return
        self._give_up([delivery])

    def _finish(self, delivery: Delivery) -> None:
        """A delivery is done (delivered or given up): release posts held for it."""
        key = delivery.order_key
        if delivery.is_pre and key in self._open_pres:
            self._open_pres[key] -= 1
            if self._open_pres[key] <= 0:
                del self._open_pres[key]
                held = self._held.pop(key, [])
                self._held_count -= len(held)
                self._ready.extend(held)
                self._cond.notify(len(held))
        if self._pending() == 0:
            self._idle.notify_all()

    def _give_up(self, deliveries: list[Delivery]) -> None:
        """Have deliveries counted in ``_in_flight`` recorded as failed: by the recorder
        thread, or here once it is closed or too far behind."""
        if deliveries and not self._recorder.put(deliveries):
            self._count_given_up(deliveries, self.dead_letters.keep(deliveries))

    def _count_given_up(self, deliveries: list[Delivery], written: bool) -> None:
        with self._cond:
            self._counters["failed"] += len(deliveries)
            self._counters["dead_lettered" if written else "lost"] += len(deliveries)
            self._in_flight -= len(deliveries)
            for delivery in deliveries:
                self._finish(delivery)

    def __repr__(self) -> str:
        return f"<ThreadDispatcher workers={self.settings.max_workers} {self.stats()}>"


def make_dispatcher(settings: Settings) -> Dispatcher:
    """The dispatcher *settings* ask for (``thread`` or ``celery``)."""
    if settings.dispatcher == "celery":  # imported only when asked: an optional extra
        from .celery import CeleryDispatcher

        return CeleryDispatcher(settings)
    return ThreadDispatcher(settings)
