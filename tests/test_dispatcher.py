"""The thread dispatcher's own contract (xo_webhooks.sending.dispatcher.ThreadDispatcher).

A scripted sender stands in for HTTP, so that every state is reached on purpose: an
attempt held in flight, a retry waiting, a post held for its pre. What it promises:

- ``submit`` never blocks and never raises; beyond ``queue_size`` pending hooks, or
  once closed, the hook is given up at once and dead-lettered;
- ``stats()`` balances at every moment: ``accepted == delivered + failed + pending``
  and ``failed == dead_lettered + lost``;
- ``flush`` waits for nothing pending; ``close`` gives up what is left (ready, waiting
  for a retry, held) and is safe twice; an attempt that fails after ``close`` began is
  given up, never rescheduled;
- ``deliver_now`` makes the first attempt in the caller's thread, the retries in the
  background;
- a call's post hook to a URL waits until its pre hook to that URL is done;
- a retry waits without holding a thread;
- a sender that raises, a dead-letter store that cannot be written and a payload that
  cannot be encoded are all counted, never silently dropped.

Real HTTP is in test_reliability.py.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from xo_webhooks import Hook, load_settings
from xo_webhooks.sending.deadletter import read_records
from xo_webhooks.sending.delivery import Delivery
from xo_webhooks.sending.dispatcher import ThreadDispatcher
from xo_webhooks.sending.policy import STAT_NAMES, Attempt

from .helpers import POST, PRE, assert_ledger
from .waiting import wait_until

pytestmark = pytest.mark.usefixtures("no_leaked_threads")

URL_A, URL_B = "http://127.0.0.1:9/a", "http://127.0.0.1:9/b"
HOOK_A = Hook(method="vm.start", type="pre/post", url=URL_A)
HOOK_B = Hook(method="vm.start", type="pre/post", url=URL_B)

OK = Attempt(True, status=204)
RETRY = Attempt(False, "HTTP 503", retryable=True, status=503)
FINAL = Attempt(False, "HTTP 404", status=404)


def hook(call_id: str, kind: str = "pre", target: Hook = HOOK_A) -> Delivery:
    return Delivery(target, {**(PRE if kind == "pre" else POST), "callId": call_id})


@dataclass(frozen=True)
class Event:
    what: str  # "start" or "end" of an attempt
    call_id: str
    kind: str
    url: str
    thread: str
    at: float


class ScriptedSender:
    """Stands in for :class:`~xo_webhooks.sending.delivery.Sender`: counts the attempt on
    the delivery, answers ``answer(delivery)`` (delivered by default; it may raise),
    and notes the start and end of every attempt. Attempts for which ``hold(delivery)``
    is true wait until :meth:`open_gate` (10 s at most, so a failing test ends)."""

    def __init__(
        self,
        answer: Callable[[Delivery], Attempt] = lambda d: OK,
        hold: Callable[[Delivery], bool] = lambda d: False,
    ) -> None:
        self.answer = answer
        self.hold = hold
        self.gate = threading.Event()
        self.events: list[Event] = []
        self.released_in: list[str] = []

    def open_gate(self) -> None:
        self.gate.set()

    def send(self, delivery: Delivery) -> Attempt:
        delivery.attempts += 1
        self._note("start", delivery)
        try:
            if self.hold(delivery):
                self.gate.wait(10)
            return self.answer(delivery)
        finally:
            self._note("end", delivery)

    def _note(self, what: str, delivery: Delivery) -> None:
        self.events.append(
            Event(what, delivery.call_id, delivery.kind, delivery.hook.url,
                  threading.current_thread().name, time.monotonic())
        )  # fmt: skip

    def started(self, call_id: str, kind: str = "pre", url: str = URL_A) -> list[Event]:
        return [e for e in self.events if e.what == "start" and e.call_id == call_id
                and e.kind == kind and e.url == url]  # fmt: skip

    def index(self, what: str, call_id: str, kind: str, url: str = URL_A) -> int:
        return next(
            n for n, e in enumerate(self.events)
            if (e.what, e.call_id, e.kind, e.url) == (what, call_id, kind, url)
        )  # fmt: skip

    def release(self) -> None:  # the dispatcher's: close this thread's connections
        self.released_in.append(threading.current_thread().name)

    def reset(self) -> None:
        pass


@pytest.fixture
def dead_file(tmp_path) -> str:
    return str(tmp_path / "dead.jsonl")


@pytest.fixture
def make(dead_file) -> Iterator[Callable[..., ThreadDispatcher]]:
    """``make(sender, **settings)``: a dispatcher writing dead letters to *dead_file*;
    its gate opened and the dispatcher closed at teardown."""
    made: list[ThreadDispatcher] = []

    def build(sender: ScriptedSender | None = None, **overrides) -> ThreadDispatcher:
        overrides.setdefault("dead_letter", dead_file)
        overrides.setdefault("backoff", 0.01)
        settings = load_settings([], {}, **overrides)
        made.append(ThreadDispatcher(settings, sender=sender or ScriptedSender()))
        return made[-1]

    yield build
    for dispatcher in made:
        if isinstance(dispatcher.sender, ScriptedSender):
            dispatcher.sender.open_gate()
        dispatcher.close(5)


def ledger(dispatcher: ThreadDispatcher) -> dict[str, int]:
    """``stats()``, checked to balance."""
    stats = dispatcher.stats()
    assert_ledger(stats)
    return stats


MEMORY_STATS = ("accepted", "delivered", "retried", "failed", "dead_lettered", "lost", "pending")


def counts(dispatcher: ThreadDispatcher) -> tuple[int, ...]:
    """(accepted, delivered, retried, failed, dead_lettered, lost, pending): without a
    spool, the other counters stay 0."""
    stats = ledger(dispatcher)
    assert stats["spooled"] == stats["left"] == stats["resumed"] == 0
    return tuple(stats[name] for name in MEMORY_STATS)


def records(path: str) -> dict[tuple[str, str], dict]:
    """The dead-letter records by (callId, type)."""
    return {(r["payload"]["callId"], r["payload"]["type"]): r for r in read_records(path)}


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("xo-webhooks-")]


# -- submit, flush, stats ----------------------------------------------------------------


def test_a_new_dispatcher_starts_no_thread_and_has_an_empty_ledger(make):
    dispatcher = make(max_workers=3)
    assert worker_threads() == []
    assert dispatcher.stats() == dict.fromkeys((*STAT_NAMES, "spool_errors", "recording"), 0)
    assert dispatcher.flush(0)


def test_workers_start_at_the_first_submit_and_stop_at_close(make):
    dispatcher = make(max_workers=3)
    dispatcher.submit(hook("c1"))
    assert sorted(t.name for t in worker_threads() if t.name != "xo-webhooks-recorder") == [
        "xo-webhooks-0", "xo-webhooks-1", "xo-webhooks-2",
    ]  # fmt: skip
    dispatcher.close(5)
    assert not any(t.is_alive() for t in worker_threads())
    assert sorted(dispatcher.sender.released_in) == sorted(
        ["xo-webhooks-0", "xo-webhooks-1", "xo-webhooks-2"]
    )  # each worker closes its connections on the way out


def test_delivered_hooks_balance_the_ledger(make):
    dispatcher = make(max_workers=2)
    for n in range(20):
        dispatcher.submit(hook(f"c{n}"))
        ledger(dispatcher)
    assert dispatcher.flush(10)
    assert counts(dispatcher) == (20, 20, 0, 0, 0, 0, 0)


def test_flush_times_out_while_a_hook_is_in_flight(make):
    sender = ScriptedSender(hold=lambda d: True)
    dispatcher = make(sender)
    dispatcher.submit(hook("c1"))
    wait_until(lambda: sender.started("c1"), what="the attempt to start")
    assert dispatcher.flush(0.05) is False
    assert counts(dispatcher) == (1, 0, 0, 0, 0, 0, 1)
    sender.open_gate()
    assert dispatcher.flush(10)
    assert counts(dispatcher) == (1, 1, 0, 0, 0, 0, 0)


def test_a_full_queue_rejects_at_once_and_dead_letters(make, dead_file):
    sender = ScriptedSender(hold=lambda d: True)
    dispatcher = make(sender, max_workers=1, queue_size=2)
    dispatcher.submit(hook("c0"))
    wait_until(lambda: sender.started("c0"), what="c0 in flight")
    started = time.monotonic()
    for n in range(1, 5):  # c1 waits for the busy worker; c2-c4 find the queue full
        dispatcher.submit(hook(f"c{n}"))
        ledger(dispatcher)
    assert time.monotonic() - started < 1  # never waits for the worker
    wait_until(lambda: ledger(dispatcher)["failed"] == 3, what="3 hooks given up")
    assert counts(dispatcher) == (5, 0, 0, 3, 3, 0, 2)
    kept = records(dead_file)
    assert sorted(kept) == [("c2", "pre"), ("c3", "pre"), ("c4", "pre")]
    assert {(r["lastError"], r["attempts"]) for r in kept.values()} == {("queue full", 0)}
    sender.open_gate()
    assert dispatcher.flush(10)
    assert counts(dispatcher) == (5, 2, 0, 3, 3, 0, 0)
    assert len(sender.started("c2")) == 0  # a rejected hook is never attempted


# -- close -------------------------------------------------------------------------------


def test_close_gives_up_on_ready_waiting_and_held_hooks(make, dead_file):
    def answer(delivery: Delivery) -> Attempt:
        if delivery.call_id == "c0":
            return Attempt(False, "HTTP 503", retryable=True, retry_after=60, status=503)
        return OK

    sender = ScriptedSender(answer, hold=lambda d: d.call_id == "c1")
    dispatcher = make(sender, max_workers=1)
    dispatcher.submit(hook("c0"))  # fails, then waits 60 s for its retry
    dispatcher.submit(hook("c1"))  # in flight, held at the gate
    wait_until(lambda: sender.started("c1"), what="c1 in flight")
    dispatcher.submit(hook("c2"))  # ready, the only worker busy
    dispatcher.submit(hook("c1", "post"))  # held until its pre is done
    assert counts(dispatcher) == (4, 0, 0, 0, 0, 0, 4)

    dispatcher.close(0)

    assert counts(dispatcher) == (4, 0, 0, 3, 3, 0, 1)  # c1's pre still in flight
    kept = records(dead_file)
    assert {key: (r["lastError"], r["attempts"]) for key, r in kept.items()} == {
        ("c0", "pre"): ("HTTP 503", 1),  # keeps why its last attempt failed
        ("c2", "pre"): ("still pending at shutdown", 0),
        ("c1", "post"): ("still pending at shutdown", 0),
    }
    sender.open_gate()  # the attempt in flight ends: delivered, counted
    assert dispatcher.flush(10)
    assert counts(dispatcher) == (4, 1, 0, 3, 3, 0, 0)


def test_close_twice_and_submit_after_close(make, dead_file):
    dispatcher = make()
    dispatcher.submit(hook("c1"))
    dispatcher.close(5)
    dispatcher.close(5)
    assert counts(dispatcher) == (1, 1, 0, 0, 0, 0, 0)
    dispatcher.submit(hook("late"))  # no thread starts; kept at once, on this thread
    assert counts(dispatcher) == (2, 1, 0, 1, 1, 0, 0)
    assert records(dead_file)["late", "pre"]["lastError"] == "dispatcher closed"
    assert worker_threads() == []


def test_an_attempt_failing_after_close_began_is_given_up_not_rescheduled(make, dead_file):
    # The mutant this guards against drops "and not self._closed" from _settle: the
    # hook would then wait for a retry no worker will ever make, pending forever.
    sender = ScriptedSender(lambda d: RETRY, hold=lambda d: True)
    dispatcher = make(sender, retries=5)
    dispatcher.submit(hook("c1"))
    wait_until(lambda: sender.started("c1"), what="the attempt to start")
    dispatcher.close(0)  # returns with the attempt still in flight
    assert counts(dispatcher) == (1, 0, 0, 0, 0, 0, 1)

    sender.open_gate()  # now it fails, retryable, with 5 retries left

    assert dispatcher.flush(10), f"still pending: {dispatcher.stats()}"
    assert counts(dispatcher) == (1, 0, 0, 1, 1, 0, 0)
    assert len(sender.started("c1")) == 1
    (record,) = records(dead_file).values()
    assert (record["lastError"], record["attempts"]) == ("HTTP 503", 1)


def test_deliver_now_after_close_gives_up_instead_of_retrying(make, dead_file):
    dispatcher = make(retries=5)
    dispatcher.close(0)
    dispatcher.sender.answer = lambda d: RETRY
    assert dispatcher.deliver_now(hook("c1")) is False
    assert counts(dispatcher) == (1, 0, 0, 1, 1, 0, 0)
    assert worker_threads() == []
    assert records(dead_file)["c1", "pre"]["lastError"] == "HTTP 503"


# -- deliver_now --------------------------------------------------------------------------


def test_deliver_now_attempts_in_the_calling_thread_and_starts_no_worker(make):
    dispatcher = make()
    assert dispatcher.deliver_now(hook("c1")) is True
    (event,) = dispatcher.sender.started("c1")
    assert event.thread == threading.current_thread().name
    assert dispatcher.sender.released_in == [threading.current_thread().name]
    assert worker_threads() == []
    assert counts(dispatcher) == (1, 1, 0, 0, 0, 0, 0)


def test_deliver_now_leaves_the_retries_to_a_worker(make):
    answers = iter([RETRY, OK])
    sender = ScriptedSender(lambda d: next(answers))
    dispatcher = make(sender)
    assert dispatcher.deliver_now(hook("c1")) is False
    assert dispatcher.flush(10)
    first, retry = sender.started("c1")
    assert first.thread == threading.current_thread().name
    assert retry.thread.startswith("xo-webhooks-")
    assert counts(dispatcher) == (1, 1, 1, 0, 0, 0, 0)


def test_deliver_now_of_a_final_failure_is_dead_lettered(make, dead_file):
    dispatcher = make(ScriptedSender(lambda d: FINAL))
    assert dispatcher.deliver_now(hook("c1")) is False
    assert dispatcher.flush(10)
    assert counts(dispatcher) == (1, 0, 0, 1, 1, 0, 0)
    assert records(dead_file)["c1", "pre"]["lastError"] == "HTTP 404"


# -- pre before post -----------------------------------------------------------------------


def test_a_post_waits_for_its_pre_to_the_same_url_only(make):
    sender = ScriptedSender(hold=lambda d: (d.call_id, d.kind, d.hook.url) == ("c1", "pre", URL_A))
    dispatcher = make(sender, max_workers=4)
    dispatcher.submit(hook("c1", "pre", HOOK_A))
    wait_until(lambda: sender.started("c1", "pre", URL_A), what="c1's pre in flight")
    dispatcher.submit(hook("c1", "post", HOOK_A))  # held: its pre is in flight
    dispatcher.submit(hook("c1", "post", HOOK_B))  # another URL: no pre to wait for
    dispatcher.submit(hook("c2", "pre", HOOK_A))  # another call: its own order
    dispatcher.submit(hook("c2", "post", HOOK_A))
    wait_until(lambda: ledger(dispatcher)["delivered"] == 3, what="the 3 hooks not held")
    assert sender.started("c1", "post", URL_A) == []
    assert counts(dispatcher) == (5, 3, 0, 0, 0, 0, 2)
    assert sender.index("end", "c2", "pre") < sender.index("start", "c2", "post")

    sender.open_gate()

    assert dispatcher.flush(10)
    assert sender.index("end", "c1", "pre") < sender.index("start", "c1", "post")
    assert counts(dispatcher) == (5, 5, 0, 0, 0, 0, 0)


def test_a_post_waits_while_its_pre_retries_and_goes_once_it_is_given_up(make, dead_file):
    sender = ScriptedSender(
        lambda d: RETRY if d.is_pre else OK,
        hold=lambda d: d.is_pre and d.attempts == 2,  # the first retry waits for the test
    )
    dispatcher = make(sender, retries=2, max_workers=3)
    assert dispatcher.deliver_now(hook("c1", "pre")) is False  # its retries go on
    dispatcher.submit(hook("c1", "post"))
    sender.open_gate()
    assert dispatcher.flush(10)
    assert [(e.what, e.kind) for e in sender.events] == [
        ("start", "pre"), ("end", "pre"),
        ("start", "pre"), ("end", "pre"),
        ("start", "pre"), ("end", "pre"),
        ("start", "post"), ("end", "post"),
    ]  # fmt: skip
    assert counts(dispatcher) == (2, 1, 2, 1, 1, 0, 0)
    assert list(records(dead_file)) == [("c1", "pre")]


# -- retries ----------------------------------------------------------------------------


def test_retries_follow_the_policy_then_the_hook_is_dead_lettered(make, dead_file):
    dispatcher = make(ScriptedSender(lambda d: RETRY), retries=2)
    dispatcher.submit(hook("c1"))
    assert dispatcher.flush(10)
    assert len(dispatcher.sender.started("c1")) == 3  # 1 attempt + 2 retries
    assert counts(dispatcher) == (1, 0, 2, 1, 1, 0, 0)
    record = records(dead_file)["c1", "pre"]
    assert (record["lastError"], record["attempts"]) == ("HTTP 503", 3)


def test_a_retry_waits_for_its_retry_after(make):
    answers = iter([Attempt(False, "HTTP 429", True, retry_after=0.3, status=429), OK])
    dispatcher = make(ScriptedSender(lambda d: next(answers)), backoff=0)
    dispatcher.submit(hook("c1"))
    assert dispatcher.flush(10)
    first, retry = dispatcher.sender.started("c1")
    assert retry.at - first.at >= 0.3
    assert counts(dispatcher) == (1, 1, 1, 0, 0, 0, 0)


def test_a_waiting_retry_holds_no_thread(make, dead_file):
    def answer(delivery: Delivery) -> Attempt:
        if delivery.call_id == "slow":
            return Attempt(False, "HTTP 503", retryable=True, retry_after=60, status=503)
        return OK

    dispatcher = make(ScriptedSender(answer), max_workers=1)
    dispatcher.submit(hook("slow"))
    for n in range(5):
        dispatcher.submit(hook(f"c{n}"))
    # The only worker delivers the other five while "slow" waits its 60 s.
    wait_until(lambda: ledger(dispatcher)["delivered"] == 5, what="5 hooks delivered")
    assert counts(dispatcher) == (6, 5, 0, 0, 0, 0, 1)
    dispatcher.close(0)
    assert counts(dispatcher) == (6, 5, 0, 1, 1, 0, 0)
    assert records(dead_file)["slow", "pre"]["lastError"] == "HTTP 503"


# -- failures that must still be counted ----------------------------------------------------


def test_a_sender_that_raises_fails_the_hook_and_spares_the_worker(make, dead_file, caplog):
    def answer(delivery: Delivery) -> Attempt:
        if delivery.call_id == "bad":
            raise RuntimeError("a bug in the sender")
        return OK

    dispatcher = make(ScriptedSender(answer), max_workers=1, retries=5)
    dispatcher.submit(hook("bad"))
    dispatcher.submit(hook("good"))  # the same, only worker sends it
    assert dispatcher.deliver_now(hook("bad", "post", HOOK_B)) is False  # never raises
    assert dispatcher.flush(10)
    assert counts(dispatcher) == (3, 1, 0, 2, 2, 0, 0)
    assert len(dispatcher.sender.started("bad")) == 1  # final: not retried
    assert records(dead_file)["bad", "pre"]["lastError"] == "unexpected error: RuntimeError"
    failures = [r for r in caplog.records if "the sender failed" in r.getMessage()]
    assert len(failures) == 2 and all(r.exc_info for r in failures)


def becomes_a_directory(tmp_path):
    (tmp_path / "dead.jsonl").mkdir()


def its_folder_becomes_a_file(tmp_path):
    (tmp_path / "sub").write_text("")


@pytest.mark.parametrize(
    ("path", "breaks"),
    [
        pytest.param("dead.jsonl", becomes_a_directory, id="a-directory"),
        pytest.param("sub/dead.jsonl", its_folder_becomes_a_file, id="under-a-file"),
    ],
)
def test_hooks_the_dead_letter_store_cannot_take_are_counted_lost(
    make, tmp_path, path, breaks, caplog
):
    # Checked at start (a ConfigError then); the store breaks while the app runs.
    dispatcher = make(ScriptedSender(lambda d: FINAL), dead_letter=str(tmp_path / path))
    breaks(tmp_path)
    dispatcher.submit(hook("c1"))
    assert dispatcher.flush(10)
    assert counts(dispatcher) == (1, 0, 0, 1, 0, 1, 0)
    dispatcher.close(5)
    dispatcher.submit(hook("late"))  # given up on this thread: lost as well
    assert counts(dispatcher) == (2, 0, 0, 2, 0, 2, 0)
    (log,) = [r for r in caplog.records if "lost" in r.getMessage()]  # rate-limited
    assert log.levelno == logging.ERROR
    assert "the dead-letter store failed" in log.getMessage()


@pytest.mark.parametrize(
    ("params", "sent"),
    [
        pytest.param({"size": float("inf")}, "Infinity", id="inf"),
        pytest.param(json.loads('{"size": -1e400}'), "-Infinity", id="-1e400"),  # as parsed
        pytest.param({"size": float("nan")}, "NaN", id="nan"),
    ],
)
def test_a_payload_strict_json_cannot_hold_is_delivered_with_stand_ins(
    params, sent, webhook_receiver, dead_file
):
    # json refuses NaN and infinities (allow_nan=False): the hook is sent all the same,
    # the value replaced by a documented stand-in, never left undeliverable.
    settings = load_settings([], {}, retries=3, backoff=0.01, timeout=2, dead_letter=dead_file)
    dispatcher = ThreadDispatcher(settings)
    target = Hook(method="vm.start", type="pre", url=webhook_receiver.url)
    try:
        dispatcher.submit(Delivery(target, {**PRE, "params": params}))
        assert dispatcher.flush(10)
    finally:
        dispatcher.close(5)
    assert counts(dispatcher) == (1, 1, 0, 0, 0, 0, 0)
    (hook,) = webhook_receiver.attempts
    assert hook.payload["params"] == {"size": sent}
    assert not os.path.exists(dead_file)
