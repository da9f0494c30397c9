"""``waitForResponse`` pre hooks: the request waits for their first attempts, made
concurrently, and for one timeout at most in all.

A batch of calls with such hooks would otherwise hold its request thread for one
timeout per hook (20 calls against a hung receiver: 20 timeouts). Here short-lived
threads make the first attempts side by side, at most ``max_workers`` of them in the
whole process (a slot each, shared by every request); the request waits until they
are all done or ``timeout`` has passed, and a hook whose attempt has not started by
then is queued like any other hook, not waited for.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..sending.delivery import Delivery
    from ..sending.dispatcher import Dispatcher

__all__ = ["deliver_first_attempts"]

logger = logging.getLogger(__name__)


def deliver_first_attempts(
    dispatcher: Dispatcher,
    deliveries: Sequence[Delivery],
    slots: threading.Semaphore,
    timeout: float,
) -> None:
    """Make the first attempt of each of *deliveries* (``dispatcher.deliver_now``) in
    threads, one per free slot of *slots* (waiting for one if none is free); return
    once all are done, or after *timeout* seconds, when those not yet started are
    queued (``dispatcher.submit``) instead."""
    if len(deliveries) == 1:  # the common case: no thread to start
        dispatcher.deliver_now(deliveries[0])
        return
    deadline = time.monotonic() + timeout
    attempts = _FirstAttempts(dispatcher, deliveries, deadline)
    started = 0
    while started < len(deliveries) and slots.acquire(blocking=False):
        _start(attempts, slots, started)
        started += 1
    if not started and slots.acquire(timeout=timeout):  # every slot busy: wait for one
        _start(attempts, slots, started)
    attempts.wait()


def _start(attempts: _FirstAttempts, slots: threading.Semaphore, number: int) -> None:
    """Start a thread on *attempts* that gives its slot back when it ends."""

    def work() -> None:
        try:
            attempts.work()
        finally:
            slots.release()

    threading.Thread(target=work, name=f"xo-webhooks-wait-{number}", daemon=True).start()


class _FirstAttempts:
    """The first attempts of one request's ``waitForResponse`` hooks."""

    def __init__(self, dispatcher: Dispatcher, deliveries: Sequence[Delivery], deadline: float):
        self._dispatcher = dispatcher
        self._deadline = deadline
        self._todo = collections.deque(deliveries)
        self._left = len(deliveries)
        self._lock = threading.Lock()
        self._done = threading.Event()

    def work(self) -> None:
        """Take hooks until none is left: attempt each, or queue it when too late."""
        while (delivery := self._take()) is not None:
            try:
                if time.monotonic() < self._deadline:
                    self._dispatcher.deliver_now(delivery)
                else:
                    self._dispatcher.submit(delivery)
            except Exception:  # the middleware's own failure: the request goes on
                logger.exception("xo-webhooks could not send a waitForResponse hook")
            with self._lock:
                self._left -= 1
                if not self._left:
                    self._done.set()

    def wait(self) -> None:
        """Wait for the attempts until the deadline; then queue what none has started."""
        if self._done.wait(max(0.0, self._deadline - time.monotonic())):
            return
        while (delivery := self._take()) is not None:
            try:
                self._dispatcher.submit(delivery)
            except Exception:
                logger.exception("xo-webhooks could not queue a waitForResponse hook")

    def _take(self) -> Delivery | None:
        try:
            return self._todo.popleft()  # atomic: each hook is taken once
        except IndexError:
            return None
