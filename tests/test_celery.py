"""The Celery dispatcher with real components: a ``redis-server`` on 127.0.0.1 and
Celery worker processes, both started here and stopped at teardown.

Scenarios: 1,000 calls through two workers (every hook at least once, none twice, pre
before post, signed); a worker killed with SIGKILL mid-run then restarted (nothing
lost, redelivered within 2 minutes); Redis stopped or hung during calls (the API
answers fast, the hooks are dead-lettered and counted); retries, dead letters in a
Redis list, and replay.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from xo_webhooks import WebhookMiddleware, load_settings
from xo_webhooks.request.payload import pre_payload
from xo_webhooks.sending.deadletter import read_records
from xo_webhooks.sending.delivery import Delivery
from xo_webhooks.sending.replay import replay
from xo_webhooks.signing import verify

from .apps import create_app
from .helpers import assert_ledger
from .waiting import wait_until

pytestmark = pytest.mark.slow

redis = pytest.importorskip("redis", reason="the celery extra is not installed")
pytest.importorskip("celery", reason="the celery extra is not installed")

from xo_webhooks.celery import QUEUE, VISIBILITY_TIMEOUT, CeleryDispatcher, celery_app  # noqa: E402
from xo_webhooks.sending.deadletter_redis import DEFAULT_KEY, RedisDeadLetter  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SECRET = "whsec_" + "c2VjcmV0LWZvci10aGUtY2VsZXJ5LXRlc3Rz"
CALLS = 1000


# -- Redis and Celery workers, for real ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """``redis-server`` on an ephemeral loopback port, without persistence."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        wait_until(lambda: self._answers(client), 10, "redis-server to answer PING")
        client.close()
        return self

    def _answers(self, client: Any) -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            assert self.process is not None and self.process.poll() is None, "redis-server died"
            return False

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def client(self) -> Any:
        return redis.Redis.from_url(self.url, socket_timeout=5)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (CI installs it: apt-get install redis-server)")
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def broker(redis_server: RedisServer) -> RedisServer:
    """The module's Redis, emptied for this test."""
    redis_server.client().flushall()
    return redis_server


class Workers:
    """Celery worker processes (``celery -A xo_webhooks.celery worker``), each in its
    own process group so that a kill takes its pool processes too."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.env: dict[str, str] = {}
        self.starts = 0

    def configure(self, **settings: str) -> None:
        """The workers' ``XO_WEBHOOKS_*`` variables (``broker_url=...``)."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("XO_WEBHOOKS_")}
        self.env = {**base, **{f"XO_WEBHOOKS_{k.upper()}": v for k, v in settings.items()}}

    def start(self, *names: str) -> None:
        """Start workers and wait until each says it is ready."""
        logs = []
        for name in names:
            self.starts += 1
            log = self.logs / f"worker-{name}-{self.starts}.log"
            logs.append(log)
            with open(log, "wb") as out:
                self.processes[name] = subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "xo_webhooks.celery", "worker",
                     "--pool", "prefork", "--concurrency", "2", "--hostname", f"{name}@%h",
                     "--without-mingle", "--without-gossip", "--without-heartbeat",
                     "--loglevel", "INFO"],
                    env=self.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
        for name, log in zip(names, logs, strict=True):
            wait_until(partial(self._ready, name, log), 30, f"worker {name} to be ready")

    def _ready(self, name: str, log: Path) -> bool:
        text = log.read_text(errors="replace")
        assert self.processes[name].poll() is None, f"worker {name} exited:\n{text[-3000:]}"
        return " ready." in text

    def kill(self, name: str) -> None:
        """SIGKILL a worker and its pool processes, as when its machine dies."""
        process = self.processes.pop(name)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    def stop(self) -> None:
        """A warm shutdown (SIGTERM), then SIGKILL whatever is left."""
        for process in self.processes.values():
            os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        self.processes.clear()

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    logs = tmp_path / "workers"
    logs.mkdir()
    running = Workers(logs)
    yield running
    running.stop()


# -- helpers ------------------------------------------------------------------------------


def hook(url: str, **extra: Any) -> dict[str, Any]:
    return {"method": "vm.start", "type": "pre/post", "url": url, "secret": SECRET,
            "headers": {"X-Team": "ops"}, **extra}  # fmt: skip


@pytest.fixture
def wrapped() -> Iterator[Callable[..., Any]]:
    """``wrapped(hooks, broker_url, **env)``: the Flask app of tests/apps.py wrapped
    with the Celery dispatcher (``app.wsgi_app``); closed at teardown."""
    built: list[WebhookMiddleware] = []

    def make(hooks: list[dict[str, Any]], broker_url: str, **env: str) -> Any:
        environ = {"XO_WEBHOOKS_DISPATCHER": "celery", "XO_WEBHOOKS_BROKER_URL": broker_url}
        environ.update({f"XO_WEBHOOKS_{k.upper()}": v for k, v in env.items()})
        app = create_app()
        app.wsgi_app = WebhookMiddleware(app.wsgi_app, hooks=hooks, environ=environ)
        built.append(app.wsgi_app)
        return app

    yield make
    for middleware in built:
        middleware.close(5)


def call(client: Any, number: int) -> float:
    """Call vm.start through the wrapped app; return how long the call took."""
    start = time.monotonic()
    body = {"jsonrpc": "2.0", "id": number, "method": "vm.start", "params": {"id": f"vm-{number}"}}
    response = client.post("/api", json=body)
    response.close()  # the post hook goes when the response is closed
    assert response.status_code == 200
    return time.monotonic() - start


def by_call(received: list[Any]) -> Counter[tuple[str, str]]:
    return Counter((h.payload["callId"], h.payload["type"]) for h in received)


def assert_pre_before_post(received: list[Any]) -> None:
    first: dict[tuple[str, str], int] = {}
    for number, h in enumerate(received):
        first.setdefault((h.payload["callId"], h.payload["type"]), number)
    late = [c for (c, kind), n in first.items() if kind == "post" and first[(c, "pre")] > n]
    assert not late, f"{len(late)} post hook(s) arrived before their pre hook"


# -- tests --------------------------------------------------------------------------------


def test_the_base_install_imports_neither_celery_nor_redis():
    code = (
        "import sys, xo_webhooks, xo_webhooks.request.middleware, xo_webhooks.sending.deadletter\n"
        "from xo_webhooks import WebhookMiddleware\n"
        "WebhookMiddleware(lambda e, s: [], hooks=[], environ={}).close(0)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('celery', 'kombu', 'redis', 'billiard', 'xo_webhooks.celery'))\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


def test_the_celery_app_acknowledges_late_and_redelivers_within_two_minutes():
    worker = celery_app(load_settings([], {}, broker_url="redis://127.0.0.1:1/0")).conf
    assert worker.task_acks_late and worker.task_reject_on_worker_lost
    assert worker.worker_prefetch_multiplier == 1
    options = worker.broker_transport_options
    assert options["visibility_timeout"] == VISIBILITY_TIMEOUT
    # The longest a message stays unacknowledged when a worker dies: the visibility
    # timeout, then one sweep interval (kombu's default sweep runs every 100 s).
    sweep = options["unacked_restore_interval"] * options["unacked_restore_throttle"]
    assert VISIBILITY_TIMEOUT + sweep <= 120
    publisher = celery_app(load_settings([], {}), publisher=True).conf
    assert publisher.task_publish_retry is False
    assert publisher.broker_transport_options["socket_timeout"] <= 0.25
    assert publisher.broker_url == "redis://127.0.0.1:6379/0"


def test_redis_dead_letter_list(broker):
    url = broker.url + "?key=test:dead"
    store = RedisDeadLetter(url)
    assert store.key == "test:dead" and "key=" not in store.url
    assert RedisDeadLetter(broker.url).key == DEFAULT_KEY
    with store.taken() as records:  # nothing there yet
        assert records == []
    record = {"id": "msg_1", "url": "http://x/", "format": "json", "payload": {"a": "é"}}
    store.append([record, {**record, "id": "msg_2"}])
    store.append([])
    broker.client().rpush("test:dead", b"not json", b"[1]")
    with store.taken() as records:
        assert [r["id"] for r in records] == ["msg_1", "msg_2"]
        assert records[0]["payload"] == {"a": "é"}
        store.append([{**record, "id": "msg_3"}])  # while replaying: a new list
        assert broker.client().keys("test:dead:replaying:*")
    assert not broker.client().keys("test:dead:replaying:*")
    with store.taken() as records:
        assert [r["id"] for r in records] == ["msg_3"]
    assert "@" not in repr(RedisDeadLetter("redis://:hunter2@127.0.0.1:1/0"))


def test_a_forked_child_publishes_on_its_own_connection(broker):
    # As under gunicorn --preload: the parent published before forking.
    settings = load_settings([hook("http://127.0.0.1:9/")], {}, broker_url=broker.url)
    dispatcher = CeleryDispatcher(settings)

    def delivery(call_id: str) -> Delivery:
        payload = pre_payload(call_id, (None, None), "vm.start", {}, 1_700_000_000_000)
        return Delivery(settings.hooks[0], payload)

    dispatcher.submit(delivery("parent"))
    pid = os.fork()
    if pid == 0:  # the child: its own counters, its own connection
        code = 1
        try:
            dispatcher.submit(delivery("child"))
            stats = dispatcher.stats()
            code = 0 if (stats["accepted"], stats["published"]) == (1, 1) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    dispatcher.submit(delivery("parent again"))
    assert dispatcher.stats()["published"] == 2
    assert broker.client().llen(QUEUE) == 3
    dispatcher.close(1)
    dispatcher.submit(delivery("after close"))  # given up, counted, never raised
    assert dispatcher.stats()["lost"] == 1


def test_thousand_calls_through_two_workers(
    broker, workers, wrapped, webhook_receiver, record_property
):
    hooks = [hook(webhook_receiver.url)]
    workers.configure(broker_url=broker.url, hooks=json.dumps(hooks))
    workers.start("w1", "w2")
    app = wrapped(hooks, broker.url)
    client = app.test_client()
    durations = [call(client, n) for n in range(CALLS)]

    received = webhook_receiver.wait_for(2 * CALLS, timeout=90)
    counts = by_call(received)
    duplicates = sum(n - 1 for n in counts.values())
    record_property("duplicates", duplicates)
    print(f"\n{CALLS} calls: {len(received)} hooks received, {duplicates} duplicate(s)")
    assert len({c for c, _ in counts}) == CALLS
    assert set(counts) == {(c, kind) for c, _ in counts for kind in ("pre", "post")}
    assert duplicates == 0, counts.most_common(3)
    assert_pre_before_post(received)
    for h in received:  # the workers sign with the secret and headers of that URL
        verify(SECRET, h.body, h.headers)
        assert h.headers["x-team"] == "ops"
    stats = app.wsgi_app.stats()
    assert stats["accepted"] == stats["published"] == 2 * CALLS and stats["failed"] == 0
    assert_ledger(stats)
    assert max(durations) < 0.5, f"slowest call: {max(durations):.3f} s"
    assert "Traceback" not in workers.log_text()


def test_worker_killed_mid_run_then_restarted_loses_nothing(
    broker, workers, wrapped, webhook_receiver, record_property
):
    hooks = [hook(webhook_receiver.url)]
    workers.configure(broker_url=broker.url, hooks=json.dumps(hooks))
    workers.start("w1", "w2")
    app = wrapped(hooks, broker.url)
    client = app.test_client()
    webhook_receiver.respond_with(204, delay=0.3)  # deliveries in flight when killed
    calls = 40
    for n in range(calls):
        call(client, n)

    webhook_receiver.wait_for_attempts(8, timeout=30)
    workers.kill("w1")
    killed_at = time.monotonic()
    unacked = broker.client().hlen("unacked")  # kombu's record of taken messages
    webhook_receiver.respond_with(204)
    workers.start("w1")

    def every_hook() -> bool:
        counts = by_call(webhook_receiver.received)
        return len(counts) == 2 * calls

    wait_until(every_hook, 130, "every hook, redelivered after the kill")
    elapsed = time.monotonic() - killed_at
    received = webhook_receiver.received
    counts = by_call(received)
    duplicates = sum(n - 1 for n in counts.values())
    record_property("duplicates", duplicates)
    record_property("redelivered_after_s", round(elapsed, 1))
    print(
        f"\nkilled with {unacked} message(s) unacknowledged; every hook received "
        f"{elapsed:.0f} s after the kill; {duplicates} duplicate(s)"
    )
    assert elapsed < 120
    # Sooner would mean the killed worker held no message: no redelivery was tested.
    # (Hooks it was sending when killed reached the receiver; those it had taken but
    # not sent yet are the ones only a redelivery brings.)
    assert elapsed > VISIBILITY_TIMEOUT / 2, "every hook arrived without a redelivery"
    assert len({c for c, _ in counts}) == calls
    assert_pre_before_post(received)
    # A duplicate is a redelivery of the same message: the same webhook-id.
    ids: dict[tuple[str, str], set[str]] = {}
    for h in received:
        ids.setdefault((h.payload["callId"], h.payload["type"]), set()).add(h.headers["webhook-id"])
    assert all(len(v) == 1 for v in ids.values())
    wait_until(lambda: broker.client().hlen("unacked") == 0, 15, "no message left unacknowledged")


def test_redis_stopped_or_hung_during_calls(wrapped, webhook_receiver, tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (CI installs it: apt-get install redis-server)")
    server = RedisServer().start()
    dead = tmp_path / "dead.jsonl"
    hooks = [hook(webhook_receiver.url)]

    def fresh(db: int) -> Any:  # another broker URL: no pooled connection to reuse
        return wrapped(hooks, server.url[:-1] + str(db), dead_letter=str(dead)).test_client()

    try:
        app = wrapped(hooks, server.url, dead_letter=str(dead))
        client = app.test_client()
        for n in range(10):
            call(client, n)
        assert app.wsgi_app.stats()["published"] == 20

        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)  # hung: connections open, no answers
        hung = [call(client, n) for n in range(10, 20)]
        hung += [call(fresh(1), n) for n in range(2)]
        server.process.send_signal(signal.SIGCONT)
        server.stop()  # gone: connections refused
        gone = [call(client, n) for n in range(20, 40)]
        gone += [call(fresh(2), n) for n in range(2)]
        stats = app.wsgi_app.stats()

        assert max(hung) < 0.5 and max(gone) < 0.5, (hung, gone)
        assert stats["published"] == 20 and stats["failed"] == stats["dead_lettered"] == 60
        assert_ledger(stats)
        records = read_records(str(dead))
        assert len(records) == 60 + 2 * 2 * 2
        assert all("broker" in r["lastError"] and r["attempts"] == 0 for r in records)
        assert len({(r["payload"]["callId"], r["payload"]["type"]) for r in records}) == 68

        server.start()  # back on the same port: publishing resumes
        time.sleep(1.1)  # past the dispatcher's fail-fast second
        call(client, 40)
        assert app.wsgi_app.stats()["published"] == 22
    finally:
        server.stop()


def test_retries_then_dead_letter_list_then_replay(broker, workers, wrapped, webhook_receiver):
    target = broker.url + "?key=test:dead"
    hooks = [hook(webhook_receiver.url)]
    workers.configure(
        broker_url=broker.url, hooks=json.dumps(hooks), retries="2", backoff="0.05",
        dead_letter=target,
    )  # fmt: skip
    workers.start("w1")
    webhook_receiver.respond_with(lambda n, h: 503 if h.payload["type"] == "pre" else 410)
    app = wrapped(hooks, broker.url)
    client = app.test_client()
    for n in range(3):
        call(client, n)

    attempts = webhook_receiver.wait_for_attempts(3 * 3 + 3, timeout=30)
    store = broker.client()
    wait_until(lambda: store.llen("test:dead") == 6, 10, "6 dead-letter records")
    records = [json.loads(v) for v in store.lrange("test:dead", 0, -1)]
    for record in records:
        seen = [h for h in attempts if h.headers["webhook-id"] == record["id"]]
        if record["payload"]["type"] == "pre":  # retried: the same webhook-id each time
            assert (record["attempts"], record["lastError"], len(seen)) == (3, "HTTP 503", 3)
        else:  # not worth retrying, and sent only once its pre hook was given up
            assert (record["attempts"], record["lastError"], len(seen)) == (1, "HTTP 410", 1)
    assert_pre_before_post(attempts)
    assert SECRET not in json.dumps(records) and "X-Team" not in json.dumps(records)

    webhook_receiver.clear()
    webhook_receiver.respond_with(204)
    report = replay(target, load_settings(hooks, {}, timeout=5))
    assert (report.read, report.delivered, report.failed) == (6, 6, 0)
    replayed = webhook_receiver.wait_for(6)
    assert {h.headers["webhook-id"] for h in replayed} == {r["id"] for r in records}
    for h in replayed:
        verify(SECRET, h.body, h.headers)
    assert store.llen("test:dead") == 0 and not store.keys("test:dead:*")


def test_wait_for_response_pre_hook_retried_by_a_worker_before_the_post(
    broker, workers, wrapped, webhook_receiver
):
    hooks = [hook(webhook_receiver.url, waitForResponse=True)]
    workers.configure(broker_url=broker.url, hooks=json.dumps(hooks), backoff="0.5")
    workers.start("w1")
    webhook_receiver.respond_with(503, 204)
    app = wrapped(hooks, broker.url, backoff="0.5")
    call(app.test_client(), 1)
    # The first attempt was made on the request path, before the call went on.
    assert [h.payload["type"] for h in webhook_receiver.attempts] == ["pre"]

    attempts = webhook_receiver.wait_for_attempts(3, timeout=20)
    assert [(h.payload["type"], h.status) for h in attempts] == [
        ("pre", 503),
        ("pre", 204),
        ("post", 204),
    ]  # the post was published at once, and held by the worker until the pre was done
    assert attempts[0].headers["webhook-id"] == attempts[1].headers["webhook-id"]
    for h in attempts[1:]:
        verify(SECRET, h.body, h.headers)
    stats = app.wsgi_app.stats()
    assert (stats["accepted"], stats["delivered"], stats["published"]) == (2, 0, 2)
    assert_ledger(stats)
