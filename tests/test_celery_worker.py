"""The Celery worker's code, in this process (coverage does not see worker processes):
:class:`xo_webhooks.sending.celery.Worker` with a fake bound task, a real
``redis-server`` for the pre hooks' markers, and the test receiver.

The task is faked as the worker uses it: ``task.retry(**kwargs)`` returns a
``celery.exceptions.Retry`` (a real bound task publishes the retry, then raises it).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from xo_webhooks import load_settings
from xo_webhooks.request.payload import pre_payload
from xo_webhooks.sending.deadletter import read_records
from xo_webhooks.sending.delivery import Delivery
from xo_webhooks.signing import verify

redis = pytest.importorskip("redis", reason="the celery extra is not installed")
Retry = pytest.importorskip("celery.exceptions", reason="the celery extra is not installed").Retry

from xo_webhooks.sending import celery as worker_module  # noqa: E402
from xo_webhooks.sending.celery import (  # noqa: E402
    HOLD_FIRST_POLL,
    HOLD_MAX_POLL,
    PRE_DONE_KEY,
    PRE_DONE_TTL,
    RESTORE_INTERVAL,
    VISIBILITY_TIMEOUT,
    Worker,
)

from .helpers import SECRET, RedisServer, free_port  # noqa: E402


class FakeTask:
    """What the worker uses of a bound Celery task: ``retry``, recorded.

    :param error: what ``retry`` raises instead (the broker is gone).
    """

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.retries: list[dict[str, Any]] = []

    def retry(self, **kwargs: Any) -> Exception:
        self.retries.append(kwargs)
        if self.error is not None:
            raise self.error
        return Retry()


@pytest.fixture
def markers(redis_server: RedisServer) -> Any:
    """A client of the module's Redis, emptied for this test."""
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def make_worker(redis_server, webhook_receiver, tmp_path) -> Iterator[Any]:
    """``make_worker(**settings)``: a Worker that delivers to the test receiver, keeps
    its markers in the module's Redis and its dead letters in ``tmp_path``."""
    made: list[Worker] = []

    def make(**settings: Any) -> Worker:
        hooks = [{"method": "vm.*", "type": "pre/post", "url": webhook_receiver.url,
                  "secret": SECRET, "headers": {"X-Team": "ops"}}]  # fmt: skip
        settings = {"broker_url": redis_server.url, "retries": 2, "backoff": 0.5, "timeout": 2,
                    "dead_letter": str(tmp_path / "dead.jsonl"), **settings}  # fmt: skip
        made.append(Worker(load_settings(hooks, {}, **settings)))
        return made[-1]

    yield make
    for worker in made:
        if worker._markers is not None:
            worker._markers.close()
        if worker._batches is not None:
            worker._batches.close()  # its sending threads, which outlive the test otherwise


def message(worker: Worker, kind: str, **extra: Any) -> dict[str, Any]:
    """A message as the publisher sends it, for the worker's one hook."""
    payload = pre_payload("call-1", ("u1", "alice"), "vm.start", {"id": "vm-1"}, 1_700_000_000_000)
    if kind == "post":
        payload = {**payload, "type": "post", "duration": 5, "result": True}
    return {**Delivery(worker.settings.hooks[0], payload).to_message(), **extra}


def post_after(worker: Worker, pre_id: str, **extra: Any) -> dict[str, Any]:
    return message(worker, "post", after=[pre_id], **extra)


def dead_letters(tmp_path) -> list[dict[str, Any]]:
    path = tmp_path / "dead.jsonl"
    return read_records(str(path)) if path.exists() else []


# -- the limits ---------------------------------------------------------------------------


def test_hold_limit_is_the_pre_hooks_whole_schedule_plus_one_redelivery(make_worker):
    worker = make_worker(retries=None, backoff=None, retry_schedule="5s,1m", timeout=10)
    # 3 attempts timing out, the 2 waits in full, then a redelivery of a lost worker's
    # message.
    assert worker.hold_limit == 3 * 10 + 65 + VISIBILITY_TIMEOUT + RESTORE_INTERVAL == 190


# -- delivered, retried, given up ---------------------------------------------------------


def test_a_delivered_pre_hook_is_signed_here_and_lets_its_post_hooks_go(
    make_worker, markers, webhook_receiver
):
    worker = make_worker()
    pre = message(worker, "pre")
    assert worker.run(FakeTask(), pre) == "delivered"
    (received,) = webhook_receiver.wait_for(1)
    # The message holds neither secret nor headers: the worker adds its own.
    verify(SECRET, received.body, received.headers)
    assert received.headers["x-team"] == "ops"
    assert received.headers["webhook-id"] == pre["id"]
    assert 0 < markers.ttl(PRE_DONE_KEY.format(pre["id"])) <= PRE_DONE_TTL


def test_a_delivered_post_hook_sets_no_marker(make_worker, markers):
    worker = make_worker()
    assert worker.run(FakeTask(), message(worker, "post")) == "delivered"
    assert markers.keys("xo-webhooks:pre-done:*") == []


def test_a_failed_attempt_is_retried_after_the_policy_delay(
    make_worker, markers, webhook_receiver, tmp_path
):
    webhook_receiver.respond_with(503)
    worker = make_worker(backoff=0.5)
    pre = message(worker, "pre")
    task = FakeTask()
    with pytest.raises(Retry):
        worker.run(task, pre)
    ((asked),) = task.retries
    assert 0.25 <= asked["countdown"] <= 0.5  # backoff * 2**0, jittered down to half
    again = asked["kwargs"]["message"]
    assert again == {**pre, "attempts": 1, "lastError": "HTTP 503"}
    assert again["id"] in asked["kwargsrepr"] and "vm-1" not in asked["kwargsrepr"]
    assert markers.keys("xo-webhooks:pre-done:*") == []  # not done yet
    assert dead_letters(tmp_path) == []


@pytest.mark.parametrize(
    ("status", "attempts_before", "error"),
    [
        pytest.param(404, 0, "HTTP 404", id="a-final-answer"),
        pytest.param(503, 2, "HTTP 503", id="the-last-retry"),
    ],
)
def test_a_hook_given_up_on_is_dead_lettered_and_lets_its_post_go(
    make_worker, markers, webhook_receiver, tmp_path, status, attempts_before, error
):
    webhook_receiver.respond_with(status)
    worker = make_worker(retries=2)
    pre = message(worker, "pre", attempts=attempts_before)
    task = FakeTask()
    assert worker.run(task, pre) == "failed"
    assert task.retries == []
    (record,) = dead_letters(tmp_path)
    assert (record["id"], record["attempts"], record["lastError"]) == (
        pre["id"],
        attempts_before + 1,
        error,
    )
    assert markers.exists(PRE_DONE_KEY.format(pre["id"]))  # its post hook need not wait


def test_a_retry_the_broker_cannot_take_is_dead_lettered(make_worker, webhook_receiver, tmp_path):
    webhook_receiver.respond_with(503)
    worker = make_worker()
    task = FakeTask(error=ConnectionError("the broker is gone"))
    assert worker.run(task, message(worker, "pre")) == "failed"
    assert len(task.retries) == 1
    (record,) = dead_letters(tmp_path)
    assert record["lastError"].startswith("HTTP 503; could not queue the retry: ")
    assert "the broker is gone" in record["lastError"]


def test_a_failing_dead_letter_store_loses_the_hook_and_says_so(
    make_worker, markers, webhook_receiver, tmp_path, caplog
):
    webhook_receiver.respond_with(410)
    worker = make_worker(dead_letter=str(tmp_path / "dead.jsonl"))
    (tmp_path / "dead.jsonl").mkdir()  # a folder now: it cannot be written
    pre = message(worker, "pre")
    with caplog.at_level(logging.ERROR, logger="xo_webhooks.sending.policy"):
        assert worker.run(FakeTask(), pre) == "failed"
    assert "the dead-letter store failed" in caplog.text and "lost" in caplog.text
    assert markers.exists(PRE_DONE_KEY.format(pre["id"]))  # lost, but its post may go


def test_a_marker_that_cannot_be_set_is_logged_not_raised(make_worker, webhook_receiver, caplog):
    worker = make_worker(broker_url=f"redis://127.0.0.1:{free_port()}/0")  # nothing there
    with caplog.at_level(logging.WARNING, logger="xo_webhooks.sending.celery"):
        assert worker.run(FakeTask(), message(worker, "pre")) == "delivered"
    assert "could not mark pre hook" in caplog.text
    assert len(webhook_receiver.received) == 1


# -- a post hook held for its pre hook ----------------------------------------------------


def test_a_post_hook_whose_pre_is_done_goes_at_once(make_worker, markers, webhook_receiver):
    worker = make_worker()
    markers.set(PRE_DONE_KEY.format("msg_pre"), b"1")
    task = FakeTask()
    assert worker.run(task, post_after(worker, "msg_pre")) == "delivered"
    assert task.retries == []
    assert len(webhook_receiver.received) == 1


def test_a_post_hook_waits_here_for_a_pre_hook_done_meanwhile(
    make_worker, markers, webhook_receiver
):
    worker = make_worker()
    key = PRE_DONE_KEY.format("msg_pre")

    class DoneAfterTheFirstLook:
        """The markers' client, as the pre's worker marks it done right after the
        post's first check."""

        def __init__(self, client: Any) -> None:
            self.client, self.looks = client, 0

        def close(self) -> None:
            pass  # the markers fixture closes the client

        def __getattr__(self, name: str) -> Any:  # the breakers' commands
            return getattr(self.client, name)

        def exists(self, *keys: str) -> int:
            found = self.client.exists(*keys)
            self.looks += 1
            if self.looks == 1:
                self.client.set(key, b"1")
            return found

    worker._markers = watched = DoneAfterTheFirstLook(markers)
    task = FakeTask()
    assert worker.run(task, post_after(worker, "msg_pre")) == "delivered"
    assert task.retries == [] and watched.looks == 2  # not put back in the queue
    assert len(webhook_receiver.received) == 1


def test_a_post_hook_whose_pre_is_late_is_put_back_after_a_short_wait(
    make_worker, markers, webhook_receiver, monkeypatch
):
    monkeypatch.setattr(worker_module, "HOLD_WAIT", 0.2)
    worker = make_worker()
    post = post_after(worker, "msg_pre")
    task = FakeTask()
    started = time.monotonic()
    with pytest.raises(Retry):
        worker.run(task, post)
    assert time.monotonic() - started >= 0.2  # waited here first
    ((asked),) = task.retries
    assert asked["countdown"] == HOLD_FIRST_POLL
    again = asked["kwargs"]["message"]
    assert again["holds"] == 1 and again["after"] == ["msg_pre"]
    assert abs(again["holdUntil"] - (time.time() + worker.hold_limit)) < 5
    assert {k: v for k, v in again.items() if k not in ("holds", "holdUntil")} == post
    assert webhook_receiver.attempts == []


@pytest.mark.parametrize(
    ("holds", "countdown"),
    [
        pytest.param(1, 2 * HOLD_FIRST_POLL, id="second"),
        pytest.param(3, 8 * HOLD_FIRST_POLL, id="fourth"),
        pytest.param(20, HOLD_MAX_POLL, id="capped"),
    ],
)
def test_later_holds_wait_no_more_here_and_come_back_less_often(
    make_worker, markers, webhook_receiver, holds, countdown
):
    worker = make_worker()
    until = time.time() + 60
    task = FakeTask()
    started = time.monotonic()
    with pytest.raises(Retry):
        worker.run(task, post_after(worker, "msg_pre", holds=holds, holdUntil=until))
    assert time.monotonic() - started < worker_module.HOLD_WAIT
    ((asked),) = task.retries
    assert asked["countdown"] == countdown
    assert asked["kwargs"]["message"]["holds"] == holds + 1
    assert asked["kwargs"]["message"]["holdUntil"] == until
    assert webhook_receiver.attempts == []


def test_a_post_hook_held_past_its_limit_goes_and_says_so(
    make_worker, markers, webhook_receiver, caplog
):
    worker = make_worker()
    task = FakeTask()
    held = post_after(worker, "msg_pre", holds=9, holdUntil=time.time() - 1)
    with caplog.at_level(logging.WARNING, logger="xo_webhooks.sending.celery"):
        assert worker.run(task, held) == "delivered"
    assert "sent although its pre hook is not done" in caplog.text
    assert task.retries == []


def test_a_post_hook_is_held_without_waiting_when_the_markers_cannot_be_read(
    make_worker, webhook_receiver, caplog
):
    worker = make_worker(broker_url=f"redis://127.0.0.1:{free_port()}/0")  # nothing there
    task = FakeTask()
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="xo_webhooks.sending.celery"),
        pytest.raises(Retry),
    ):
        worker.run(task, post_after(worker, "msg_pre"))
    assert "could not check whether the pre hook is done" in caplog.text
    assert time.monotonic() - started < worker_module.HOLD_WAIT
    assert task.retries[0]["countdown"] == HOLD_FIRST_POLL
    assert webhook_receiver.attempts == []


def test_a_post_hook_that_cannot_be_put_back_goes_at_once(
    make_worker, markers, webhook_receiver, caplog, monkeypatch
):
    monkeypatch.setattr(worker_module, "HOLD_WAIT", 0.0)
    worker = make_worker()
    task = FakeTask(error=ConnectionError("the broker is gone"))
    with caplog.at_level(logging.WARNING, logger="xo_webhooks.sending.celery"):
        assert worker.run(task, post_after(worker, "msg_pre")) == "delivered"
    assert "could not hold a post hook; sending it now" in caplog.text
    (received,) = webhook_receiver.wait_for(1)
    assert json.loads(received.body)["type"] == "post"


def test_a_post_hook_waits_for_every_pre_hook_it_follows(make_worker, markers, monkeypatch):
    monkeypatch.setattr(worker_module, "HOLD_WAIT", 0.0)
    worker = make_worker()
    markers.set(PRE_DONE_KEY.format("msg_a"), b"1")  # msg_b is not done
    task = FakeTask()
    with pytest.raises(Retry):
        worker.run(task, message(worker, "post", after=["msg_a", "msg_b"]))
    markers.set(PRE_DONE_KEY.format("msg_b"), b"1")
    again = task.retries[0]["kwargs"]["message"]
    assert worker.run(task, again) == "delivered"
    assert len(task.retries) == 1
