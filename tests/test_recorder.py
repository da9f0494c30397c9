"""The recorder's contract (xo_webhooks.sending.recorder.Recorder): the thread that
takes given-up hooks off the request path.

- ``record`` runs on a background thread, started by the first ``put``, never before;
  ``done`` follows each batch with what ``record`` returned;
- what piles up while a batch is being recorded goes as one batch;
- ``put`` refuses (returns ``False``, queues nothing) beyond ``limit`` waiting items,
  and once closed;
- ``close`` records what is waiting, then stops the thread; it returns whether that
  finished in time, and is safe twice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from xo_webhooks.sending.recorder import Recorder

from .waiting import wait_until

pytestmark = pytest.mark.usefixtures("no_leaked_threads")


class Store:
    """A ``record`` and a ``done`` that note what they get, and on which thread. While
    ``blocking`` is set, ``record`` waits for :meth:`open_gate` (10 s at most)."""

    def __init__(self, kept: bool = True, blocking: bool = False) -> None:
        self.kept = kept
        self.gate = threading.Event()
        if not blocking:
            self.gate.set()
        self.recording: list[list[str]] = []  # batches record() was given
        self.done: list[tuple[list[str], bool]] = []
        self.threads: set[str] = set()

    def record(self, batch: list[str]) -> bool:
        self.threads.add(threading.current_thread().name)
        self.recording.append(list(batch))
        self.gate.wait(10)
        return self.kept

    def finish(self, batch: list[str], kept: bool) -> None:
        assert self.recording[-1] == batch  # after record(), with the same batch
        self.done.append((list(batch), kept))

    def open_gate(self) -> None:
        self.gate.set()


@pytest.fixture
def recorders() -> Iterator[list[Recorder]]:
    """Recorders to close at teardown."""
    made: list[Recorder] = []
    yield made
    for recorder in made:
        assert recorder.close(10)


def make(recorders: list[Recorder], store: Store, limit: int = 10) -> Recorder:
    recorders.append(Recorder(store.record, store.finish, limit))
    return recorders[-1]


def recorder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "xo-webhooks-recorder"]


def test_the_thread_starts_at_the_first_put_and_records_there(recorders):
    store = Store()
    recorder = make(recorders, store)
    assert recorder_threads() == []
    assert recorder.put(["a", "b"])
    (thread,) = recorder_threads()
    assert thread.daemon  # never keeps the process alive
    wait_until(lambda: store.done, what="the batch to be recorded")
    assert store.done == [(["a", "b"], True)]
    assert store.threads == {"xo-webhooks-recorder"}
    assert recorder.put(["c"])
    wait_until(lambda: len(store.done) == 2, what="the second batch")
    assert recorder_threads() == [thread]  # one thread, reused


def test_done_is_told_when_record_did_not_keep_the_batch(recorders):
    store = Store(kept=False)
    recorder = make(recorders, store)
    assert recorder.put(["a"])
    assert recorder.close(10)
    assert store.done == [(["a"], False)]


def test_what_piles_up_during_a_batch_goes_as_one_batch(recorders):
    store = Store(blocking=True)
    recorder = make(recorders, store)
    assert recorder.put(["a"])
    wait_until(lambda: store.recording, what="the first batch to start")
    assert recorder.put(["b", "c"])
    assert recorder.put(["d"])
    store.open_gate()
    assert recorder.close(10)
    assert store.done == [(["a"], True), (["b", "c", "d"], True)]


def test_put_refuses_beyond_the_limit_of_waiting_items(recorders):
    store = Store(blocking=True)
    recorder = make(recorders, store, limit=3)
    assert recorder.put(["a"])
    wait_until(lambda: store.recording, what="the first batch to start")
    # The batch being recorded no longer counts: three may wait.
    assert recorder.put(["b", "c"])
    assert recorder.put(["d", "e"]) is False  # all or nothing: 2 + 2 > 3
    assert recorder.put(["d"])
    assert recorder.put(["e"]) is False
    store.open_gate()
    assert recorder.close(10)
    assert store.done == [(["a"], True), (["b", "c", "d"], True)]


def test_a_batch_larger_than_the_limit_is_refused_even_when_idle(recorders):
    store = Store()
    recorder = make(recorders, store, limit=2)
    assert recorder.put(["a", "b", "c"]) is False
    assert recorder_threads() == []  # refused: nothing started
    assert recorder.close(10)
    assert store.recording == []


def test_close_records_what_is_waiting_then_stops(recorders):
    store = Store(blocking=True)
    recorder = make(recorders, store)
    assert recorder.put(["a"])
    wait_until(lambda: store.recording, what="the first batch to start")
    assert recorder.put(["b"])  # waiting when close() is called
    assert recorder.close(0.01) is False  # "a" is still being recorded
    store.open_gate()
    assert recorder.close(10)  # twice is fine; now it has stopped
    assert store.done == [(["a"], True), (["b"], True)]
    assert recorder_threads() == []


def test_put_is_refused_once_closed(recorders):
    store = Store()
    recorder = make(recorders, store)
    assert recorder.put(["a"])
    assert recorder.close(10)
    assert recorder.put(["late"]) is False
    assert store.done == [(["a"], True)]
    assert recorder_threads() == []  # no thread started again


def test_closing_a_recorder_that_never_started(recorders):
    store = Store()
    recorder = make(recorders, store)
    assert recorder.close(0)
    assert recorder.put(["a"]) is False
    assert recorder_threads() == [] and store.recording == []
