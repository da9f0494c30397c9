"""Hostile callers and careless configurations (issue #14): no request holds a thread
for long, floods the queue or writes to disk; misspelt settings and URLs that are
credentials are caught or kept out of logs and records. Real servers on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import requests

from xo_webhooks import load_settings
from xo_webhooks.config import Hook
from xo_webhooks.errors import ConfigError
from xo_webhooks.sending.deadletter import read_records
from xo_webhooks.sending.delivery import Delivery
from xo_webhooks.sending.dispatcher import ThreadDispatcher

from .apps import create_app
from .helpers import PRE, HungReceiver, assert_ledger
from .waiting import wait_until


def batch(method: str, count: int, notification: bool = False) -> list[dict[str, Any]]:
    calls = [{"jsonrpc": "2.0", "method": method, "params": {"n": n}} for n in range(count)]
    if not notification:
        for n, call in enumerate(calls):
            call["id"] = n
    return calls


@pytest.fixture
def hung():
    receiver = HungReceiver()
    yield receiver
    receiver.close()


def test_wait_for_response_in_a_batch_costs_one_timeout_at_most(hung, serve, wrap):
    # 20 calls against a receiver that never answers, 0.5 s timeout: sequentially 10 s.
    app = create_app()
    hooks = [{"method": "vm.start", "type": "pre", "url": hung.url, "waitForResponse": True}]
    app.wsgi_app = middleware = wrap(app.wsgi_app, hooks=hooks, timeout=0.5, retries=1)
    url = serve(app).url + "/api"
    started = time.monotonic()
    answer = requests.post(url, json=batch("vm.start", 20), timeout=30)
    elapsed = time.monotonic() - started
    assert answer.status_code == 200 and len(answer.json()) == 20
    assert elapsed < 2.0, f"the batch waited {elapsed:.1f} s"
    # Every pre hook is on its way: queued, or taken by a waiting thread whose
    # deliver_now() may count it a moment after the deadline sent the answer.
    wait_until(lambda: middleware.stats()["accepted"] == 20, what="20 pre hooks accepted")
    hung.close()  # its attempts end at once


def test_calls_over_max_calls_reach_the_app_and_leave_one_record(
    webhook_receiver, serve, wrap, tmp_path
):
    dead = tmp_path / "dead.jsonl"
    app = create_app()
    hooks = [{"method": "vm.*", "type": "pre/post", "url": webhook_receiver.url}]
    app.wsgi_app = middleware = wrap(app.wsgi_app, hooks=hooks, max_calls=3, dead_letter=str(dead))
    url = serve(app).url + "/api"
    body = batch("vm.start", 4) + batch("vm.fail", 3)
    answer = requests.post(url, json=body, timeout=10)
    assert len(answer.json()) == 7  # the app ran every call
    wait_until(lambda: len(webhook_receiver.attempts) == 6, what="the hooks of 3 calls")
    assert middleware.flush(10)
    middleware.close(5)
    assert len(webhook_receiver.attempts) == 6  # pre and post of the first 3 calls
    stats = middleware.stats()
    assert stats["over_limit"] == 8 and stats["accepted"] == 6
    assert_ledger(stats)
    (record,) = [json.loads(line) for line in dead.read_text().splitlines()]
    assert record["kind"] == "over_limit" and record["calls"] == 4 and record["hooks"] == 8
    assert record["methods"] == {"vm.start": 1, "vm.fail": 3}


def test_a_flood_never_exceeds_the_queue_bound_nor_writes_on_the_request_thread(
    hung, tmp_path, monkeypatch
):
    fsyncs: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        fsyncs.append(threading.current_thread().name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    settings = load_settings([], {}, queue_size=50, timeout=0.5, retries=1,
                             dead_letter=str(tmp_path / "dead.jsonl"))  # fmt: skip
    dispatcher = ThreadDispatcher(settings)
    hook = Hook(method="vm.start", type="pre", url=hung.url)
    most = 0
    try:
        for n in range(3000):
            dispatcher.submit(Delivery(hook, {**PRE, "callId": f"c{n}"}))
            most = max(most, dispatcher.stats()["pending"])
        stats = dispatcher.stats()
    finally:
        hung.close()
        dispatcher.close(5)
    assert most <= 50
    assert_ledger(stats)
    assert threading.current_thread().name not in fsyncs
    assert stats["lost"] + stats["dead_lettered"] + stats["recording"] >= 2900


def test_the_request_thread_never_writes_a_refused_hook_and_counts_it_lost(tmp_path, caplog):
    # A recorder that cannot keep up: what it cannot take is lost, logged, not written.
    gate, entered = threading.Event(), threading.Event()

    class SlowStore:
        records: list[dict] = []

        def append(self, records) -> None:
            entered.set()
            gate.wait(5)
            self.records.extend(records)

    settings = load_settings([], {}, queue_size=1, timeout=0.5)
    dispatcher = ThreadDispatcher(settings)
    dispatcher.dead_letters.store = SlowStore()
    hook = Hook(method="vm.start", type="pre", url="http://127.0.0.1:9/")
    try:
        for n in range(2):  # the first holds the lane's one place; the second is refused
            dispatcher.submit(Delivery(hook, {**PRE, "callId": f"c{n}"}))
        assert entered.wait(5)  # the recorder is busy writing it
        for n in range(1200):  # the recorder takes 1000 more; 200 are lost
            dispatcher.submit(Delivery(hook, {**PRE, "callId": f"d{n}"}))
        stats = dispatcher.stats()
        assert stats["lost"] == 200 and stats["pending"] <= 1
        assert any("too far behind" in r.getMessage() for r in caplog.records)
    finally:
        gate.set()
        dispatcher.close(0.1)  # the first hook waits 5 s to retry: given up at once
    assert_ledger(dispatcher.stats())


def test_batch_ids_true_and_1_get_their_own_outcomes(webhook_receiver, serve, wrap):
    app = create_app()
    hooks = [{"method": "vm.*", "type": "post", "url": webhook_receiver.url}]
    app.wsgi_app = wrap(app.wsgi_app, hooks=hooks)
    url = serve(app).url + "/api"
    body = [
        {"jsonrpc": "2.0", "id": True, "method": "vm.start", "params": {"id": "a"}},
        {"jsonrpc": "2.0", "id": 1, "method": "vm.fail"},
    ]
    requests.post(url, json=body, timeout=10)
    # The post hooks are queued once the server has closed the response: wait for them.
    wait_until(lambda: len(webhook_receiver.attempts) == 2, what="both post hooks")
    by_method = {h.payload["method"]: h.payload for h in webhook_receiver.attempts}
    assert by_method["vm.start"]["result"] == {"id": "a", "power_state": "Running"}
    assert by_method["vm.fail"]["error"]["code"] == 13


def test_a_misspelt_setting_is_logged_with_the_closest_name(caplog):
    caplog.set_level(logging.WARNING)
    load_settings([], {"XO_WEBHOOKS_TIMOUT": "2"})
    (line,) = [r.getMessage() for r in caplog.records if "TIMOUT" in r.getMessage()]
    assert "did you mean XO_WEBHOOKS_TIMEOUT?" in line


def check_config(**env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("XO_WEBHOOKS_")}
    return subprocess.run(
        [sys.executable, "-m", "xo_webhooks", "check-config", *env.pop("args", "").split()],
        env={**environ, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_check_config_lists_unknown_variables_and_fails():
    result = check_config(XO_WEBHOOKS_TIMOUT="2")
    assert result.returncode == 1
    assert "XO_WEBHOOKS_TIMOUT (did you mean XO_WEBHOOKS_TIMEOUT?)" in result.stdout


def test_check_config_masks_url_secrets_unless_asked():
    hooks = json.dumps([{"method": "a", "type": "pre",
                         "url": "https://bob:hunter2@h.example/x?sig=S3CR3T"}])  # fmt: skip
    masked = check_config(XO_WEBHOOKS_HOOKS=hooks)
    assert masked.returncode == 0
    assert "hunter2" not in masked.stdout and "S3CR3T" not in masked.stdout
    assert "https://bob:***@h.example/x?sig=***" in masked.stdout
    whole = check_config(XO_WEBHOOKS_HOOKS=hooks, args="--show-urls")
    assert "https://bob:hunter2@h.example/x?sig=S3CR3T" in whole.stdout


def test_an_unwritable_dead_letter_path_fails_at_start(tmp_path):
    (tmp_path / "file").write_text("")
    for path in (tmp_path, tmp_path / "file" / "dead.jsonl"):
        with pytest.raises(ConfigError, match="XO_WEBHOOKS_DEAD_LETTER: cannot write dead"):
            load_settings([], {"XO_WEBHOOKS_DEAD_LETTER": str(path)})
    result = check_config(XO_WEBHOOKS_DEAD_LETTER=str(tmp_path))
    assert result.returncode == 1 and "cannot write dead letters there" in result.stderr


@pytest.mark.parametrize("transport", ["http", "requests"])
def test_url_credentials_go_as_basic_auth_and_stay_out_of_logs_and_records(
    transport, webhook_receiver, refused_url, tmp_path, caplog
):
    url = webhook_receiver.url.replace("http://", "http://bob:p%40ss@") + "?token=T0K3N"
    settings = load_settings([], {}, transport=transport)
    dispatcher = ThreadDispatcher(settings)
    try:
        dispatcher.submit(Delivery(Hook(method="m", type="pre", url=url), PRE))
        assert dispatcher.flush(10)
    finally:
        dispatcher.close(5)
    (hook,) = webhook_receiver.attempts
    assert hook.headers["authorization"] == "Basic " + base64.b64encode(b"bob:p@ss").decode()
    # A failing one: logs name its position and origin, the record masks the secrets.
    secret_url = refused_url.replace("http://", "http://bob:hunter2@") + "services/T0/B0?sig=S1G"
    dead = tmp_path / "dead.jsonl"
    settings = load_settings([{"method": "m", "type": "pre", "url": secret_url}], {},
                             retries=1, backoff=0.01, dead_letter=str(dead))  # fmt: skip
    dispatcher = ThreadDispatcher(settings)
    try:
        dispatcher.submit(Delivery(settings.hooks[0], PRE))
        assert dispatcher.flush(10)
    finally:
        dispatcher.close(5)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "hooks[0] http://127.0.0.1:" in logged
    for secret in ("hunter2", "S1G", "T0/B0"):
        assert secret not in logged
    (record,) = read_records(str(dead))
    assert "hunter2" not in record["url"] and record["url"].endswith("services/T0/B0?sig=***")
    # replay finds the configured hook by its fingerprint and sends to its whole URL
    assert Delivery.from_record(record, settings).hook.url == secret_url
    with pytest.raises(LookupError, match="no configured hook has the fingerprint"):
        Delivery.from_record(record, load_settings([], {}))


def test_a_url_that_is_not_ascii_is_encoded_or_refused_at_start():
    hook = {"method": "m", "type": "pre", "url": "https://bücher.example/päth?q=é"}
    (loaded,) = load_settings([hook], {}).hooks
    assert loaded.url == "https://xn--bcher-kva.example/p%C3%A4th?q=%C3%A9"
    bad = {**hook, "url": "https://" + "a" * 70 + "ü.example/"}
    with pytest.raises(ConfigError, match=r"hooks\[0\]\.url: the host name cannot be IDNA"):
        load_settings([bad], {})


def test_an_over_limit_record_survives_hostile_method_names(
    webhook_receiver, serve, wrap, tmp_path
):
    # Names a caller chose (a lone surrogate, a newline, 5 kB) must not cost the record.
    dead = tmp_path / "dead.jsonl"
    app = create_app()
    hooks = [{"method": "*", "type": "pre", "url": webhook_receiver.url}]
    app.wsgi_app = middleware = wrap(app.wsgi_app, hooks=hooks, max_calls=1, dead_letter=str(dead))
    url = serve(app).url + "/api"
    names = ["vm.start", "vm.\\ud800", "vm.\\nline", "vm." + "x" * 5000]
    body = (
        "["
        + ",".join(f'{{"jsonrpc":"2.0","id":{n},"method":"{m}"}}' for n, m in enumerate(names))
        + "]"
    )
    requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=10)
    wait_until(lambda: dead.exists() and dead.read_text(), what="the over-limit record")
    middleware.close(5)
    (record,) = [json.loads(line) for line in dead.read_text().splitlines()]
    assert record["calls"] == 3 and middleware.stats()["over_limit"] == 3
    assert set(record["methods"]) == {"vm.\ufffd", "vm.\nline", ("vm." + "x" * 5000)[:100]}


def test_replay_keeps_over_limit_records_as_notices_and_succeeds(
    webhook_receiver, tmp_path, capsys, monkeypatch
):
    from xo_webhooks.cli import main

    dead = tmp_path / "dead.jsonl"
    notice = {"kind": "over_limit", "calls": 4, "hooks": 8, "methods": {"vm.start": 4}}
    hook = {"id": "msg_1", "url": webhook_receiver.url, "payload": {**PRE, "callId": "c1"}}
    dead.write_text(json.dumps(notice) + "\n" + json.dumps(hook) + "\n")
    for name in [n for n in os.environ if n.startswith("XO_WEBHOOKS_")]:
        monkeypatch.delenv(name)
    assert main(["replay", str(dead)]) == 0
    out = capsys.readouterr().out
    assert "delivered 1" in out and "notices 1 (calls over XO_WEBHOOKS_MAX_CALLS, kept)" in out
    assert [json.loads(line) for line in dead.read_text().splitlines()] == [notice]


def test_wait_for_response_threads_are_bounded_by_max_workers_across_requests(hung, serve, wrap):
    app = create_app()
    hooks = [{"method": "vm.start", "type": "pre", "url": hung.url, "waitForResponse": True}]
    app.wsgi_app = middleware = wrap(
        app.wsgi_app, hooks=hooks, timeout=0.5, max_workers=2, retries=0
    )
    url = serve(app).url + "/api"
    most = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal most
        while not done.is_set():
            waiting = [t for t in threading.enumerate() if t.name.startswith("xo-webhooks-wait")]
            most = max(most, len(waiting))
            done.wait(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    posts = [threading.Thread(target=requests.post, args=(url,),
                              kwargs={"json": batch("vm.start", 10), "timeout": 30})
             for _ in range(4)]  # fmt: skip
    for post in posts:
        post.start()
    for post in posts:
        post.join(30)
    done.set()
    watcher.join()
    assert 1 <= most <= 2
    assert middleware.stats()["accepted"] == 40  # every hook attempted or queued
    hung.close()


def test_over_limit_records_without_a_store_or_with_a_broken_one_are_logged(tmp_path, caplog):
    from xo_webhooks.request.jsonrpc import Call
    from xo_webhooks.request.overlimit import OverLimit

    hook = Hook(method="vm.start", type="pre/post", url="http://127.0.0.1:9/")
    calls = [(Call("vm.start", {}, n), (hook,)) for n in range(3)]
    nowhere = OverLimit(load_settings([], {}, max_calls=1))
    assert len(nowhere.split(calls)) == 1
    nowhere.close(5)
    assert nowhere.hooks == 4 and "no dead-letter record was written" in caplog.text
    dead = tmp_path / "dead.jsonl"
    broken = OverLimit(load_settings([], {}, max_calls=2, dead_letter=str(dead)))
    dead.mkdir()  # the store breaks after start
    broken.split(calls)
    broken.close(5)
    assert broken.hooks == 2
    assert "could not write the record of calls over the limit" in caplog.text


def test_a_dead_letter_folder_that_cannot_be_written_fails_at_start():
    # /proc takes no new file, even from root: the temporary file check says why.
    with pytest.raises(ConfigError, match="cannot write dead letters there: cannot write in /proc"):
        load_settings([], {"XO_WEBHOOKS_DEAD_LETTER": "/proc/xo-webhooks/dead.jsonl"})
