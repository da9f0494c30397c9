"""Replaying a dead-letter file: ``xo-webhooks replay FILE``."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .._urls import endpoint_of
from ..config import Settings
from .delivery import Delivery
from .dispatcher import ThreadDispatcher
from .policy import DeadLetters, open_dead_letter

__all__ = ["ReplayReport", "replay"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayReport:
    """How a replay went: records read, delivered, written back as still failing,
    (with a spool) handed to the spool to wait there for their next attempt, and not
    usable (damaged, or not records that can be sent: left in the store as they were).
    ``read`` counts them all."""

    read: int
    delivered: int
    failed: int
    spooled: int = 0
    unusable: int = 0
    unmatched: int = 0  #: records kept: their URL is masked and no hook has their fingerprint
    notices: int = 0  #: records of calls over the limit, kept: no hook to send


#: Seconds: a replay keeps the leading waits of the retry schedule up to this long, so
#: that it ends in minutes, not after the schedule's hours (what still fails stays in
#: the store, for the next replay).
REPLAY_MAX_WAIT = 60.0


def replay(target: str, settings: Settings) -> ReplayReport:
    """Re-send every record of a dead-letter file (or ``redis://`` list) with the
    leading retries of the configured schedule (waits of up to :data:`REPLAY_MAX_WAIT`),
    then leave in it only what still failed.

    The records are first taken out of the store, so hooks that a running app
    dead-letters meanwhile are kept apart and never overwritten; what still fails is
    appended back, and so are the store's unusable entries, as they were (see
    :meth:`.DeadLetterFile.taken`: a file's replay also takes what a replay that died
    left). Each record goes to its URL with the signing secret and headers of
    the configured hook for that URL (else the global secret): neither is ever stored.

    With a spool (``XO_WEBHOOKS_SPOOL``), each record gets its first attempt here (or
    none, if its endpoint is down for every process of the spool), and a record
    worth another one waits in the spool with the whole retry schedule, for the app's
    processes to send: the replay ends at once and takes none of their hooks.
    """
    if settings.spool is None:
        schedule = tuple(
            itertools.takewhile(lambda d: d <= REPLAY_MAX_WAIT, settings.retry_schedule)
        )
        settings = dataclasses.replace(settings, retry_schedule=schedule)
    store = open_dead_letter(target)
    failed: list[dict[str, Any]] = []
    still_failing = DeadLetters(settings, store=_Collector(failed))
    with store.taken() as records:
        origins = {endpoint_of(record["url"]) for record in records}
        dispatcher = ThreadDispatcher(
            settings, dead_letters=still_failing, endpoints=origins, resumes=False
        )
        unmatched = []  # masked URLs that no configured hook's fingerprint names
        for record in records:
            try:
                delivery = Delivery.from_record(record, settings)
            except LookupError as e:
                logger.warning("replay: %s; kept in the store", e)
                unmatched.append(record)
            else:
                dispatcher.submit(delivery)
        if settings.spool is None:
            dispatcher.flush()
        dispatcher.close(None if settings.spool else 0)
        store.append(failed + unmatched)
    stats = dispatcher.stats()
    spooled = stats["spooled"] + stats["left"] - stats["resumed"]  # resumed: not written
    read = len(records) + records.unusable
    return ReplayReport(
        read + records.notices, stats["delivered"], len(failed), spooled, records.unusable,
        len(unmatched), records.notices,
    )  # fmt: skip


class _Collector:
    """Collects the records of hooks that failed again, to append them back at the end."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        self.records.extend(records)

    def __repr__(self) -> str:  # in DeadLetters' log line
        return "the records to append back after the replay"
