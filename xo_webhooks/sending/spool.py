"""The spool: hooks kept in a SQLite file, so that they outlive the process that
accepted them, shared by the processes of one host.

A row is one hook: its message (:meth:`.Delivery.to_message`, redacted), when it is due,
when its schedule runs out (its deadline), and who holds it. A process that holds a
hook in memory *owns* its row under a lease that it renews; a row with no owner, or
whose lease has run out, or whose owner is a process of this host that is gone, may be
*claimed* by any process. A call's post hook to a URL is never claimed while its pre
hook to that URL is in the spool. Each endpoint's circuit breaker is shared in its own
table, so that one process's probe serves all.

:class:`Spool` is storage only (no threads, no clock of its own): the dispatcher's
spooler (:mod:`.spooler`) calls it from one thread, ``xo-webhooks spool`` from the
command line. The file is in WAL mode with ``synchronous=NORMAL``: a transaction
committed is kept if the process is killed; a power cut may lose the last ones.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["Spool", "Row", "Claimed", "EndpointSummary", "owner_token"]

#: Seconds a process may hold a hook without renewing its lease (it renews every
#: quarter of that): after it, another process takes the hook over.
LEASE = 60.0
#: Seconds SQLite waits for another process's write to end before it gives up.
BUSY_TIMEOUT = 5.0
#: Seconds an endpoint's shared breaker state is kept without news (as in Redis).
BREAKER_TTL = 7 * 86400.0
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS hooks (
    id TEXT PRIMARY KEY,
    endpoint TEXT NOT NULL,
    url TEXT NOT NULL,
    call TEXT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    due REAL NOT NULL,
    deadline REAL NOT NULL,
    created REAL NOT NULL,
    owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS hooks_due ON hooks (endpoint, due);
CREATE INDEX IF NOT EXISTS hooks_deadline ON hooks (deadline);
CREATE INDEX IF NOT EXISTS hooks_owner ON hooks (owner);
CREATE INDEX IF NOT EXISTS hooks_call ON hooks (call, url, kind);
CREATE TABLE IF NOT EXISTS endpoints (
    origin TEXT PRIMARY KEY,
    breaker TEXT,
    updated REAL NOT NULL DEFAULT 0,
    writer TEXT,
    version INTEGER NOT NULL DEFAULT 0,
    probe_until REAL NOT NULL DEFAULT 0
);
"""
#: A row of the hooks table as written: see :meth:`Spool.write`.
COLUMNS = "id, endpoint, url, call, kind, message, due, deadline, created, owner, lease_until"


@dataclass(frozen=True)
class Row:
    """A hook as the spool keeps it.

    :param owner: the process that holds it in memory, or ``None`` (any may claim it).
    """

    id: str
    endpoint: str
    url: str
    call: str  #: the call's id, as JSON (``1`` and ``"1"`` differ)
    kind: str
    message: str  #: the JSON of :meth:`.Delivery.to_message`
    due: float
    deadline: float
    created: float
    owner: str | None

    def values(self, lease_until: float) -> tuple[Any, ...]:
        return (self.id, self.endpoint, self.url, self.call, self.kind, self.message,
                self.due, self.deadline, self.created, self.owner, lease_until)  # fmt: skip


#: An endpoint's breaker as another process saved it: origin, fields, and the version
#: of the save (a number that grows with each save, in the order they committed).
Shared = tuple[str, dict[str, Any], int]


@dataclass(frozen=True)
class Claimed:
    """What one claim took: hooks to send, and hooks whose schedule has run out; and
    whether it stopped at a limit (more may be due)."""

    due: list[dict[str, Any]]
    expired: list[dict[str, Any]]
    more: bool = False


@dataclass(frozen=True)
class EndpointSummary:
    """One endpoint's hooks in the spool, for ``xo-webhooks spool``."""

    endpoint: str
    due: int
    waiting: int
    leased: int
    oldest: float | None  #: epoch seconds the oldest hook was accepted
    state: str


def owner_token() -> str:
    """A name in the spool for one dispatcher of this process: its host, pid, and a
    random part (a process may have several dispatchers, and a later one the same pid).
    The host is the host name and the pid namespace: containers that share a host
    name (host networking) do not share pids."""
    token = f"{_host()}/{os.getpid()}/{os.urandom(4).hex()}"
    _OWNERS.add(token)
    return token


def _host() -> str:
    try:
        namespace = f"~{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # not Linux
        namespace = ""
    return socket.gethostname() + namespace


#: The owner tokens made by this process: another token with its pid is a former one.
_OWNERS: set[str] = set()


class Spool:
    """The spool file at *path* (created, with its folder, when missing).

    :raises sqlite3.Error: the file is locked past :data:`BUSY_TIMEOUT`, or is not a
        database (corrupted); :class:`OSError`: the folder cannot be created.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._db = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        try:
            self._prepare(time.monotonic() + BUSY_TIMEOUT)
        except BaseException:
            self._db.close()
            raise

    def _prepare(self, deadline: float) -> None:
        """WAL mode and the tables. Processes that open a new file together (the workers
        of a server starting) may find it locked while one of them sets it up: then
        this waits for it, up to the busy timeout."""
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version == SCHEMA_VERSION:
                    return
                if version > SCHEMA_VERSION:
                    raise sqlite3.DatabaseError(
                        f"spool schema {version} is newer than this version knows "
                        f"({SCHEMA_VERSION})"
                    )
                with self._transaction() as db:
                    for statement in SCHEMA.split(";"):
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once so that two processes never both
        read the same free rows before either writes."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    # -- writing ----------------------------------------------------------------------

    def write(
        self,
        rows: Iterable[Row],
        deleted: Iterable[str],
        breakers: Iterable[tuple[str, dict[str, Any]]],
        owner: str,
        now: float,
    ) -> None:
        """In one transaction: write *rows* (replacing rows with their ids), delete the
        rows with the ids in *deleted*, and save *breakers* (``(origin, fields)``)."""
        until = now + LEASE
        with self._transaction() as db:
            rows = list(rows)
            db.executemany(
                f"INSERT OR REPLACE INTO hooks ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [row.values(until if row.owner else 0.0) for row in rows],
            )
            db.executemany("DELETE FROM hooks WHERE id = ?", [(i,) for i in deleted])
            db.executemany(
                "INSERT OR IGNORE INTO endpoints (origin) VALUES (?)",
                [(origin,) for origin in {row.endpoint for row in rows}],
            )
            db.executemany(
                "INSERT INTO endpoints (origin, breaker, updated, writer, version) "
                "VALUES (?, ?, ?, ?, (SELECT coalesce(max(version), 0) + 1 FROM endpoints)) "
                "ON CONFLICT (origin) DO UPDATE SET breaker = excluded.breaker, "
                "updated = excluded.updated, writer = excluded.writer, "
                "version = excluded.version, probe_until = 0",
                [(o, json.dumps(fields), now, owner) for o, fields in breakers],
            )

    def renew(self, owner: str, now: float) -> None:
        """Renew the lease on every row *owner* holds, and free the rows of processes
        of this host that are gone (a crash, a SIGKILL)."""
        with self._transaction() as db:
            db.execute("UPDATE hooks SET lease_until = ? WHERE owner = ?", (now + LEASE, owner))
            holders = [
                r[0] for r in db.execute("SELECT DISTINCT owner FROM hooks WHERE owner IS NOT NULL")
            ]
            gone = [(h,) for h in holders if h != owner and _is_gone(h)]
            db.executemany("UPDATE hooks SET owner = NULL, lease_until = 0 WHERE owner = ?", gone)

    def release(self, owner: str, keep: Iterable[str] = ()) -> None:
        """Free every row *owner* holds but those in *keep*: it stops, the next process
        sends them. (*keep*: attempts still under way, whose outcome it writes later.)"""
        with self._transaction() as db:
            kept = {hook_id: None for hook_id in keep}
            held = db.execute("SELECT id FROM hooks WHERE owner = ?", (owner,)).fetchall()
            db.executemany(
                "UPDATE hooks SET owner = NULL, lease_until = 0 WHERE id = ?",
                [row for row in held if row[0] not in kept],
            )

    # -- claiming ---------------------------------------------------------------------

    def claim(
        self,
        owner: str,
        now: float,
        room: int,
        per_endpoint: int,
        held: dict[str, int],
        probe_lease: float,
    ) -> Claimed:
        """Take for *owner* every free hook whose deadline has passed (to be given up
        on), and hooks that are due and free: up to *room* in all, and up to
        *per_endpoint* of each endpoint, counting those *held* in memory already. An
        endpoint whose shared breaker is open gives none, or one when its probe is due
        (no other process's probe on its way)."""
        with self._transaction() as db:
            free = "(owner IS NULL OR lease_until < :now)"
            expired = db.execute(
                f"SELECT id, message FROM hooks WHERE deadline <= :now AND {free} LIMIT :room",
                {"now": now, "room": room},
            ).fetchall()
            more = len(expired) == room
            room -= len(expired)
            due: list[tuple[str, str]] = []
            for origin, fields, probe_until in db.execute(
                "SELECT origin, breaker, probe_until FROM endpoints"
            ).fetchall():
                limit = per_endpoint - held.get(origin, 0)
                gate = _gate(fields, probe_until, now)
                if gate == "wait" or room <= 0 or limit <= 0:
                    continue
                take = 1 if gate == "probe" else min(limit, room)
                found = db.execute(
                    "SELECT id, message FROM hooks h WHERE endpoint = :origin AND due <= :now "
                    f"AND deadline > :now AND {free} AND NOT (kind = 'post' AND EXISTS "
                    "(SELECT 1 FROM hooks p WHERE p.call = h.call AND p.url = h.url "
                    "AND p.kind = 'pre')) "
                    "ORDER BY due LIMIT :take",
                    {"origin": origin, "now": now, "take": take},
                ).fetchall()
                if found and gate == "probe":
                    db.execute(
                        "UPDATE endpoints SET probe_until = ? WHERE origin = ?",
                        (now + probe_lease, origin),
                    )
                due += found
                room -= len(found)
                more = more or (gate == "send" and len(found) == take)
            db.executemany(
                "UPDATE hooks SET owner = ?, lease_until = ? WHERE id = ?",
                [(owner, now + LEASE, row_id) for row_id, _ in expired + due],
            )
        return Claimed([json.loads(m) for _, m in due], [json.loads(m) for _, m in expired], more)

    def breakers(self, since: int, owner: str, now: float) -> list[Shared]:
        """The endpoints' breakers that processes other than *owner* saved after the
        version *since*, in the order they were saved, those older than
        :data:`BREAKER_TTL` aside."""
        rows = self._db.execute(
            "SELECT origin, breaker, version FROM endpoints WHERE breaker IS NOT NULL "
            "AND version > ? AND updated > ? AND writer IS NOT ? ORDER BY version",
            (since, now - BREAKER_TTL, owner),
        ).fetchall()
        return [(origin, json.loads(fields), version) for origin, fields, version in rows]

    def count(self) -> int:
        """How many hooks the spool holds."""
        return int(self._db.execute("SELECT count(*) FROM hooks").fetchone()[0])

    def holds(self, ids: Iterable[str]) -> set[str]:
        """Which of *ids* are in the spool."""
        ids = list(ids)
        found: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT id FROM hooks WHERE id IN ({marks})"
            found.update(r[0] for r in self._db.execute(query, chunk))
        return found

    # -- for the operator (xo-webhooks spool) -----------------------------------------

    def summary(self, now: float) -> list[EndpointSummary]:
        """Per endpoint: hooks due, waiting and leased, the oldest, the breaker state."""
        states = {
            origin: _state(fields, now, updated)
            for origin, fields, updated in self._db.execute(
                "SELECT origin, breaker, updated FROM endpoints"
            )
        }
        rows = self._db.execute(
            "SELECT endpoint, "
            "sum(lease_until < :now AND due <= :now), sum(lease_until < :now AND due > :now), "
            "sum(lease_until >= :now), min(created) FROM hooks GROUP BY endpoint",
            {"now": now},
        ).fetchall()
        found = {
            origin: EndpointSummary(
                origin, due, waiting, leased, oldest, states.get(origin, "closed")
            )
            for origin, due, waiting, leased, oldest in rows
        }
        for origin, state in states.items():  # down, or gone, with no hook waiting
            if origin not in found and state != "closed":
                found[origin] = EndpointSummary(origin, 0, 0, 0, None, state)
        return [found[origin] for origin in sorted(found)]

    def retry_now(self, now: float) -> int:
        """Make every waiting hook due now, and let a probe go now to every endpoint
        that is down; return how many hooks were waiting."""
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE hooks SET due = ? WHERE due > ? AND lease_until < ?", (now, now, now)
            ).rowcount
            for origin, fields in db.execute(
                "SELECT origin, breaker FROM endpoints WHERE breaker IS NOT NULL"
            ).fetchall():
                breaker = json.loads(fields)
                if breaker.get("state") in ("open", "half-open"):
                    breaker.update(state="open", probe_at=now, probe_until=0.0)
                    db.execute(
                        "UPDATE endpoints SET breaker = ?, updated = ?, writer = NULL, "
                        "probe_until = 0, version = (SELECT max(version) + 1 FROM endpoints) "
                        "WHERE origin = ?",
                        (json.dumps(breaker), now, origin),
                    )
        return int(changed)

    @contextmanager
    def taken(self, now: float) -> Iterator[list[dict[str, Any]]]:
        """Yield the messages of every hook no process holds, leased meanwhile (no
        process sends them, and the file is not locked while the caller works), and
        delete them once the caller is done; a failure in between frees them again."""
        owner = owner_token()
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, message FROM hooks WHERE lease_until < ? ORDER BY created", (now,)
            ).fetchall()
            ids = [(hook_id,) for hook_id, _ in rows]
            db.executemany(
                "UPDATE hooks SET owner = ?, lease_until = ? WHERE id = ?",
                [(owner, now + LEASE, hook_id) for hook_id, _ in rows],
            )
        try:
            yield [json.loads(message) for _, message in rows]
        except BaseException:
            with self._transaction() as db:
                db.executemany("UPDATE hooks SET owner = NULL, lease_until = 0 WHERE id = ?", ids)
            raise
        with self._transaction() as db:
            db.executemany("DELETE FROM hooks WHERE id = ?", ids)

    def __repr__(self) -> str:
        return f"Spool({self.path!r})"


def _gate(fields: str | None, probe_until: float, now: float) -> str:
    """``send``, ``probe`` or ``wait``: what an endpoint's shared breaker lets claims
    take (a disabled endpoint's hooks are taken, to be given up on at once)."""
    if fields is None:
        return "send"
    breaker = json.loads(fields)
    if breaker.get("state") not in ("open", "half-open"):
        return "send"
    next_probe = (
        breaker.get("probe_at", 0) if breaker["state"] == "open" else breaker.get("probe_until", 0)
    )
    return "probe" if next_probe <= now and probe_until < now else "wait"


def _state(fields: str | None, now: float, updated: float) -> str:
    if fields is None or updated < now - BREAKER_TTL:
        return "closed"
    return str(json.loads(fields).get("state", "closed"))


def _is_gone(owner: str) -> bool:
    """Whether *owner* is a process of this host that no longer runs."""
    host, _, rest = owner.partition("/")
    pid = rest.partition("/")[0]
    if host != _host() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():  # this pid: a dispatcher of ours, or a former process's
        return owner not in _OWNERS
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError as e:  # EPERM: it runs, as another user
        return e.errno != errno.EPERM
    return False
