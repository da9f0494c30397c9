"""The intake (xo_webhooks.sending.intake.Intake): the jobs the request path hands off,
run one at a time, in the order given, on a thread of its own.

What it promises:

- jobs run in :meth:`put` order, on one thread named ``xo-webhooks-intake`` started on
  first use, never on the caller's;
- a job that raises is logged, and the ones after it still run;
- when ``max_jobs`` or ``max_bytes`` is reached, :meth:`put` runs the waiting jobs, then
  its own, on the caller's thread, after the job under way: nothing is lost or reordered;
- :meth:`drain` runs what waits on the caller's thread, after the job under way;
- :meth:`close` runs what waits, stops and joins the thread; later jobs run on the
  caller of :meth:`put`;
- a thread that cannot start (a process limit): :meth:`put` runs the job on the
  caller, and the next one tries to start the thread again;
- a job put without waking the thread runs at its next look, or with the next job put
  with ``now``.

A job under way is held on an event. Where a test needs another thread to be blocked
inside the intake (waiting for that job) before it lets the job go, it watches that
thread's stack (:func:`inside`): there is no event to wait on for "blocked on a lock".
"""

from __future__ import annotations

import logging
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from xo_webhooks.sending import intake as intake_module
from xo_webhooks.sending.intake import Intake

from .waiting import wait_until

pytestmark = pytest.mark.usefixtures("no_leaked_threads")

THREAD_NAME = "xo-webhooks-intake"
LOGGER = "xo_webhooks.sending.intake"


class Log:
    """What the jobs did, in order, each entry with the thread it ran on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.entries: list[tuple[str, str]] = []

    def job(self, name: str) -> Callable[[], None]:
        """A job that notes *name* and its thread."""
        return lambda: self.note(name)

    def note(self, name: str) -> None:
        with self._lock:
            self.entries.append((name, threading.current_thread().name))

    @property
    def names(self) -> list[str]:
        with self._lock:
            return [name for name, _ in self.entries]

    def thread_of(self, name: str) -> str:
        with self._lock:
            (thread,) = [thread for job, thread in self.entries if job == name]
        return thread


class Held:
    """A job that stays under way until :meth:`release`: its ``started`` event tells
    that it runs, ``thread`` on which thread."""

    def __init__(self, log: Log, name: str = "held") -> None:
        self.log, self.name = log, name
        self.started = threading.Event()
        self._release = threading.Event()
        self.thread: threading.Thread | None = None

    def __call__(self) -> None:
        self.thread = threading.current_thread()
        self.started.set()
        assert self._release.wait(10), "the held job was never released"
        self.log.note(self.name)

    def release(self) -> None:
        self._release.set()


@pytest.fixture
def intakes() -> Iterator[Callable[..., Intake]]:
    """``intakes(**kwargs)`` makes an intake, closed at teardown (its thread joined)."""
    made: list[Intake] = []

    def make(**kwargs: Any) -> Intake:
        made.append(Intake(**kwargs))
        return made[-1]

    yield make
    for intake in made:
        intake.close(10)


@pytest.fixture
def unstartable(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """The intake module's threads cannot start (as at a process's thread limit);
    ``allow()`` lets them start again."""
    state = types.SimpleNamespace(refuse=True)

    class Thread(threading.Thread):
        def start(self) -> None:
            if state.refuse:
                raise RuntimeError("can't start new thread")
            super().start()

    def allow() -> None:
        state.refuse = False

    state.allow = allow
    fake = types.SimpleNamespace(**{**vars(threading), "Thread": Thread})
    monkeypatch.setattr(intake_module, "threading", fake)
    return state


def inside(thread: threading.Thread, function: Callable[..., Any]) -> bool:
    """Whether *thread* is running *function* now (anywhere in its stack)."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code is function.__code__:
            return True
        frame = frame.f_back
    return False


def intake_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def hold_then_queue(intake: Intake, log: Log, sizes: tuple[int, int] = (0, 0)) -> Held:
    """Have the intake's thread take a :class:`Held` job, then queue jobs "a" and "b"
    (of *sizes*) behind it; return the held job."""
    held = Held(log)
    intake.put(held)
    assert held.started.wait(10)  # taken: it no longer counts as waiting
    intake.put(log.job("a"), size=sizes[0])
    intake.put(log.job("b"), size=sizes[1])
    return held


def in_thread(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name)
    thread.start()
    return thread


# -- order and thread ---------------------------------------------------------------------


def test_no_thread_before_the_first_job(intakes):
    intake = intakes()
    intake.drain()  # nothing to run, nothing started
    assert intake_threads() == []


def test_jobs_run_in_put_order_on_the_intake_thread(intakes):
    log = Log()
    intake = intakes()
    done = threading.Event()
    for n in range(200):
        intake.put(log.job(f"job-{n}"), size=10)
    intake.put(done.set)
    assert done.wait(10)
    assert log.names == [f"job-{n}" for n in range(200)]
    assert {thread for _, thread in log.entries} == {THREAD_NAME}
    assert len(intake_threads()) == 1  # one thread, started once


def test_jobs_put_from_many_threads_keep_each_threads_order(intakes):
    # Small bounds: some puts find the intake full and run the waiting jobs themselves.
    log = Log()
    intake = intakes(max_jobs=3, max_bytes=50)
    producers, per_producer = 8, 100
    barrier = threading.Barrier(producers)

    def produce(p: int) -> None:
        barrier.wait(10)
        for n in range(per_producer):
            intake.put(log.job(f"{p}:{n}"), size=n % 20)

    threads = [in_thread(lambda p=p: produce(p), f"producer-{p}") for p in range(producers)]
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()
    intake.drain()
    names = log.names
    assert len(names) == producers * per_producer
    for p in range(producers):
        mine = [int(name.split(":")[1]) for name in names if name.startswith(f"{p}:")]
        assert mine == list(range(per_producer)), f"producer {p}: {mine}"


def test_a_job_that_raises_is_logged_and_the_next_ones_run(intakes, caplog):
    log = Log()
    intake = intakes()
    done = threading.Event()

    def fails() -> None:
        log.note("fails")
        raise ValueError("a body it could not read")

    with caplog.at_level(logging.ERROR, logger=LOGGER):
        intake.put(log.job("before"))
        intake.put(fails)
        intake.put(log.job("after"))
        intake.put(done.set)
        assert done.wait(10)
    assert log.names == ["before", "fails", "after"]
    (record,) = [r for r in caplog.records if r.name == LOGGER]
    assert record.getMessage() == "xo-webhooks could not build the hooks of a request"
    assert record.exc_info is not None and record.exc_info[0] is ValueError


def test_a_job_that_raises_on_the_callers_thread_does_not_raise_from_put(intakes, caplog):
    intake = intakes(max_jobs=0)  # every job runs on the caller

    def fails() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger=LOGGER):
        intake.put(fails)  # never raises
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [RuntimeError]


# -- full: the caller runs what waits, then its own job -----------------------------------


@pytest.mark.parametrize(
    ("bounds", "sizes"),
    [
        pytest.param({"max_jobs": 2}, (0, 0, 0), id="max_jobs"),
        pytest.param({"max_bytes": 10}, (4, 6, 1), id="max_bytes"),
    ],
)
def test_put_on_a_full_intake_runs_after_the_job_under_way_and_the_waiting_ones(
    intakes, bounds, sizes
):
    log = Log()
    intake = intakes(**bounds)
    held = hold_then_queue(intake, log, sizes)  # full now

    def caller() -> None:
        intake.put(log.job("c"), size=sizes[2])
        log.note("put returned")

    thread = in_thread(caller, "caller")
    wait_until(lambda: inside(thread, Intake.put), what="the caller to be in put()")
    assert log.names == []  # c waits for the held job, and for a and b
    held.release()
    thread.join(10)
    assert log.names == ["held", "a", "b", "c", "put returned"]
    assert log.thread_of("c") == "caller"  # run by put() itself, which returned after it


def test_a_job_larger_than_max_bytes_runs_on_the_caller(intakes):
    log = Log()
    intake = intakes(max_bytes=100)
    intake.put(log.job("big"), size=101)
    assert log.entries == [("big", threading.current_thread().name)]
    assert intake_threads() == []  # nothing was queued, so nothing started


def test_when_the_thread_cannot_start_put_runs_the_job_and_the_next_put_tries_again(
    intakes, unstartable, caplog
):
    # Hooks must not wait for a queue nobody takes from: the caller runs its job.
    log = Log()
    intake = intakes()
    me = threading.current_thread().name
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        intake.put(log.job("a"))
        intake.put(log.job("b"))
    assert log.entries == [("a", me), ("b", me)]
    starts = [r for r in caplog.records if r.name == LOGGER]
    assert [r.getMessage() for r in starts] == ["could not start the xo-webhooks intake thread"] * 2

    unstartable.allow()
    done = threading.Event()
    intake.put(log.job("g"))
    intake.put(done.set)
    assert done.wait(10)
    assert log.entries[-1] == ("g", THREAD_NAME)


# -- drain --------------------------------------------------------------------------------


def test_drain_waits_for_the_job_under_way_and_everything_put_before(intakes):
    log = Log()
    intake = intakes()
    held = hold_then_queue(intake, log)

    def drainer() -> None:
        intake.drain()
        log.note("drained")

    thread = in_thread(drainer, "drainer")
    wait_until(lambda: inside(thread, Intake.drain), what="the drainer to be in drain()")
    assert log.names == []
    held.release()
    thread.join(10)
    assert log.names == ["held", "a", "b", "drained"]
    assert held.thread is not None and held.thread.name == THREAD_NAME


def test_drain_runs_the_waiting_jobs_on_the_callers_thread(intakes, monkeypatch):
    monkeypatch.setattr(intake_module, "POLL", 60.0)  # the thread takes nothing unwoken
    log = Log()
    intake = intakes()
    started = threading.Event()
    intake.put(started.set)
    assert started.wait(10)
    wait_until(lambda: inside_wait(intake), what="the intake thread waiting")
    for n in range(5):
        intake.put(log.job(f"job-{n}"), now=False)
    intake.drain()
    me = threading.current_thread().name
    assert log.entries == [(f"job-{n}", me) for n in range(5)]
    intake.drain()  # nothing left: runs nothing twice
    assert len(log.entries) == 5


# -- close --------------------------------------------------------------------------------


def test_close_runs_what_waits_then_stops_and_joins_the_thread(intakes):
    log = Log()
    intake = intakes()
    held = hold_then_queue(intake, log)

    def closer() -> None:
        intake.close(10)
        log.note("closed")

    thread = in_thread(closer, "closer")
    wait_until(lambda: inside(thread, Intake.close), what="the closer to be in close()")
    held.release()
    thread.join(10)
    assert log.names == ["held", "a", "b", "closed"]
    assert held.thread is not None and not held.thread.is_alive()  # joined by close()
    assert intake_threads() == []

    # Closed: a job runs at once on the caller, and no thread starts again.
    intake.put(log.job("late"), size=1)
    assert log.entries[-1] == ("late", threading.current_thread().name)
    assert intake_threads() == []
    intake.close(10)  # twice: nothing to do


def test_close_of_an_idle_intake_stops_its_thread(intakes):
    log = Log()
    intake = intakes()
    done = threading.Event()
    intake.put(log.job("a"))
    intake.put(done.set)
    assert done.wait(10)
    (thread,) = intake_threads()
    intake.close(10)
    assert not thread.is_alive()
    assert log.names == ["a"]


def test_close_runs_the_jobs_the_thread_has_not_taken(intakes, monkeypatch):
    monkeypatch.setattr(intake_module, "POLL", 60.0)
    log = Log()
    intake = intakes()
    started = threading.Event()
    intake.put(started.set)
    assert started.wait(10)
    wait_until(lambda: inside_wait(intake), what="the intake thread waiting")
    intake.put(log.job("a"), now=False)
    intake.put(log.job("b"), now=False)
    intake.close(10)
    me = threading.current_thread().name
    assert log.entries == [("a", me), ("b", me)]
    intake.put(log.job("c"))  # closed: on the caller, no attempt to start a thread
    assert log.entries[-1] == ("c", me)
    assert intake_threads() == []


def test_a_caller_of_a_full_intake_runs_no_job_put_after_its_own(intakes):
    # Under load others keep putting: a caller that runs jobs because the intake was
    # full runs those put before its own, then its own, never the ones that came later.
    log = Log()
    intake = intakes(max_bytes=10)
    held, release = threading.Event(), threading.Event()
    intake.put(lambda: (held.set(), release.wait(10)))
    assert held.wait(10)
    intake.put(log.job("a"), size=5)
    intake.put(log.job("b"), size=5)  # 10 bytes: full for any job of size > 0
    caller = in_thread(lambda: intake.put(log.job("mine"), size=5), "caller")
    wait_until(lambda: inside(caller, Intake._run_next), what="the caller waiting")
    intake.put(log.job("later"))  # size 0: fits, queued after "mine" was put
    release.set()
    caller.join(10)
    assert not caller.is_alive()
    intake.drain()
    names = log.names
    assert names.index("a") < names.index("b") < names.index("mine")
    assert ("mine", "caller") in log.entries
    assert ("later", "caller") not in log.entries and "later" in names


# -- jobs put without waking the thread (a request's pre job) ----------------------------


def test_a_job_put_without_waking_runs_at_the_threads_next_look(intakes, monkeypatch):
    monkeypatch.setattr(intake_module, "POLL", 0.01)
    intake = intakes()
    intake.put(lambda: None)  # starts the thread
    ran = threading.Event()
    names: list[str] = []
    intake.put(lambda: (names.append(threading.current_thread().name), ran.set()), now=False)
    assert ran.wait(10)
    assert names == ["xo-webhooks-intake"]


def test_a_job_put_now_runs_the_ones_waiting_before_it_without_a_look(intakes, monkeypatch):
    monkeypatch.setattr(intake_module, "POLL", 60.0)  # no look in this test's time
    intake = intakes()
    started = threading.Event()
    intake.put(started.set)
    assert started.wait(10)
    wait_until(lambda: inside_wait(intake), what="the intake thread waiting")
    order: list[str] = []
    pre_ran = threading.Event()
    intake.put(lambda: (order.append("pre"), pre_ran.set()), now=False)
    assert not pre_ran.wait(0.2)  # not woken for it
    post_ran = threading.Event()
    intake.put(lambda: (order.append("post"), post_ran.set()))
    assert post_ran.wait(10)
    assert order == ["pre", "post"]


def test_after_a_long_idle_the_thread_sleeps_and_any_job_wakes_it(intakes, monkeypatch):
    monkeypatch.setattr(intake_module, "POLL", 0.001)
    monkeypatch.setattr(intake_module, "SLEEP_AFTER", 3)
    intake = intakes()
    intake.put(lambda: None)
    wait_until(lambda: intake._sleeping, what="the intake thread asleep")
    ran = threading.Event()
    intake.put(ran.set, now=False)  # it sleeps: woken all the same
    assert ran.wait(10)


def inside_wait(intake: Intake) -> bool:
    """Whether the intake's thread waits for jobs (in Condition.wait) now."""
    thread = intake._thread
    return thread is not None and inside(thread, threading.Condition.wait)
