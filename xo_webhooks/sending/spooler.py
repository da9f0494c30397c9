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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from .._urls import endpoint_of, mask_passwords
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
#: Seconds: a spool that fails again within this time of its last error is not
#: logged again (a nearly full disk fails big writes and lets small ones through).
LOG_INTERVAL = 300.0
#: Deletions kept for a spool that fails, at most: beyond, a hook delivered meanwhile
#: may be sent again after a restart (with its ``webhook-id``).
MAX_RETRIED_DELETES = 100_000


@dataclass(frozen=True)
class SpoolClient:
    """What the spooler asks of its dispatcher (each call takes the dispatcher's lock)."""

    #: Hooks it can take now in all, and how many each endpoint holds already.
    room: Callable[[], tuple[int, dict[str, int]]]
    #: Take hooks claimed from the spool: to send, and to give up on.
    resume: Callable[[list[Delivery], list[Delivery]], None]
    #: Take back hooks that could not be written: ``(delivery, due epoch)``.
    unspool: Callable[[list[tuple[Delivery, float]]], None]
    #: Another process saved this breaker state of an endpoint.
    adopt: Callable[[str, dict[str, Any]], None]
    #: The spooler wrote, or counted the hooks in the spool: wake ``flush()``.
    looked: Callable[[], None]
    #: Forget the spooled pre hooks (noted before a time) that left the spool (the
    #: callable says which of some ids are there).
    forget_pres: Callable[[float, Callable[[list[str]], set[str]]], None]


#: Connections a forked child inherited: never used, never closed (SQLite's close
#: could checkpoint and remove the write-ahead log the parent still writes).
_INHERITED: list[Spool] = []


class _Op(NamedTuple):
    """A hook to write: held by this process (*owned*), or free, due at *due*."""

    delivery: Delivery
    owned: bool
    due: float = 0.0
    attempts: int = 0
    last_error: str | None = None


#: Failed: what :meth:`Spooler._guard` returns when the spool failed.
_FAILED: Any = object()


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
        self._flushing = 0  # flush() calls waiting: count the rows at every cycle
        self._dirty = True  # written since the last count (or never counted)
        self._closed = False
        self._ops: deque[tuple[str, _Op | None]] = deque()  # releases, deletions (None)
        self._kept: deque[Delivery] = deque()  # hooks held here, to write
        self._breakers: deque[tuple[str, dict[str, Any]]] = deque()
        self._retried_deletes: dict[str, None] = {}
        self._spool: Spool | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._seen = 0  # the version of the newest breaker state adopted
        self._soonest = math.inf  # when the soonest hook this process spooled is due
        self._next_try = 0.0
        self._logged_at = -math.inf  # when a failure, or its end, was last logged
        self._told = False  # a failure was logged, and not yet its end
        self._lock = threading.Lock()  # starting, closing, and writing after close
        self._in_flight: list[str] = []  # at close: attempts under way, kept leased

    # -- from any thread: queue, never block ------------------------------------------

    def keep(self, delivery: Delivery) -> None:
        """Write *delivery*, held by this process (the request path's one append)."""
        self._kept.append(delivery)
        if self._thread is None:  # a waitForResponse hook may come before any other
            self.start()

    def release(self, delivery: Delivery, due: float) -> None:
        """Write *delivery* for any process to send at *due* (epoch seconds)."""
        op = _Op(delivery, False, due, delivery.attempts, delivery.last_error)
        self._ops.append((delivery.id, op))
        if self._closed:
            self._write_late()

    def forget(self, delivery: Delivery) -> None:
        """*delivery* is done (delivered or given up on): remove it."""
        if self._thread is None:  # never started (or could not): it wrote nothing
            return
        self._ops.append((delivery.id, None))
        if self._closed:
            self._write_late()

    def save_breaker(self, origin: str, fields: dict[str, Any]) -> None:
        """Share *origin*'s breaker state with the other processes."""
        self._breakers.append((origin, fields))

    def idle(self) -> bool:
        """Nothing left to write, and no hook in the spool at the last count."""
        if self._ops or self._kept:  # a hook handed over: written, or back to memory soon
            return False
        return self.rows == 0 and not self._dirty

    def flushing(self, waiting: bool) -> None:
        """A ``flush()`` starts (*waiting*) or ends: while one waits, the spooler writes
        and counts at every cycle, starting now."""
        self._flushing += 1 if waiting else -1
        self._wake.set()

    def poke(self) -> None:
        """Write and look now, if a flush is waiting (memory just got empty)."""
        if self._flushing:
            self._wake.set()

    # -- the thread -------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread, once; a thread that cannot start (a process limit) leaves
        the hooks in memory, as a failing spool does, until a later call."""
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            thread = threading.Thread(target=self._run, name="xo-webhooks-spool", daemon=True)
            try:
                thread.start()
            except RuntimeError as e:
                self._failed(e)
                self._dirty = False  # never counted, never written: flush() waits for memory
                return
            self._thread = thread

    def close(self, timeout: float, in_flight: Iterable[str] = ()) -> None:
        """Write what is queued, free the hooks this process holds but those *in
        flight* (their attempts write their outcome when they end: :meth:`_write_late`),
        and stop the thread, waiting at most *timeout* seconds."""
        with self._lock:
            self._stop.set()
            self._in_flight = list(in_flight)
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
                if self.healthy and (now >= next_poll or self._flushing or due_soon):
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
            self._client.looked()
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
                self._guard(lambda spool: spool.release(self.owner, self._in_flight), True)
            else:
                self._hand_back()
            self._close_file()

    def _write_late(self) -> None:
        """After close(), an attempt that was in flight has ended: write its outcome
        now (else the next process would send a delivered hook again), from a thread
        of its own, since the caller holds the dispatcher's lock."""
        try:
            threading.Thread(target=self._late, name="xo-webhooks-spool-late").start()
        except RuntimeError:  # the interpreter is exiting: no new thread, and no wait
            self._late()

    def _late(self) -> None:
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
                self.rows, self._dirty = 0, False  # no hook can be sent from it: none waited for
                return False
        if self._ops or self._kept or self._retried_deletes:
            return True  # the write of what waits says whether it works again
        # A write says so: a read may pass on a locked file.
        renewed = self._guard(lambda spool: spool.renew(self.owner, time.time()), writes=True)
        return renewed is not _FAILED

    def _guard(self, action: Callable[[Spool], Any], writes: bool = False) -> Any:
        """Run *action* on the spool and return what it returns; on failure, note it
        and return :data:`_FAILED`. A write (*writes*) that works shows that a failed
        spool works again."""
        assert self._spool is not None
        try:
            result = action(self._spool)
        except (sqlite3.Error, OSError) as e:
            self._failed(e)
            return _FAILED
        if writes and not self.healthy:
            self.healthy = True
            if self._told:  # the failure was logged: so is the end of it
                logger.info("spool %s works again: hooks are kept there again", self.path)
                self._logged_at, self._told = time.monotonic(), False
        return result

    def _failed(self, error: Exception) -> None:
        self.errors += 1
        if not self.healthy:
            return
        self.healthy = False
        now = time.monotonic()
        if now - self._logged_at > LOG_INTERVAL:  # a full disk fails some writes, not all
            self._logged_at, self._told = now, True
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
        while self._ops:
            hook_id, op = self._ops.popleft()
            batch[hook_id] = op
        while self._kept:
            delivery = self._kept.popleft()
            if delivery.id not in batch:
                batch[delivery.id] = _Op(delivery, owned=True)
            elif batch[delivery.id] is None:
                del batch[delivery.id]  # kept, then done: it never needs the disk
        breakers = {}
        while self._breakers:
            origin, fields = self._breakers.popleft()
            breakers[origin] = fields
        return batch, list(breakers.items())

    def _write(self) -> None:
        was_dirty = self._dirty
        self._dirty = True  # before the queue empties: idle() must not see a gap
        batch, breakers = self._take_ops()
        if not batch and not breakers:
            self._dirty = was_dirty
            return
        now = time.time()
        rows, deleted, released = [], [], []
        for hook_id, op in batch.items():
            if op is None:
                deleted.append(hook_id)
                continue
            row = self._row(hook_id, op, now)
            if row is not None:
                rows.append(row)
                if not op.owned:
                    released.append((op.delivery, op.due))
                    self._soonest = min(self._soonest, op.due)
        written = self._guard(
            lambda spool: spool.write(rows, deleted, breakers, self.owner, now), writes=True
        )
        if written is not _FAILED:
            return
        self._dirty = was_dirty  # nothing changed in the file
        self._keep_deletes(deleted)
        if released:  # never lost: they go back to memory
            self._client.unspool(released)

    def _row(self, hook_id: str, op: _Op, now: float) -> Row | None:
        delivery, owned, due, attempts, last_error = op
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
        released = [(op.delivery, op.due) for op in batch.values() if op and not op.owned]
        self._keep_deletes([hook_id for hook_id, op in batch.items() if op is None])
        if released:
            self._client.unspool(released)

    # -- reading ----------------------------------------------------------------------

    def _claim(self) -> bool:
        """Claim what is due (see :meth:`Spool.claim`); return whether more may be."""
        self._soonest = math.inf
        room, held = self._client.room()
        if room <= 0:
            return False
        claimed: Claimed = self._guard(lambda spool: spool.claim(
            self.owner, time.time(), room, self._per_endpoint, held, self._probe_lease
        ), writes=True)  # fmt: skip
        if claimed is _FAILED:
            return False
        if claimed.due or claimed.expired:
            self._client.resume(
                [self._delivery(m) for m in claimed.due],
                [self._delivery(m) for m in claimed.expired],
            )
        return claimed.more

    def _delivery(self, message: dict[str, Any]) -> Delivery:
        delivery = self._make_delivery(message)
        delivery.created = float(message.get("created") or delivery.created)
        return delivery

    def _adopt_breakers(self) -> None:
        found = self._guard(lambda spool: spool.breakers(self._seen, self.owner, time.time()))
        for origin, fields, version in [] if found is _FAILED else found:
            self._client.adopt(origin, fields)
            self._seen = max(self._seen, version)

    def _count(self, written_at: float) -> None:
        counted = self._guard(lambda spool: spool.count())
        if counted is not _FAILED:
            self.rows = counted  # before it is said clean: idle() reads both
            self._dirty = False
        self._client.forget_pres(written_at, self._holds)

    def _holds(self, ids: list[str]) -> set[str]:
        found = self._guard(lambda spool: spool.holds(ids))
        return set(ids) if found is _FAILED else found

    def __repr__(self) -> str:
        return f"<Spooler {mask_passwords(self.path)} healthy={self.healthy} rows={self.rows}>"
