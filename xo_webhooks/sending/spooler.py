"""The thread dispatcher's link to its spool: one thread that does all its I/O.

The request path and the delivery threads only append to a queue (:meth:`Spooler.keep`,
:meth:`~Spooler.release`, :meth:`~Spooler.forget`, :meth:`~Spooler.save_breaker`); the
spooler's thread writes what they said every :data:`COMMIT_INTERVAL` in one
transaction, a hook kept and forgotten within the same interval never touching the
disk. Every :data:`POLL_INTERVAL` it claims the hooks that are due (its own retries,
other processes' hooks, a dead process's) and hands them to the dispatcher with the
breaker states that other processes saved; every quarter of the lease it renews its
lease on the hooks it holds.

When the spool cannot be written (a full disk, a locked or corrupted file), the hooks
it was handed go back to the dispatcher, which keeps them in memory; the failure is
logged once, counted, and tried again every :data:`RETRY_INTERVAL`.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from .._urls import endpoint_of, mask_url
from .delivery import Delivery
from .spool import LEASE, Claimed, Row, Spool, owner_token

__all__ = ["Spooler", "SpoolClient", "COMMIT_INTERVAL", "POLL_INTERVAL"]

logger = logging.getLogger(__name__)

#: Seconds between two commits: a hook accepted this long before a crash is in the
#: spool (unless it was delivered meanwhile).
COMMIT_INTERVAL = 0.2
#: Seconds between two looks for hooks that are due, and at other processes' breakers.
POLL_INTERVAL = 1.0
#: Seconds between two tries of a spool that failed.
RETRY_INTERVAL = 5.0
#: Deletions kept for a spool that fails, at most: beyond, a hook delivered meanwhile
#: may be sent again after a restart (with its ``webhook-id``).
MAX_RETRIED_DELETES = 100_000


class SpoolClient(Protocol):
    """What the spooler asks of its dispatcher (each call takes the dispatcher's lock)."""

    def spool_room(self) -> tuple[int, dict[str, int]]:
        """Hooks it can take now in all, and how many each endpoint holds already."""

    def resume(self, due: list[Delivery], expired: list[Delivery]) -> None:
        """Take hooks claimed from the spool: to send, and to give up on."""

    def unspool(self, released: list[tuple[Delivery, float]]) -> None:
        """Take back hooks that could not be written: ``(delivery, due epoch)``."""

    def adopt(self, origin: str, fields: dict[str, Any]) -> None:
        """Another process saved this breaker state of *origin*."""

    def spool_looked(self) -> None:
        """The spooler wrote, or counted the hooks in the spool: wake ``flush()``."""

    def forget_pres(self, before: float, held: Callable[[list[str]], set[str]]) -> None:
        """Forget the spooled pre hooks (noted before *before*) that left the spool."""


#: Connections a forked child inherited: never used, never closed (SQLite's close
#: could checkpoint and remove the write-ahead log the parent still writes).
_INHERITED: list[Spool] = []

# An operation queued for the spool: (id, delivery or None to delete, owned, due,
# attempts, last error).
_Op = tuple[str, "Delivery | None", bool, float, int, "str | None"]


class Spooler:
    """Writes a dispatcher's hooks to the spool at *path* and claims them back.

    :param make_delivery: builds a :class:`Delivery` from a spooled message.
    :param deadline: when a hook waiting from *start* (epoch seconds) with *attempts*
        made is given up on: ``deadline(start, attempts)``.
    :param redact: the words to redact from payloads before they are written.
    :param probe_lease: seconds a probe holds its endpoint (see :func:`.endpoints.probe_lease`).
    :param per_endpoint: hooks of one endpoint that a claim brings into memory at most.
    """

    def __init__(
        self,
        path: str,
        client: SpoolClient,
        *,
        make_delivery: Callable[[dict[str, Any]], Delivery],
        deadline: Callable[[float, int], float],
        redact: tuple[str, ...],
        probe_lease: float,
        per_endpoint: int,
    ) -> None:
        self.path = path
        self._client = client
        self._make_delivery = make_delivery
        self._deadline = deadline
        self._redact = redact
        self._probe_lease = probe_lease
        self._per_endpoint = per_endpoint
        self._reset()

    def _reset(self) -> None:
        self.owner = owner_token()
        self.healthy = True  #: whether hooks go to the spool (else they stay in memory)
        self.errors = 0  #: failed spool transactions
        self.rows = 0  #: hooks in the spool, at the last count
        self.flushing = 0  #: flush() calls waiting: count the rows at every cycle
        self._dirty = True  # written since the last count (or never counted)
        self._closed = False
        self._ops: deque[_Op] = deque()  # releases and deletions, in order
        self._kept: deque[Delivery] = deque()  # hooks held here, to write
        self._breakers: deque[tuple[str, dict[str, Any]]] = deque()
        self._retried_deletes: dict[str, None] = {}
        self._spool: Spool | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._seen = 0.0  # the newest breaker state of another process adopted
        self._soonest = math.inf  # when the soonest hook this process spooled is due
        self._next_try = 0.0
        self._lock = threading.Lock()  # starting, closing, and writing after close

    # -- from any thread: queue, never block ------------------------------------------

    def keep(self, delivery: Delivery) -> None:
        """Write *delivery*, held by this process (the request path's one append)."""
        self._kept.append(delivery)

    def release(self, delivery: Delivery, due: float) -> None:
        """Write *delivery* for any process to send at *due* (epoch seconds)."""
        self._ops.append(
            (delivery.id, delivery, False, due, delivery.attempts, delivery.last_error)
        )
        if self._closed:
            self._late()

    def forget(self, delivery: Delivery) -> None:
        """*delivery* is done (delivered or given up on): remove it."""
        self._ops.append((delivery.id, None, False, 0.0, 0, None))
        if self._closed:
            self._late()

    def save_breaker(self, origin: str, fields: dict[str, Any]) -> None:
        """Share *origin*'s breaker state with the other processes."""
        self._breakers.append((origin, fields))

    def idle(self) -> bool:
        """Nothing left to write, and no hook in the spool at the last count."""
        idle = not self._ops and not self._kept
        return idle and (not self.healthy or (not self._dirty and self.rows == 0))

    def poke(self) -> None:
        """Write and look now (a flush is waiting)."""
        self._wake.set()

    # -- the thread -------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread, once."""
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="xo-webhooks-spool", daemon=True
                )
                self._thread.start()

    def close(self, timeout: float) -> None:
        """Write what is queued, free the hooks this process holds (the next one sends
        them), and stop the thread, waiting at most *timeout* seconds."""
        with self._lock:
            self._stop.set()
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join(timeout)
        else:
            self._finish()

    def after_fork(self) -> None:
        """In a child process: a new owner, no thread, no connection (never share one)."""
        if self._spool is not None:  # closing it here could delete the parent's WAL file
            _INHERITED.append(self._spool)
        self._reset()

    def _run(self) -> None:
        next_poll = next_renew = 0.0
        while True:
            stopping = self._stop.is_set()
            now = time.monotonic()
            if self._usable(now):
                written_at = time.monotonic()  # what was spooled before is in the file now
                self._write()
                due_soon = self._soonest <= time.time()
                if self.healthy and (now >= next_poll or self.flushing or due_soon):
                    if now >= next_renew:
                        self._guard(lambda s: s.renew(self.owner, time.time()), writes=True)
                        next_renew = now + LEASE / 4
                    more = False
                    if not stopping:
                        self._adopt_breakers()
                        more = self._claim()
                    self._count(written_at)
                    next_poll = now + (0 if more else POLL_INTERVAL)
            else:
                self._hand_back()
            self._client.spool_looked()
            if stopping:
                break
            self._wake.wait(COMMIT_INTERVAL)
            self._wake.clear()
        self._finish()

    def _finish(self) -> None:
        """The last write, then free this process's hooks and close the file. What
        comes after (an attempt that ended late) is written at once: :meth:`_late`."""
        with self._lock:
            self._closed = True
            if self._spool is None and not self._ops and not self._kept:
                return  # it never had anything to do
            if self._usable(time.monotonic(), final=True):
                self._write()
                self._guard(lambda spool: spool.release(self.owner), writes=True)
            else:
                self._hand_back()
            self._close_file()

    def _late(self) -> None:
        """After close(): an attempt in flight then has ended; write its outcome now,
        from its own thread (else the next process would send a delivered hook again)."""
        with self._lock:
            if self._usable(time.monotonic(), final=True):
                self._write()
            else:
                self._hand_back()
            self._close_file()

    def _close_file(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def _usable(self, now: float, final: bool = False) -> bool:
        """Whether the spool is open and working (opening it, or trying it again after
        a failure, at most every :data:`RETRY_INTERVAL`)."""
        if self.healthy and self._spool is not None:
            return True
        if now < self._next_try and not final:
            return False
        self._next_try = now + RETRY_INTERVAL
        if self._spool is None:
            try:
                self._spool = Spool(self.path)
            except (sqlite3.Error, OSError) as e:
                self._failed(e)
                return False
        # A write says whether it works (again): a read may pass on a locked file.
        return self._guard(lambda spool: spool.renew(self.owner, time.time()), writes=True)

    def _guard(self, action: Callable[[Spool], Any], writes: bool = False) -> bool:
        """Run *action* on the spool; on failure, note it and return ``False``. A
        successful write (*writes*) shows a failed spool works again."""
        assert self._spool is not None
        try:
            action(self._spool)
        except (sqlite3.Error, OSError) as e:
            self._failed(e)
            return False
        if writes and not self.healthy:
            self.healthy = True
            logger.info("spool %s works again: hooks are kept there again", self.path)
        return True

    def _failed(self, error: Exception) -> None:
        self.errors += 1
        if self.healthy:
            self.healthy = False
            logger.error(
                "spool %s failed (%s: %s): hooks are kept in memory meanwhile, and it is "
                "tried again every %g s", self.path, type(error).__name__, error, RETRY_INTERVAL,
            )  # fmt: skip

    # -- writing ----------------------------------------------------------------------

    def _take_ops(self) -> tuple[dict[str, _Op | None], list[tuple[str, dict[str, Any]]]]:
        """The queued operations, the last one of each hook winning (``None``: delete
        it); a hook kept and forgotten in the same batch is left out.

        Releases and deletions are taken before the hooks kept: a hook is kept before
        anything else happens to it, so its deletion is never in an earlier batch than
        its keeping, and a keeping that finds its deletion in the batch cancels both.
        """
        batch: dict[str, _Op | None] = dict(self._retried_deletes)
        self._retried_deletes.clear()
        self._dirty = self._dirty or bool(self._ops) or bool(self._kept)
        while self._ops:
            op = self._ops.popleft()
            batch[op[0]] = None if op[1] is None else op
        while self._kept:
            delivery = self._kept.popleft()
            if delivery.id not in batch:
                batch[delivery.id] = (delivery.id, delivery, True, 0.0, 0, None)
            elif batch[delivery.id] is None:
                del batch[delivery.id]  # kept, then done: it never needs the disk
        breakers = {}
        while self._breakers:
            origin, fields = self._breakers.popleft()
            breakers[origin] = fields
        return batch, list(breakers.items())

    def _write(self) -> None:
        batch, breakers = self._take_ops()
        if not batch and not breakers:
            return
        now = time.time()
        rows, deleted, released = [], [], []
        for hook_id, op in batch.items():
            if op is None:
                deleted.append(hook_id)
                continue
            row = self._row(op, now)
            if row is not None:
                rows.append(row)
                if not op[2]:
                    assert op[1] is not None
                    released.append((op[1], op[3]))
                    self._soonest = min(self._soonest, op[3])
        if self._guard(lambda spool: spool.write(rows, deleted, breakers, self.owner, now)):
            return
        self._keep_deletes(deleted)
        if released:  # never lost: they go back to memory
            self._client.unspool(released)

    def _row(self, op: _Op, now: float) -> Row | None:
        hook_id, delivery, owned, due, attempts, last_error = op
        assert delivery is not None
        if owned:  # as it is now: a delivery thread may have tried it meanwhile
            due, attempts, last_error = now, delivery.attempts, delivery.last_error
        try:
            delivery.redact(self._redact)
            message = {**delivery.to_message(), "attempts": attempts, "lastError": last_error,
                       "created": delivery.created}  # fmt: skip
            text = json.dumps(message, separators=(",", ":"))
        except Exception as e:  # a payload that cannot be encoded: it stays in memory
            logger.warning("hook %s cannot be spooled: %s", delivery.describe(), e)
            if not owned:
                self._client.unspool([(delivery, due)])
            return None
        url = delivery.hook.url
        return Row(hook_id, endpoint_of(url), url, json.dumps(delivery.call_id),
                   str(delivery.kind), text, due, self._deadline(due, attempts),
                   delivery.created, self.owner if owned else None)  # fmt: skip

    def _keep_deletes(self, deleted: list[str]) -> None:
        room = MAX_RETRIED_DELETES - len(self._retried_deletes)
        self._retried_deletes.update(dict.fromkeys(deleted[: max(0, room)]))
        if len(deleted) > room:
            logger.warning(
                "spool %s: %d finished hooks not removed", self.path, len(deleted) - room
            )

    def _hand_back(self) -> None:
        """The spool does not work: hooks released to it go back to memory."""
        batch, _ = self._take_ops()
        released = [(op[1], op[3]) for op in batch.values() if op is not None and not op[2]]
        self._keep_deletes([hook_id for hook_id, op in batch.items() if op is None])
        if released:
            self._client.unspool(released)  # type: ignore[arg-type]

    # -- reading ----------------------------------------------------------------------

    def _claim(self) -> bool:
        """Claim what is due (see :meth:`Spool.claim`); return whether more may be."""
        self._soonest = math.inf
        room, held = self._client.spool_room()
        if room <= 0:
            return False
        claimed: list[Claimed] = []
        self._guard(lambda spool: claimed.append(spool.claim(
            self.owner, time.time(), room, self._per_endpoint, held, self._probe_lease
        )))  # fmt: skip
        if claimed and (claimed[0].due or claimed[0].expired):
            self._client.resume(
                [self._delivery(m) for m in claimed[0].due],
                [self._delivery(m) for m in claimed[0].expired],
            )
        return bool(claimed) and claimed[0].more

    def _delivery(self, message: dict[str, Any]) -> Delivery:
        delivery = self._make_delivery(message)
        delivery.created = float(message.get("created") or delivery.created)
        return delivery

    def _adopt_breakers(self) -> None:
        found: list[list[tuple[str, dict[str, Any], float]]] = []
        self._guard(lambda s: found.append(s.breakers(self._seen, self.owner, time.time())))
        for origin, fields, updated in found[0] if found else []:
            self._client.adopt(origin, fields)
            self._seen = max(self._seen, updated)

    def _count(self, written_at: float) -> None:
        counted: list[int] = []
        dirty, self._dirty = self._dirty, False
        if self._guard(lambda spool: counted.append(spool.count())):
            self.rows = counted[0]
        else:
            self._dirty = dirty
        self._client.forget_pres(written_at, lambda ids: self._holds(ids))

    def _holds(self, ids: list[str]) -> set[str]:
        found: list[set[str]] = []
        self._guard(lambda spool: found.append(spool.holds(ids)))
        return found[0] if found else set(ids)

    def __repr__(self) -> str:
        return f"<Spooler {mask_url(self.path)} healthy={self.healthy} rows={self.rows}>"
