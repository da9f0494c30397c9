"""Endpoints on Celery: the circuit breaker every worker shares in Redis, and the hooks
parked in Redis (while their endpoint is open, or for a retry longer than a countdown).

In this process: :class:`~xo_webhooks.sending.celery.Worker` with the fake bound task of
test_celery_worker.py, a real ``redis-server`` and the test receiver; ``Parking`` and
``CeleryDispatcher.endpoint_stats()`` on their own. With real worker processes (slow): an
outage and its recovery, a retry longer than the visibility timeout, and a worker killed
while hooks are parked.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import Counter
from typing import Any

import pytest

from xo_webhooks import load_settings
from xo_webhooks.request.payload import pre_payload
from xo_webhooks.sending import endpoints
from xo_webhooks.sending.delivery import Delivery
from xo_webhooks.sending.endpoints import FIRST_PAUSE, Breaker, endpoint_of

from .helpers import assert_ledger
from .waiting import wait_until

redis = pytest.importorskip("redis", reason="the celery extra is not installed")
Retry = pytest.importorskip("celery.exceptions", reason="the celery extra is not installed").Retry

from xo_webhooks.sending import endpoints_redis  # noqa: E402
from xo_webhooks.sending.celery import (  # noqa: E402
    COUNTDOWN_LIMIT,
    PRE_DONE_KEY,
    QUEUE,
)
from xo_webhooks.sending.celery_publisher import CeleryDispatcher  # noqa: E402
from xo_webhooks.sending.endpoints_redis import Parking  # noqa: E402

from . import test_celery, test_celery_worker  # noqa: E402
from .test_celery import Workers, call, hook  # noqa: E402
from .test_celery_worker import FakeTask, dead_letters, message  # noqa: E402

# The fixtures of those modules, found by pytest under these names.
broker, workers, wrapped = test_celery.broker, test_celery.workers, test_celery.wrapped
make_worker, markers = test_celery_worker.make_worker, test_celery_worker.markers

#: A schedule whose sum (12 s) outlasts the first pause (5 s) before a probe.
SCHEDULE = {"retries": None, "backoff": None, "retry_schedule": [1, 1, 10]}
ISO_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def shared_breaker(client: Any, origin: str) -> dict[str, Any]:
    """The breaker of *origin* as Redis holds it (``{}``: none, closed)."""
    raw = client.get(f"xo-webhooks:endpoint:{origin}")
    return json.loads(raw) if raw else {}


def parked(client: Any, origin: str) -> list[tuple[dict[str, Any], float]]:
    """The hooks parked for *origin* (without the nonce of each parking), with when
    each is due."""
    members = client.zrange(f"xo-webhooks:parked:{origin}", 0, -1, withscores=True)
    kept = [(json.loads(member), due) for member, due in members]
    assert all(len(message.pop("parkId")) == 16 for message, _ in kept)
    return kept


def plant_open_breaker(client: Any, origin: str) -> dict[str, Any]:
    """Make *origin*'s shared breaker open (as another worker's failures left it)."""
    now = time.time()
    breaker = Breaker(2, state="open", failures=2, opened_at=now - 60, probe_at=now + 20,
                      pause=FIRST_PAUSE, last_error="HTTP 503")  # fmt: skip
    client.set(f"xo-webhooks:endpoint:{origin}", json.dumps(breaker.to_dict()))
    return breaker.to_dict()


def utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def logged(caplog: Any, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


# -- the shared breaker, in this process --------------------------------------------------


def test_consecutive_outages_open_the_shared_breaker_and_later_hooks_are_parked_unsent(
    make_worker, markers, webhook_receiver, caplog
):
    webhook_receiver.respond_with(503)
    worker = make_worker(breaker_threshold=2, **SCHEDULE)
    origin = endpoint_of(webhook_receiver.url)
    with caplog.at_level(logging.INFO, logger="xo_webhooks.sending.endpoints"):
        for _ in range(2):
            with pytest.raises(Retry):  # 1 s away: a countdown
                worker.run(FakeTask(), message(worker, "pre"))
        waiting, task = message(worker, "pre"), FakeTask()
        before = time.time()
        assert worker.run(task, waiting) == "parked"

    state = shared_breaker(markers, origin)
    assert (state["state"], state["failures"], state["last_error"]) == ("open", 2, "HTTP 503")
    assert before - 5 < state["opened_at"] <= before
    assert state["probe_at"] == pytest.approx(state["opened_at"] + FIRST_PAUSE)
    assert len(webhook_receiver.attempts) == 2 and task.retries == []  # not attempted
    # Parked until the probe, with the time it gives up: the sum of its schedule.
    ((kept, due),) = parked(markers, origin)
    assert kept == {**waiting, "giveUpAt": pytest.approx(before + 12, abs=1)}
    assert due == pytest.approx(state["probe_at"])
    (opened,) = logged(caplog, "is down after 2 consecutive failures")
    assert opened.levelno == logging.WARNING and "HTTP 503" in opened.getMessage()

    # Another worker process (its own client) sees the same breaker, and parks too.
    other = make_worker(breaker_threshold=2, **SCHEDULE)
    assert other.breakers.load(origin).to_dict() == state
    assert other.run(FakeTask(), message(other, "pre")) == "parked"
    assert len(webhook_receiver.attempts) == 2
    assert other.parking.count(origin) == 2


@pytest.mark.parametrize(
    ("settings", "retry_after", "where", "low", "high"),
    [
        pytest.param({}, "120", "parked", 120, 120, id="retry-after-120s"),
        pytest.param(
            SCHEDULE | {"retry_schedule": [120]}, None, "parked", 96, 120, id="schedule-2m-jittered"
        ),
        pytest.param({}, "61", "parked", 61, 61, id="retry-after-just-over-the-limit"),
        pytest.param({}, "60", "countdown", 60, 60, id="retry-after-at-the-limit"),
    ],
)
def test_a_retry_later_than_the_countdown_limit_is_parked_in_redis(
    make_worker, markers, webhook_receiver, settings, retry_after, where, low, high
):
    headers = {"Retry-After": retry_after} if retry_after else None
    webhook_receiver.respond_with(503, headers=headers)
    worker = make_worker(**settings)
    origin = endpoint_of(webhook_receiver.url)
    pre, task = message(worker, "pre"), FakeTask()
    before = time.time()
    if where == "countdown":
        with pytest.raises(Retry):
            worker.run(task, pre)
        ((asked),) = task.retries
        assert low <= asked["countdown"] <= high <= COUNTDOWN_LIMIT
        assert parked(markers, origin) == []
        return
    assert worker.run(task, pre) == "parked"
    after = time.time()
    assert task.retries == []  # no countdown: the worker holds nothing
    ((kept, due),) = parked(markers, origin)
    assert kept == {**pre, "attempts": 1, "lastError": "HTTP 503"}
    assert before + low <= due <= after + high
    assert shared_breaker(markers, origin)["state"] == "closed"  # one failure: still closed


def test_410_disables_the_endpoint_for_every_worker(
    make_worker, markers, webhook_receiver, tmp_path, caplog
):
    webhook_receiver.respond_with(410)
    worker, other = make_worker(), make_worker()
    origin = endpoint_of(webhook_receiver.url)
    first, later = message(worker, "pre"), message(other, "pre")
    with caplog.at_level(logging.INFO, logger="xo_webhooks.sending.endpoints"):
        assert worker.run(FakeTask(), first) == "failed"
        assert other.run(FakeTask(), later) == "failed"

    assert shared_breaker(markers, origin)["state"] == "disabled"
    assert len(webhook_receiver.attempts) == 1  # the later hook was not attempted
    gone = rf"endpoint {re.escape(origin)} is gone: it answered 410 Gone at {ISO_TIME}"
    records = {r["id"]: r for r in dead_letters(tmp_path)}
    assert [records[first["id"]]["attempts"], records[later["id"]]["attempts"]] == [1, 0]
    assert all(re.fullmatch(gone, r["lastError"]) for r in records.values()), records
    assert markers.exists(PRE_DONE_KEY.format(later["id"]))  # its post hook need not wait
    (disabled,) = logged(caplog, "answered 410 Gone: disabled")
    assert disabled.levelno == logging.ERROR


@pytest.mark.parametrize(
    ("extra", "outcome", "due_in"),
    [
        # The probe is due in 20 s; [1, 1, 10] leaves 11 s after one attempt.
        pytest.param({"attempts": 1}, "parked", 11, id="until-its-schedule-runs-out"),
        pytest.param({"giveUpAt": 30}, "parked", 20, id="until-the-probe"),
        pytest.param({"giveUpAt": -1}, "failed", None, id="its-give-up-time-passed"),
        pytest.param({"attempts": 3}, "failed", None, id="its-schedule-used-up"),
    ],
)
def test_a_hook_waits_for_an_open_endpoint_as_long_as_its_schedule_lasts(
    make_worker, markers, webhook_receiver, tmp_path, extra, outcome, due_in
):
    worker = make_worker(breaker_threshold=2, **SCHEDULE)
    origin = endpoint_of(webhook_receiver.url)
    state = plant_open_breaker(markers, origin)
    now = time.time()
    relative = {k: now + v if k == "giveUpAt" else v for k, v in extra.items()}
    waiting = message(worker, "pre", lastError="HTTP 503", **relative)

    assert worker.run(FakeTask(), waiting) == outcome
    assert webhook_receiver.attempts == []
    if outcome == "parked":
        ((kept, due),) = parked(markers, origin)
        assert kept["giveUpAt"] == pytest.approx(relative.get("giveUpAt", now + 11), abs=1)
        assert due == pytest.approx(now + due_in, abs=1)
        assert dead_letters(tmp_path) == []
    else:
        (record,) = dead_letters(tmp_path)
        assert record["id"] == waiting["id"] and record["attempts"] == waiting["attempts"]
        assert record["lastError"] == (
            f"endpoint {origin} unavailable since {utc(state['opened_at'])} (last error: HTTP 503)"
        )
        assert parked(markers, origin) == []


def test_a_successful_probe_closes_the_breaker_and_makes_the_parked_hooks_due(
    make_worker, markers, webhook_receiver, caplog, monkeypatch
):
    monkeypatch.setattr(endpoints, "FIRST_PAUSE", 0.3)
    worker = make_worker(breaker_threshold=2, **SCHEDULE)
    origin = endpoint_of(webhook_receiver.url)
    webhook_receiver.respond_with(503)
    for _ in range(2):
        with pytest.raises(Retry):
            worker.run(FakeTask(), message(worker, "pre"))
    waiting = [message(worker, "pre") for _ in range(2)]
    assert [worker.run(FakeTask(), m) for m in waiting] == ["parked", "parked"]
    long_retry = message(worker, "pre", attempts=1, lastError="HTTP 503")
    worker.parking.park(origin, long_retry, time.time() + 3600)  # a 1 h Retry-After
    probe_at = shared_breaker(markers, origin)["probe_at"]
    wait_until(lambda: time.time() >= probe_at, 5, "the probe to be due")

    webhook_receiver.respond_with(204)
    due: list[dict[str, Any]] = []
    assert worker.parking.move_due(due.append) == 2
    with caplog.at_level(logging.INFO, logger="xo_webhooks.sending.endpoints"):
        assert worker.run(FakeTask(), due[0]) == "delivered"  # the probe

    assert shared_breaker(markers, origin)["state"] == "closed"
    assert worker.breakers.load(origin).opened_at is None
    # The endpoint is back: whatever is parked for it is due now, the long retry too.
    now = time.time()
    assert [(m["id"], when <= now) for m, when in parked(markers, origin)] == [
        (long_retry["id"], True)
    ]
    (back,) = logged(caplog, "is back after")
    assert back.levelno == logging.INFO
    assert worker.parking.move_due(due.append) == 1 and due[-1]["id"] == long_retry["id"]


def test_the_back_online_line_counts_each_waiting_hook_once(
    make_worker, markers, webhook_receiver, caplog, monkeypatch
):
    """Two hooks wait through an outage; one is the probe, and the other comes back
    while the probe is on its way (half-open) and is parked again. The info line says
    2 hooks waited (log_transition: "distinct hooks that waited"), however often each
    was parked again (each failed probe)."""
    monkeypatch.setattr(endpoints, "FIRST_PAUSE", 0.3)
    caplog.set_level(logging.INFO, logger="xo_webhooks.sending.endpoints")
    worker = make_worker(breaker_threshold=2, **SCHEDULE)
    prober = make_worker(breaker_threshold=2, **SCHEDULE)  # another worker process
    origin = endpoint_of(webhook_receiver.url)
    webhook_receiver.respond_with(503)
    for _ in range(2):
        with pytest.raises(Retry):
            worker.run(FakeTask(), message(worker, "pre"))
    for _ in range(2):
        assert worker.run(FakeTask(), message(worker, "pre")) == "parked"
    probe_at = shared_breaker(markers, origin)["probe_at"]
    wait_until(lambda: time.time() >= probe_at, 5, "the probe to be due")

    asked, answer = threading.Event(), threading.Event()

    def answer_when_told(number: int, h: Any) -> int:
        asked.set()
        return 204 if answer.wait(1.5) else 503  # within the 2 s timeout

    webhook_receiver.respond_with(answer_when_told)
    due: list[dict[str, Any]] = []
    assert worker.parking.move_due(due.append) == 2
    outcome: list[str] = []
    probe = threading.Thread(target=lambda: outcome.append(prober.run(FakeTask(), due[0])))
    probe.start()
    try:
        assert asked.wait(5)  # the probe is on its way
        assert shared_breaker(markers, origin)["state"] == "half-open"
        assert worker.run(FakeTask(), due[1]) == "parked"  # parked again, for 1 s
    finally:
        answer.set()
        probe.join(10)
    assert outcome == ["delivered"]
    assert shared_breaker(markers, origin)["state"] == "closed"
    (back,) = logged(caplog, "is back after")
    assert "; 2 hook(s) waited" in back.getMessage(), back.getMessage()


# -- parking ------------------------------------------------------------------------------

ORIGIN, OTHER = "http://127.0.0.1:1", "http://127.0.0.1:2"


def test_move_due_publishes_the_due_hooks_and_keeps_the_others(markers):
    parking = Parking(markers)
    now = time.time()
    parking.park(ORIGIN, {"id": "due"}, now - 1)
    parking.park(ORIGIN, {"id": "later"}, now + 100)
    parking.park(OTHER, {"id": "due-elsewhere"}, now)
    published: list[dict[str, Any]] = []
    assert parking.move_due(published.append) == 2
    assert sorted(m["id"] for m in published) == ["due", "due-elsewhere"]
    assert (parking.count(ORIGIN), parking.count(OTHER)) == (1, 0)
    assert parking.move_due(published.append) == 0
    assert [m["id"] for m, _ in parked(markers, ORIGIN)] == ["later"]


def test_a_claim_whose_publish_failed_is_taken_back_after_its_lease(markers, monkeypatch):
    monkeypatch.setattr(endpoints_redis, "CLAIM_LEASE", 1.0)
    parking = Parking(markers)
    for n in range(3):
        parking.park(ORIGIN, {"id": f"hook-{n}"}, time.time() - 1)
    published: list[dict[str, Any]] = []

    def broker_gone_after_one(hook_message: dict[str, Any]) -> None:
        if published:
            raise ConnectionError("the broker is gone")
        published.append(hook_message)

    with pytest.raises(ConnectionError):
        parking.move_due(broker_gone_after_one)
    assert parking.count(ORIGIN) == 2  # claimed, not lost
    assert markers.zcard(f"xo-webhooks:parked-claims:{ORIGIN}") == 2
    assert parking.move_due(published.append) == 0  # leased: no other worker takes them
    wait_until(lambda: parking.move_due(published.append), 5, "the lease to pass")
    assert sorted(m["id"] for m in published) == ["hook-0", "hook-1", "hook-2"]
    assert parking.count(ORIGIN) == 0


def test_release_makes_every_parked_hook_due_now_and_delays_none(markers):
    parking = Parking(markers)
    now = time.time()
    parking.park(ORIGIN, {"id": "later"}, now + 100)
    parking.park(ORIGIN, {"id": "overdue"}, now - 50)
    parking.release(ORIGIN)
    due = {m["id"]: when for m, when in parked(markers, ORIGIN)}
    assert now <= due["later"] <= time.time()
    assert due["overdue"] == pytest.approx(now - 50)


# -- the API side -------------------------------------------------------------------------


@pytest.fixture
def dispatcher(redis_server, webhook_receiver) -> Any:
    """A CeleryDispatcher for the receiver (two URLs, one endpoint) and a port where
    nothing listens; hooks wait for the response."""
    hooks = [
        {"method": "vm.*", "type": "pre", "url": webhook_receiver.url, "waitForResponse": True},
        {"method": "vm.*", "type": "post", "url": webhook_receiver.url + "other"},
        {"method": "vm.*", "type": "pre", "url": "http://127.0.0.1:9/"},
    ]
    settings = load_settings(hooks, {}, broker_url=redis_server.url, breaker_threshold=2)
    made = CeleryDispatcher(settings)
    yield made
    made.close(1)


def test_endpoint_stats_read_the_shared_state(make_worker, markers, webhook_receiver, dispatcher):
    worker = make_worker(breaker_threshold=2, **SCHEDULE)
    origin = endpoint_of(webhook_receiver.url)
    assert worker.run(FakeTask(), message(worker, "pre")) == "delivered"
    webhook_receiver.respond_with(503)
    for _ in range(2):
        with pytest.raises(Retry):
            worker.run(FakeTask(), message(worker, "pre"))
    assert worker.run(FakeTask(), message(worker, "pre")) == "parked"
    state = shared_breaker(markers, origin)

    stats = dispatcher.endpoint_stats()
    assert set(stats) == {origin, "http://127.0.0.1:9"}  # one per endpoint, not per URL
    assert stats[origin] == {
        "state": "open",
        "pending": 1,
        "delivered": 1,
        "failed": 0,
        "consecutive_failures": 2,
        "last_error": "HTTP 503",
        "last_success": pytest.approx(time.time(), abs=10),
        "opened_at": state["opened_at"],
    }
    assert stats["http://127.0.0.1:9"] == {
        "state": "closed", "pending": 0, "delivered": 0, "failed": 0,
        "consecutive_failures": 0, "last_error": None, "last_success": None, "opened_at": None,
    }  # fmt: skip


def test_wait_for_response_makes_no_attempt_to_an_open_endpoint(
    markers, webhook_receiver, dispatcher
):
    origin = endpoint_of(webhook_receiver.url)
    plant_open_breaker(markers, origin)
    payload = pre_payload("call-1", (None, None), "vm.start", {}, 1_700_000_000_000)
    assert dispatcher.deliver_now(Delivery(dispatcher.settings.hooks[0], payload)) is False
    assert webhook_receiver.attempts == []
    assert markers.llen(QUEUE) == 1  # handed to the workers, who park it
    stats = dispatcher.stats()
    assert (stats["published"], stats["delivered"], stats["failed"]) == (1, 0, 0)
    assert_ledger(stats)


def test_wait_for_response_attempts_log_the_transitions_they_cause(
    markers, webhook_receiver, dispatcher, caplog
):
    """Attempts made on the request path move the shared breaker too; the transitions
    they cause are logged as the workers' are (README: "Each transition is logged
    once")."""
    caplog.set_level(logging.INFO, logger="xo_webhooks.sending.endpoints")
    origin = endpoint_of(webhook_receiver.url)
    payload = pre_payload("call-1", (None, None), "vm.start", {}, 1_700_000_000_000)
    webhook_receiver.respond_with(503)
    for _ in range(2):
        assert dispatcher.deliver_now(Delivery(dispatcher.settings.hooks[0], payload)) is False
    assert shared_breaker(markers, origin)["state"] == "open"
    assert len(logged(caplog, "is down after 2 consecutive failures")) == 1


class PublishedTasks:
    """A Celery app that keeps what is published instead of sending it."""

    def __init__(self) -> None:
        self.tasks: list[tuple[dict[str, Any], float | None]] = []

    def send_task(self, name: str, kwargs: dict[str, Any], countdown: float | None = None,
                  **options: Any) -> None:  # fmt: skip
        self.tasks.append((kwargs["message"], countdown))


def test_a_wait_for_response_retry_later_than_a_countdown_is_parked_by_its_worker(
    redis_server, markers, webhook_receiver, make_worker
):
    """The request path publishes at once, with the time the retry is due; the worker
    that takes it parks it, so that no message is held past the visibility timeout."""
    webhook_receiver.respond_with(429, headers={"Retry-After": "120"})
    hooks = [{"method": "vm.*", "type": "pre", "url": webhook_receiver.url,
              "waitForResponse": True}]  # fmt: skip
    app = PublishedTasks()
    dispatcher = CeleryDispatcher(load_settings(hooks, {}, broker_url=redis_server.url), app=app)
    payload = pre_payload("call-1", (None, None), "vm.start", {}, 1_700_000_000_000)
    before = time.time()
    assert dispatcher.deliver_now(Delivery(dispatcher.settings.hooks[0], payload)) is False
    dispatcher.close(1)
    ((published, countdown),) = app.tasks
    assert countdown is None
    assert before + 120 <= published["notBefore"] <= time.time() + 120

    worker = make_worker()
    assert worker.run(FakeTask(), published) == "parked"
    ((kept, due),) = parked(markers, endpoint_of(webhook_receiver.url))
    assert kept == {k: v for k, v in published.items() if k != "notBefore"}
    assert due == pytest.approx(published["notBefore"])
    assert len(webhook_receiver.attempts) == 1  # the request path's only
    assert_ledger(dispatcher.stats())


# -- real workers -------------------------------------------------------------------------

DEAD_KEY = "test:dead"


def settled(client: Any, origin: str) -> bool:
    """Nothing left anywhere: queue, unacknowledged messages, parked hooks and claims."""
    return not (client.llen(QUEUE) or client.hlen("unacked") or Parking(client).count(origin))


def start_outage(
    broker: Any, workers: Workers, wrapped: Any, receiver: Any, names: tuple[str, ...], hooks: int
) -> tuple[Any, str]:
    """Workers with a breaker threshold of 2 and a 1 s retry, a receiver answering 503
    and *hooks* pre hooks published: returns the app and the endpoint."""
    configured = [hook(receiver.url, type="pre")]
    workers.configure(
        broker_url=broker.url, hooks=json.dumps(configured), retry_schedule="1s,30s",
        breaker_threshold="2", dead_letter=f"{broker.url}?key={DEAD_KEY}",
    )  # fmt: skip
    workers.speed_up(PARK_POLL=0.2, VISIBILITY_TIMEOUT=6, RESTORE_INTERVAL=1, COUNTDOWN_LIMIT=3)
    receiver.respond_with(503)
    workers.start(*names)
    app = wrapped(configured, broker.url)
    client = app.test_client()
    for n in range(hooks):
        call(client, n)
    return app, endpoint_of(receiver.url)


def delivered_ids(receiver: Any, count: int, timeout: float) -> Counter[str]:
    """Wait until *count* hooks (webhook-ids) arrived with 2xx; count each one's copies."""
    wait_until(
        lambda: len({h.headers["webhook-id"] for h in receiver.received}) >= count,
        timeout,
        f"{count} different hooks to be delivered",
    )
    return Counter(h.headers["webhook-id"] for h in receiver.received)


@pytest.mark.slow
def test_an_outage_opens_the_shared_breaker_then_every_parked_hook_is_delivered(
    broker, workers, wrapped, webhook_receiver
):
    hooks = 10
    app, origin = start_outage(broker, workers, wrapped, webhook_receiver, ("w1", "w2"), hooks)
    client = broker.client()
    wait_until(lambda: shared_breaker(client, origin).get("state") == "open", 15, "it to open")
    parking = Parking(client)
    wait_until(lambda: parking.count(origin) == hooks, 15, "every hook to be parked")
    failed = webhook_receiver.attempts
    # Only the attempts under way when it opened: 2 workers x 2 processes.
    assert all(h.status == 503 for h in failed) and len(failed) <= 2 + 4, len(failed)
    assert time.time() < shared_breaker(client, origin)["probe_at"]  # parked before the probe

    webhook_receiver.respond_with(204)
    copies = delivered_ids(webhook_receiver, hooks, 30)
    wait_until(lambda: settled(client, origin), 15, "nothing left to deliver")
    assert sorted(copies.values()) == [1] * hooks  # no worker killed: no duplicate
    assert len(webhook_receiver.attempts) == len(failed) + hooks  # one success each
    assert shared_breaker(client, origin)["state"] == "closed"
    assert client.llen(DEAD_KEY) == 0
    assert_ledger(app.wsgi_app.stats())
    assert app.wsgi_app.stats()["published"] == hooks
    log = workers.log_text()
    assert log.count("is down after 2 consecutive failures") == 1, log[-3000:]
    assert log.count("is back after") == 1
    assert "Traceback" not in log


@pytest.mark.slow
def test_a_retry_longer_than_the_visibility_timeout_is_not_delivered_twice(
    broker, workers, wrapped, webhook_receiver
):
    """A 5 s retry with a 3 s visibility timeout: as a countdown, the held message
    would be given to a second worker; parked, it is acknowledged at once."""
    configured = [hook(webhook_receiver.url, type="pre")]
    workers.configure(
        broker_url=broker.url, hooks=json.dumps(configured), retry_schedule="5s",
        breaker_threshold="100", dead_letter=f"{broker.url}?key={DEAD_KEY}",
    )  # fmt: skip
    workers.speed_up(VISIBILITY_TIMEOUT=3, RESTORE_INTERVAL=1, COUNTDOWN_LIMIT=1, PARK_POLL=0.2)
    refused: set[str] = set()
    lock = threading.Lock()

    def first_attempt_fails(number: int, h: Any) -> int:
        with lock:
            first = h.headers["webhook-id"] not in refused
            refused.add(h.headers["webhook-id"])
        return 503 if first else 204

    webhook_receiver.respond_with(first_attempt_fails)
    workers.start("w1", "w2")
    app = wrapped(configured, broker.url)
    client = app.test_client()
    hooks = 6
    for n in range(hooks):
        call(client, n)
    origin = endpoint_of(webhook_receiver.url)
    client = broker.client()
    parking = Parking(client)
    wait_until(lambda: parking.count(origin) == hooks, 10, "every retry to be parked")

    copies = delivered_ids(webhook_receiver, hooks, 30)
    # Nothing queued, unacknowledged or parked: no copy can come later.
    wait_until(lambda: settled(client, origin), 15, "nothing left to deliver")
    attempts = Counter(h.headers["webhook-id"] for h in webhook_receiver.attempts)
    assert sorted(attempts.values()) == [2] * hooks, attempts  # failed once, delivered once
    assert sorted(copies.values()) == [1] * hooks
    assert client.llen(DEAD_KEY) == 0
    assert_ledger(app.wsgi_app.stats())


@pytest.mark.slow
def test_a_worker_killed_while_hooks_are_parked_loses_none(
    broker, workers, wrapped, webhook_receiver
):
    hooks = 8
    app, origin = start_outage(broker, workers, wrapped, webhook_receiver, ("w1",), hooks)
    client = broker.client()
    parking = Parking(client)
    wait_until(
        lambda: parking.count(origin) == hooks and not client.hlen("unacked"),
        15,
        "every hook to be parked and acknowledged",
    )
    workers.kill("w1")
    assert parking.count(origin) == hooks  # killed while they were parked
    # A claim left by a worker killed between claiming a hook and publishing it.
    settings = load_settings([hook(webhook_receiver.url, type="pre")], {})
    payload = pre_payload("orphan", (None, None), "vm.start", {}, 1_700_000_000_000)
    orphan = Delivery(settings.hooks[0], payload).to_message()
    client.zadd(f"xo-webhooks:parked-claims:{origin}", {json.dumps(orphan): time.time() - 1})

    webhook_receiver.respond_with(204)
    workers.start("w2")  # its probe goes when the breaker's pause is over
    copies = delivered_ids(webhook_receiver, hooks + 1, 30)
    wait_until(lambda: settled(client, origin), 15, "nothing left to deliver")
    assert orphan["id"] in copies and len(copies) == hooks + 1
    assert client.llen(DEAD_KEY) == 0
    assert shared_breaker(client, origin)["state"] == "closed"
    assert_ledger(app.wsgi_app.stats())
