"""Dead-letter stores: what one is (:class:`DeadLetterStore`), and the file, hooks that
could not be delivered, one JSON object a line (the Redis list is in
:mod:`.deadletter_redis`; :func:`.policy.open_dead_letter` picks one).

Each record is appended with a single ``write()`` on a file opened with ``O_APPEND``,
so records from several threads or processes never interleave, and a crash mid-write
can damage only the line being written, never an earlier one.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

__all__ = ["DeadLetterStore", "DeadLetterFile", "read_records", "parse_record"]

logger = logging.getLogger(__name__)


class DeadLetterStore(Protocol):
    """Where given-up hooks are kept: a JSON Lines file, or a Redis list."""

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Keep *records*; raise on failure so the caller counts them as lost."""

    def taken(self) -> AbstractContextManager[list[dict[str, Any]]]:
        """Remove every record from the store and yield them; the caller appends back
        what it could not handle. Records appended meanwhile are not taken."""


class DeadLetterFile:
    """Appends dead-letter records to the JSON Lines file at *path*.

    :param path: the file; it and its folder are created when missing.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append *records*; raises :class:`OSError` when the file cannot be written."""
        lines = [json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records]
        if not lines:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        with self._lock:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                # A torn last line (a crash mid-write) must not swallow the next record.
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    os.write(fd, b"\n")
                for line in lines:
                    os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)

    @contextmanager
    def taken(self) -> Iterator[list[dict[str, Any]]]:
        """Move the file aside and yield its records; remove the copy once done. A
        crash in between leaves ``<path>.replaying-<pid>-<random>`` on disk, nothing lost:
        the random part keeps a later replay with the same pid (pid 1 in a container)
        from overwriting it."""
        working = f"{self.path}.replaying-{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(self.path, working)
        yield read_records(working)
        os.remove(working)

    def __repr__(self) -> str:
        return f"DeadLetterFile({self.path!r})"


def read_records(path: str) -> list[dict[str, Any]]:
    """Read the records of a dead-letter file, skipping (and logging) damaged lines."""
    with open(path, encoding="utf-8", errors="replace") as f:
        found = (parse_record(line, f"{path}:{n}") for n, line in enumerate(f, 1) if line.strip())
        return [record for record in found if record is not None]


def parse_record(text: str | bytes, where: str) -> dict[str, Any] | None:
    """The dead-letter record in *text*, or ``None`` (logged, naming *where*) when it is
    damaged or not a record."""
    try:
        record = json.loads(text)
    except ValueError:
        logger.warning("%s: skipped a damaged dead-letter record", where)
        return None
    if isinstance(record, dict) and "url" in record and "payload" in record:
        return record
    logger.warning("%s: skipped a value that is not a dead-letter record", where)
    return None
