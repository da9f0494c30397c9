"""``waitForResponse`` first attempts side by side (xo_webhooks.request.waiting), with a
dispatcher that only records: slots shared by requests, the deadline, failures."""

from __future__ import annotations

import threading

import pytest

from xo_webhooks.config import Hook
from xo_webhooks.request.waiting import deliver_first_attempts
from xo_webhooks.sending.delivery import Delivery

from .helpers import PRE

HOOK = Hook(method="vm.start", type="pre", url="http://127.0.0.1:9/", wait_for_response=True)


def deliveries(count: int) -> list[Delivery]:
    return [Delivery(HOOK, {**PRE, "callId": f"c{n}"}) for n in range(count)]


class Dispatcher:
    """Records which hooks were attempted and which queued; an attempt waits for *gate*."""

    def __init__(self, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.gate, self.fail = gate, fail
        self.attempted: list[str] = []
        self.queued: list[str] = []

    def deliver_now(self, delivery: Delivery) -> bool:
        if self.gate is not None:
            self.gate.wait(5)
        if self.fail:
            raise RuntimeError("a bug")
        self.attempted.append(delivery.payload["callId"])
        return True

    def submit(self, delivery: Delivery) -> None:
        if self.fail:
            raise RuntimeError("a bug")
        self.queued.append(delivery.payload["callId"])


@pytest.fixture(autouse=True)
def wait_threads_end(no_leaked_threads):
    """Every wait thread started ends within the test (the fixture checks)."""


def test_all_are_attempted_side_by_side_within_the_timeout():
    dispatcher = Dispatcher()
    deliver_first_attempts(dispatcher, deliveries(6), threading.BoundedSemaphore(3), 5)
    assert sorted(dispatcher.attempted) == [f"c{n}" for n in range(6)]
    assert dispatcher.queued == []


def test_what_has_not_started_at_the_deadline_is_queued():
    gate = threading.Event()
    dispatcher = Dispatcher(gate)
    deliver_first_attempts(dispatcher, deliveries(5), threading.BoundedSemaphore(1), 0.2)
    # The one thread is still on its first attempt: the other four are queued.
    assert len(dispatcher.queued) == 4 and dispatcher.attempted == []
    gate.set()


def test_with_every_slot_busy_a_request_waits_for_one():
    slots = threading.BoundedSemaphore(1)
    slots.acquire()  # another request's thread holds the only slot
    dispatcher = Dispatcher()
    threading.Timer(0.1, slots.release).start()  # and gives it back
    deliver_first_attempts(dispatcher, deliveries(3), slots, 5)
    assert sorted(dispatcher.attempted) == ["c0", "c1", "c2"]


def test_a_slot_never_freed_means_every_hook_is_queued():
    slots = threading.BoundedSemaphore(1)
    slots.acquire()
    dispatcher = Dispatcher()
    deliver_first_attempts(dispatcher, deliveries(2), slots, 0.1)
    assert dispatcher.queued == ["c0", "c1"] and dispatcher.attempted == []


def test_a_failing_dispatcher_is_logged_and_the_request_goes_on(caplog):
    failing = Dispatcher(fail=True)
    deliver_first_attempts(failing, deliveries(3), threading.BoundedSemaphore(2), 1)
    assert "could not send a waitForResponse hook" in caplog.text
    slots = threading.BoundedSemaphore(1)
    slots.acquire()  # no slot: every hook is queued at the deadline, and that fails too
    deliver_first_attempts(failing, deliveries(2), slots, 0.05)
    assert "could not queue a waitForResponse hook" in caplog.text
