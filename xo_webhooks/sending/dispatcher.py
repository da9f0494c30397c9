"""The thread dispatcher: delivers hooks from a pool of worker threads.

It keeps a bounded set of pending hooks (ready, waiting for a retry, or held until
their call's pre hook is done), never blocks the caller, retries with backoff without
holding a thread, and hands every hook it gives up on to the dead-letter file. Without a
spool, threads start lazily in the process that submits, so a server that forks after
building the app (gunicorn ``--preload``) never inherits them.

With a spool (``XO_WEBHOOKS_SPOOL``, :mod:`.spool`), every hook accepted is also
written there by the spooler's thread (:mod:`.spooler`), and the hooks that wait (for a
retry, for an endpoint that is down, for room in memory) wait there, not in memory:
they outlive the process, and any process sharing the spool may send them: one that
submits, flushes, serves a request through the middleware, or calls :meth:`start`.
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
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .._urls import endpoint_of
from ..config import Settings
from .delivery import Delivery, Sender
from .endpoints import Breaker, Gate, log_transition, probe_lease
from .intake import Intake, Job
from .lanes import Lane, Lanes
from .observers import Observers
from .policy import STAT_NAMES, Attempt, DeadLetters, RetryPolicy
from .recorder import Recorder
from .spooler import SpoolClient, Spooler
from .transport import SessionFactory

__all__ = ["Dispatcher", "ThreadDispatcher", "make_dispatcher"]

logger = logging.getLogger(__name__)


#: Fewest hooks given up on that may wait for the recorder thread (at least the queue
#: size): beyond them a hook is lost rather than written on the request thread.
RECORDER_MIN = 1000


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


class Dispatcher(Protocol):
    """What the middleware needs from a dispatcher.

    Two methods are optional, and used when present: ``submit_many(deliveries)``
    (queue a request's hooks in one go, as the Celery dispatcher publishes them in one
    round trip) and ``defer(job, size, now)`` (run *job*, which builds and submits a
    request's hooks, off the request thread, in the order given; *size* is the bytes
    it holds, *now* false when it may wait a little: see :meth:`ThreadDispatcher.defer`).
    Without ``defer`` the request thread builds them.
    """

    def submit(self, delivery: Delivery) -> None:
        """Queue *delivery*; never blocks, never raises."""

    def deliver_now(self, delivery: Delivery) -> bool:
        """Make the first attempt in the calling thread (``waitForResponse``); queue any
        retry. Returns whether it was delivered."""

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending; return whether that happened in time."""

    def start(self) -> None:
        """Start delivering in this process if it needs to before its first hook (the
        middleware calls it on its first request, when the dispatcher has it)."""

    def close(self, timeout: float | None = None) -> None:
        """Flush, stop, and dead-letter what is left (with a spool: leave it there)."""

    def stats(self) -> dict[str, int]:
        """Integer counters since start (see :data:`STAT_NAMES`)."""

    def endpoint_stats(self) -> dict[str, dict[str, Any]]:
        """Each endpoint's breaker state and counters (see :class:`ThreadDispatcher`)."""


def _reset_after_fork(ref: weakref.ref[ThreadDispatcher]) -> None:
    dispatcher = ref()
    if dispatcher is not None:
        dispatcher._reset()
        if dispatcher._spooler is not None:
            dispatcher._spooler.after_fork()
        dispatcher.sender.reset()
        dispatcher.dead_letters.reopen()  # its lock may be held


class ThreadDispatcher:
    """Delivers hooks from ``settings.max_workers`` threads, endpoint by endpoint.

    Each endpoint (a hook URL's origin) has its own lane (:mod:`.lanes`): at most
    ``settings.endpoint_concurrency`` attempts in flight, its share of the pending
    bound, and a circuit breaker (:mod:`.endpoints`) that stops attempts to an endpoint
    that is down, while its hooks wait without holding a thread.

    :param settings: retry schedule, queue size, concurrency, dead-letter store, timeouts.
    :param sender: the transport (a :class:`Sender` by default).
    :param dead_letters: where hooks given up on go (by default the configured store;
        ``xo-webhooks replay`` collects them with its own).
    :param endpoints: endpoints besides the configured ones that keep a share of the
        queue (``replay`` gives those of its records).
    :param resumes: whether it takes hooks from the spool (``replay`` does not: it
        sends its records and leaves what waits to the app's processes).

    With ``settings.spool``, hooks that wait are kept in the spool (see the module
    docstring), and ``stats()`` counts three more moves: ``spooled`` (handed to the
    spool to wait there), ``left`` (handed to it by ``close()``: the next process sends
    them) and ``resumed`` (taken from it by this process, whoever spooled them).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        sender: Sender | None = None,
        dead_letters: DeadLetters | None = None,
        endpoints: Iterable[str] = (),
        resumes: bool = True,
    ) -> None:
        self.settings = settings
        self._endpoints = tuple(endpoints)
        self._resumes = resumes
        self.sender = sender or Sender(settings)
        self.policy = RetryPolicy.from_settings(settings)
        self.dead_letters = dead_letters or DeadLetters(settings)
        #: Told what happens to hooks (metrics, ``on_give_up``): see :mod:`.observers`.
        self.observers = Observers()
        self._lease = probe_lease(settings.timeout)
        self._post_urls = frozenset(hook.url for hook in settings.hooks if hook.post)
        self._spooler = None if settings.spool is None else Spooler(
            settings.spool,
            SpoolClient(
                room=self._spool_room, resume=self._resume, unspool=self._unspool,
                adopt=self._adopt, looked=self._spool_looked, forget_pres=self._forget_pres,
            ),
            make_delivery=lambda message: Delivery.from_record(
                message, settings, int(message.get("attempts") or 0)
            ),
            deadline=lambda start, attempts: (
                start + self.policy.remaining(attempts) + settings.timeout
            ),
            redact=settings.redact,
            probe_lease=self._lease,
            per_endpoint=max(64, settings.queue_size // (1 + len(settings.hooks))),
        )  # fmt: skip
        self._reset()
        # Keep a fork from inheriting locks that another thread held, or queued hooks
        # the parent process will deliver itself.
        os.register_at_fork(after_in_child=functools.partial(_reset_after_fork, weakref.ref(self)))

    def _reset(self) -> None:
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # workers wait here for hooks to send
        self._idle = threading.Condition(lock)  # flush() waits here for nothing pending
        self._lanes = Lanes(self.settings, self.policy, self._endpoints)
        self._refused: set[int] = set()  # refused hooks on their way to the record
        self._delayed: list[tuple[float, int, Delivery]] = []  # retries, a heap by due time
        self._held: dict[tuple[Any, str], list[Delivery]] = {}  # posts waiting for a pre
        self._open_pres: Counter[tuple[Any, str]] = Counter()
        self._attempting: set[str] = set()  # ids of the hooks whose attempt is under way
        # Pre hooks handed to the spool, by order key: their call's post hooks to that
        # URL go there too, where none is sent before its pre hook has left the spool.
        self._spooled_pres: dict[tuple[Any, str], tuple[str, float]] = {}
        self._seq = itertools.count()
        self._counters: Counter[str] = Counter()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._closed = False
        self._recorder = Recorder(
            self.dead_letters.keep,
            self._count_given_up,
            max(RECORDER_MIN, self.settings.queue_size),
        )
        self._intake = Intake()  # the building of requests' hooks, off the request thread

    # -- the caller's side ------------------------------------------------------------

    def start(self) -> None:
        """With a spool, start the delivery threads and the spool's claims in this
        process, if they are not running: what waits in the spool is sent from then on,
        before any hook of this process's own. The first request through the middleware
        does it (as do :meth:`submit` and :meth:`flush`). Without a spool there is
        nothing to send yet: the threads start with the first hook."""
        if self._spooler is not None:
            with self._cond:
                self._start_workers()

    def submit(self, delivery: Delivery) -> None:
        """Queue *delivery*; never blocks (beyond a short lock), never raises."""
        with self._cond:
            self._start_workers()
            self._counters["accepted"] += 1
            lane = self._lanes.of(delivery)
            refusal = self._refusal(lane)
            spooled = self._spools(delivery, lane, refusal)
            if spooled:
                refusal = None
            else:
                self._count_in(delivery, lane, refusal)
            if refusal is None and not spooled:
                self._keep(delivery)
                key = delivery.order_key
                if not delivery.is_pre and key in self._open_pres:
                    self._held.setdefault(key, []).append(delivery)
                else:
                    self._lanes.put(lane, delivery, time.monotonic())
                    if not self._lanes.saturated(lane):  # else no worker could take it
                        self._cond.notify()
        if self.observers:
            self.observers.accepted(lane.origin)
        if refusal is not None:
            delivery.reason, delivery.last_error = refusal
            self._give_up([delivery])

    def defer(self, job: Job, size: int = 0, now: bool = True) -> None:
        """Run *job* soon on the dispatcher's intake thread, after every job deferred
        before it: the middleware hands over this way the parsing of a request that may
        hold hooked calls and the submitting of their hooks (see :mod:`.intake`).
        *size* is the request body's length: the bytes the job holds while it waits.
        Never blocks beyond a short lock, unless the intake is full: then this thread
        runs the waiting jobs, then *job*. With *now* false, the intake thread is not
        woken for it: it runs within 10 ms, or with the next job deferred with *now*
        (see :meth:`.Intake.put`). :meth:`flush`, :meth:`stats`,
        :meth:`endpoint_stats` and :meth:`close` run or wait for the deferred jobs first."""
        if not self._threads:  # as submit() does: and the hooks are flushed at exit
            with self._cond:
                self._start_workers()
        self._intake.put(job, size, now)

    def deliver_now(self, delivery: Delivery) -> bool:
        """Make the first attempt in this thread, bounded by the timeout; retries, if
        any, go on in the background. An endpoint that is down gets no attempt: the
        hook waits for it like any other. Returns whether the hook was delivered."""
        with self._cond:
            self._counters["accepted"] += 1
            lane = self._lanes.of(delivery)
            gate = lane.breaker.admit(time.time(), self._lease)
            if gate is Gate.GONE:
                refusal: Refusal | None = ("gone", lane.breaker.unavailable(lane.origin))
            elif gate is Gate.WAIT:  # it waits in the queue: it needs a place there
                refusal = self._refusal(lane)
            else:  # the attempt is this thread's: no queue place needed
                refusal = None
            if gate is Gate.WAIT:
                self._start_workers()  # to probe the endpoint, or give the hook up in time
            if gate is Gate.WAIT and self._spools(delivery, lane, refusal):
                refusal = None
            else:
                self._count_in(delivery, lane, refusal)
                if refusal is None:
                    self._keep(delivery)
                if refusal is None and gate is Gate.WAIT:
                    self._lanes.put(lane, delivery, time.monotonic())
                    self._cond.notify()
                elif refusal is None:
                    self._attempting.add(delivery.id)
        if self.observers:
            self.observers.accepted(lane.origin)
        if refusal is None and gate is Gate.WAIT:
            return False
        if refusal is not None:
            delivery.reason, delivery.last_error = refusal
            self._give_up([delivery])
            return False
        try:
            attempt = self._attempt(delivery)
        finally:
            self.sender.release()  # a server thread: it may not live to send another
        self._settle(lane, delivery, attempt, by_worker=False)
        return attempt.delivered

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until no hook is pending, in memory or (with a spool) in the spool,
        whichever process put it there; return whether that happened within *timeout*."""
        self._intake.drain()  # the deferred requests' hooks are submitted first
        spooler = self._spooler
        if spooler is None:
            with self._idle:
                return self._idle.wait_for(lambda: self._unsettled() == 0, timeout)
        self.start()
        with self._idle:  # and nothing in the spool: its retries are pending too
            spooler.flushing(True)
            try:
                return self._idle.wait_for(
                    lambda: self._unsettled() == 0 and spooler.idle(), timeout
                )
            finally:
                spooler.flushing(False)

    def close(self, timeout: float | None = None) -> None:
        """Wait up to *timeout* seconds (default ``shutdown_timeout``) for the hooks in
        memory, stop the workers, and give up on whatever is still pending, or, with a
        spool, leave it there for the next process (an attempt still under way then
        stays this process's, and writes its own outcome). Safe to call twice."""
        timeout = self.settings.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._intake.close(timeout)  # the requests' hooks it holds are submitted first
        with self._idle:  # the hooks in memory; those in the spool wait for the next process
            self._idle.wait_for(lambda: self._unsettled() == 0, _left(deadline))
        with self._cond:
            self._closed = self._stopping = True
            now = time.monotonic()
            waiting = [(d, due - now) for due, _, d in self._delayed]
            waiting += [(d, 0.0) for d in self._lanes.drain()]
            waiting += [(d, 0.0) for held in self._held.values() for d in held]
            self._delayed.clear()
            self._held.clear()
            left = [d for d, _ in waiting]
            if self._spooling():
                for delivery, delay in waiting:
                    self._lanes.count(self._lanes.of(delivery), -1)
                    self._to_spool(delivery, time.time() + max(0.0, delay))
                left = []
            self._cond.notify_all()
            threads, self._threads = self._threads, []
        for delivery in left:
            delivery.reason = "shutdown"
            delivery.last_error = delivery.last_error or "still pending at shutdown"
        self._give_up(left)
        for thread in threads:
            thread.join(_left(deadline))
        if self._spooler is not None:  # after the threads: their last retries go there too
            with self._cond:  # still under way: held, their outcome written when they end
                attempting = list(self._attempting)
            self._spooler.close(_left(deadline) + 5, attempting)
            if self._counters["left"]:
                logger.info(
                    "%d hook(s) left in the spool %s: the next process that opens it sends them",
                    self._counters["left"], self._spooler.path,
                )  # fmt: skip
        self._recorder.close(_left(deadline) + 5)  # kept hooks must reach the file
        atexit.unregister(self.close)

    def stats(self) -> dict[str, int]:
        """Counters since start: ``accepted + resumed == delivered + failed + spooled +
        left + pending`` and ``failed == dead_lettered + lost`` hold at every moment
        (without a spool, ``resumed``, ``spooled`` and ``left`` stay 0);
        ``spool_errors`` counts the spool's failed transactions. Deferred jobs are run
        first (see :meth:`defer`), so the hooks of every request answered are counted."""
        self._intake.drain()
        with self._cond:
            counters = {name: self._counters[name] for name in STAT_NAMES}
            counters["pending"] = self._pending()
            counters["recording"] = len(self._refused)
        counters["spool_errors"] = 0 if self._spooler is None else self._spooler.errors
        return counters

    def endpoint_stats(self) -> dict[str, dict[str, Any]]:
        """For each endpoint: ``state`` (closed, open, half-open, disabled), ``pending``,
        ``delivered``, ``failed``, ``consecutive_failures``, ``last_error``,
        ``last_success`` and ``opened_at`` (epoch seconds or ``None``), and where its
        waiting hooks are kept: ``spool`` (``"spool"``, or ``"memory"`` without a
        spool or while it fails)."""
        self._intake.drain()
        where = "spool" if self._spooling() else "memory"
        with self._cond:
            stats = self._lanes.stats()
        for endpoint in stats.values():
            endpoint["spool"] = where
        return stats

    # -- internals --------------------------------------------------------------------

    def _refusal(self, lane: Lane) -> Refusal | None:
        """Why a new hook to *lane* is given up on at once (the reason, the error), or
        ``None``. Holds the lock."""
        if self._closed:
            return "shutdown", "dispatcher closed"
        if lane.breaker.state == "disabled":
            return "gone", lane.breaker.unavailable(lane.origin)
        full = self._lanes.refusal(lane)
        return None if full is None else ("queue_full", full)

    def _count_in(self, delivery: Delivery, lane: Lane, refusal: Refusal | None) -> None:
        """Count an accepted delivery as pending: on its lane, or, refused, apart until
        it is recorded (it holds no place of the bound). Holds the lock."""
        if refusal is None:
            self._lanes.count(lane, +1)
            self._note_pre(delivery)
        else:
            self._refused.add(id(delivery))

    def _pending(self) -> int:
        """Hooks in the queue: never more than ``queue_size`` (a refused hook on its way
        to the dead-letter store is ``recording``, not pending)."""
        return self._lanes.pending

    def _unsettled(self) -> int:
        return self._lanes.pending + len(self._refused)

    # -- the spool --------------------------------------------------------------------

    def _spooling(self) -> bool:
        """Whether waiting hooks go to the spool (it is configured and works)."""
        return self._spooler is not None and self._spooler.healthy

    def _spools(self, delivery: Delivery, lane: Lane, refusal: Refusal | None) -> bool:
        """Whether a new hook waits in the spool rather than in memory, handing it
        there if so: its endpoint is down, memory is full, or its call's pre hook to
        that URL is in the spool. Holds the lock."""
        if refusal is None and lane.breaker.state == "closed" and not self._spooled_pres:
            return False  # the common case, on the request path: nothing more to ask
        if not self._spooling() or (refusal is not None and refusal[0] != "queue_full"):
            return False
        key = delivery.order_key
        waits = (
            refusal is not None
            or lane.breaker.state != "closed"
            or (not delivery.is_pre and key in self._spooled_pres and key not in self._open_pres)
        )
        if waits:
            self._to_spool(delivery, time.time())
        return waits

    def _keep(self, delivery: Delivery) -> None:
        """A hook this process holds in memory is written to the spool too (by the
        spooler's thread: here, an append). Holds the lock."""
        spooler = self._spooler
        if spooler is not None and spooler.healthy:
            spooler.keep(delivery)

    def _to_spool(self, delivery: Delivery, due: float) -> None:
        """Hand *delivery*, due at *due* (epoch seconds), to the spool: it leaves
        memory, and is counted ``spooled`` (``left`` once closing). Holds the lock."""
        assert self._spooler is not None
        self._spooler.release(delivery, due)
        self._counters["left" if self._closed else "spooled"] += 1
        key = delivery.order_key
        if delivery.is_pre and (delivery.hook.url in self._post_urls or key in self._held):
            self._spooled_pres[key] = (delivery.id, time.monotonic())
        elif key in self._spooled_pres:  # the call's post: the entry has served
            delivery.after = self._spooled_pres.pop(key)[0]

    def _spool_room(self) -> tuple[int, dict[str, int]]:
        """how many hooks memory can take now, and how many each
        endpoint holds there already."""
        with self._cond:
            if self._closed or not self._resumes:
                return 0, {}
            return self.settings.queue_size - self._pending(), self._lanes.held()

    def _resume(self, due: list[Delivery], expired: list[Delivery]) -> None:
        """Take hooks claimed from the spool: to send (*due*), or to give up on
        (*expired*: their schedule ran out while they waited)."""
        gone = []
        with self._cond:
            self._counters["resumed"] += len(due) + len(expired)
            now = time.monotonic()
            for delivery, ran_out in [(d, False) for d in due] + [(d, True) for d in expired]:
                lane = self._lanes.of(delivery)
                self._lanes.count(lane, +1)
                self._note_pre(delivery)
                if lane.breaker.state != "closed" and (ran_out or lane.breaker.state == "disabled"):
                    _unavailable(lane, delivery)
                    gone.append(delivery)
                elif ran_out:
                    delivery.reason = "retries_exhausted"
                    delivery.last_error = delivery.last_error or "its schedule ran out as it waited"
                    gone.append(delivery)
                elif self._closed:
                    self._lanes.count(lane, -1)
                    self._to_spool(delivery, time.time())
                elif not delivery.is_pre and delivery.order_key in self._open_pres:
                    self._held.setdefault(delivery.order_key, []).append(delivery)
                else:
                    self._lanes.put(lane, delivery, now)
            self._cond.notify_all()
        self._give_up(gone)

    def _unspool(self, released: list[tuple[Delivery, float]]) -> None:
        """Take back hooks handed to the spool that could not be written: they wait in
        memory, due at their time (epoch seconds); a post hook whose pre hook is on its
        way (here, or in the spool) waits for it."""
        shutdown = []
        with self._cond:
            self._counters["resumed"] += len(released)
            mono, epoch = time.monotonic(), time.time()
            for delivery, due in released:
                self._lanes.count(self._lanes.of(delivery), +1)
                key = delivery.order_key
                if delivery.is_pre:
                    self._spooled_pres.pop(key, None)
                    self._note_pre(delivery)
                if self._closed:
                    delivery.reason = "shutdown"
                    delivery.last_error = delivery.last_error or "the spool failed at shutdown"
                    shutdown.append(delivery)
                elif not delivery.is_pre and (key in self._open_pres or delivery.after):
                    self._held.setdefault(key, []).append(delivery)
                    if delivery.after and key not in self._open_pres:  # its pre is spooled
                        self._spooled_pres[key] = (delivery.after, mono)
                else:
                    due_at = mono + max(0.0, due - epoch)
                    heapq.heappush(self._delayed, (due_at, next(self._seq), delivery))
            self._cond.notify_all()
        self._give_up(shutdown)

    def _adopt(self, origin: str, fields: dict[str, Any]) -> None:
        """Another process saved this state of *origin*'s breaker (its probe failed or
        succeeded, it saw the endpoint go down or gone)."""
        with self._cond:
            lane = self._lanes.lane(origin)
            before = lane.breaker.state
            lane.breaker = Breaker.from_dict(self.settings.breaker_threshold, fields)
            after = lane.breaker.state
            transition = None
            if after in ("closed", "disabled") and after != before:
                transition = "closed" if after == "closed" else "disabled"
            elif before == "closed" and after != "closed":
                transition = "opened"
            gone = self._transition(lane, transition)
            self._cond.notify_all()
        self._give_up(gone)

    def _spool_looked(self) -> None:
        """The spooler wrote or counted: ``flush()`` may be done."""
        with self._idle:
            self._idle.notify_all()

    def _forget_pres(self, before: float, held: Callable[[list[str]], set[str]]) -> None:
        """Forget the pre hooks handed to the spool before *before* (monotonic) that
        are no longer there (*held* says which ids are); post hooks held here for one
        of them may go."""
        with self._cond:
            noted = [(k, pre_id) for k, (pre_id, t) in self._spooled_pres.items() if t < before]
        if not noted:
            return
        present = held([pre_id for _, pre_id in noted])
        with self._cond:
            now = time.monotonic()
            for key, pre_id in noted:
                if pre_id not in present and self._spooled_pres.get(key, ("",))[0] == pre_id:
                    del self._spooled_pres[key]
                    if key not in self._open_pres:  # posts unspooled while it was there
                        for post in self._held.pop(key, []):
                            self._lanes.put(self._lanes.of(post), post, now)
            self._cond.notify_all()

    def _note_pre(self, delivery: Delivery) -> None:
        """A pre hook is on its way: its call's post hooks to that URL wait for it."""
        if delivery.is_pre:
            self._open_pres[delivery.order_key] += 1

    def _start_workers(self) -> None:
        if self._threads or self._closed:
            return
        if self._spooler is not None:
            self._spooler.start()
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
                    work = self._next_work()
                if work is None:
                    return
                if isinstance(work, list):
                    self._give_up(work)
                else:
                    lane, delivery = work
                    self._settle(lane, delivery, self._attempt(delivery))
        finally:
            self.sender.release()

    def _attempt(self, delivery: Delivery) -> Attempt:
        started = time.monotonic()
        try:
            attempt = self.sender.send(delivery)
        except Exception as e:  # a sender of the caller's: its bug must not stop delivery
            logger.exception("the sender failed on hook %s", delivery.describe())
            attempt = Attempt(False, f"unexpected error: {type(e).__name__}")
        if self.observers:
            origin = endpoint_of(delivery.hook.url)
            self.observers.attempted(origin, attempt, time.monotonic() - started)
        return attempt

    def _next_work(self) -> tuple[Lane, Delivery] | list[Delivery] | None:
        """Wait for a hook to send, or for hooks whose wait has run out (to give up);
        ``None`` once stopping. Holds the lock."""
        while not self._stopping:
            now = time.monotonic()
            expired = []
            while self._delayed and self._delayed[0][0] <= now:
                delivery = heapq.heappop(self._delayed)[2]
                lane = self._lanes.of(delivery)
                if lane.breaker.state == "disabled":
                    expired.append((lane, delivery))
                else:
                    self._lanes.put(lane, delivery, now)
            expired += self._lanes.expired(now) + self._lanes.gone()
            if expired:
                for lane, delivery in expired:
                    _unavailable(lane, delivery)
                return [delivery for _, delivery in expired]
            work = self._lanes.take(time.time(), self._lease)
            if work is not None:
                self._attempting.add(work[1].id)
                return work
            waits = [self._delayed[0][0] - now] if self._delayed else []
            wake = self._lanes.next_wake(now, time.time())
            waits += [] if wake is None else [wake]
            self._cond.wait(min(waits) if waits else None)
        return None

    def _settle(
        self, lane: Lane, delivery: Delivery, attempt: Attempt, by_worker: bool = True
    ) -> None:
        """Count an attempt's result on its endpoint's breaker, then finish the delivery
        or schedule its retry."""
        if not attempt.delivered:
            delivery.failed(attempt)
        elif self.observers:  # before it is counted: flush() returns after observers
            self.observers.delivered(lane.origin, delivery)
        with self._cond:
            self._attempting.discard(delivery.id)
            if by_worker:
                lane.in_flight -= 1
            if delivery.attempts > 1:
                self._counters["retried"] += 1
            breaker = lane.breaker
            down_since, waited = breaker.opened_at, len(lane.waited)
            transition = breaker.record(attempt, time.time())
            gone = self._transition(lane, transition)
            gone_waiting = len(gone)
            if attempt.delivered:
                self._counters["delivered"] += 1
                lane.delivered += 1
                self._lanes.count(lane, -1)
                self._finish(delivery)
            else:
                delay = self.policy.next_delay(delivery.attempts, attempt)
                if breaker.state == "disabled":
                    _unavailable(lane, delivery)
                    gone.append(delivery)
                elif delay is not None and self._spooling():  # even closing: it waits there
                    self._lanes.count(lane, -1)
                    self._to_spool(delivery, time.time() + delay)
                    self._finish(delivery, forget=False)
                elif delay is not None and not self._closed:
                    self._start_workers()
                    due = time.monotonic() + delay
                    heapq.heappush(self._delayed, (due, next(self._seq), delivery))
                    self._cond.notify()
                else:
                    delivery.reason = "shutdown" if delay is not None else attempt.give_up_reason
                    gone.append(delivery)
        log_transition(lane.origin, breaker, transition, down_since, waited, gone_waiting)
        if transition is not None and self._spooler is not None:
            self._spooler.save_breaker(lane.origin, breaker.to_dict())
        if transition is not None and self.observers:
            self.observers.state_changed(lane.origin, breaker.state)
        self._give_up(gone)

    def _transition(self, lane: Lane, transition: str | None) -> list[Delivery]:
        """Act on a breaker's transition; return the hooks it gives up on (a disabled
        endpoint's). Holds the lock."""
        if transition == "opened" and self._spooling():  # its hooks wait in the spool
            for delivery in self._lanes.drain(lane):
                self._lanes.count(lane, -1)
                self._to_spool(delivery, time.time())
                self._finish(delivery, forget=False)
        elif transition == "opened":
            self._lanes.park(lane, time.monotonic())
        elif transition == "closed":
            self._lanes.unpark(lane)
            self._cond.notify_all()
        elif transition == "disabled":
            gone = self._lanes.drain(lane)
            delayed = [entry for entry in self._delayed if self._lanes.of(entry[2]) is lane]
            if delayed:
                self._delayed = [e for e in self._delayed if self._lanes.of(e[2]) is not lane]
                heapq.heapify(self._delayed)
                gone += [delivery for _, _, delivery in delayed]
            for delivery in gone:
                _unavailable(lane, delivery)
            return gone
        return []

    def _finish(self, delivery: Delivery, forget: bool = True) -> None:
        """A delivery is done here (delivered, given up, or handed to the spool):
        remove it from the spool if *forget* (not when it was just handed there, or
        never written), and release the posts held for it (to the spool, if it or
        another pre hook of the call went there)."""
        if self._spooler is not None and forget:
            self._spooler.forget(delivery)
        key = delivery.order_key
        if delivery.is_pre and key in self._open_pres:
            self._open_pres[key] -= 1
            if self._open_pres[key] <= 0:
                del self._open_pres[key]
                held = self._held.pop(key, [])
                now = time.monotonic()
                for post in held:
                    if key in self._spooled_pres and self._spooling():
                        self._lanes.count(self._lanes.of(post), -1)
                        self._to_spool(post, time.time())
                    else:
                        self._lanes.put(self._lanes.of(post), post, now)
                self._cond.notify(len(held))
        if self._unsettled() == 0:
            self._idle.notify_all()
            if self._spooler is not None:
                self._spooler.poke()  # for a flush(): what is left to see is the spool's

    def _give_up(self, deliveries: list[Delivery]) -> None:
        """Have accepted deliveries recorded as failed by the recorder thread, never by
        the caller (a request thread must not wait for a disk): when the recorder is too
        far behind they are lost (counted, and logged by :class:`DeadLetters`). Once the
        dispatcher is closed and its recorder stopped, the caller writes them."""
        if not deliveries or self._recorder.put(deliveries):
            return
        if self._recorder.closed:
            self._count_given_up(deliveries, self.dead_letters.keep(deliveries))
        else:
            self.dead_letters.lose(deliveries, "the dead-letter recorder is too far behind")
            self._count_given_up(deliveries, False)

    def _count_given_up(self, deliveries: list[Delivery], written: bool) -> None:
        for delivery in deliveries:  # before they are counted: flush() returns after them
            self.observers.gave_up_on(delivery, self.settings.redact)
        with self._cond:
            self._counters["failed"] += len(deliveries)
            self._counters["dead_lettered" if written else "lost"] += len(deliveries)
            for delivery in deliveries:
                lane = self._lanes.of(delivery)
                lane.failed += 1
                refused = id(delivery) in self._refused
                if refused:
                    self._refused.discard(id(delivery))
                else:
                    self._lanes.count(lane, -1)
                self._finish(delivery, forget=not refused)  # a refused one was never kept

    def __repr__(self) -> str:
        return f"<ThreadDispatcher workers={self.settings.max_workers} {self.stats()}>"


#: Why a hook is refused: the reason (see ``policy.GIVE_UP_REASONS``) and the error.
Refusal = tuple[str, str]


def _unavailable(lane: Lane, delivery: Delivery) -> None:
    """Give *delivery* its endpoint's word for why it cannot go: gone (``410``), or
    down for longer than the hook's schedule."""
    delivery.reason = "gone" if lane.breaker.state == "disabled" else "retries_exhausted"
    delivery.last_error = lane.breaker.unavailable(lane.origin)


def make_dispatcher(
    settings: Settings, session_factory: SessionFactory | None = None
) -> Dispatcher:
    """The dispatcher *settings* ask for (``thread`` or ``celery``); the thread one's
    sender uses *session_factory* (see :class:`.Sender`). Celery workers build their
    own sender, from the settings alone."""
    if settings.dispatcher == "celery":  # imported only when asked: an optional extra
        from .celery_publisher import CeleryDispatcher

        return CeleryDispatcher(settings)
    return ThreadDispatcher(settings, sender=Sender(settings, session_factory))
