"""Reliable delivery over real HTTP on 127.0.0.1: retries, backoff, Retry-After, the
bounded queue, dead letters, shutdown, ordering, replay, and the stats ledger."""

from __future__ import annotations

import json
import threading
import time

import pytest

from xo_webhooks import load_settings
from xo_webhooks.request.payload import pre_payload
from xo_webhooks.schema import validate_payload
from xo_webhooks.sending.deadletter import DeadLetterFile, read_records
from xo_webhooks.sending.delivery import Delivery
from xo_webhooks.sending.dispatcher import ThreadDispatcher
from xo_webhooks.sending.replay import replay

from .apps import create_app
from .helpers import assert_ledger
from .waiting import wait_until


def payload(call_id="c1", kind="pre", method="vm.start"):
    body = pre_payload(call_id, (None, None), method, {"id": "vm-1"}, 1_700_000_000_000)
    if kind == "post":
        body.update(type="post", duration=5, result=True)
    return body


@pytest.fixture
def dispatch(tmp_path):
    """``dispatch(url, **settings)`` -> (dispatcher, hook); closed at teardown."""
    made = []

    def make(url, **overrides):
        overrides.setdefault("backoff", 0.01)
        overrides.setdefault("timeout", 2)
        overrides.setdefault("dead_letter", str(tmp_path / "dead.jsonl"))
        settings = load_settings([{"method": "*", "type": "pre/post", "url": url}], {}, **overrides)
        made.append(ThreadDispatcher(settings))
        return made[-1], settings.hooks[0]

    yield make
    for dispatcher in made:
        dispatcher.close(5)


def dead_letters(tmp_path):
    path = tmp_path / "dead.jsonl"
    return read_records(str(path)) if path.exists() else []


def test_refused_connections_are_retried_then_dead_lettered(dispatch, refused_url, tmp_path):
    dispatcher, hook = dispatch(refused_url, retries=2)
    dispatcher.submit(Delivery(hook, payload()))
    assert dispatcher.flush(10)
    stats = dispatcher.stats()
    assert_ledger(stats)
    assert stats | {"pending": 0} == {
        "accepted": 1, "delivered": 0, "retried": 2, "failed": 1,
        "dead_lettered": 1, "lost": 0, "pending": 0,
        "spooled": 0, "left": 0, "resumed": 0, "spool_errors": 0, "recording": 0,
    }  # fmt: skip
    (record,) = dead_letters(tmp_path)
    assert record["url"] == refused_url and record["attempts"] == 3
    assert "connection failed" in record["lastError"]
    validate_payload(record["payload"])


def test_500_then_200_is_delivered_on_retry(dispatch, webhook_receiver):
    webhook_receiver.respond_with(500, 200)
    dispatcher, hook = dispatch(webhook_receiver.url)
    dispatcher.submit(Delivery(hook, payload()))
    assert dispatcher.flush(10)
    assert [a.status for a in webhook_receiver.attempts] == [500, 200]
    stats = dispatcher.stats()
    assert_ledger(stats)
    assert (stats["delivered"], stats["retried"], stats["failed"]) == (1, 1, 0)


def test_retries_keep_the_same_message_id(dispatch, webhook_receiver):
    webhook_receiver.respond_with(503, 503, 204)
    dispatcher, hook = dispatch(webhook_receiver.url, secret="whsec_" + "A" * 32)
    dispatcher.submit(Delivery(hook, payload()))
    assert dispatcher.flush(10)
    ids = {a.headers["webhook-id"] for a in webhook_receiver.attempts}
    assert len(webhook_receiver.attempts) == 3 and len(ids) == 1


def test_429_retry_after_is_honoured(dispatch, webhook_receiver):
    webhook_receiver.respond_with(429, 204, headers={"Retry-After": "1"})
    dispatcher, hook = dispatch(webhook_receiver.url)
    started = time.monotonic()
    dispatcher.submit(Delivery(hook, payload()))
    assert dispatcher.flush(10)
    assert time.monotonic() - started >= 0.9  # not the 10 ms backoff
    assert [a.status for a in webhook_receiver.attempts] == [429, 204]
    assert_ledger(dispatcher.stats())


def test_receiver_hanging_past_the_timeout(dispatch, webhook_receiver, tmp_path):
    webhook_receiver.respond_with(204, delay=3)
    dispatcher, hook = dispatch(webhook_receiver.url, timeout=0.2, retries=1)
    dispatcher.submit(Delivery(hook, payload()))
    assert dispatcher.flush(10)
    (record,) = dead_letters(tmp_path)
    assert record["attempts"] == 2 and "timed out" in record["lastError"]
    assert_ledger(dispatcher.stats())


def test_connection_closed_mid_response_is_retried(dispatch, webhook_receiver):
    webhook_receiver.respond_with("close", 204)
    dispatcher, hook = dispatch(webhook_receiver.url)
    dispatcher.submit(Delivery(hook, payload()))
    assert dispatcher.flush(10)
    assert len(webhook_receiver.received) == 1 and dispatcher.stats()["retried"] == 1
    assert_ledger(dispatcher.stats())


@pytest.mark.parametrize("status", [404, 400, 302])
def test_answers_not_worth_retrying_are_given_up_at_once(
    status, dispatch, webhook_receiver, tmp_path
):
    webhook_receiver.respond_with(status)
    dispatcher, hook = dispatch(webhook_receiver.url)
    dispatcher.submit(Delivery(hook, payload()))
    assert dispatcher.flush(10)
    assert len(webhook_receiver.attempts) == 1
    (record,) = dead_letters(tmp_path)
    assert record["attempts"] == 1 and record["lastError"] == f"HTTP {status}"
    stats = dispatcher.stats()
    assert_ledger(stats)
    assert (stats["failed"], stats["retried"]) == (1, 0)


def test_a_waiting_retry_does_not_hold_a_worker(dispatch, webhook_receiver, refused_url):
    settings = load_settings(
        [{"method": "*", "type": "pre/post", "url": refused_url},
         {"method": "*", "type": "pre/post", "url": webhook_receiver.url}],
        {}, max_workers=1, backoff=30, retries=3,
    )  # fmt: skip
    dispatcher = ThreadDispatcher(settings)
    try:
        down, up = settings.hooks
        dispatcher.submit(Delivery(down, payload("down")))
        for n in range(20):
            dispatcher.submit(Delivery(up, payload(f"up-{n}")))
        assert len(webhook_receiver.wait_for(20)) == 20  # while "down" waits 15-30 s
        wait_until(lambda: dispatcher.stats()["pending"] == 1, what="only 'down' pending")
    finally:
        dispatcher.close(0)
    assert_ledger(dispatcher.stats())


def test_post_waits_for_its_pre_to_be_delivered(dispatch, webhook_receiver):
    webhook_receiver.respond_with(500, 500, 204)
    dispatcher, hook = dispatch(webhook_receiver.url, max_workers=4)
    dispatcher.submit(Delivery(hook, payload("c1", "pre")))
    dispatcher.submit(Delivery(hook, payload("c1", "post")))
    assert dispatcher.flush(10)
    kinds = [(a.status, a.payload["type"]) for a in webhook_receiver.attempts]
    assert kinds == [(500, "pre"), (500, "pre"), (204, "pre"), (204, "post")]


def test_post_goes_once_its_pre_is_given_up(dispatch, webhook_receiver, tmp_path):
    webhook_receiver.respond_with(400, 204)
    dispatcher, hook = dispatch(webhook_receiver.url)
    dispatcher.submit(Delivery(hook, payload("c1", "pre")))
    dispatcher.submit(Delivery(hook, payload("c1", "post")))
    assert dispatcher.flush(10)
    assert [a.payload["type"] for a in webhook_receiver.attempts] == ["pre", "post"]
    assert [r["payload"]["type"] for r in dead_letters(tmp_path)] == ["pre"]


def test_full_queue_never_blocks_and_dead_letters(dispatch, webhook_receiver, tmp_path):
    webhook_receiver.respond_with(204, delay=5)
    dispatcher, hook = dispatch(webhook_receiver.url, queue_size=5, max_workers=1, timeout=10)
    for n in range(50):
        dispatcher.submit(Delivery(hook, payload(f"c{n}")))
    # Never blocked: a submit that waited for room in the queue could only have returned
    # once an answer came (each takes 5 s), yet none has.
    stats = dispatcher.stats()
    assert_ledger(stats)
    assert (stats["accepted"], stats["delivered"], webhook_receiver.received) == (50, 0, [])
    # The rejected ones are written by the recorder thread, off the request path.
    stats = wait_until(lambda: (s := dispatcher.stats())["failed"] == 45 and s, what="45 failed")
    assert_ledger(stats)
    assert (stats["accepted"], stats["pending"], stats["dead_lettered"]) == (50, 5, 45)
    assert len(dead_letters(tmp_path)) == 45
    assert {r["lastError"] for r in dead_letters(tmp_path)} == {"queue full"}
    webhook_receiver.stop()  # release the slow answers


def test_close_dead_letters_what_is_left(dispatch, refused_url, tmp_path):
    dispatcher, hook = dispatch(refused_url, backoff=60, retries=5)
    for n in range(3):
        dispatcher.submit(Delivery(hook, payload(f"c{n}")))
    started = time.monotonic()
    dispatcher.close(0.5)
    # Generous: the first retry is due 30-60 s after the first attempt, and close() did
    # not wait for it (each record shows at most that first attempt).
    assert time.monotonic() - started < 20
    stats = dispatcher.stats()
    assert_ledger(stats)
    assert (stats["pending"], stats["dead_lettered"], stats["retried"]) == (0, 3, 0)
    records = dead_letters(tmp_path)
    assert sorted(r["payload"]["callId"] for r in records) == ["c0", "c1", "c2"]
    assert all(r["attempts"] <= 1 for r in records), records
    dispatcher.submit(Delivery(hook, payload("late")))  # after close: kept, not lost
    assert dead_letters(tmp_path)[-1]["lastError"] == "dispatcher closed"


def test_a_proxy_of_another_scheme_is_a_final_error(dispatch, monkeypatch, tmp_path):
    for name in ("https_proxy", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "socks5://user:s3cret@127.0.0.1:1080")
    dispatcher, hook = dispatch("https://127.0.0.1:9/hook", retries=3)
    dispatcher.submit(Delivery(hook, payload()))
    assert dispatcher.flush(10)
    stats = dispatcher.stats()
    assert_ledger(stats)
    assert (stats["failed"], stats["dead_lettered"], stats["retried"]) == (1, 1, 0)
    (record,) = dead_letters(tmp_path)
    assert record["attempts"] == 1  # not worth a retry: the setting will not change
    assert record["lastError"] == (
        "request failed: ValueError: only http:// proxies are supported, "
        "not 'socks5://user:***@127.0.0.1:1080'"
    )


def test_without_a_dead_letter_file_hooks_are_counted_lost(dispatch, refused_url, caplog):
    dispatcher, hook = dispatch(refused_url, retries=0, dead_letter=None)
    for n in range(5):
        dispatcher.submit(Delivery(hook, payload(f"c{n}")))
    assert dispatcher.flush(10)
    stats = dispatcher.stats()
    assert_ledger(stats)
    assert (stats["lost"], stats["dead_lettered"]) == (5, 0)
    lost_logs = [r for r in caplog.records if "lost" in r.getMessage()]
    assert len(lost_logs) == 1  # rate-limited
    assert "vm-1" not in caplog.text  # params never logged


def test_dead_letter_lines_survive_a_torn_write(tmp_path):
    path = tmp_path / "dead.jsonl"
    dead = DeadLetterFile(str(path))
    dead.append([{"url": "http://127.0.0.1/", "payload": {"n": 1}}])
    with open(path, "ab") as f:
        f.write(b'{"url": "http://127.0.0.1/", "payl')  # a crash mid-write
    dead.append([{"url": "http://127.0.0.1/", "payload": {"n": 2}}])
    assert [r["payload"]["n"] for r in read_records(str(path))] == [1, 2]


def test_wait_for_response_holds_the_first_attempt_only(webhook_receiver, serve, wrap):
    webhook_receiver.respond_with(500, 204)
    hooks = [
        {"method": "vm.start", "type": "pre", "url": webhook_receiver.url, "waitForResponse": True}
    ]
    middleware = wrap(create_app().wsgi_app, hooks=hooks, backoff=60)
    url = serve(middleware).url + "/api"
    import requests

    answer = requests.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "vm.start"}, timeout=10)
    assert answer.json()["result"]["power_state"] == "Running"
    # The API answered while the retry still waits its 30-60 s in the background.
    stats = middleware.stats()
    assert (stats["pending"], stats["retried"]) == (1, 0)
    assert [a.status for a in webhook_receiver.attempts] == [500]
    assert_ledger(stats)
    # Closing without waiting gives the waiting retry up at once (the fixture's close
    # would wait its whole timeout for it).
    middleware.close(0)
    stats = middleware.stats()
    assert_ledger(stats)
    assert (stats["pending"], stats["failed"], stats["retried"]) == (0, 1, 0)
    assert [a.status for a in webhook_receiver.attempts] == [500]


def test_replay_resends_and_keeps_only_what_still_fails(tmp_path, webhook_receiver, refused_url):
    path = tmp_path / "dead.jsonl"
    good = [
        {
            "id": f"msg_{n}",
            "url": webhook_receiver.url,
            "format": "json",
            "payload": payload(f"c{n}"),
            "attempts": 6,
            "lastError": "HTTP 503",
        }
        for n in range(3)
    ]
    bad = {
        "id": "msg_bad",
        "url": refused_url,
        "format": "json",
        "payload": payload("cbad"),
        "attempts": 6,
        "lastError": "connection failed",
    }
    path.write_text("".join(json.dumps(r) + "\n" for r in [*good, bad]))
    settings = load_settings([], {}, retries=1, backoff=0.01, secret="whsec_" + "B" * 32)

    report = replay(str(path), settings)

    assert (report.read, report.delivered, report.failed) == (4, 3, 1)
    received = webhook_receiver.wait_for(3)
    assert sorted(h.headers["webhook-id"] for h in received) == ["msg_0", "msg_1", "msg_2"]
    (left,) = read_records(str(path))
    assert left["id"] == "msg_bad" and left["attempts"] == 2
    assert list(tmp_path.iterdir()) == [path]


def test_concurrent_submitters_keep_the_ledger(dispatch, webhook_receiver):
    webhook_receiver.respond_with(lambda n, hook: 500 if n % 3 == 0 else 204)
    dispatcher, hook = dispatch(webhook_receiver.url, retries=1)
    barrier = threading.Barrier(4)
    seen = [[] for _ in range(4)]  # each submitter's snapshots, checked on this thread

    def submit(worker):
        barrier.wait(10)
        for n in range(100):
            dispatcher.submit(Delivery(hook, payload(f"{worker}-{n}")))
            seen[worker].append(dispatcher.stats())

    threads = [threading.Thread(target=submit, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert not any(thread.is_alive() for thread in threads)
    assert [len(snapshots) for snapshots in seen] == [100] * 4
    for snapshot in (s for snapshots in seen for s in snapshots):
        assert_ledger(snapshot)
    assert dispatcher.flush(20)
    stats = dispatcher.stats()
    assert_ledger(stats)
    assert stats["accepted"] == 400 and stats["pending"] == 0


def test_a_garbage_retry_after_does_not_stop_delivery(dispatch, webhook_receiver):
    # "²" is a digit to str.isdigit() but not to float(): it once killed the workers.
    webhook_receiver.respond_with(503, 204, headers={"Retry-After": "\u00b2"})
    dispatcher, hook = dispatch(webhook_receiver.url, max_workers=1)
    for n in range(3):
        dispatcher.submit(Delivery(hook, payload(f"c{n}")))
    assert dispatcher.flush(10)
    stats = dispatcher.stats()
    assert_ledger(stats)
    assert (stats["delivered"], stats["retried"]) == (3, 1)
