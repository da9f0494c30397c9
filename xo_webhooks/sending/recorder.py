"""Keeping given-up hooks off the request path: a thread that records them in batches.

A hook given up on the request path (the queue is full, or the dispatcher closed) must
not cost the API a file write and an fsync; the recorder takes it from there, and
writes whatever has piled up in one batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Recorder"]

T = TypeVar("T")


class Recorder(Generic[T]):
    """Runs *record* on batches of items from a background thread, then *done*.

    :param record: keeps a batch; returns whether it was kept (its errors are its own).
    :param done: told each batch and whether it was kept, after *record*.
    :param limit: most items waiting; :meth:`put` refuses more.
    """

    def __init__(
        self,
        record: Callable[[list[T]], bool],
        done: Callable[[list[T], bool], None],
        limit: int,
    ) -> None:
        self._record = record
        self._done = done
        self._limit = limit
        self._cond = threading.Condition()
        self._waiting: list[T] = []
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called: :meth:`put` refuses everything from then on."""
        return self._closed

    def put(self, items: list[T]) -> bool:
        """Queue *items* for recording; ``False`` (nothing queued) when closed or full."""
        with self._cond:
            if self._closed or len(self._waiting) + len(items) > self._limit:
                return False
            self._waiting.extend(items)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="xo-webhooks-recorder", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Record what is waiting, then stop; return whether that finished in time."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting or self._closed)
                if not self._waiting:
                    return
                batch, self._waiting = self._waiting, []
            self._done(batch, self._record(batch))
