"""Under real servers: gunicorn (sync and gthread workers, with and without --preload)
and waitress. Hooks are delivered from the worker processes, flushed on a graceful
stop, and every hook is either received exactly as sent or in the dead-letter file."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from xo_webhooks.sending.deadletter import read_records

from .apps import create_app

ROOT = Path(__file__).resolve().parent.parent


class Gunicorn:
    """A gunicorn process with 2 workers on an ephemeral port, serving *app* (by
    default tests.server_app) with *config*; *args* go on its command line last."""

    def __init__(
        self,
        env: dict[str, str],
        *args: str,
        app: str = "tests.server_app:app",
        config: str = "tests/gunicorn_conf.py",
    ) -> None:
        command = [
            sys.executable, "-m", "gunicorn", app, "--config", config,
            "--bind", "127.0.0.1:0", "--workers", "2", "--graceful-timeout", "30", *args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True
        )
        assert self.process.stderr is not None
        self._stderr = self.process.stderr
        self.log: list[str] = []
        self.url = self._wait_for_address()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _wait_for_address(self) -> str:
        for line in self._stderr:  # ends if gunicorn dies: then the test fails below
            self.log.append(line)
            found = re.search(r"Listening at: (http://127\.0\.0\.1:\d+)", line)
            if found:
                return found.group(1)
        self.process.wait(10)
        raise AssertionError("gunicorn did not start:\n" + "".join(self.log))

    def _drain(self) -> None:  # on its own thread: no assertion here
        for line in self._stderr:
            self.log.append(line)

    def stop(self) -> int:
        """A graceful stop (SIGTERM), as a process manager does."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._reader.join(5)


@pytest.fixture
def gunicorn(tmp_path):
    started: list[Gunicorn] = []

    def start(receiver_url: str, *args: str, **settings: str) -> Gunicorn:
        hooks = [{"method": "vm.*", "type": "pre/post", "url": receiver_url}]
        env = {
            "XO_WEBHOOKS_HOOKS": json.dumps(hooks),
            "XO_WEBHOOKS_DEAD_LETTER": str(tmp_path / "dead.jsonl"),
            "XO_WEBHOOKS_BACKOFF": "0.01",
            "XO_TEST_STATS_DIR": str(tmp_path),
            **settings,
        }
        started.append(Gunicorn(env, *args))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def call_many(url: str, count: int) -> dict[int, dict]:
    """Call vm.start *count* times from 4 client threads; return answers by call number."""
    local = threading.local()

    def call(n: int) -> tuple[int, int, dict]:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        body = {"jsonrpc": "2.0", "id": n, "method": "vm.start", "params": {"id": f"vm-{n}"}}
        answer = session.post(url + "/api", json=body, timeout=30)
        return n, answer.status_code, answer.json()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(count)))
    # Checked here, on the test's thread, not in the pool's.
    assert [status for _, status, _ in results] == [200] * count
    return {n: answer for n, _, answer in results}


def check_every_hook_accounted_for(tmp_path, receiver, answers: dict[int, dict]) -> None:
    """Each call's pre and post hooks were received exactly once as sent, or dead-lettered;
    the workers' ledgers balance."""
    dead_file = tmp_path / "dead.jsonl"
    dead = read_records(str(dead_file)) if dead_file.exists() else []
    seen: dict[tuple[str, str], dict] = {}
    for payload in [h.payload for h in receiver.received] + [r["payload"] for r in dead]:
        key = (payload["callId"], payload["type"])
        assert key not in seen, f"hook {key} arrived twice"
        seen[key] = payload
    by_vm: dict[str, dict[str, dict]] = {}
    for (_, kind), payload in seen.items():
        by_vm.setdefault(payload["params"]["id"], {})[kind] = payload
    assert len(by_vm) == len(answers)
    for n, answer in answers.items():
        hooks = by_vm[f"vm-{n}"]
        assert set(hooks) == {"pre", "post"}
        assert hooks["pre"]["callId"] == hooks["post"]["callId"]
        assert hooks["post"]["result"] == answer["result"]

    stats = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert len(stats) == 2, "each worker reports its counters at exit"
    total = {k: sum(s[k] for s in stats) for k in stats[0]}
    assert total["pending"] == 0
    assert total["accepted"] == total["delivered"] + total["failed"] == 2 * len(answers)
    assert total["failed"] == total["dead_lettered"] + total["lost"]
    assert total["delivered"] == len(receiver.received)
    assert total["dead_lettered"] == len(dead)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("--worker-class", "sync"), id="sync"),
        pytest.param(("--worker-class", "gthread", "--threads", "4"), id="gthread"),
        pytest.param(("--worker-class", "sync", "--preload"), id="sync-preload"),
        pytest.param(
            ("--worker-class", "gthread", "--threads", "4", "--preload"), id="gthread-preload"
        ),
    ],
)
def test_gunicorn_workers_deliver_and_flush_on_graceful_stop(
    args, gunicorn, webhook_receiver, tmp_path
):
    server = gunicorn(webhook_receiver.url, *args)
    answers = call_many(server.url, 50)
    assert server.stop() == 0, "".join(server.log)
    check_every_hook_accounted_for(tmp_path, webhook_receiver, answers)
    assert len(webhook_receiver.received) == 100


@pytest.mark.slow
def test_load_with_a_flaky_receiver_loses_nothing(gunicorn, webhook_receiver, tmp_path):
    pick = random.Random(1234)
    lock = threading.Lock()

    def flaky(n, hook):
        with lock:
            return 500 if pick.random() < 1 / 3 else 204

    webhook_receiver.respond_with(flaky)
    server = gunicorn(
        webhook_receiver.url, "--worker-class", "gthread", "--threads", "4", "--preload",
        XO_WEBHOOKS_RETRIES="2",
        XO_WEBHOOKS_BREAKER_THRESHOLD="100",  # a third failing at random is no outage here
    )  # fmt: skip
    answers = call_many(server.url, 2000)
    assert server.stop() == 0, "".join(server.log[-20:])
    check_every_hook_accounted_for(tmp_path, webhook_receiver, answers)
    dead = read_records(str(tmp_path / "dead.jsonl"))
    assert dead, "with a third of attempts failing and 2 retries, some hooks run out of retries"
    assert all(r["attempts"] == 3 and r["lastError"] == "HTTP 500" for r in dead)


def test_waitress_serves_the_wrapped_app(webhook_receiver, wrap):
    waitress = pytest.importorskip("waitress")
    from waitress import wasyncore

    hooks = [{"method": "vm.*", "type": "pre/post", "url": webhook_receiver.url}]
    middleware = wrap(create_app().wsgi_app, hooks=hooks)
    server = waitress.create_server(middleware, host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.effective_port}"
        answers = call_many(url, 20)
    finally:
        # Close every channel from the loop's own thread: closing the server from this
        # one races its select() (EBADF in waitress's loop); the loop ends with no channel.
        # A trigger already closed (EBADF on its pipe) means the loop closed them itself.
        with contextlib.suppress(OSError):
            server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
        thread.join(10)
        server.task_dispatcher.shutdown()
    assert not thread.is_alive()
    assert all(a["result"]["power_state"] == "Running" for a in answers.values())
    hooks_received = webhook_receiver.wait_for(40)
    assert {(h.payload["params"]["id"], h.payload["type"]) for h in hooks_received} == {
        (f"vm-{n}", kind) for n in range(20) for kind in ("pre", "post")
    }
