"""One request cannot crowd out the others: the hooked calls of a request beyond
``XO_WEBHOOKS_MAX_CALLS`` still reach the app, but their hooks are not queued.

They are counted (``stats()["over_limit"]``: hooks, outside the delivery ledger, since
they were never accepted) and written as one dead-letter record per request, saying
how many calls and which methods were over the limit. The record is written by a
thread of its own, never the request's; when that thread is too far behind, the record
is lost, and logged.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

from .._sometimes import Sometimes
from .._text import shorten
from ..config import Hook, Settings
from ..sending.deadletter import OVER_LIMIT, DeadLetterStore
from ..sending.policy import open_dead_letter
from ..sending.recorder import Recorder
from ..sending.redaction import redact
from .jsonrpc import Call

__all__ = ["OverLimit"]

logger = logging.getLogger(__name__)

#: Most records waiting for the writer thread.
WAITING_RECORDS = 100
#: Methods named in a record (the most frequent), and the longest name kept: a caller
#: chooses them.
RECORD_METHODS, METHOD_LENGTH = 20, 100
#: Seconds between two log lines about requests over the limit.
LOG_INTERVAL = 60.0


class OverLimit:
    """Counts and records the calls of requests over ``settings.max_calls``.

    :param settings: ``max_calls`` and ``dead_letter`` (where the records go).
    """

    def __init__(self, settings: Settings) -> None:
        self.max_calls = settings.max_calls
        self._target = settings.dead_letter
        self._lock = threading.Lock()
        self.hooks = 0  #: hooks not queued since start
        self._say = Sometimes(LOG_INTERVAL)
        self._store: DeadLetterStore | None = None
        self._recorder = self._new_recorder()
        ref = weakref.ref(self)  # a forked child gets a recorder whose thread it can start
        os.register_at_fork(after_in_child=lambda: _renew(ref))

    def _new_recorder(self) -> Recorder[dict[str, Any]]:
        return Recorder(self._write, _ignore, WAITING_RECORDS)

    def split(
        self, matched: list[tuple[Call, tuple[Hook, ...]]]
    ) -> list[tuple[Call, tuple[Hook, ...]]]:
        """The calls of one request whose hooks are sent: the first ``max_calls``; the
        others are counted and recorded here."""
        if len(matched) <= self.max_calls:
            return matched
        self._refuse(matched[self.max_calls :])
        return matched[: self.max_calls]

    def close(self, timeout: float | None = None) -> None:
        """Write the records still waiting, then stop."""
        self._recorder.close(timeout)

    def _refuse(self, calls: Sequence[tuple[Call, tuple[Hook, ...]]]) -> None:
        hooks = sum(h.pre + h.post for _, matched in calls for h in matched)
        methods = collections.Counter(call.method[:METHOD_LENGTH] for call, _ in calls)
        record = {
            "kind": OVER_LIMIT,
            "calls": len(calls),
            "hooks": hooks,
            # A caller's names: cut, and made strict JSON (a lone surrogate would make
            # the record, and those written with it, impossible to write).
            "methods": redact(dict(methods.most_common(RECORD_METHODS)), ()),
            "maxCalls": self.max_calls,
            "lastError": (
                f"{len(calls)} hooked call(s) beyond XO_WEBHOOKS_MAX_CALLS={self.max_calls} "
                "in one request: the app ran them, their hooks were not sent"
            ),
            "failedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with self._lock:
            self.hooks += hooks
        log = self._say()
        queued = self._recorder.put([record])
        if log:
            logger.warning(
                "a request had %d hooked calls over XO_WEBHOOKS_MAX_CALLS=%d (%s): their "
                "%d hooks were not sent; %s (logged at most every %d s)",
                len(calls), self.max_calls, shorten(ascii(list(methods)[:5]), 200), hooks,
                "a dead-letter record says so" if queued and self._target
                else "no dead-letter record was written", LOG_INTERVAL,
            )  # fmt: skip

    def _write(self, records: list[dict[str, Any]]) -> bool:
        if not self._target:
            return False
        try:
            if self._store is None:
                self._store = open_dead_letter(self._target)
            self._store.append(records)
        except Exception:
            logger.exception("xo-webhooks could not write the record of calls over the limit")
            return False
        return True


def _renew(ref: weakref.ref[OverLimit]) -> None:
    over_limit = ref()
    if over_limit is not None:
        over_limit._recorder = over_limit._new_recorder()
        over_limit._lock = threading.Lock()
        over_limit._say.reset()


def _ignore(records: list[dict[str, Any]], written: bool) -> None:
    """The records are counted when refused, whether or not they could be written."""
