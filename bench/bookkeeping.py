"""Scenario 13: what the per-endpoint bookkeeping of issue #12 costs per hook: the
lanes (:mod:`xo_webhooks.sending.lanes`: a lane per endpoint, its concurrency, its share
of the pending bound, round-robin) and the circuit breaker
(:mod:`xo_webhooks.sending.endpoints`: admit and record per attempt).

The baseline is the same dispatcher, in the same run, with its lanes replaced by
:class:`OneQueue`: one FIFO queue for every hook, bounded by the queue size alone, and a
breaker that never trips, which is what the dispatcher kept before #12. Everything else
is today's code, so that the ratio is the bookkeeping's alone: the code before #12
(``806067f``) would also lack what #13-#16 and #18 added to the dispatcher since. The
calls the dispatcher makes into its lanes stay on both sides; only what they do goes.

a. Delivery: this process's CPU per hook (``time.process_time``) through a
   :class:`ThreadDispatcher` with 4 workers to the fast receiver, one dispatcher per
   side for the whole run, the sides alternating every tenth of a round (as in
   scenarios 9, 11 and 12). ``XO_WEBHOOKS_ENDPOINT_CONCURRENCY`` is 4 on both sides,
   so that the same number of attempts is in flight (by default one endpoint gets
   half of the workers, a throughput choice that scenario 8 shows, not a cost).
b. The calls alone: the ones the dispatcher makes into the lanes and the breaker for
   one delivered hook (``submit()``'s on the request thread; the worker's take, the
   breaker's record, the count), in its order and with its arguments, on the real
   lanes, in this thread (``time.thread_time``), no dispatcher around them.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from apps import hook
from common import Row, Spread, ratios
from observability import SLICES, WORKERS, DeliverySide, interleaved_cpu
from throughput import payloads

from xo_webhooks import load_settings
from xo_webhooks.config import Settings
from xo_webhooks.sending.delivery import Delivery
from xo_webhooks.sending.dispatcher import ThreadDispatcher
from xo_webhooks.sending.endpoints import Breaker, Gate, log_transition, probe_lease
from xo_webhooks.sending.lanes import Lane, Lanes
from xo_webhooks.sending.policy import Attempt, RetryPolicy

#: Chosen, not set by #12 (which set no cost): within 10% of the CPU per hook without
#: it, the bound #13 set for what its spool adds to the request path.
BOUND = 1.10
DELIVERED = Attempt(True, status=204)


class NoBreaker(Breaker):
    """A breaker that never trips: every hook may go, no attempt is counted."""

    def admit(self, now: float, lease: float) -> Gate:
        return Gate.SEND

    def record(self, attempt: Attempt, now: float) -> str | None:
        return None


class OneQueue(Lanes):
    """The lanes' interface over one FIFO queue for every hook: no endpoints, no
    concurrency limit, no shares (the queue size is the only bound), no breaker."""

    def __init__(self, settings: Settings, policy: RetryPolicy, others: Iterable[str] = ()) -> None:
        self.policy = policy
        self.queue_size = settings.queue_size
        self.pending = 0
        self._one = Lane("every endpoint", settings.breaker_threshold, 0)
        self._one.breaker = NoBreaker(settings.breaker_threshold)
        self._order = [self._one]
        self._ready: deque[Delivery] = deque()

    def of(self, delivery: Delivery) -> Lane:
        return self._one

    def lane(self, origin: str) -> Lane:
        return self._one

    def refusal(self, lane: Lane) -> str | None:
        return "queue full" if self.pending >= self.queue_size else None

    def count(self, lane: Lane, change: int) -> None:
        self.pending += change

    def put(self, lane: Lane, delivery: Delivery, now: float) -> None:
        self._ready.append(delivery)

    def park(self, lane: Lane, now: float) -> None:
        pass

    def unpark(self, lane: Lane) -> None:
        pass

    def expired(self, now: float) -> list[tuple[Lane, Delivery]]:
        return []

    def gone(self) -> list[tuple[Lane, Delivery]]:
        return []

    def drain(self, lane: Lane | None = None) -> list[Delivery]:
        out = list(self._ready)
        self._ready.clear()
        return out

    def take(self, now: float, lease: float) -> tuple[Lane, Delivery] | None:
        if not self._ready:
            return None
        self._one.in_flight += 1  # the dispatcher before #12 counted it too
        return self._one, self._ready.popleft()

    def saturated(self, lane: Lane) -> bool:
        return False

    def next_wake(self, now: float, now_epoch: float) -> float | None:
        return None

    def held(self) -> dict[str, int]:
        return {self._one.origin: self.pending} if self.pending else {}


class OneQueueDispatcher(ThreadDispatcher):
    """Today's :class:`ThreadDispatcher` on :class:`OneQueue`."""

    def _reset(self) -> None:
        super()._reset()
        self._lanes = OneQueue(self.settings, self.policy)


def calls_alone(settings: Settings, make: type[Lanes], count: int) -> tuple[float, float]:
    """Replay what the dispatcher asks of its lanes and breaker for *count* delivered
    hooks, a burst as in (a): each hook's ``submit()`` part, then each one's worker
    part. Returns the thread CPU seconds of the two parts."""
    policy = RetryPolicy.from_settings(settings)
    lanes = make(settings, policy)
    lease = probe_lease(settings.timeout)
    target = settings.hooks[0]
    batch = [Delivery(target, p) for p in payloads(count)]
    gc.collect()
    start = time.thread_time()
    for delivery in batch:  # submit(), _refusal(), _spools(), _count_in(), under the lock
        lane = lanes.of(delivery)
        if lane.breaker.state != "disabled":
            lanes.refusal(lane)
        if lane.breaker.state == "closed":
            lanes.count(lane, +1)
            lanes.put(lane, delivery, time.monotonic())
            lanes.saturated(lane)
    submitted = time.thread_time()
    for _ in batch:  # _next_work(), then _settle() of a delivered hook
        now = time.monotonic()
        lanes.expired(now)
        lanes.gone()
        taken = lanes.take(time.time(), lease)
        if taken is None:
            raise RuntimeError(f"{make.__name__} gave no hook to send")
        lane = taken[0]
        lane.in_flight -= 1
        breaker = lane.breaker
        down_since, waited = breaker.opened_at, len(lane.waited)
        transition = breaker.record(DELIVERED, time.time())
        lane.delivered += 1
        lanes.count(lane, -1)
        log_transition(lane.origin, breaker, transition, down_since, waited, 0)
    done = time.thread_time()
    if lanes.pending:
        raise RuntimeError(f"{make.__name__}: {lanes.pending} hooks left pending")
    return submitted - start, done - submitted


def run(url: str, rounds: int, count: int, receiver: str) -> list[Row]:
    extra: dict[str, Any] = {"endpoint_concurrency": WORKERS}
    sides = {
        "lanes": DeliverySide(url, **extra),
        "one queue": DeliverySide(url, dispatcher=OneQueueDispatcher, **extra),
    }
    if not isinstance(sides["one queue"].dispatcher._lanes, OneQueue):
        raise RuntimeError("the baseline dispatcher does not use one queue")
    try:
        cpu, rate = interleaved_cpu(sides, count, rounds)  # type: ignore[arg-type]
        stats = sides["lanes"].dispatcher.endpoint_stats()
    finally:
        for side in sides.values():
            side.close()
    (endpoint,) = stats.values()
    if endpoint["state"] != "closed" or endpoint["delivered"] != sides["lanes"].sent:
        raise RuntimeError(f"the lanes' side: {stats}")

    settings = load_settings([hook("vm.start", url)], {}, max_workers=WORKERS, **extra)
    alone: dict[str, list[tuple[float, float]]] = {"lanes": [], "one queue": []}
    for i in range(1 + rounds):  # the first round warms up
        for name, make in (("lanes", Lanes), ("one queue", OneQueue))[:: 1 if i % 2 else -1]:
            spent = calls_alone(settings, make, count)
            if i:
                alone[name].append(spent)
    per_hook = {  # microseconds: submit() part, worker part
        name: ([s / count * 1e6 for s, _ in v], [w / count * 1e6 for _, w in v])
        for name, v in alone.items()
    }
    whole = [s + w for s, w in zip(*per_hook["lanes"], strict=True)]
    share = [a / c for a, c in zip(whole, cpu["lanes"], strict=True)]
    detail = {
        "receiver": receiver,
        "hooks_per_round": count,
        "slices": SLICES,
        "workers": WORKERS,
        "endpoint_concurrency": WORKERS,
        **{f"{name}_hooks_per_s": Spread.of(r).__dict__ for name, r in rate.items()},
        "hooks_per_s_lanes_over_one_queue": ratios(rate["lanes"], rate["one queue"]).__dict__,
        "calls_alone_share_of_delivery_cpu": Spread.of(share).__dict__,
        "calls_alone_on_one_queue_us": Spread.of(
            [s + w for s, w in zip(*per_hook["one queue"], strict=True)]
        ).__dict__,
    }
    added = [a - b for a, b in zip(cpu["lanes"], cpu["one queue"], strict=True)]
    return [
        Row("13", "delivery, per-endpoint lanes + breaker / one queue: CPU per hook",
            ratios(cpu["lanes"], cpu["one queue"]), target=f"<= {BOUND:.2f}", detail=detail),
        Row("13", "  added CPU per hook", Spread.of(added), unit="us"),
        Row("13", "  CPU per hook, one queue", Spread.of(cpu["one queue"]), unit="us"),
        Row("13", "  the lanes' and breaker's calls alone, per hook", Spread.of(whole),
            unit="us"),
        Row("13", "    of which in submit() (the request thread)",
            Spread.of(per_hook["lanes"][0]), unit="us"),
    ]  # fmt: skip
