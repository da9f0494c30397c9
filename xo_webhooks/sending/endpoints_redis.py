"""Endpoints shared by Celery workers: their circuit breakers, and the hooks parked in
Redis while they wait for an endpoint or a long retry delay.

Each endpoint's :class:`~.endpoints.Breaker` is one JSON value in Redis, changed only in
a ``WATCH``/``MULTI`` transaction, so that every worker on every host sees and moves the
same breaker. Its counters (delivered, failed, last success) are a hash beside it,
changed without a transaction. Both expire :data:`TTL` seconds after their last change.

A hook that must wait longer than a broker message may be held (Celery's ``countdown``
beyond the visibility timeout is delivered twice with Redis), or that waits for an open
endpoint, is **parked**: a member of a sorted set per endpoint, scored by when it is
due. Workers move due hooks back to the queue (:meth:`Parking.move_due`): a Lua script
claims them (moves them to a claims set with a lease), the worker publishes each, then
drops its claim. A worker killed in between leaves the claim, which another worker takes
back once its lease has passed: parked hooks are never lost, at worst sent twice (with
the same ``webhook-id``).

Needs the ``redis`` package (the ``celery`` extra).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import redis

from .endpoints import GONE_STATUS, Breaker, Gate, log_transition
from .policy import Attempt

__all__ = ["SharedBreakers", "Parking", "TTL", "PREFIX"]

logger = logging.getLogger(__name__)

PREFIX = "xo-webhooks"
#: Seconds an endpoint's breaker and counters live after their last change (a disabled
#: endpoint is enabled again after that, or when its key is deleted).
TTL = 7 * 86400
#: Seconds a worker has to publish a claimed hook before another may take it back.
CLAIM_LEASE = 60.0
#: Most parked hooks one worker claims at once.
CLAIM_BATCH = 100


def _breaker_key(origin: str) -> str:
    return f"{PREFIX}:endpoint:{origin}"


def _counts_key(origin: str) -> str:
    return f"{PREFIX}:endpoint-counts:{origin}"


def _waited_key(origin: str) -> str:
    return f"{PREFIX}:endpoint-waited:{origin}"


class SharedBreakers:
    """The breakers of every endpoint, in Redis.

    :param client: the redis-py client.
    :param threshold: consecutive outage failures that open a breaker.
    :param lease: seconds a probe has to report (see :func:`.endpoints.probe_lease`).
    """

    def __init__(self, client: redis.Redis, threshold: int, lease: float) -> None:
        self.client = client
        self.threshold = threshold
        self.lease = lease

    def load(self, origin: str) -> Breaker:
        """The breaker of *origin* as Redis has it now (closed when it has none)."""
        return self._parse(self.client.get(_breaker_key(origin)))

    def _parse(self, raw: Any) -> Breaker:
        if not raw:
            return Breaker(self.threshold)
        return Breaker.from_dict(self.threshold, json.loads(raw))

    def admit(self, origin: str) -> tuple[Gate, Breaker]:
        """Whether a hook to *origin* may be sent now; a half-open breaker's probe is
        given to one worker only."""
        breaker = self.load(origin)
        if breaker.state in ("closed", "disabled"):  # the common case costs one GET
            return breaker.admit(time.time(), self.lease), breaker
        return self._change(origin, lambda b: b.admit(time.time(), self.lease))

    def record(self, origin: str, attempt: Attempt) -> tuple[str | None, Breaker, float | None]:
        """Count one attempt's result; return the transition it caused, the breaker, and
        when the endpoint had opened (before this attempt; ``None`` if it was not open)."""
        now = time.time()
        counts = self.client.pipeline(transaction=False)
        if attempt.delivered:
            counts.hset(_counts_key(origin), "last_success", now)
            counts.expire(_counts_key(origin), TTL)
            counts.execute()
        breaker = self.load(origin)
        unchanged = breaker.state == "closed" and breaker.failures == 0
        if unchanged and not attempt.retryable and attempt.status != GONE_STATUS:
            return None, breaker, None  # nothing to change: no transaction
        opened_at: list[float | None] = []

        def change(breaker: Breaker) -> str | None:
            opened_at[:] = [breaker.opened_at]
            return breaker.record(attempt, now)

        transition, breaker = self._change(origin, change)
        return transition, breaker, opened_at[0]

    def settle(self, origin: str, attempt: Attempt, parking: Parking) -> tuple[str | None, Breaker]:
        """Everything an attempt's result changes for *origin*: its breaker and counters;
        when it is back, or gone, its parked hooks made due now (to flow, or to be given
        up on at once); and one log line per transition. Returns the transition, if
        any, and the breaker."""
        transition, breaker, down_since = self.record(origin, attempt)
        if attempt.delivered:
            self.count(origin, "delivered")
        waited = gone = 0
        if transition == "closed":
            waited = self.take_waited(origin)
        if transition == "disabled":
            gone = parking.count(origin)
        if transition in ("closed", "disabled"):
            parking.release(origin)
        log_transition(origin, breaker, transition, down_since, waited, gone)
        return transition, breaker

    def count(self, origin: str, field: str) -> None:
        """Add one to *origin*'s ``delivered`` or ``failed`` counter."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hincrby(_counts_key(origin), field, 1)
        pipe.expire(_counts_key(origin), TTL)
        pipe.execute()

    def delivered(self, origin: str, count: int) -> None:
        """*count* hooks were delivered to *origin*, whose breaker is closed without
        failures (so it does not change): its counters, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(_counts_key(origin), "last_success", time.time())
        pipe.hincrby(_counts_key(origin), "delivered", count)
        pipe.expire(_counts_key(origin), TTL)
        pipe.execute()

    def note_waiting(self, origin: str, delivery_id: str) -> None:
        """A hook waits for *origin* to be back (counted once however often it waits)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.sadd(_waited_key(origin), delivery_id)
        pipe.expire(_waited_key(origin), TTL)
        pipe.execute()

    def take_waited(self, origin: str) -> int:
        """How many hooks waited during the outage that just ended (and start again)."""
        pipe = self.client.pipeline()
        pipe.scard(_waited_key(origin))
        pipe.delete(_waited_key(origin))
        waited, _ = pipe.execute()
        return int(waited)

    def _change(self, origin: str, change: Callable[[Breaker], Any]) -> tuple[Any, Breaker]:
        """Apply *change* to the breaker in a transaction; return its result."""
        key = _breaker_key(origin)
        outcome: list[tuple[Any, Breaker]] = []

        def apply(pipe: redis.client.Pipeline) -> None:
            outcome.clear()
            breaker = self._parse(pipe.get(key))
            before = breaker.to_dict()
            result = change(breaker)
            outcome.append((result, breaker))
            pipe.multi()
            if breaker.to_dict() != before:
                pipe.set(key, json.dumps(breaker.to_dict()), ex=TTL)

        self.client.transaction(apply, key)
        return outcome[0]

    def stats(self, origin: str, pending: int) -> dict[str, Any]:
        """What ``endpoint_stats()`` shows of *origin* (see the thread dispatcher's)."""
        breaker = self.load(origin)
        counts = {_text(k): v for k, v in self.client.hgetall(_counts_key(origin)).items()}
        last_success = counts.get("last_success")
        breaker.last_success = float(last_success) if last_success else None  # kept apart
        delivered, failed = int(counts.get("delivered", 0)), int(counts.get("failed", 0))
        return breaker.stats(pending, delivered, failed)


# Claim up to ARGV[3] due hooks: from the parked set (due by ARGV[1]) and from claims
# whose lease has passed, into the claims set, leased until ARGV[2].
_CLAIM = """
local out = {}
for _, source in ipairs({KEYS[2], KEYS[1]}) do
  local due = redis.call('ZRANGEBYSCORE', source, '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
  for _, member in ipairs(due) do
    redis.call('ZREM', source, member)
    redis.call('ZADD', KEYS[2], ARGV[2], member)
    table.insert(out, member)
  end
end
if redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2]) == 0 then
  redis.call('SREM', KEYS[3], ARGV[4])
end
return out
"""


class Parking:
    """Hooks parked in Redis until they are due, per endpoint.

    :param client: the redis-py client.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._claim = client.register_script(_CLAIM)
        self._registry = f"{PREFIX}:parked-endpoints"

    def _keys(self, origin: str) -> tuple[str, str]:
        return f"{PREFIX}:parked:{origin}", f"{PREFIX}:parked-claims:{origin}"

    def park(self, origin: str, message: dict[str, Any], due: float) -> None:
        """Keep *message* until *due* (epoch seconds)."""
        parked, _ = self._keys(origin)
        # A fresh nonce makes each parking a member of its own: a hook parked again
        # while an older copy is still claimed is never confused with it.
        member = json.dumps({**message, "parkId": secrets.token_hex(8)}, separators=(",", ":"))
        pipe = self.client.pipeline()
        pipe.zadd(parked, {member: due})
        pipe.sadd(self._registry, origin)
        pipe.execute()

    def release(self, origin: str) -> None:
        """Make every hook parked for *origin* due now (the endpoint is back)."""
        parked, _ = self._keys(origin)
        now = time.time()
        members: list[Any] = self.client.zrange(parked, 0, -1)
        if members:
            self.client.zadd(parked, {member: now for member in members}, xx=True, lt=True)

    def count(self, origin: str) -> int:
        """Hooks parked for *origin*, claimed ones included."""
        pipe = self.client.pipeline(transaction=False)
        for key in self._keys(origin):
            pipe.zcard(key)
        return sum(pipe.execute())

    def move_due(self, publish: Callable[[dict[str, Any]], None], limit: int = 1000) -> int:
        """Publish the hooks that are due, at most *limit*; return how many. A hook
        whose publish fails stays claimed and comes back after the lease."""
        moved = 0
        for raw_origin in self.client.smembers(self._registry):
            origin = _text(raw_origin)
            parked, claims = self._keys(origin)
            while moved < limit:
                now = time.time()
                members = self._claim(
                    keys=[parked, claims, self._registry],
                    args=[now, now + CLAIM_LEASE, CLAIM_BATCH, origin],
                )
                for member in members:
                    publish(json.loads(member))
                    self.client.zrem(claims, member)
                    moved += 1
                if len(members) < CLAIM_BATCH:
                    break
        return moved


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
