"""Replaying a dead-letter file: ``xo-webhooks replay FILE``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from .delivery import Delivery
from .dispatcher import ThreadDispatcher
from .policy import DeadLetters, open_dead_letter

__all__ = ["ReplayReport", "replay"]


@dataclass(frozen=True)
class ReplayReport:
    """How a replay went: records read, delivered, and written back as still failing."""

    read: int
    delivered: int
    failed: int


def replay(target: str, settings: Settings) -> ReplayReport:
    """Re-send every record of a dead-letter file (or ``redis://`` list) with the
    configured retries, then leave in it only what still failed.

    The records are first taken out of the store, so hooks that a running app
    dead-letters meanwhile are kept apart and never overwritten; what still fails is
    appended back. Each record goes to its URL with the signing secret and headers of
    the configured hook for that URL (else the global secret): neither is ever stored.
    """
    store = open_dead_letter(target)
    failed: list[dict[str, Any]] = []
    still_failing = DeadLetters(settings, store=_Collector(failed))
    dispatcher = ThreadDispatcher(settings, dead_letters=still_failing)
    with store.taken() as records:
        for record in records:
            dispatcher.submit(Delivery.from_record(record, settings))
        dispatcher.flush()
        dispatcher.close(0)
        store.append(failed)
    return ReplayReport(read=len(records), delivered=len(records) - len(failed), failed=len(failed))


class _Collector:
    """Collects the records of hooks that failed again, to append them back at the end."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        self.records.extend(records)

    def __repr__(self) -> str:  # in DeadLetters' log line
        return "the records to append back after the replay"
