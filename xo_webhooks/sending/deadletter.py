"""Dead-letter stores: what one is (:class:`DeadLetterStore`), and the file, hooks that
could not be delivered, one JSON object a line (the Redis list is in
:mod:`.deadletter_redis`; :func:`.policy.open_dead_letter` picks one).

Writers of the file (threads and processes alike) take its exclusive ``flock`` for
each append, so records never interleave, and an append that fails (a full disk) is
undone: no torn record is left, the caller counts the hooks lost. A crash mid-write can
damage only the line being written; the next append starts on a line of its own.

A replay takes the file by locking it and renaming it to a working file,
``<path>.replaying-<pid>-<random>``, and keeps that lock until it is done; the app's
appends go to a new file meanwhile. A working file nobody holds the lock of was left
by a replay that died, and the next replay takes it too: the lock, not the pid (reused,
or another pid namespace's), says whether its owner is alive.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

from .._urls import parse_http_url
from .formats import FORMATS

__all__ = [
    "OVER_LIMIT",
    "classify",
    "DeadLetterStore",
    "DeadLetterFile",
    "Taken",
    "read_records",
    "parse_record",
    "record_problem",
]

logger = logging.getLogger(__name__)

#: The ``kind`` of a notice: a record of the hooks of calls over
#: ``XO_WEBHOOKS_MAX_CALLS``, never sent (see :mod:`..request.overlimit`). A replay keeps
#: it as it is and counts it apart: it is not a hook to send, nor a damaged line.
OVER_LIMIT = "over_limit"

#: Seconds between two tries to lock a file that another writer holds (an append holds
#: it for one write and an fsync).
LOCK_POLL = 0.002
#: Between a dead-letter file's name and its working file's pid and random part.
WORKING = ".replaying-"

#: The descriptors of the files this process locks. A forked child gets copies, which
#: would keep a lock after this process lets it go: the child closes them. Opened and
#: closed under the lock that a fork takes, so that none escapes the set.
_holding: set[int] = set()
_holding_lock = threading.Lock()


def _close_held_in_child() -> None:
    for fd in _holding:
        os.close(fd)
    _holding.clear()
    _holding_lock.release()


os.register_at_fork(
    before=_holding_lock.acquire,
    after_in_parent=_holding_lock.release,
    after_in_child=_close_held_in_child,
)


class Taken(list[dict[str, Any]]):
    """The usable records taken out of a store, how many of its lines (or values) were
    not (damaged, or not records this version can send), and how many were notices
    (records of hooks never sent: see :data:`OVER_LIMIT`). Those stay in the store as
    they were.

    :param records: the usable records.
    :param unusable: how many entries were not usable.
    :param notices: how many entries were notices.
    """

    def __init__(
        self, records: Iterable[dict[str, Any]] = (), unusable: int = 0, notices: int = 0
    ) -> None:
        super().__init__(records)
        self.unusable = unusable
        self.notices = notices


class DeadLetterStore(Protocol):
    """Where given-up hooks are kept: a JSON Lines file, or a Redis list."""

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Keep *records*; raise on failure so the caller counts them as lost."""

    def taken(self) -> AbstractContextManager[Taken]:
        """Remove every record from the store and yield the usable ones; the caller
        appends back what it could not handle, the store puts back the unusable entries
        as they were when the block ends without an exception. Records appended
        meanwhile are not taken."""


class DeadLetterFile:
    """Appends dead-letter records to the JSON Lines file at *path*.

    :param path: the file; it and its folder are created when missing.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()  # this process's threads wait here, not in a poll

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append *records*; raises :class:`OSError` when the file cannot be written,
        having left it as it was."""
        self._append(b"".join(_line(record) for record in records))

    def _append(self, data: bytes) -> None:
        if not data:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with self._lock:
            fd = _open_locked(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
            try:
                _append_whole(fd, data)
            finally:
                _unlock(fd)

    @contextmanager
    def taken(self) -> Iterator[Taken]:
        """Take the working files that replays which died left, and the file itself
        (moved to ``<path>.replaying-<pid>-<random>``), and yield their records. Once
        the block is done, put back their unusable lines and remove them; an exception
        in the block leaves them on disk, nothing lost, for the next replay. Raises
        :class:`FileNotFoundError` when there is nothing to take."""
        held = _claim_leftovers(self.path)
        working = f"{self.path}{WORKING}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            fd = _take(self.path, working)
            if fd is not None:
                held.append((working, fd))
            if not held:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self.path)
            records, kept, notices = _parse_files(held)
            yield Taken(records, len(kept) - notices, notices)
            self._append(b"".join(kept))
            for name, _ in held:
                os.remove(name)  # before the lock goes: see _claim
        finally:
            for _, fd in held:
                _unlock(fd)

    def __repr__(self) -> str:
        return f"DeadLetterFile({self.path!r})"


def read_records(path: str) -> list[dict[str, Any]]:
    """Read the usable records of a dead-letter file, skipping (and logging) the rest."""
    with open(path, "rb") as f:
        return _parse_lines(f.read(), path)[0]


def parse_record(text: str | bytes, where: str) -> dict[str, Any] | None:
    """The dead-letter record in *text*, or ``None`` when it is a notice, or (logged,
    naming *where*) damaged or not a record that can be sent (see
    :func:`record_problem`)."""
    return classify(text, where)[1]


def classify(text: str | bytes, where: str) -> tuple[str, dict[str, Any] | None]:
    """What an entry of a store is: ``("record", record)``; ``("notice", None)`` for a
    record of hooks never sent (kept, not replayed); ``("unusable", None)``, logged,
    naming *where*, for the rest."""
    try:
        value = json.loads(text)
    except ValueError:
        logger.warning("%s: a damaged dead-letter record (not JSON)", where)
        return "unusable", None
    if isinstance(value, dict) and value.get("kind") == OVER_LIMIT:
        return "notice", None
    problem = record_problem(value)
    if problem is None:
        return "record", value  # a dict: record_problem checked
    logger.warning("%s: not a usable dead-letter record: %s", where, problem)
    return "unusable", None


def record_problem(value: Any) -> str | None:
    """Why *value* cannot be sent as a dead-letter record, or ``None`` when it can: the
    fields that :meth:`.Delivery.from_record` reads, checked before it sees them."""
    if not isinstance(value, dict):
        return "not a JSON object"
    if not isinstance(value.get("url"), str):
        return "its url is not a string"
    try:
        parse_http_url(value["url"])
    except ValueError:
        return "its url is not an http(s) URL with a host and a valid port"
    payload = value.get("payload")
    if not isinstance(payload, dict):
        return "its payload is not a JSON object"
    if isinstance(payload.get("callId"), (dict, list)):  # a key of the dispatcher's maps
        return "its payload's callId is not a string, number or null"
    for name, valid, expected in _OPTIONAL_FIELDS:
        if name in value and not valid(value[name]):
            return f"its {name} is not {expected}"
    return None


_OPTIONAL_FIELDS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("id", lambda v: v is None or isinstance(v, str), "a string"),
    ("format", lambda v: v in FORMATS, "one of " + ", ".join(FORMATS)),
    ("attempts", lambda v: type(v) is int and v >= 0, "a count"),
    ("lastError", lambda v: v is None or isinstance(v, str), "a string"),
)


def _line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


# -- writing -------------------------------------------------------------------------------


def _append_whole(fd: int, data: bytes) -> None:
    """Append *data* to the locked file *fd* and fsync it, or truncate the file back to
    its size before and raise: a short write (a full disk) must neither leave a torn
    record nor count as kept."""
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        data = b"\n" + data  # a torn last line (a crash mid-write) must not swallow ours
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.ftruncate(fd, size)  # the lock is ours: nobody appended after us
        raise


def _write_all(fd: int, data: bytes) -> None:
    """Write all of *data*: ``write()`` may take only part of it (a full disk), and
    says so only by its return value; the next one raises the error."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # never looped on: a file system that takes nothing is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


# -- locking and taking ----------------------------------------------------------------------


def _open_locked(path: str, flags: int) -> int:
    """A descriptor of the file at *path* holding its exclusive lock. When a replay
    takes that file meanwhile (and holds its lock until done), the file that is at
    *path* then is opened instead."""
    while True:
        fd = _open(path, flags)
        try:
            if _lock_while_at(fd, path):
                return fd
        except BaseException:
            _unlock(fd)
            raise
        _unlock(fd)


def _lock_while_at(fd: int, path: str) -> bool:
    """Lock *fd*'s file; ``False`` once it is no longer at *path*. Polled rather than
    waited for: a replay that takes the file keeps its lock for minutes, and a writer
    waiting on the lock would wait that long for a file it must not write."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not _is_at(fd, path):
                return False
            time.sleep(LOCK_POLL)
        else:
            return _is_at(fd, path)


def _is_at(fd: int, path: str) -> bool:
    """Whether the file of *fd* is the one named *path* (not renamed, nor removed)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _take(path: str, working: str) -> int | None:
    """Lock the file at *path* and rename it *working*; its descriptor, still holding
    the lock, or ``None`` when there is no file. Locked before the rename, so that no
    other replay ever sees the working file unlocked."""
    try:
        fd = _open_locked(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        os.rename(path, working)  # only a replay holding this lock moves it
    except BaseException:
        _unlock(fd)
        raise
    return fd


def _claim_leftovers(path: str) -> list[tuple[str, int]]:
    """The working files of *path* whose replay died, each with a descriptor holding
    its lock."""
    folder, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(name + WORKING) + "[0-9]+-[0-9a-f]+")  # no copy of one
    names = sorted(n for n in os.listdir(folder) if pattern.fullmatch(n))
    claimed: list[tuple[str, int]] = []
    try:
        for working in (os.path.join(folder, n) for n in names):
            fd = _claim(working)
            if fd is not None:
                claimed.append((working, fd))
    except BaseException:
        for _, fd in claimed:
            _unlock(fd)
        raise
    return claimed


def _claim(working: str) -> int | None:
    """A descriptor holding the lock of the working file *working*, or ``None`` when a
    live replay holds it or has just finished with it (removed before unlocked)."""
    try:
        fd = _open(working, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _is_at(fd, working):
            return fd
    except BlockingIOError:
        pass  # its replay is alive
    except BaseException:
        _unlock(fd)
        raise
    _unlock(fd)
    return None


def _open(path: str, flags: int) -> int:
    """Open a file to lock (see :data:`_holding`)."""
    with _holding_lock:
        fd = os.open(path, flags, 0o600)
        _holding.add(fd)
    return fd


def _unlock(fd: int) -> None:
    """Close *fd*, which lets its lock go."""
    with _holding_lock:
        _holding.discard(fd)
        os.close(fd)


# -- reading -------------------------------------------------------------------------------


def _parse_files(
    held: list[tuple[str, int]],
) -> tuple[list[dict[str, Any]], list[bytes], int]:
    """The usable records of the locked files *held*, their other lines, as they were
    (newline included), to put back, and how many of those are notices."""
    records: list[dict[str, Any]] = []
    kept: list[bytes] = []
    notices = 0
    for name, fd in held:
        with open(fd, "rb", closefd=False) as f:
            found, rest, noticed = _parse_lines(f.read(), name)
        records += found
        kept += rest
        notices += noticed
    return records, kept, notices


def _parse_lines(data: bytes, where: str) -> tuple[list[dict[str, Any]], list[bytes], int]:
    records: list[dict[str, Any]] = []
    kept: list[bytes] = []
    notices = 0
    for n, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue  # blank, or the end of the last line
        kind, record = classify(line.decode("utf-8", errors="replace"), f"{where}:{n}")
        if record is not None:
            records.append(record)
        else:
            kept.append(line + b"\n")
            notices += kind == "notice"
    return records, kept, notices
