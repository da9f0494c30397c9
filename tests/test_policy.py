"""The delivery policy, and that every dispatcher decides by it: the same table of
answers from a real receiver on 127.0.0.1, through the thread dispatcher and the Celery
worker (run in-process), gives the same decisions."""

from __future__ import annotations

import email.utils
import time
from typing import Any

import pytest

from xo_webhooks import load_settings
from xo_webhooks.request.payload import pre_payload
from xo_webhooks.sending.delivery import Delivery
from xo_webhooks.sending.dispatcher import ThreadDispatcher
from xo_webhooks.sending.policy import (
    JITTER,
    MAX_RETRY_AFTER,
    Attempt,
    DeadLetters,
    RetryPolicy,
    judge_answer,
    judge_failure,
    parse_retry_after,
)

BACKOFF = 0.5


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [
        pytest.param(200, None, Attempt(True, status=200), id="200"),
        pytest.param(204, "5", Attempt(True, status=204), id="204-ignores-retry-after"),
        pytest.param(302, None, Attempt(False, "HTTP 302", status=302), id="302-final"),
        pytest.param(400, None, Attempt(False, "HTTP 400", status=400), id="400-final"),
        pytest.param(408, None, Attempt(False, "HTTP 408", True, None, 408), id="408-retry"),
        pytest.param(410, None, Attempt(False, "HTTP 410", status=410), id="410-final"),
        pytest.param(429, None, Attempt(False, "HTTP 429", True, None, 429), id="429"),
        pytest.param(429, "7", Attempt(False, "HTTP 429", True, 7.0, 429), id="429-retry-after"),
        pytest.param(
            503, "99999", Attempt(False, "HTTP 503", True, MAX_RETRY_AFTER, 503), id="503-cap"
        ),
        pytest.param(500, None, Attempt(False, "HTTP 500", True, None, 500), id="500"),
    ],
)
def test_judge_answer(status, retry_after, expected):
    assert judge_answer(status, retry_after) == expected


def test_judge_failure():
    assert judge_failure(TimeoutError("timed out"), 2.5) == Attempt(
        False, "timed out after 2.5 s", retryable=True
    )
    refused = judge_failure(ConnectionRefusedError(111, "Connection refused"), 1)
    assert refused.retryable and refused.error.startswith("connection failed: ")
    assert refused.error.endswith("ConnectionRefusedError: [Errno 111] Connection refused")
    unusable = judge_failure(ValueError("not an http(s) URL"), 1)
    assert not unusable.retryable and unusable.error.startswith("request failed: ValueError")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param(None, None, id="absent"),
        pytest.param("3", 3.0, id="seconds"),
        pytest.param("1800", 1800.0, id="half-an-hour"),
        pytest.param("86400", MAX_RETRY_AFTER, id="capped-at-an-hour"),
        pytest.param("soon", None, id="garbage"),
        pytest.param("\u00b2", None, id="superscript-two"),
        pytest.param("Wed, 21 Oct 2015 07:28:00 GMT", 0.0, id="date-in-the-past"),
    ],
)
def test_parse_retry_after(header, expected):
    assert parse_retry_after(header) == expected


def test_retry_after_as_a_future_date():
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= parse_retry_after(future) <= 30


def test_next_delay_gives_up_after_the_retries_and_on_final_answers():
    policy = RetryPolicy((1.0, 2.0))
    retryable = Attempt(False, "HTTP 503", True)
    assert policy.next_delay(1, retryable) is not None
    assert policy.next_delay(2, retryable) is not None
    assert policy.next_delay(3, retryable) is None  # 1 attempt + 2 retries made
    assert policy.next_delay(1, Attempt(False, "HTTP 410", status=410)) is None
    assert policy.next_delay(1, Attempt(True, status=204)) is None


def test_each_delay_follows_the_schedule_jittered_below_it():
    policy, failed = RetryPolicy((5.0, 300.0, 7200.0)), Attempt(False, "HTTP 503", True)
    for attempts, scheduled in [(1, 5.0), (2, 300.0), (3, 7200.0)]:
        delays = [policy.next_delay(attempts, failed) for _ in range(50)]
        assert all(JITTER * scheduled <= d <= scheduled for d in delays)
        assert len(set(delays)) > 1  # jittered
    assert policy.next_delay(3, Attempt(False, "HTTP 429", True, retry_after=7.0)) == 7.0
    assert policy.next_delay(4, failed) is None


def test_the_shorthand_is_an_exponential_schedule_capped_at_a_minute():
    assert load_settings(environ={}, retries=8, backoff=1).retry_schedule == (
        1, 2, 4, 8, 16, 32, 60, 60,
    )  # fmt: skip
    assert load_settings(environ={}, retries=0).retry_schedule == ()


def test_remaining_and_longest_schedule():
    policy = RetryPolicy((1.0, 2.0, 4.0))
    assert [policy.remaining(n) for n in range(5)] == [7.0, 6.0, 4.0, 0.0, 0.0]
    assert policy.longest_schedule(10) == 4 * 10 + 7.0
    assert RetryPolicy(()).longest_schedule(10) == 10


def test_dead_letters_redact_write_and_count(tmp_path, caplog):
    path = tmp_path / "dead.jsonl"
    settings = load_settings(environ={}, dead_letter=str(path))
    hook = settings_hook(settings, "http://127.0.0.1:9/")
    delivery = Delivery(hook, pre_payload("c1", (None, None), "vm.start", {"password": "x"}, 1))
    delivery.last_error = "HTTP 503"
    assert DeadLetters(settings).keep([delivery])
    (line,) = path.read_text().splitlines()
    assert '"password":"***"' in line and '"lastError":"HTTP 503"' in line
    # no store: lost, and said so once
    assert not DeadLetters(load_settings(environ={})).keep([delivery, delivery])
    (record,) = [r for r in caplog.records if "lost" in r.getMessage()]
    assert "XO_WEBHOOKS_DEAD_LETTER is not set" in record.getMessage()


def settings_hook(settings, url: str) -> Any:
    from xo_webhooks import Hook

    return Hook(method="vm.start", type="post", url=url)


# -- the same table through both dispatchers ---------------------------------------------


class RecordingPolicy:
    """The real policy, whose every decision is noted; it then stops the hook there,
    so that a table of answers costs one attempt each."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.decisions: list[tuple[Attempt, float | None]] = []

    def next_delay(self, attempts: int, attempt: Attempt) -> float | None:
        self.decisions.append((attempt, self.policy.next_delay(attempts, attempt)))
        return None

    def longest_schedule(self, timeout: float) -> float:
        return self.policy.longest_schedule(timeout)


ANSWERS = [
    pytest.param((204, None), "delivered", id="204"),
    pytest.param((302, None), "final", id="302"),
    pytest.param((408, None), "backoff", id="408"),
    pytest.param((410, None), "final", id="410"),
    pytest.param((429, None), "backoff", id="429"),
    pytest.param((429, "3"), 3.0, id="429-retry-after"),
    pytest.param((503, None), "backoff", id="503"),
    pytest.param((500, "2"), 2.0, id="500-retry-after"),
    pytest.param("refused", "backoff", id="refused"),
    pytest.param("timeout", "backoff", id="timeout"),
]


def _decision(delivered: bool, recorded: list[tuple[Attempt, float | None]]) -> Any:
    if delivered:
        assert recorded == []
        return "delivered", None
    ((attempt, delay),) = recorded
    if delay is None:
        return "final", attempt
    if attempt.retry_after is not None:
        assert delay == attempt.retry_after
        return delay, attempt
    assert JITTER * BACKOFF <= delay <= BACKOFF
    return "backoff", attempt


@pytest.fixture
def answer_url(webhook_receiver, refused_url):
    def url_for(answer) -> str:
        if answer == "refused":
            return refused_url
        if answer == "timeout":
            webhook_receiver.respond_with(204, delay=5)
        else:
            status, retry_after = answer
            headers = {"Retry-After": retry_after} if retry_after else None
            webhook_receiver.respond_with(status, headers=headers)
        return webhook_receiver.url

    return url_for


def _settings(url: str, tmp_path) -> Any:
    hooks = [{"method": "vm.start", "type": "post", "url": url}]
    return load_settings(
        hooks, environ={}, retries=3, backoff=BACKOFF, timeout=0.3,
        dead_letter=str(tmp_path / "dead.jsonl"),
    )  # fmt: skip


def _delivery(settings) -> Delivery:
    payload = pre_payload("call-1", (None, None), "vm.start", {"id": "vm-1"}, 1)
    payload = {**payload, "type": "post", "duration": 1, "result": True}
    return Delivery(settings.hooks[0], payload)


def through_threads(settings) -> Any:
    dispatcher = ThreadDispatcher(settings)
    dispatcher.policy = recording = RecordingPolicy(dispatcher.policy)
    dispatcher.submit(_delivery(settings))
    try:
        assert dispatcher.flush(10)
        stats = dispatcher.stats()
    finally:
        dispatcher.close(5)
    return _decision(stats["delivered"] == 1, recording.decisions)


class FakeTask:
    """What the worker uses of a bound Celery task: ``retry``."""

    def retry(self, **kwargs: Any) -> Exception:
        raise AssertionError("the recording policy never asks for a retry")


def through_celery_worker(settings) -> Any:
    celery_worker = pytest.importorskip("xo_webhooks.sending.celery")
    worker = celery_worker.Worker(settings)
    worker.policy = recording = RecordingPolicy(worker.policy)
    outcome = worker.run(FakeTask(), _delivery(settings).to_message())
    return _decision(outcome == "delivered", recording.decisions)


@pytest.mark.parametrize(("answer", "expected"), ANSWERS)
def test_both_dispatchers_decide_alike(answer, expected, answer_url, tmp_path):
    settings = _settings(answer_url(answer), tmp_path)
    by_threads = through_threads(settings)
    by_celery = through_celery_worker(settings)
    assert by_threads[0] == expected
    assert by_threads == by_celery


def test_the_celery_worker_retries_with_the_policy_delay(webhook_receiver, tmp_path):
    celery_worker = pytest.importorskip("xo_webhooks.sending.celery")
    retry_error = pytest.importorskip("celery.exceptions").Retry
    webhook_receiver.respond_with(429, headers={"Retry-After": "4"})
    settings = _settings(webhook_receiver.url, tmp_path)
    asked: list[dict[str, Any]] = []

    class Task:
        def retry(self, **kwargs: Any) -> Exception:
            asked.append(kwargs)
            return retry_error()

    delivery = _delivery(settings)
    with pytest.raises(retry_error):
        celery_worker.Worker(settings).run(Task(), delivery.to_message())
    ((kwargs),) = asked
    assert kwargs["countdown"] == 4.0
    again = kwargs["kwargs"]["message"]
    assert again == {**delivery.to_message(), "attempts": 1, "lastError": "HTTP 429"}
