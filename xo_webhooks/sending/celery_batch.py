"""A Celery task that delivers many hooks: those of its own message and of more messages
taken from the queue (:class:`~.celery_wire.Drain`), sent together in a few threads of
the worker process over kept-alive connections (the thread dispatcher's transport).

What Celery costs per message (taking it, recording it as unacknowledged, handing it to
a pool process, acknowledging it: about a millisecond of CPU and five Redis commands) is
then paid once per batch, not once per hook. Each hook still has its own fate, decided
as :meth:`.celery.Worker.run` decides it for a lone hook: the breaker of its endpoint, a
retry published alone with its own countdown (not a copy of the whole batch), parking,
its own dead-letter record; a post hook waits for its pre hook, in this task first, then
put back alone. A batch lasts at most :data:`BATCH_SECONDS` of attempts, well inside the
visibility timeout: past it, the hooks not attempted yet are queued again, each alone.

Needs the ``celery`` extra.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from celery import Task

from .._urls import endpoint_of
from .celery_messages import (
    COUNTDOWN_LIMIT,
    HOLD_FIRST_POLL,
    HOLD_MAX_POLL,
    HOLD_WAIT,
    HOLD_WAIT_POLL,
    PRE_DONE_KEY,
    PRE_PENDING_KEY,
    QUEUE,
    TASK_NAME,
    again_message,
    message_summary,
    pending_mark,
)
from .celery_wire import Drain
from .delivery import Delivery
from .endpoints import Breaker, Gate
from .policy import Attempt

if TYPE_CHECKING:
    from .celery import Worker

__all__ = ["Batches", "THREADS", "BATCH", "BATCH_SECONDS"]

logger = logging.getLogger("xo_webhooks.sending.celery")

#: Threads of a worker process that send the hooks of a batch.
THREADS = 16
#: Most hooks one task delivers.
BATCH = 64
#: Seconds of attempts a batch may take at most, every attempt timing out: with the
#: default timeout of 10 s, 4 rounds of :data:`THREADS` attempts (the lone hooks of an
#: endpoint that is not plainly up go one at a time, as they do in one-hook tasks).
BATCH_SECONDS = 40.0


@dataclass
class _Hook:
    """One hook of a batch."""

    message: dict[str, Any]
    delivery: Delivery
    origin: str
    marked: bool | None  # a pre with a pending marker (see .celery.pending_mark)
    waits: bool  # a post hook that waits for its pre hook


@dataclass
class _Run:
    """What one task learns while it delivers its batch."""

    task: Task
    outcomes: Counter[str] = field(default_factory=Counter)
    #: Endpoints whose breaker is closed without failures, and stays so in this batch.
    healthy: dict[str, Breaker] = field(default_factory=dict)
    #: Endpoints a hook of this batch was delivered to: the others go together at once.
    proven: set[str] = field(default_factory=set)
    delivered: Counter[str] = field(default_factory=Counter)  # counted once, at the end
    settled: set[str] = field(default_factory=set)  # pre hooks delivered or given up
    #: After this (``time.monotonic()``), hooks not attempted yet are queued again.
    deadline: float = field(default_factory=lambda: time.monotonic() + BATCH_SECONDS)


class Batches:
    """Delivers the hooks of tasks in one worker process (made after the fork).

    :param worker: the worker whose sender, policy, breakers and dead letters are used.
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.pid = os.getpid()
        self.pool = ThreadPoolExecutor(THREADS, thread_name_prefix="xo-webhooks-send")
        self.drain = Drain(worker.markers, QUEUE, TASK_NAME)
        rounds = max(1, int(BATCH_SECONDS // max(worker.settings.timeout, 0.001)))
        #: Most hooks per task, so that a batch of timeouts fits in BATCH_SECONDS.
        self.limit = min(BATCH, THREADS * rounds)

    def close(self) -> None:
        """Stop the sending threads, once what they have is sent (a worker's own end
        stops them anyway: this is for a process that goes on, e.g. a test)."""
        self.pool.shutdown(wait=True)

    def run(self, task: Task, messages: list[dict[str, Any]]) -> str:
        """Deliver *messages* and those of more messages taken from the queue; say what
        became of them. A lone hook with nothing more queued goes through
        :meth:`.celery.Worker.run` (a retry then replaces the task's message)."""
        taken: list[tuple[str, dict[str, Any]]] = []
        try:
            taken = self.drain.take(self.limit - len(messages))
        except redis.RedisError:
            logger.warning("could not take more hooks from the queue", exc_info=True)
        if not taken and len(messages) == 1:
            return self.worker.run(task, messages[0])
        everything = list(messages)
        for _tag, kwargs in taken:
            if "message" in kwargs:
                everything.append(kwargs["message"])
            else:
                everything.extend(kwargs.get("messages") or ())
        outcomes = self.deliver(task, everything)
        try:
            self.drain.ack([tag for tag, _ in taken])
        except redis.RedisError:  # they come back after the visibility timeout
            logger.warning("could not acknowledge %d messages", len(taken), exc_info=True)
        return ", ".join(f"{what} {n}" for what, n in sorted(outcomes.items()))

    def deliver(self, task: Task, messages: list[dict[str, Any]]) -> Counter[str]:
        """Deliver the hooks of *messages*, each to its own fate; count the fates."""

        worker = self.worker
        batch = _Run(task)
        hooks = []
        for message in messages:
            delivery = worker.delivery(message)
            hook = _Hook(
                message,
                delivery,
                endpoint_of(delivery.hook.url),
                pending_mark(message),
                bool(message.get("after") or message.get("afterPending")),
            )
            not_before = float(message.get("notBefore") or 0)
            if not_before > time.time():  # a long retry of a waitForResponse hook
                again = {k: v for k, v in message.items() if k != "notBefore"}
                if worker._park(hook.origin, again, not_before, delivery):
                    batch.outcomes["parked"] += 1
                    continue
            hooks.append(hook)
        # Posts whose pre hooks are in this batch wait for them here without asking.
        here = {h.delivery.id for h in hooks if h.delivery.is_pre}
        posts = [h for h in hooks if h.waits]
        elsewhere = [h for h in posts if not set(h.message.get("afterPending") or ()) <= here]
        waiting = [h for h in posts if h not in self._ready(elsewhere, batch)]
        try:
            self._send(batch, [h for h in hooks if h not in waiting])
            self._hold(batch, waiting)
        finally:
            for origin, count in batch.delivered.items():
                self._count_delivered(origin, count)
        return batch.outcomes

    # -- ordering -------------------------------------------------------------------------

    def _ready(self, hooks: list[_Hook], batch: _Run) -> list[_Hook]:
        """Those of the post *hooks* whose pre hooks are done (settled in this batch,
        or their pending markers gone, or their done markers set, from an older
        publisher): one ``MGET`` for them all. A hook whose markers cannot be read is
        not ready: it is held, not sent."""

        wanted = []  # per hook: (pending keys, done keys)
        for hook in hooks:
            pending = [i for i in hook.message.get("afterPending") or () if i not in batch.settled]
            done = [i for i in hook.message.get("after") or () if i not in batch.settled]
            wanted.append(
                (
                    [PRE_PENDING_KEY.format(i) for i in pending],
                    [PRE_DONE_KEY.format(i) for i in done],
                )
            )
        keys = [key for pending, done in wanted for key in (*pending, *done)]
        if not keys:
            return list(hooks)
        try:
            values = dict(zip(keys, self.worker.markers.mget(keys), strict=True))
        except redis.RedisError:
            logger.warning("could not check whether the pre hooks are done", exc_info=True)
            return []
        return [
            hook
            for hook, (pending, done) in zip(hooks, wanted, strict=True)
            if all(values[k] is None for k in pending) and all(values[k] for k in done)
        ]

    def _hold(self, batch: _Run, waiting: list[_Hook]) -> None:
        """Post hooks whose pre hooks are not done: wait here (their pre hooks may be
        in this batch, or being sent elsewhere), then put each back alone."""

        first = any(not int(h.message.get("holds", 0)) for h in waiting)
        deadline = time.monotonic() + (HOLD_WAIT if first else 0.0)
        pause = 0.002  # a pre in another process's batch is usually done in milliseconds
        while waiting:
            ready = self._ready(waiting, batch)
            if ready:
                waiting = [h for h in waiting if h not in ready]
                self._send(batch, ready)
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(pause)
            pause = min(HOLD_WAIT_POLL, pause * 2)
        late = []
        for hook in waiting:
            holds = int(hook.message.get("holds", 0))
            now = time.time()
            until = float(hook.message.get("holdUntil") or now + self.worker.hold_limit)
            if now >= until:
                logger.warning(
                    "hook %s sent although its pre hook is not done", hook.delivery.describe()
                )
                late.append(hook)
                continue
            again = {**hook.message, "holdUntil": until, "holds": holds + 1}
            countdown = min(HOLD_MAX_POLL, HOLD_FIRST_POLL * 2**holds)
            try:
                self._republish(batch.task, again, countdown)
            except Exception:  # the broker is gone: deliver now rather than lose the hook
                logger.warning("could not hold a post hook; sending it now", exc_info=True)
                late.append(hook)
            else:
                batch.outcomes["held"] += 1
        self._send(batch, late)

    # -- sending --------------------------------------------------------------------------

    def _send(self, batch: _Run, hooks: list[_Hook]) -> None:
        """Admit, send, record and settle *hooks*; then let their post hooks go.

        To an endpoint whose breaker is closed without failures, one hook goes first
        (unless one was delivered there in this batch already); once it is delivered,
        the others go together. Otherwise (that first one failed, or the breaker is
        open, half-open or has failures) one at a time, each asking the breaker, as lone
        hooks do: a receiver that is down gets no more attempts than from one-hook tasks
        before its breaker opens.
        """
        if not hooks:
            return
        worker = self.worker
        origins: dict[str, list[_Hook]] = {}
        for hook in hooks:
            origins.setdefault(hook.origin, []).append(hook)
        alone: list[tuple[_Hook, tuple[Gate, Breaker] | None]] = []
        healthy: list[tuple[str, list[_Hook]]] = []
        for origin, group in origins.items():
            if origin not in batch.healthy:
                gate, breaker = worker._admit(origin)
                if gate is not Gate.SEND or breaker.state != "closed" or breaker.failures:
                    # The first goes on this answer (a half-open breaker's probe is
                    # this process's to send), the others ask again.
                    alone += [(group[0], (gate, breaker))] + [(h, None) for h in group[1:]]
                    continue
                batch.healthy[origin] = breaker
            healthy.append((origin, group))
        scouts = [group[0] for origin, group in healthy if origin not in batch.proven]
        tried = dict(zip(map(id, scouts), self.pool.map(self._attempt, scouts), strict=True))
        together: list[tuple[str, list[_Hook]]] = []
        for origin, group in healthy:
            first = tried.get(id(group[0]))
            if first is None or first[0].delivered:
                together.append((origin, group))
                continue
            batch.healthy.pop(origin)
            self._finish(batch, group[0], *first, worker._record(origin, first[0]))
            alone += [(hook, None) for hook in group[1:]]
        rest = [hook for _, group in together for hook in group if id(hook) not in tried]
        tried.update(zip(map(id, rest), self.pool.map(self._attempt, rest), strict=True))
        for origin, group in together:
            attempts = [tried[id(hook)] for hook in group]
            if all(attempt.delivered for attempt, _ in attempts):
                batch.proven.add(origin)
                batch.delivered[origin] += len(group)  # the breaker stays as it is
                breakers = [batch.healthy[origin]] * len(group)
            else:
                batch.healthy.pop(origin, None)
                breakers = [worker._record(origin, attempt) for attempt, _ in attempts]
            for hook, (attempt, seconds), after in zip(group, attempts, breakers, strict=True):
                self._finish(batch, hook, attempt, seconds, after)
        sent = [hook for _, group in together for hook in group]
        self._done([hook for hook in sent if tried[id(hook)][0].delivered])
        for hook, admitted in alone:
            self._one(batch, hook, admitted)

    def _attempt(self, hook: _Hook) -> tuple[Attempt, float]:
        started = time.monotonic()
        attempt = self.worker.sender.send(hook.delivery)
        return attempt, time.monotonic() - started

    def _one(self, batch: _Run, hook: _Hook, admitted: tuple[Gate, Breaker] | None = None) -> None:
        """A hook whose endpoint is not plainly up, as :meth:`.celery.Worker.run` treats
        it, but retried alone; *admitted*: the breaker's answer already given for it."""
        worker = self.worker
        if time.monotonic() > batch.deadline:
            # Slow answers one at a time: the batch has had its time (its messages are
            # held unacknowledged meanwhile). This hook goes back to the queue, alone.
            try:
                self._republish(batch.task, hook.message, None)
            except Exception:
                logger.warning("could not queue a hook again; sending it now", exc_info=True)
            else:
                batch.outcomes["queued again"] += 1
                return
        gate, breaker = admitted or worker._admit(hook.origin)
        if gate is Gate.GONE:
            hook.delivery.last_error = breaker.unavailable(hook.origin)
            worker._give_up(hook.delivery, hook.origin, "gone", hook.marked)
            batch.settled.add(hook.delivery.id)
            batch.outcomes["failed"] += 1
            return
        if gate is Gate.WAIT:
            message, delivery = hook.message, hook.delivery
            outcome = worker._wait(message, delivery, hook.origin, breaker, hook.marked)
            if outcome == "failed":
                batch.settled.add(hook.delivery.id)
            batch.outcomes[outcome] += 1
            return
        attempt, seconds = self._attempt(hook)
        self._finish(batch, hook, attempt, seconds, worker._record(hook.origin, attempt))
        if attempt.delivered:
            self._done([hook])

    def _finish(
        self, batch: _Run, hook: _Hook, attempt: Attempt, seconds: float, breaker: Breaker
    ) -> None:
        """What one attempt's result makes of its hook: delivered, a retry published
        alone, parked, or given up (as :meth:`.celery.Worker.run`)."""

        worker, delivery, origin = self.worker, hook.delivery, hook.origin
        if worker.observers:
            worker.observers.attempted(origin, attempt, seconds)
        outcome = "failed"
        if attempt.delivered:
            if worker.observers:
                worker.observers.delivered(origin, delivery)
            outcome = "delivered"
        else:
            delivery.failed(attempt)
            delay = worker.policy.next_delay(delivery.attempts, attempt)
            reason = attempt.give_up_reason
            again = again_message(delivery, hook.marked)
            if breaker.state == "disabled":
                delivery.last_error = breaker.unavailable(origin)
                reason = "gone"
            elif delay is not None and delay > COUNTDOWN_LIMIT:
                if worker._park(origin, again, time.time() + delay, delivery):
                    outcome = "parked"
                else:
                    reason = "broker"
            elif delay is not None:
                try:
                    self._republish(batch.task, again, delay)
                except Exception as e:  # the broker is gone: keep the hook all the same
                    delivery.last_error = f"{attempt.error}; could not queue the retry: {e}"[:300]
                    reason = "broker"
                else:
                    outcome = "retried"
            if outcome == "failed":
                worker._give_up(delivery, origin, reason, hook.marked)
        if outcome in ("delivered", "failed"):
            batch.settled.add(delivery.id)
        batch.outcomes[outcome] += 1

    def _republish(self, task: Task, message: dict[str, Any], countdown: float | None) -> None:
        """Publish one hook's message again, alone, due in *countdown* seconds."""

        if self.worker.republish is not None:
            self.worker.republish(message, countdown)
            return
        task.retry(
            args=(),
            kwargs={"message": message},
            kwargsrepr=message_summary(message),
            countdown=countdown,
            throw=False,
        )

    def _count_delivered(self, origin: str, count: int) -> None:
        try:
            self.worker.breakers.delivered(origin, count)
        except redis.RedisError:
            logger.warning("could not update the counters of %s", origin, exc_info=True)

    def _done(self, hooks: list[_Hook]) -> None:
        """Delivered *hooks* that are pre hooks let their post hooks go: one command for the pending
        markers of them all (a pre from an older publisher sets its done marker)."""

        pres = [h for h in hooks if h.delivery.is_pre]
        marked = [PRE_PENDING_KEY.format(h.delivery.id) for h in pres if h.marked]
        try:
            if marked:
                self.worker.markers.delete(*marked)
        except redis.RedisError:
            logger.warning("could not mark %d pre hooks as done", len(marked), exc_info=True)
        for hook in pres:
            if hook.marked is None:  # from an older publisher
                self.worker._done(hook.delivery)
