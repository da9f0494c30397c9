"""Endpoints kept apart, over real HTTP on 127.0.0.1 (ThreadDispatcher and the middleware).

What the thread dispatcher promises once hooks go to more than one endpoint:

- a hung endpoint holds at most its concurrency of the workers: a healthy endpoint's
  hooks arrive meanwhile, and its backlog never takes the healthy one's places in the
  queue (its own overflow is dead-lettered, saying so);
- an endpoint that is down opens its breaker: no attempts, its hooks wait without a
  thread, one probe after a pause; a probe that succeeds closes it and every hook flows
  again, with one log line when it opens and one when it closes;
- hooks that wait on an open endpoint past their schedule are dead-lettered, saying
  since when the endpoint is unavailable;
- ``410 Gone`` disables an endpoint: every hook to it is dead-lettered at once;
- ``deliver_now`` (``waitForResponse``) makes no attempt to an endpoint that is down.

The breaker's and the lanes' logic without I/O: test_endpoints.py.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from xo_webhooks import load_settings
from xo_webhooks.config import Hook
from xo_webhooks.request.payload import pre_payload
from xo_webhooks.sending import endpoints
from xo_webhooks.sending.deadletter import read_records
from xo_webhooks.sending.delivery import Delivery
from xo_webhooks.sending.dispatcher import ThreadDispatcher
from xo_webhooks.sending.endpoints import endpoint_of
from xo_webhooks.sending.policy import DeadLetters

from .helpers import HungReceiver, assert_ledger
from .waiting import wait_until

pytestmark = pytest.mark.usefixtures("no_leaked_threads")

LOGGER = endpoints.logger.name  # where the transition lines are logged
#: How ``Breaker.unavailable`` writes a time.
WHEN = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


class GatedStore:
    """A dead-letter store whose writes wait for :attr:`gate` (5 s at most): the
    recorder thread falls behind, as under a burst of refusals."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.records: list[dict] = []

    def append(self, records) -> None:
        self.gate.wait(5)
        self.records += records


@pytest.fixture
def hung() -> Iterator[HungReceiver]:
    """A receiver that never answers; its connections dropped at teardown (so that
    attempts still waiting on it end at once)."""
    receiver = HungReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def dead_file(tmp_path) -> str:
    return str(tmp_path / "dead.jsonl")


@pytest.fixture
def dispatch(dead_file) -> Iterator[Callable[..., tuple[ThreadDispatcher, tuple[Hook, ...]]]]:
    """``dispatch(urls, **settings)`` -> (dispatcher, its hooks: one per URL, any
    method, pre/post), dead letters in *dead_file*; closed at teardown without waiting
    (a hung endpoint's hooks would never end)."""
    made: list[ThreadDispatcher] = []

    def make(
        urls: list[str], store: GatedStore | None = None, **overrides
    ) -> tuple[ThreadDispatcher, tuple[Hook, ...]]:
        overrides.setdefault("dead_letter", dead_file)
        hooks = [{"method": "*", "type": "pre/post", "url": url} for url in urls]
        settings = load_settings(hooks, {}, **overrides)
        dead = DeadLetters(settings, store=store) if store is not None else None
        made.append(ThreadDispatcher(settings, dead_letters=dead))
        return made[-1], settings.hooks

    yield make
    for dispatcher in made:
        dispatcher.close(0)


def payload(call_id: str) -> dict:
    return pre_payload(call_id, (None, None), "vm.start", {"id": "vm-1"}, 1_700_000_000_000)


def submit(dispatcher: ThreadDispatcher, hook: Hook, count: int, prefix: str) -> None:
    for n in range(count):
        dispatcher.submit(Delivery(hook, payload(f"{prefix}{n}")))


def dead_letters(path: str) -> list[dict]:
    try:
        return read_records(path)
    except FileNotFoundError:
        return []


def transition_logs(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


# -- a hung endpoint ---------------------------------------------------------------------


def test_a_hung_endpoint_does_not_hold_up_a_healthy_one(hung, webhook_receiver, dispatch):
    dispatcher, (to_hung, to_healthy) = dispatch(
        [hung.url, webhook_receiver.url], max_workers=4, timeout=2
    )
    started = time.monotonic()
    submit(dispatcher, to_hung, 40, "hung")
    submit(dispatcher, to_healthy, 20, "ok")
    received = webhook_receiver.wait_for(20, timeout=5)
    elapsed = time.monotonic() - started

    assert sorted(h.payload["callId"] for h in received) == sorted(f"ok{n}" for n in range(20))
    # The receiver records a hook just before answering: let the answers reach the
    # dispatcher.
    origin = endpoint_of(webhook_receiver.url)
    wait_until(lambda: dispatcher.endpoint_stats()[origin]["delivered"] == 20, 5, "20 counted")
    by_endpoint = dispatcher.endpoint_stats()
    healthy = by_endpoint[origin]
    assert (healthy["state"], healthy["delivered"], healthy["pending"]) == ("closed", 20, 0)
    stuck = by_endpoint[hung.origin]
    assert (stuck["pending"], stuck["delivered"], stuck["failed"]) == (40, 0, 0)
    # At most its concurrency (max_workers // 2) of attempts at once, each lasting the
    # whole timeout: what the hung endpoint can have seen in that time.
    assert 1 <= hung.accepted <= 2 * (1 + int(elapsed // 2))
    stats = dispatcher.stats()
    assert_ledger(stats)
    assert (stats["accepted"], stats["delivered"], stats["pending"]) == (60, 20, 40)


def test_a_hung_endpoints_backlog_never_refuses_another_endpoints_hooks(
    hung, webhook_receiver, dispatch, dead_file
):
    dispatcher, (to_hung, to_healthy) = dispatch(
        [hung.url, webhook_receiver.url], queue_size=50, timeout=2
    )
    submit(dispatcher, to_hung, 100, "hung")
    submit(dispatcher, to_healthy, 20, "ok")
    webhook_receiver.wait_for(20, timeout=5)
    # The overflow is written by the recorder thread, off the caller's path; the receiver
    # records a hook just before answering.
    stats = wait_until(
        lambda: (s := dispatcher.stats())["failed"] == 75 and s["delivered"] == 20 and s,
        5, "75 failed and 20 delivered",
    )  # fmt: skip
    assert_ledger(stats)
    assert stats == {
        "accepted": 120, "delivered": 20, "retried": 0, "failed": 75,
        "dead_lettered": 75, "lost": 0, "pending": 25,
        "spooled": 0, "left": 0, "resumed": 0, "spool_errors": 0, "recording": 0,
    }  # fmt: skip
    records = {r["payload"]["callId"]: r for r in dead_letters(dead_file)}
    assert sorted(records) == sorted(f"hung{n}" for n in range(25, 100))  # the first 25 stay
    assert {r["url"] for r in records.values()} == {hung.url}
    assert records["hung25"]["lastError"] == (
        f"queue full for endpoint {hung.origin}: it has 25 hooks pending, its share of "
        "XO_WEBHOOKS_QUEUE_SIZE=50 is 25, and the places left are kept for other endpoints"
    )
    assert all(r["lastError"].startswith("queue full for endpoint") for r in records.values())
    by_endpoint = dispatcher.endpoint_stats()
    assert (by_endpoint[hung.origin]["pending"], by_endpoint[hung.origin]["failed"]) == (25, 75)
    healthy = by_endpoint[endpoint_of(webhook_receiver.url)]
    assert (healthy["delivered"], healthy["failed"], healthy["pending"]) == (20, 0, 0)


def test_a_refusal_counts_only_the_hooks_the_endpoint_holds(hung, dispatch):
    store = GatedStore()
    dispatcher, (to_hung, _) = dispatch(
        [hung.url, "http://127.0.0.1:9/never-sent"], store=store, queue_size=50, timeout=2
    )
    submit(dispatcher, to_hung, 60, "hung")  # 25 kept (its share), 35 refused
    pending_while_behind = dispatcher.endpoint_stats()[hung.origin]["pending"]
    store.gate.set()
    wait_until(lambda: dispatcher.stats()["failed"] == 35, 5, "35 failed")
    assert_ledger(dispatcher.stats())

    expected = (
        f"queue full for endpoint {hung.origin}: it has 25 hooks pending, its share of "
        "XO_WEBHOOKS_QUEUE_SIZE=50 is 25, and the places left are kept for other endpoints"
    )
    assert [r["lastError"] for r in store.records] == [expected] * 35
    assert pending_while_behind == 25  # what it holds, not 60


# -- an outage: the breaker opens, waits, probes, closes -------------------------------


def test_an_outage_opens_the_breaker_and_a_probe_closes_it(
    webhook_receiver, dispatch, dead_file, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setattr(endpoints, "FIRST_PAUSE", 0.3)
    # 503 to the two attempts that open the breaker and to two probes (after 0.3 s and
    # 0.6 s more): down for over 2 s, longer than the schedule's first two steps (1 s,
    # 1 s), yet within what the schedule lets a hook wait (4 s).
    arrivals: list[float] = []

    def answer(n: int, hook) -> int:
        arrivals.append(time.monotonic())
        return 503 if n <= 4 else 204

    webhook_receiver.respond_with(answer)
    dispatcher, (hook,) = dispatch(
        [webhook_receiver.url], retry_schedule="1s,1s,2s", breaker_threshold=2,
        endpoint_concurrency=1,
    )  # fmt: skip
    submit(dispatcher, hook, 10, "c")
    assert dispatcher.flush(8)

    # While down, only the probes went: no hook spent its retries on the outage.
    assert [a.status for a in webhook_receiver.attempts] == [503] * 4 + [204] * 10
    assert arrivals[4] - arrivals[1] >= 0.3 + 0.6 + 1.2 - 0.05  # the pause doubled
    assert sorted(h.payload["callId"] for h in webhook_receiver.received) == sorted(
        f"c{n}" for n in range(10)
    )
    stats = dispatcher.stats()
    assert_ledger(stats)
    assert (stats["delivered"], stats["failed"], stats["dead_lettered"]) == (10, 0, 0)
    assert dead_letters(dead_file) == []
    (endpoint,) = dispatcher.endpoint_stats().values()
    assert endpoint["state"] == "closed"
    assert (endpoint["opened_at"], endpoint["consecutive_failures"]) == (None, 0)
    assert endpoint["delivered"] == 10 and endpoint["last_success"] is not None

    origin = endpoint_of(webhook_receiver.url)
    (down,) = transition_logs(caplog, logging.WARNING)
    assert down.startswith(
        f"endpoint {origin} is down after 2 consecutive failures (last: HTTP 503): "
        "no attempts to it for 0.3 s, then one probe"
    )
    (back,) = transition_logs(caplog, logging.INFO)
    # Each of the 10 hooks waited, counted once: 8 parked when it opened, the 2 failed
    # first attempts and the 2 failed probes again when their retries came due.
    assert re.fullmatch(
        rf"endpoint {re.escape(origin)} is back after \d+ s down; 10 hook\(s\) waited "
        "meanwhile, and those still pending flow again",
        back,
    )
    assert transition_logs(caplog, logging.ERROR) == []


def test_hooks_waiting_on_a_refusing_endpoint_expire_with_their_schedule(
    refused_url, dispatch, dead_file, monkeypatch, caplog
):
    monkeypatch.setattr(endpoints, "FIRST_PAUSE", 60.0)  # no probe during the test
    caplog.set_level(logging.INFO, logger=LOGGER)
    dispatcher, (hook,) = dispatch(
        [refused_url], retry_schedule=[0.3, 0.3], breaker_threshold=2, endpoint_concurrency=1
    )
    before = time.time()
    submit(dispatcher, hook, 5, "c")
    assert dispatcher.flush(5)  # each waited at most what its schedule had left: 0.6 s

    stats = dispatcher.stats()
    assert_ledger(stats)
    assert (stats["failed"], stats["dead_lettered"], stats["retried"]) == (5, 5, 0)
    origin = endpoint_of(refused_url)
    records = dead_letters(dead_file)
    assert sorted(r["attempts"] for r in records) == [0, 0, 0, 1, 1]  # 2 opened it
    for record in records:
        assert re.fullmatch(
            rf"endpoint {re.escape(origin)} unavailable since {WHEN} "
            r"\(last error: connection failed: .+\)",
            record["lastError"],
        ), record["lastError"]
    endpoint = dispatcher.endpoint_stats()[origin]
    assert endpoint["state"] == "open"
    assert before <= endpoint["opened_at"] <= time.time()
    assert (endpoint["pending"], endpoint["failed"], endpoint["delivered"]) == (0, 5, 0)
    assert endpoint["consecutive_failures"] == 2
    assert endpoint["last_error"].startswith("connection failed: ")
    assert len(transition_logs(caplog, logging.WARNING)) == 1
    assert transition_logs(caplog, logging.INFO) == []


# -- 410 Gone ---------------------------------------------------------------------------


def test_410_gone_disables_the_endpoint(webhook_receiver, dispatch, dead_file, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    answer = threading.Event()  # the first answer waits until all 5 hooks are queued
    webhook_receiver.respond_with(lambda n, hook: 410 if answer.wait(5) else 500)
    dispatcher, (hook,) = dispatch([webhook_receiver.url], endpoint_concurrency=1)
    submit(dispatcher, hook, 5, "first")
    answer.set()
    assert dispatcher.flush(5)
    submit(dispatcher, hook, 3, "later")  # given up at once: no attempt to wait for
    assert dispatcher.flush(5)

    assert len(webhook_receiver.attempts) == 1
    stats = dispatcher.stats()
    assert_ledger(stats)
    assert (stats["accepted"], stats["failed"], stats["dead_lettered"]) == (8, 8, 8)
    origin = endpoint_of(webhook_receiver.url)
    endpoint = dispatcher.endpoint_stats()[origin]
    assert (endpoint["state"], endpoint["failed"], endpoint["pending"]) == ("disabled", 8, 0)
    records = dead_letters(dead_file)
    assert sorted(r["attempts"] for r in records) == [0] * 7 + [1]
    for record in records:
        assert re.fullmatch(
            rf"endpoint {re.escape(origin)} is gone: it answered 410 Gone at {WHEN}",
            record["lastError"],
        ), record["lastError"]
    (error,) = transition_logs(caplog, logging.ERROR)
    assert error.startswith(f"endpoint {origin} answered 410 Gone: disabled until restart; ")


def test_post_hooks_held_for_a_pre_that_got_410_are_given_up_at_once(
    webhook_receiver, dispatch, dead_file
):
    webhook_receiver.respond_with(410)
    dispatcher, (hook,) = dispatch([webhook_receiver.url])
    for kind in ("pre", "post"):  # the post waits for its pre, then finds the endpoint gone
        dispatcher.submit(Delivery(hook, {**payload("c1"), "type": kind}))
    assert dispatcher.flush(5)  # not the schedule's 27 hours
    assert len(webhook_receiver.attempts) == 1
    assert_ledger(dispatcher.stats())
    records = {r["payload"]["type"]: r for r in dead_letters(dead_file)}
    assert (records["pre"]["attempts"], records["post"]["attempts"]) == (1, 0)
    assert "is gone: it answered 410 Gone" in records["post"]["lastError"]


# -- deliver_now (waitForResponse) ------------------------------------------------------


def test_hooks_waiting_after_deliver_now_alone_are_still_given_up(refused_url, dispatch):
    """Only waitForResponse hooks, no retries: no worker was ever started by a submit,
    and the hook that waits on the open endpoint must still be given up in time."""
    dispatcher, (hook,) = dispatch([refused_url], retries=0, breaker_threshold=1)
    assert dispatcher.deliver_now(Delivery(hook, payload("opens-it"))) is False
    assert dispatcher.deliver_now(Delivery(hook, payload("waits"))) is False
    assert dispatcher.flush(5)
    stats = dispatcher.stats()
    assert_ledger(stats)
    assert (stats["accepted"], stats["dead_lettered"]) == (2, 2)


@pytest.mark.parametrize(
    ("status", "state", "pending"),
    [
        pytest.param(503, "open", 2, id="open-the-hook-waits"),
        pytest.param(410, "disabled", 0, id="disabled-the-hook-is-dead-lettered"),
    ],
)
def test_deliver_now_makes_no_attempt_to_an_endpoint_that_is_down(
    webhook_receiver, dispatch, dead_file, monkeypatch, status, state, pending
):
    monkeypatch.setattr(endpoints, "FIRST_PAUSE", 60.0)
    webhook_receiver.respond_with(status)
    dispatcher, (hook,) = dispatch([webhook_receiver.url], breaker_threshold=1, timeout=5)
    assert dispatcher.deliver_now(Delivery(hook, payload("first"))) is False
    origin = endpoint_of(webhook_receiver.url)
    assert dispatcher.endpoint_stats()[origin]["state"] == state

    webhook_receiver.respond_with(204, delay=2)  # an attempt now would take 2 s, and succeed
    started = time.monotonic()
    assert dispatcher.deliver_now(Delivery(hook, payload("second"))) is False
    assert time.monotonic() - started < 1

    assert len(webhook_receiver.attempts) == 1
    if state == "disabled":
        wait_until(lambda: dispatcher.stats()["dead_lettered"] == 2, 5, "2 dead letters")
        assert {r["payload"]["callId"]: r["attempts"] for r in dead_letters(dead_file)} == {
            "first": 1, "second": 0,
        }  # fmt: skip
    stats = dispatcher.stats()
    assert_ledger(stats)
    # Open: the first hook waits for its retry, the second for the endpoint. Disabled:
    # both are dead-lettered.
    assert stats["pending"] == dispatcher.endpoint_stats()[origin]["pending"] == pending


# -- through the middleware ---------------------------------------------------------------


def call_api(url: str, n: int) -> float:
    """Call ``vm.start`` through *url*; return how long the answer took."""
    started = time.monotonic()
    answer = requests.post(
        url, json={"jsonrpc": "2.0", "id": n, "method": "vm.start", "params": {"id": "vm-1"}},
        timeout=10,
    )  # fmt: skip
    assert answer.json()["result"]["power_state"] == "Running"
    return time.monotonic() - started


def test_a_hung_endpoint_through_the_middleware(hung, webhook_receiver, serve, wrap, flask_app):
    hooks = [
        {"method": "vm.start", "type": "post", "url": hung.url},
        {"method": "vm.start", "type": "post", "url": webhook_receiver.url},
    ]
    middleware = wrap(flask_app.wsgi_app, hooks=hooks, max_workers=4, timeout=2)
    url = serve(middleware).url + "/api"
    durations = [call_api(url, n) for n in range(10)]
    webhook_receiver.wait_for(10, timeout=5)
    origin = endpoint_of(webhook_receiver.url)
    wait_until(lambda: middleware.endpoint_stats()[origin]["delivered"] == 10, 5, "10 counted")

    assert max(durations) < 1  # hooks never hold the API up
    by_endpoint = middleware.endpoint_stats()
    assert set(by_endpoint) == {hung.origin, endpoint_of(webhook_receiver.url)}
    assert by_endpoint[hung.origin]["pending"] == 10
    assert by_endpoint[endpoint_of(webhook_receiver.url)] | {"last_success": None} == {
        "state": "closed", "pending": 0, "delivered": 10, "failed": 0,
        "consecutive_failures": 0, "last_error": None, "last_success": None, "opened_at": None,
        "spool": "memory",
    }  # fmt: skip
    assert_ledger(middleware.stats())
    # End the attempts in flight at once, and what waits for a retry: the wrap fixture's
    # close would wait for them.
    hung.close()
    middleware.close(0)
    assert_ledger(middleware.stats())


def test_wait_for_response_stops_waiting_once_the_endpoint_is_open(
    hung, serve, wrap, flask_app, monkeypatch
):
    monkeypatch.setattr(endpoints, "FIRST_PAUSE", 60.0)
    hooks = [{"method": "vm.start", "type": "pre", "url": hung.url, "waitForResponse": True}]
    middleware = wrap(flask_app.wsgi_app, hooks=hooks, timeout=1, breaker_threshold=1)
    url = serve(middleware).url + "/api"

    first = call_api(url, 0)  # waits for the hung receiver, up to the timeout
    later = [call_api(url, n) for n in range(1, 5)]

    assert first >= 1
    assert max(later) < 0.5  # no attempt: the endpoint is open
    assert hung.accepted == 1
    endpoint = middleware.endpoint_stats()[hung.origin]
    assert endpoint["state"] == "open" and endpoint["opened_at"] is not None
    assert (endpoint["pending"], endpoint["consecutive_failures"]) == (5, 1)
    assert endpoint["last_error"] == "timed out after 1 s"
    assert_ledger(middleware.stats())
    middleware.close(0)
    assert_ledger(middleware.stats())
