"""Celery at scale: the request path's own publish (one ``LPUSH`` on a kept connection,
one message per call with ``submit_many``), pending markers for ordering, and tasks that
deliver a batch of hooks taken from the queue.

In this process: the publisher against a real ``redis-server``, and
:class:`~xo_webhooks.sending.celery.Worker` with the fake bound task of
test_celery_worker.py. With real worker processes (slow): calls with several hooks
through two workers, and a message in the shape every earlier version published (a
rolling upgrade).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pytest

from xo_webhooks import load_settings
from xo_webhooks.request.payload import pre_payload
from xo_webhooks.sending.delivery import Delivery
from xo_webhooks.signing import verify

from .helpers import SECRET, assert_ledger
from .waiting import wait_until

redis = pytest.importorskip("redis", reason="the celery extra is not installed")
pytest.importorskip("celery", reason="the celery extra is not installed")

from xo_webhooks.sending import celery_batch  # noqa: E402
from xo_webhooks.sending.celery import (  # noqa: E402
    PRE_DONE_KEY,
    PRE_PENDING_KEY,
    QUEUE,
    TASK_NAME,
    celery_app,
)
from xo_webhooks.sending.celery_publisher import CeleryDispatcher  # noqa: E402
from xo_webhooks.sending.celery_wire import decode_kwargs, task_message  # noqa: E402

from . import test_celery, test_celery_worker  # noqa: E402
from .test_celery import assert_pre_before_post  # noqa: E402
from .test_celery_worker import FakeTask, dead_letters  # noqa: E402

broker, workers, broker_log = test_celery.broker, test_celery.workers, test_celery.broker_log
make_worker, markers = test_celery_worker.make_worker, test_celery_worker.markers


def deliveries(settings: Any, call_id: str, kind: str = "pre") -> list[Delivery]:
    """The hooks of one call, one per configured hook of that *kind*."""
    payload = pre_payload(call_id, ("u1", "alice"), "vm.start", {"id": "vm-1"}, 1_700_000_000_000)
    if kind == "post":
        payload = {**payload, "type": "post", "duration": 5, "result": True}
    return [Delivery(h, payload) for h in settings.hooks if getattr(h, kind)]


def queued(client: Any) -> list[dict[str, Any]]:
    """The keyword arguments of every message in the queue, oldest first."""
    return [decode_kwargs(raw) for raw in reversed(client.lrange(QUEUE, 0, -1))]


def hooks_of(kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    return [kwargs["message"]] if "message" in kwargs else kwargs["messages"]


@pytest.fixture
def publisher(redis_server, webhook_receiver) -> Any:
    """A CeleryDispatcher publishing to the module's Redis: two pre/post hooks (two
    URLs of the receiver) and a pre-only one."""
    redis_server.client().flushall()
    hooks = [
        {"method": "vm.*", "type": "pre/post", "url": webhook_receiver.url + "a", "secret": SECRET},
        {"method": "vm.*", "type": "pre/post", "url": webhook_receiver.url + "b", "secret": SECRET},
        {"method": "vm.*", "type": "pre", "url": webhook_receiver.url + "c", "secret": SECRET},
    ]
    made = CeleryDispatcher(load_settings(hooks, {}, broker_url=redis_server.url))
    yield made
    made.close(1)


# -- the message ------------------------------------------------------------------------


def test_the_message_written_here_is_the_one_celery_writes(redis_server):
    client = redis_server.client()
    client.flushall()
    app = celery_app(load_settings([], {}, broker_url=redis_server.url), publisher=True)
    kwargs = {"message": {"id": "msg_1", "payload": {"é": [1, None]}}}
    app.send_task(TASK_NAME, kwargs=kwargs, kwargsrepr="{'message': 'x'}")
    app.close()
    (theirs,) = (json.loads(raw) for raw in client.lrange(QUEUE, 0, -1))
    ours = json.loads(task_message(TASK_NAME, QUEUE, kwargs, "{'message': 'x'}"))
    assert set(ours) == set(theirs)
    assert set(ours["headers"]) == set(theirs["headers"])
    # Celery's has kwargsrepr among the properties too; kombu reads none of them.
    assert set(ours["properties"]) == set(theirs["properties"]) - {"kwargsrepr"}
    assert ours["properties"]["delivery_info"] == theirs["properties"]["delivery_info"]
    assert decode_kwargs(json.dumps(ours)) == decode_kwargs(json.dumps(theirs)) == kwargs
    assert ours["headers"]["id"] != json.loads(task_message(TASK_NAME, QUEUE, kwargs, ""))[
        "headers"]["id"]  # fmt: skip


def test_the_kept_connection_is_replaced_when_redis_closed_it_and_refusals_raise(redis_server):
    from xo_webhooks.sending.celery_wire import Broker, pack

    client = redis_server.client()
    client.flushall()
    broker = Broker(redis_server.url, 0.2)
    try:
        assert broker.execute([pack("SET", "k", b"v"), pack("LPUSH", "q", b"1")]) == [
            b"+OK",
            b":1",
        ]
        client.client_kill_filter(_type="normal", skipme=True)  # as a Redis restart does
        assert broker.execute([pack("LPUSH", "q", b"2")]) == [b":2"]  # sent once, anew
        assert client.lrange("q", 0, -1) == [b"2", b"1"]
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            broker.execute([pack("LPUSH", "k", b"x")])
        assert broker.execute([pack("LPUSH", "q", b"3")]) == [b":3"]
    finally:
        broker.close()


def test_submit_publishes_one_message_in_the_shape_of_every_earlier_version(publisher):
    (pre, *_) = deliveries(publisher.settings, "call-1")
    publisher.submit(pre)
    client = redis.Redis.from_url(publisher.settings.broker_url)
    ((kwargs),) = queued(client)
    assert kwargs == {"message": {**pre.to_message(), "pendingMark": True}}
    # Its pending marker lives at most as long as a post waits for it, then goes.
    ttl = client.ttl(PRE_PENDING_KEY.format(pre.id))
    assert 0 < ttl <= publisher._pending_ttl
    assert publisher.stats()["published"] == 1


def test_submit_many_publishes_a_calls_hooks_in_one_message(publisher):
    client = redis.Redis.from_url(publisher.settings.broker_url)
    pres = deliveries(publisher.settings, "call-1")
    publisher.submit_many(pres)
    posts = deliveries(publisher.settings, "call-1", "post")
    publisher.submit_many(posts)
    publisher.submit_many([])
    pre_message, post_message = queued(client)
    assert [m["id"] for m in hooks_of(pre_message)] == [d.id for d in pres]
    # Each pre with a post to its URL has a pending marker; the pre-only one none.
    assert [m.get("pendingMark", False) for m in hooks_of(pre_message)] == [True, True, False]
    assert client.exists(*(PRE_PENDING_KEY.format(d.id) for d in pres)) == 2
    # Each post waits for the pre of its own URL.
    assert [m["afterPending"] for m in hooks_of(post_message)] == [[pres[0].id], [pres[1].id]]
    stats = publisher.stats()
    assert (stats["accepted"], stats["published"]) == (5, 5)
    assert_ledger(stats)


def test_submit_many_gives_up_each_hook_of_a_payload_that_cannot_be_encoded(publisher, monkeypatch):
    from xo_webhooks.sending import celery_publisher

    def encode(task: str, queue: str, kwargs: Any, summary: str, eta: Any = None) -> bytes:
        if "call odd" in summary:  # the payload would not encode (redaction makes most do)
            raise TypeError("Object of type set is not JSON serializable")
        return task_message(task, queue, kwargs, summary, eta)

    monkeypatch.setattr(celery_publisher, "task_message", encode)
    odd = deliveries(publisher.settings, "odd")
    fine = deliveries(publisher.settings, "fine")
    publisher.submit_many(odd + fine)
    client = redis.Redis.from_url(publisher.settings.broker_url)
    ((kwargs),) = queued(client)  # the other call's message went
    assert [m["id"] for m in hooks_of(kwargs)] == [d.id for d in fine]
    assert not client.exists(*(PRE_PENDING_KEY.format(d.id) for d in odd))
    stats = publisher.stats()
    assert (stats["published"], stats["failed"]) == (3, 3)
    assert_ledger(stats)


def test_a_broker_that_is_gone_fails_every_hook_of_submit_many_fast(webhook_receiver, tmp_path):
    from .helpers import free_port

    hooks = [{"method": "vm.*", "type": "pre", "url": webhook_receiver.url + p} for p in "ab"]
    settings = load_settings(hooks, {}, broker_url=f"redis://127.0.0.1:{free_port()}/0",
                             dead_letter=str(tmp_path / "dead.jsonl"))  # fmt: skip
    dispatcher = CeleryDispatcher(settings)
    started = time.monotonic()
    dispatcher.submit_many(deliveries(settings, "call-1"))
    dispatcher.submit_many(deliveries(settings, "call-2"))  # fails fast: no attempt
    assert time.monotonic() - started < 1
    stats = dispatcher.stats()
    dispatcher.close(1)
    assert (stats["failed"], stats["dead_lettered"]) == (4, 4)
    assert_ledger(stats)
    records = dead_letters(tmp_path)
    errors = Counter(r["lastError"].split(":")[0].split(" (")[0] for r in records)
    assert errors == {"could not publish to the broker": 2, "broker unreachable": 2}


def test_submit_many_of_one_hook_goes_as_submit_does(publisher):
    client = redis.Redis.from_url(publisher.settings.broker_url)
    (pre,) = deliveries(publisher.settings, "call-1")[2:]  # the pre-only hook
    publisher.submit_many([pre])
    ((kwargs),) = queued(client)
    assert kwargs["message"]["id"] == pre.id  # a one-hook message, as submit() writes it
    assert_ledger(publisher.stats())


def test_submit_many_survives_its_own_failures(publisher, monkeypatch, caplog):
    # A bug here (redaction, or the push itself) gives the hooks up: never the request.
    first, second, third = deliveries(publisher.settings, "call-1")

    redact = Delivery.redact

    def broken(self: Delivery, words: Any) -> None:
        if self is first:
            raise RuntimeError("a bug")
        redact(self, words)

    monkeypatch.setattr(Delivery, "redact", broken)
    publisher.submit_many([first, second])
    monkeypatch.setattr(publisher, "_push", lambda calls: 1 / 0)
    publisher.submit_many([third, *deliveries(publisher.settings, "call-2")])
    stats = publisher.stats()
    assert (stats["published"], stats["failed"]) == (1, 5)  # call-2 has 3 pre hooks
    assert_ledger(stats)
    assert "could not publish a hook" in caplog.text and "could not publish hooks" in caplog.text


# -- batches, in this process -----------------------------------------------------------


def test_a_task_delivers_the_hooks_queued_behind_it_and_retries_a_failed_one_alone(
    publisher, make_worker, markers, webhook_receiver
):
    worker = make_worker()
    worker.settings = publisher.settings  # the same hooks (URLs, secret) as the API
    worker.sender = type(worker.sender)(publisher.settings)
    client = redis.Redis.from_url(publisher.settings.broker_url)
    for n in range(4):
        publisher.submit_many(deliveries(publisher.settings, f"call-{n}"))
    first, *rest = queued(client)
    client.rpop(QUEUE)  # as Celery takes the first message for the task
    failing = hooks_of(rest[0])[1]["id"]
    webhook_receiver.respond_with(lambda n, h: 503 if h.headers["webhook-id"] == failing else 204)
    republished: list[tuple[dict[str, Any], float | None]] = []
    worker.republish = lambda message, countdown: republished.append((message, countdown))

    outcome = worker.run_task(FakeTask(), hooks_of(first))

    assert outcome == "delivered 11, retried 1"
    ((again, countdown),) = republished  # alone, as a one-hook message
    assert again["id"] == failing and again["attempts"] == 1 and again["pendingMark"]
    assert 0 < countdown <= 0.5
    assert Counter(h.headers["webhook-id"] for h in webhook_receiver.attempts)[failing] == 1
    assert len(webhook_receiver.received) == 11
    for h in webhook_receiver.received:
        verify(SECRET, h.body, h.headers)
    # Taken, recorded as kombu records them, then acknowledged: nothing left.
    assert client.llen(QUEUE) == 0 and client.hlen("unacked") == 0
    assert client.zcard("unacked_index") == 0
    # The delivered pres' pending markers are gone; the retried one's stays.
    assert client.keys(PRE_PENDING_KEY.format("*")) == [PRE_PENDING_KEY.format(failing).encode()]
    assert client.keys(PRE_DONE_KEY.format("*")) == []


def test_a_post_waits_in_the_batch_for_its_pre_of_the_same_batch(
    publisher, make_worker, webhook_receiver
):
    worker = make_worker()
    worker.settings = publisher.settings
    worker.sender = type(worker.sender)(publisher.settings)
    client = redis.Redis.from_url(publisher.settings.broker_url)
    publisher.submit_many(deliveries(publisher.settings, "call-1"))
    publisher.submit_many(deliveries(publisher.settings, "call-1", "post"))
    first = queued(client)[0]
    client.rpop(QUEUE)
    task = FakeTask()
    assert worker.run_task(task, hooks_of(first)) == "delivered 5"
    assert task.retries == []
    assert_pre_before_post(webhook_receiver.received)
    assert [h.payload["type"] for h in webhook_receiver.received] == ["pre"] * 3 + ["post"] * 2


def test_a_post_whose_pre_is_elsewhere_is_put_back_alone(
    publisher, make_worker, webhook_receiver, monkeypatch
):
    from xo_webhooks.sending import celery as worker_module

    monkeypatch.setattr(worker_module, "HOLD_WAIT", 0.1)
    worker = make_worker()
    worker.settings = publisher.settings
    worker.sender = type(worker.sender)(publisher.settings)
    client = redis.Redis.from_url(publisher.settings.broker_url)
    publisher.submit_many(deliveries(publisher.settings, "call-1"))  # not taken: "elsewhere"
    client.delete(QUEUE)
    publisher.submit_many(deliveries(publisher.settings, "call-1", "post"))
    publisher.submit_many(deliveries(publisher.settings, "call-2"))
    first = queued(client)[0]
    client.rpop(QUEUE)
    republished: list[tuple[dict[str, Any], float | None]] = []
    worker.republish = lambda message, countdown: republished.append((message, countdown))
    assert worker.run_task(FakeTask(), hooks_of(first)) == "delivered 3, held 2"
    assert [(m["holds"], c) for m, c in republished] == [(1, 1.0), (1, 1.0)]
    assert {h.payload["callId"] for h in webhook_receiver.received} == {"call-2"}


def test_a_message_celery_wrote_is_taken_with_the_batch_and_recorded_as_kombu_does(
    publisher, make_worker, webhook_receiver
):
    """A rolling upgrade: an older API publishes through Celery's send_task, in the
    one-hook shape, with a post waiting for its pre's done marker."""
    worker = make_worker()
    worker.settings = publisher.settings
    worker.sender = type(worker.sender)(publisher.settings)
    client = redis.Redis.from_url(publisher.settings.broker_url)
    publisher.submit(deliveries(publisher.settings, "call-1")[0])
    older = celery_app(publisher.settings, publisher=True)
    pre = deliveries(publisher.settings, "old")[0]
    post = deliveries(publisher.settings, "old", "post")[0]
    older.send_task(TASK_NAME, kwargs={"message": pre.to_message()})
    older.send_task(TASK_NAME, kwargs={"message": {**post.to_message(), "after": [pre.id]}})
    older.close()
    first = queued(client)[0]
    client.rpop(QUEUE)
    taken = worker._batches = celery_batch.Batches(worker)
    recorded: list[Any] = []
    ack = taken.drain.ack
    taken.drain.ack = lambda tags: (recorded.append(  # type: ignore[method-assign]
        [json.loads(client.hget("unacked", t)) for t in tags]), ack(tags))  # fmt: skip

    assert worker.run_task(FakeTask(), hooks_of(first)) == "delivered 3"

    # Until acknowledged, each was in kombu's record, in kombu's format: what its
    # sweeper restores to the queue when a worker dies.
    ((older_pre, older_post),) = recorded
    assert [entry[1:] for entry in (older_pre, older_post)] == [["", QUEUE]] * 2
    assert decode_kwargs(json.dumps(older_pre[0])) == {"message": pre.to_message()}
    assert [h.headers["webhook-id"] for h in webhook_receiver.received][1:] == [pre.id, post.id]
    # The older API's post waited for a done marker: the pre set one, as before.
    assert client.exists(PRE_DONE_KEY.format(pre.id))
    assert client.hlen("unacked") == 0


def test_the_probe_a_batch_is_given_goes_and_the_others_follow_once_it_is_back(
    publisher, make_worker, webhook_receiver
):
    """An endpoint whose probe is due: the batch's first hook to it is the probe (the
    breaker gave it to this process: asking again would park it, and no probe would
    ever go); once delivered, the breaker is closed and the others are sent."""
    from xo_webhooks.sending.endpoints import endpoint_of

    from .test_celery_endpoints import plant_open_breaker, shared_breaker

    worker = make_worker(breaker_threshold=2)
    worker.settings = publisher.settings
    worker.sender = type(worker.sender)(publisher.settings)
    client = redis.Redis.from_url(publisher.settings.broker_url)
    origin = endpoint_of(webhook_receiver.url)
    plant_open_breaker(client, origin)
    state = json.loads(client.get(f"xo-webhooks:endpoint:{origin}"))
    client.set(f"xo-webhooks:endpoint:{origin}", json.dumps({**state, "probe_at": 0}))
    for n in range(3):
        publisher.submit_many(deliveries(publisher.settings, f"call-{n}"))
    first = queued(client)[0]
    client.rpop(QUEUE)
    assert worker.run_task(FakeTask(), hooks_of(first)) == "delivered 9"
    assert shared_breaker(client, origin)["state"] == "closed"
    assert len(webhook_receiver.attempts) == 9


def test_hooks_a_batch_had_no_time_for_are_queued_again_alone(
    publisher, make_worker, webhook_receiver, monkeypatch
):
    """To an endpoint with failures, hooks go one at a time; a batch that has spent
    its time (BATCH_SECONDS: its messages are held unacknowledged meanwhile) puts the
    others back in the queue, each alone, unattempted."""
    from xo_webhooks.sending.endpoints import Breaker, endpoint_of

    monkeypatch.setattr(celery_batch, "BATCH_SECONDS", 0.0)
    worker = make_worker()
    worker.settings = publisher.settings
    worker.sender = type(worker.sender)(publisher.settings)
    client = redis.Redis.from_url(publisher.settings.broker_url)
    origin = endpoint_of(webhook_receiver.url)
    failing = Breaker(5, failures=1, last_error="HTTP 503")
    client.set(f"xo-webhooks:endpoint:{origin}", json.dumps(failing.to_dict()))
    for n in range(2):
        publisher.submit_many(deliveries(publisher.settings, f"call-{n}"))
    everything = queued(client)
    client.rpop(QUEUE)
    republished: list[tuple[dict[str, Any], float | None]] = []
    worker.republish = lambda message, countdown: republished.append((message, countdown))
    assert worker.run_task(FakeTask(), hooks_of(everything[0])) == "queued again 6"
    assert webhook_receiver.attempts == []
    every_hook = [m for kwargs in everything for m in hooks_of(kwargs)]
    assert sorted(m["id"] for m, _ in republished) == sorted(m["id"] for m in every_hook)
    assert {countdown for _, countdown in republished} == {None}
    assert client.hlen("unacked") == 0  # the batch's messages are acknowledged


def test_a_hook_parked_just_after_the_probe_succeeded_is_due_at_once(
    make_worker, markers, webhook_receiver
):
    """The race of two worker processes: this one is told to wait (a probe is on its
    way), the probe succeeds and its worker releases the parked hooks, and only then
    is this one parked. It must not wait for the probe's lease (30 s)."""
    from xo_webhooks.sending.endpoints import Breaker, endpoint_of

    from .test_celery_worker import message

    worker = make_worker()
    origin = endpoint_of(webhook_receiver.url)
    probing = Breaker(5, state="half-open", failures=5, opened_at=time.time() - 10,
                      probe_until=time.time() + 30, last_error="HTTP 503")  # fmt: skip
    markers.set(f"xo-webhooks:endpoint:{origin}", json.dumps(probing.to_dict()))
    park = worker.parking.park

    def probe_succeeds_first(origin: str, hook: dict[str, Any], due: float) -> None:
        markers.delete(f"xo-webhooks:endpoint:{origin}")  # closed, by the prober
        worker.parking.release(origin)  # what it released: nothing yet
        park(origin, hook, due)

    worker.parking.park = probe_succeeds_first  # type: ignore[method-assign]
    assert worker.run(FakeTask(), message(worker, "pre")) == "parked"
    ((_, due),) = markers.zrange(f"xo-webhooks:parked:{origin}", 0, -1, withscores=True)
    assert due <= time.time()  # due now, not in 30 s


def test_a_lone_message_with_nothing_queued_behind_it_goes_as_before(
    make_worker, markers, webhook_receiver
):
    from .test_celery_worker import message

    worker = make_worker()
    webhook_receiver.respond_with(503)
    task = FakeTask()
    with pytest.raises(test_celery_worker.Retry):  # the task's own message is retried
        worker.run_task(task, [message(worker, "pre")])
    assert len(task.retries) == 1


def test_a_batch_is_bounded_by_the_timeout(make_worker):
    # Every attempt of a batch timing out: at most BATCH_SECONDS, far from the
    # visibility timeout (its messages are not acknowledged until it ends).
    threads, seconds = celery_batch.THREADS, celery_batch.BATCH_SECONDS
    assert celery_batch.Batches(make_worker(timeout=10)).limit == celery_batch.BATCH
    assert threads * seconds // 10 >= celery_batch.BATCH
    assert celery_batch.Batches(make_worker(timeout=30)).limit == threads
    assert seconds + 30 < test_celery.VISIBILITY_TIMEOUT


# -- real workers -----------------------------------------------------------------------


@pytest.mark.slow
def test_a_worker_killed_mid_batch_loses_none_of_the_messages_it_took(
    broker, broker_log, workers, webhook_receiver
):
    """The messages a task took from the queue beside its own are in kombu's record of
    unacknowledged messages: when its worker dies, another gets them once the
    visibility timeout has passed (6 s here)."""
    hooks = [{"method": "vm.*", "type": "pre", "url": webhook_receiver.url, "secret": SECRET}]
    workers.configure(broker_url=broker.url, hooks=json.dumps(hooks))
    workers.speed_up(VISIBILITY_TIMEOUT=6, RESTORE_INTERVAL=1)
    workers.start("w1")
    settings = load_settings(hooks, {}, broker_url=broker.url)
    dispatcher = CeleryDispatcher(settings)
    webhook_receiver.respond_with(204, delay=0.5)  # a batch in flight when killed
    try:
        for n in range(60):
            dispatcher.submit(deliveries(settings, f"call{n}")[0])  # \w+, for BrokerLog
    finally:
        dispatcher.close(1)
    webhook_receiver.wait_for_attempts(1, timeout=30)
    client = broker.client()
    assert client.hlen("unacked") > 2  # a batch: more than the task's own messages
    workers.kill("w1")
    webhook_receiver.respond_with(204)
    workers.start("w2")

    fate = wait_until(test_celery.accounted(broker_log, webhook_receiver), 60, "every hook")
    assert len(broker_log.hooks()) == 60
    test_celery.assert_each_vanished_message_was_taken_by_a_killed_worker(broker_log, workers.kills)
    assert len(fate["received"]) + len(fate["vanished"]) == 60
    test_celery.assert_one_webhook_id_per_hook(webhook_receiver.received)


@pytest.mark.slow
def test_calls_with_several_hooks_through_two_workers_leave_no_ordering_keys(
    broker, workers, webhook_receiver
):
    hooks = [
        {"method": "vm.*", "type": "pre/post", "url": webhook_receiver.url + p, "secret": SECRET}
        for p in "ab"
    ]
    workers.configure(broker_url=broker.url, hooks=json.dumps(hooks))
    workers.start("w1", "w2")
    settings = load_settings(hooks, {}, broker_url=broker.url)
    dispatcher = CeleryDispatcher(settings)
    calls = 200
    try:
        for n in range(calls):
            dispatcher.submit_many(deliveries(settings, f"call-{n}"))
            dispatcher.submit_many(deliveries(settings, f"call-{n}", "post"))
        # A message as every earlier version published it (a rolling upgrade): an
        # older API's pre and its post, which waits for the pre's done marker.
        old = celery_app(settings, publisher=True)
        (pre,) = deliveries(settings, "old-call")[:1]
        (post,) = deliveries(settings, "old-call", "post")[:1]
        old.send_task(TASK_NAME, kwargs={"message": {**post.to_message(), "after": [pre.id]}})
        old.send_task(TASK_NAME, kwargs={"message": pre.to_message()})
        old.close()
        received = webhook_receiver.wait_for(4 * calls + 2, timeout=90)
    finally:
        dispatcher.close(1)
    ids = Counter(h.headers["webhook-id"] for h in received)
    assert len(ids) == 4 * calls + 2 and set(ids.values()) == {1}
    for url in ("a", "b"):
        assert_pre_before_post([h for h in received if h.path.endswith(url)])
    for h in received:
        verify(SECRET, h.body, h.headers)
    client = broker.client()
    wait_until(lambda: not client.hlen("unacked"), 15, "every message acknowledged")
    # No key per call is left for ordering: the pending markers went with their pres;
    # only the older API's pre left a done marker (it lives an hour).
    assert client.keys(PRE_PENDING_KEY.format("*")) == []
    assert client.keys(PRE_DONE_KEY.format("*")) == [PRE_DONE_KEY.format(pre.id).encode()]
    assert "Traceback" not in workers.log_text()


def test_a_summary_that_needs_escaping_is_written_as_json():
    raw = task_message("t", "q", {"message": {}}, 'a "quoted" summary')
    assert json.loads(raw)["headers"]["kwargsrepr"] == 'a "quoted" summary'
