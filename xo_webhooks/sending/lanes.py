"""The thread dispatcher's bookkeeping per endpoint: one lane per endpoint.

A lane holds its endpoint's hooks that wait to be sent (in order), counts its attempts
in flight against ``XO_WEBHOOKS_ENDPOINT_CONCURRENCY``, and keeps its circuit breaker
and counters. :class:`Lanes` shares the pending bound fairly and hands workers the next
hook round-robin over the endpoints that may be sent to, so that a hung endpoint holds
at most its concurrency of the workers and its backlog never refuses another's hooks.

No threads and no I/O here: the dispatcher calls every method with its lock held.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from ..config import Settings
from .delivery import Delivery
from .endpoints import Breaker, Gate, endpoint_of
from .policy import RetryPolicy

__all__ = ["Lane", "Lanes"]


class Lane:
    """One endpoint's hooks, attempts and breaker.

    :param origin: the endpoint (see :func:`.endpoints.endpoint_of`).
    :param threshold: its breaker's threshold.
    :param share: places of the pending bound kept for it.
    """

    def __init__(self, origin: str, threshold: int, share: int) -> None:
        self.origin = origin
        self.breaker = Breaker(threshold)
        self.share = share
        self.waiting: OrderedDict[int, Delivery] = OrderedDict()  # due, in order
        self.deadlines: dict[int, float] = {}  # waiting hooks' give-up times, while not closed
        self.in_flight = 0  # attempts by the workers
        self.waited: set[int] = set()  # hooks that waited during the current outage
        self.pending = 0  # accepted and not finished: waiting, held, retrying, in flight
        self.delivered = 0
        self.failed = 0

    def stats(self) -> dict[str, Any]:
        """What ``endpoint_stats()`` shows of this endpoint."""
        return self.breaker.stats(self.pending, self.delivered, self.failed)


class Lanes:
    """Every endpoint's lane, the fair share of the pending bound, and the choice of
    the next hook to send.

    Each configured endpoint keeps ``QUEUE_SIZE // endpoints`` places of the bound for
    itself; the rest is free for any endpoint. A hook is refused only when its endpoint
    holds its share already and the free places left are kept for the others.

    :param settings: the hooks (their endpoints), queue size, concurrency, threshold.
    :param policy: how long a waiting hook may wait (its schedule's remaining delays).
    :param others: endpoints besides the configured ones that keep a share (a replay's).
    """

    def __init__(self, settings: Settings, policy: RetryPolicy, others: Iterable[str] = ()) -> None:
        self.policy = policy
        self.concurrency = settings.endpoint_concurrency
        self.queue_size = settings.queue_size
        self.threshold = settings.breaker_threshold
        origins = dict.fromkeys([*(endpoint_of(hook.url) for hook in settings.hooks), *others])
        share = self.queue_size // max(1, len(origins))
        self._lanes: dict[str, Lane] = {}
        self._order: list[Lane] = []
        self._turn = 0
        self.pending = 0
        self._kept = 0  # places kept for lanes under their share
        self._deadlines: list[tuple[float, int, Lane, int]] = []  # heap
        self._seq = itertools.count()
        for origin in origins:
            self._add_lane(origin, share)

    def _add_lane(self, origin: str, share: int) -> Lane:
        lane = self._lanes[origin] = Lane(origin, self.threshold, share)
        self._order.append(lane)
        self._kept += share
        return lane

    def of(self, delivery: Delivery) -> Lane:
        """The lane of *delivery*'s endpoint (a new one, with no share, for an endpoint
        that was not given: it only borrows free places)."""
        return self.lane(endpoint_of(delivery.hook.url))

    def lane(self, origin: str) -> Lane:
        """The lane of endpoint *origin* (see :meth:`of`)."""
        lane = self._lanes.get(origin)
        return lane if lane is not None else self._add_lane(origin, 0)

    # -- the pending bound ------------------------------------------------------------

    def refusal(self, lane: Lane) -> str | None:
        """Why a new hook to *lane* cannot be accepted now, or ``None``."""
        if self.pending >= self.queue_size:
            return "queue full"
        if lane.pending < lane.share or self.pending + self._kept < self.queue_size:
            return None
        return (
            f"queue full for endpoint {lane.origin}: it has {lane.pending} hooks pending, "
            f"its share of XO_WEBHOOKS_QUEUE_SIZE={self.queue_size} is {lane.share}, and "
            "the places left are kept for other endpoints"
        )

    def count(self, lane: Lane, change: int) -> None:
        """Add *change* (+1 accepted, -1 finished) to the pending hooks of *lane*."""
        before = max(0, lane.share - lane.pending)
        lane.pending += change
        self.pending += change
        self._kept += max(0, lane.share - lane.pending) - before

    # -- waiting hooks ----------------------------------------------------------------

    def put(self, lane: Lane, delivery: Delivery, now: float) -> None:
        """Queue *delivery*, due now, on its lane; while the endpoint is not closed it
        waits, until its schedule would have run out (``now`` is monotonic)."""
        lane.waiting[id(delivery)] = delivery
        if lane.breaker.state != "closed":
            self._set_deadline(lane, delivery, now)
            lane.waited.add(id(delivery))

    def park(self, lane: Lane, now: float) -> None:
        """The endpoint just opened: its waiting hooks get their give-up times."""
        for delivery in lane.waiting.values():
            self._set_deadline(lane, delivery, now)
        lane.waited.update(lane.waiting)

    def unpark(self, lane: Lane) -> None:
        """The endpoint closed again: its hooks no longer expire."""
        lane.waited.clear()
        lane.deadlines.clear()
        self._deadlines = [entry for entry in self._deadlines if entry[2] is not lane]
        heapq.heapify(self._deadlines)

    def _set_deadline(self, lane: Lane, delivery: Delivery, now: float) -> None:
        key = id(delivery)
        deadline = now + self.policy.remaining(delivery.attempts)
        lane.deadlines[key] = deadline
        heapq.heappush(self._deadlines, (deadline, next(self._seq), lane, key))

    def expired(self, now: float) -> list[tuple[Lane, Delivery]]:
        """Remove and return the waiting hooks whose schedule has run out."""
        out = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, _, lane, key = heapq.heappop(self._deadlines)
            if lane.deadlines.get(key) == deadline:
                del lane.deadlines[key]
                out.append((lane, lane.waiting.pop(key)))
        return out

    def gone(self) -> list[tuple[Lane, Delivery]]:
        """Remove and return the waiting hooks of disabled endpoints (a post hook
        released there when its pre hook was given up on)."""
        return [
            (lane, delivery)
            for lane in self._order
            if lane.breaker.state == "disabled" and lane.waiting
            for delivery in self.drain(lane)
        ]

    def drain(self, lane: Lane | None = None) -> list[Delivery]:
        """Remove and return the waiting hooks of *lane* (of every lane by default)."""
        lanes = self._order if lane is None else [lane]
        out: list[Delivery] = []
        for each in lanes:
            out += each.waiting.values()
            each.waiting.clear()
            each.deadlines.clear()
        return out

    # -- choosing the next hook -------------------------------------------------------

    def take(self, now: float, lease: float) -> tuple[Lane, Delivery] | None:
        """The next hook to send, round-robin over the lanes that may send one now (a
        closed one under its concurrency, or an open one whose probe is due), counted
        in flight; ``None`` when there is none. *now* is epoch seconds."""
        count = len(self._order)
        for step in range(count):
            lane = self._order[(self._turn + step) % count]
            if not lane.waiting:
                continue
            if lane.breaker.state == "closed":
                if lane.in_flight >= self.concurrency:
                    continue
            elif lane.breaker.admit(now, lease) is not Gate.PROBE:
                continue
            self._turn = (self._turn + step + 1) % count
            key, delivery = lane.waiting.popitem(last=False)
            lane.deadlines.pop(key, None)
            lane.in_flight += 1
            return lane, delivery
        return None

    def saturated(self, lane: Lane) -> bool:
        """Whether *lane* is closed and has its concurrency in flight: a hook queued
        there waits for an attempt to end, and waking a worker for it would be wasted
        (the request path pays for that wake-up)."""
        return lane.breaker.state == "closed" and lane.in_flight >= self.concurrency

    def next_wake(self, now: float, now_epoch: float) -> float | None:
        """Seconds until a waiting hook's give-up time or an endpoint's probe; ``None``
        when nothing is due to happen."""
        times = [self._deadlines[0][0] - now] if self._deadlines else []
        for lane in self._order:
            if lane.waiting and lane.breaker.state in ("open", "half-open"):
                times.append(lane.breaker.next_probe() - now_epoch)
        return max(0.0, min(times)) if times else None

    def held(self) -> dict[str, int]:
        """The hooks each endpoint holds in memory (its pending ones)."""
        return {lane.origin: lane.pending for lane in self._order if lane.pending}

    def stats(self) -> dict[str, dict[str, Any]]:
        """``endpoint_stats()``: each endpoint's :meth:`Lane.stats`."""
        return {lane.origin: lane.stats() for lane in self._order}
