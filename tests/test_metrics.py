"""Prometheus metrics (:mod:`xo_webhooks.metrics`), read after real traffic.

In one process: a served Flask app wrapped by the middleware, real receivers scripted
to answer 2xx, 3xx, 4xx, 5xx, 410, slowly or not at all, and a fresh registry per test
read with ``get_sample_value``. Then the setups the README documents: gunicorn with two
worker processes and ``PROMETHEUS_MULTIPROC_DIR`` (counters add up over the workers),
and Celery workers with ``XO_WEBHOOKS_METRICS_PORT`` (scraped over HTTP), with the
API's ``published`` counter beside them.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

pytest.importorskip("prometheus_client", reason="the prometheus extra is not installed")

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from xo_webhooks import WebhookMiddleware  # noqa: E402
from xo_webhooks._urls import endpoint_of  # noqa: E402
from xo_webhooks.errors import ConfigError  # noqa: E402
from xo_webhooks.metrics import outcome_of, register  # noqa: E402
from xo_webhooks.sending.endpoints import STATES  # noqa: E402
from xo_webhooks.sending.policy import (  # noqa: E402
    GIVE_UP_REASONS,
    Attempt,
    judge_answer,
    judge_failure,
)

from .apps import CALL  # noqa: E402
from .helpers import RedisServer, free_port  # noqa: E402
from .test_servers import Gunicorn
from .waiting import wait_until  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUTCOMES = ("2xx", "3xx", "4xx", "5xx", "timeout", "connection_error", "error")
PREFIX = "xo_webhooks_"


# -- reading the metrics --------------------------------------------------------------


Lookup = Callable[[str, dict[str, str]], "float | None"]


class Readings:
    """One endpoint's metrics, from a registry or from a scraped exposition."""

    def __init__(self, lookup: Lookup, origin: str) -> None:
        self._lookup = lookup
        self.origin = origin

    @classmethod
    def of(cls, registry: CollectorRegistry, origin: str) -> Readings:
        return cls(registry.get_sample_value, origin)

    @classmethod
    def scraped(cls, text: str, origin: str) -> Readings:
        samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        return cls(lambda name, labels: samples.get((name, frozenset(labels.items()))), origin)

    def value(self, name: str, **labels: str) -> float | None:
        """The sample ``xo_webhooks_<name>`` of this endpoint; ``None`` if never set."""
        return self._lookup(PREFIX + name, {"endpoint": self.origin, **labels})

    def count(self, name: str, **labels: str) -> int:
        return int(self.value(name, **labels) or 0)

    def failed(self) -> dict[str, int]:
        found = {r: self.count("hooks_failed_total", reason=r) for r in GIVE_UP_REASONS}
        return {reason: n for reason, n in found.items() if n}

    def attempts(self) -> dict[str, int]:
        found = {o: self.count("attempts_total", outcome=o) for o in OUTCOMES}
        return {outcome: n for outcome, n in found.items() if n}

    def states(self) -> dict[str, float | None]:
        return {state: self.value("endpoint_state", state=state) for state in STATES}

    def summary(self) -> dict[str, Any]:
        """Everything a scenario checks, in one comparable dict."""
        return {
            "accepted": self.count("hooks_accepted_total"),
            "delivered": self.count("hooks_delivered_total"),
            "pending": self.count("hooks_pending"),
            "failed": self.failed(),
            "attempts": self.attempts(),
            "attempt durations": self.count("attempt_duration_seconds_count"),
            "delays": self.count("delivery_delay_seconds_count"),
            "states": self.states(),
        }


def state_is(state: str) -> dict[str, float]:
    """What ``Readings.states()`` is for an endpoint in *state*."""
    return {each: 1.0 if each == state else 0.0 for each in STATES}


def assert_settles(read: Callable[[], Any], expected: Any, timeout: float = 5.0) -> None:
    """Wait until ``read() == expected``, else fail showing the difference.

    Needed although the test flushes: a dispatcher's ``flush()`` returns once nothing
    is pending, and a delivery thread tells the observers of its last hook just after.
    """
    with contextlib.suppress(AssertionError):
        wait_until(lambda: read() == expected, timeout, "the metrics to settle")
    assert read() == expected


def call_api(url: str, count: int = 1) -> None:
    """Make *count* vm.start calls to the app served at *url*."""
    with requests.Session() as session:
        for n in range(count):
            answer = session.post(f"{url}/api", json={**CALL, "id": n}, timeout=10)
            assert answer.status_code == 200, answer.text


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh registry: the default one is process-wide."""
    return CollectorRegistry()


# -- one process: a served app, real receivers ------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """A receiver's answers, the middleware's settings, and the metrics after one
    vm.start call that has a pre and a post hook."""

    answers: tuple[int | str, ...] = (204,)
    delay: float = 0.0  # before each answer
    settings: dict[str, Any] = field(default_factory=dict)
    refused: bool = False  # send to a port where nothing listens, not to the receiver
    wait: bool = False  # the pre hook is waitForResponse: its first attempt is the call's
    delivered: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    state: str = "closed"


SCENARIOS = [
    pytest.param(
        Scenario(delivered=2, attempts={"2xx": 2}),
        id="healthy",
    ),
    pytest.param(
        Scenario(
            answers=(503, 204),
            settings={"retry_schedule": "10ms,10ms"},
            delivered=2,
            attempts={"5xx": 1, "2xx": 2},
        ),
        id="503-then-204",
    ),  # fmt: skip
    pytest.param(
        Scenario(
            refused=True,
            settings={"retries": 0},
            failed={"retries_exhausted": 2},
            attempts={"connection_error": 2},
        ),
        id="connection-refused",
    ),  # fmt: skip
    pytest.param(
        Scenario(
            answers=("close",),
            settings={"retries": 0},
            failed={"retries_exhausted": 2},
            attempts={"connection_error": 2},
        ),
        id="connection-dropped",
    ),  # fmt: skip
    pytest.param(
        Scenario(
            delay=5.0,
            settings={"retries": 0, "timeout": 0.2},
            failed={"retries_exhausted": 2},
            attempts={"timeout": 2},
        ),
        id="timeout",
    ),  # fmt: skip
    pytest.param(
        Scenario(answers=(404,), failed={"final_answer": 2}, attempts={"4xx": 2}),
        id="404-final-answer",
    ),
    pytest.param(
        Scenario(answers=(302,), failed={"final_answer": 2}, attempts={"3xx": 2}),
        id="302-final-answer",
    ),
    pytest.param(
        # The pre hook's 410 disables the endpoint: its post hook gets no attempt.
        Scenario(answers=(410,), failed={"gone": 2}, attempts={"4xx": 1}, state="disabled"),
        id="410-gone",
    ),
    pytest.param(
        # Two failures in a row open the breaker (the second attempt is the post's).
        Scenario(
            answers=(503,),
            settings={"retries": 0, "breaker_threshold": 2},
            failed={"retries_exhausted": 2},
            attempts={"5xx": 2},
            state="open",
        ),
        id="breaker-opens",
    ),  # fmt: skip
    pytest.param(
        Scenario(wait=True, delivered=2, attempts={"2xx": 2}),
        id="wait-for-response",
    ),
    pytest.param(
        # The first failure is the request thread's own attempt.
        Scenario(
            wait=True,
            answers=(503,),
            settings={"retries": 0, "breaker_threshold": 2},
            failed={"retries_exhausted": 2},
            attempts={"5xx": 2},
            state="open",
        ),
        id="wait-for-response-breaker-opens",
    ),  # fmt: skip
]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_metrics_count_what_happens_to_the_hooks(
    no_leaked_threads, scenario, webhook_receiver, refused_url, flask_app, wrap, serve, registry
):
    webhook_receiver.respond_with(*scenario.answers, delay=scenario.delay)
    url = refused_url if scenario.refused else webhook_receiver.url
    hooks = [
        {"method": "vm.start", "type": "pre", "url": url, "waitForResponse": scenario.wait},
        {"method": "vm.start", "type": "post", "url": url},
    ]
    middleware = wrap(flask_app.wsgi_app, hooks=hooks, **scenario.settings)
    register(middleware, registry)
    readings = Readings.of(registry, endpoint_of(url))
    assert readings.states() == state_is("closed"), "every configured endpoint starts closed"

    call_api(serve(middleware).url)
    assert middleware.flush(10)

    attempts = sum(scenario.attempts.values())
    assert_settles(readings.summary, {
        "accepted": 2,
        "delivered": scenario.delivered,
        "pending": 0,
        "failed": scenario.failed,
        "attempts": scenario.attempts,
        "attempt durations": attempts,
        "delays": scenario.delivered,
        "states": state_is(scenario.state),
    })  # fmt: skip
    # The same story as the middleware's own counters.
    stats = middleware.stats()
    assert (stats["accepted"], stats["delivered"]) == (2, scenario.delivered)
    assert stats["failed"] == sum(scenario.failed.values())
    assert middleware.endpoint_stats()[endpoint_of(url)]["state"] == scenario.state


def test_durations_and_delays_are_observed_in_seconds(
    no_leaked_threads, webhook_receiver, flask_app, wrap, serve, registry
):
    webhook_receiver.respond_with(204, delay=0.05)
    hooks = [{"method": "vm.start", "type": "post", "url": webhook_receiver.url}]
    middleware = wrap(flask_app.wsgi_app, hooks=hooks)
    register(middleware, registry)
    readings = Readings.of(registry, endpoint_of(webhook_receiver.url))

    call_api(serve(middleware).url, 3)
    assert middleware.flush(10)

    wait_until(lambda: readings.count("delivery_delay_seconds_count") == 3, 5, "3 delays")
    durations = readings.value("attempt_duration_seconds_sum")
    assert 3 * 0.05 <= durations < 3 * 5, "three attempts of the receiver's 50 ms"
    assert readings.count("attempt_duration_seconds_bucket", le="0.025") == 0
    assert readings.count("attempt_duration_seconds_bucket", le="+Inf") == 3
    # From the end of each call to its delivery: at least the receiver's 50 ms.
    delays = readings.value("delivery_delay_seconds_sum")
    assert 3 * 0.05 <= delays < 3 * 5
    assert readings.count("delivery_delay_seconds_bucket", le="0.01") == 0


def test_a_full_queue_counts_queue_full_and_pending_goes_up_then_back_to_zero(
    no_leaked_threads, webhook_receiver, flask_app, wrap, serve, registry
):
    arrived, release = threading.Event(), threading.Event()

    def hold_until_released(n, hook):
        arrived.set()
        release.wait(10)
        return 204

    webhook_receiver.respond_with(hold_until_released)
    hooks = [{"method": "vm.start", "type": "pre/post", "url": webhook_receiver.url}]
    middleware = wrap(flask_app.wsgi_app, hooks=hooks, queue_size=1)
    register(middleware, registry)
    readings = Readings.of(registry, endpoint_of(webhook_receiver.url))
    try:
        # The pre hook holds the only place while the receiver holds its answer: the
        # post hook is refused at once.
        call_api(serve(middleware).url)
        assert arrived.wait(5), "the pre hook reached the receiver"
        assert_settles(lambda: (readings.count("hooks_pending"), readings.failed()),
                       (1, {"queue_full": 1}))  # fmt: skip
    finally:
        release.set()
    assert middleware.flush(10)
    assert_settles(readings.summary, {
        "accepted": 2, "delivered": 1, "pending": 0,
        "failed": {"queue_full": 1}, "attempts": {"2xx": 1},
        "attempt durations": 1, "delays": 1, "states": state_is("closed"),
    })  # fmt: skip


def test_an_open_breaker_holds_hooks_as_pending(
    no_leaked_threads, webhook_receiver, flask_app, wrap, serve, registry
):
    webhook_receiver.respond_with(503)
    hooks = [{"method": "vm.start", "type": "post", "url": webhook_receiver.url}]
    # The first retry is due after the breaker's first pause (5 s): the test is over by then.
    middleware = wrap(flask_app.wsgi_app, hooks=hooks, breaker_threshold=1, retry_schedule="1m")
    register(middleware, registry)
    readings = Readings.of(registry, endpoint_of(webhook_receiver.url))

    url = serve(middleware).url
    call_api(url)
    wait_until(lambda: readings.value("endpoint_state", state="open") == 1, 5, "the breaker")
    call_api(url, 2)  # their hooks wait for the endpoint, holding no thread

    assert_settles(readings.summary, {
        "accepted": 3, "delivered": 0, "pending": 3, "failed": {},
        "attempts": {"5xx": 1}, "attempt durations": 1, "delays": 0,
        "states": state_is("open"),
    })  # fmt: skip
    middleware.close(0)  # gives up on the waiting hooks
    assert_settles(lambda: (readings.count("hooks_pending"), readings.failed()),
                   (0, {"shutdown": 3}))  # fmt: skip


def test_register_starts_every_configured_endpoint_closed(wrap, flask_app, registry):
    urls = ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b", "https://hooks.example.com/x"]
    hooks = [{"method": "vm.start", "type": "post", "url": url} for url in urls]
    register(wrap(flask_app.wsgi_app, hooks=hooks), registry)  # no hook is sent
    for origin in ("http://127.0.0.1:9", "https://hooks.example.com"):
        readings = Readings.of(registry, origin)
        assert readings.states() == state_is("closed")
        assert readings.value("hooks_accepted_total") is None
    endpoints = {s.labels["endpoint"] for m in registry.collect() for s in m.samples}
    assert endpoints == {"http://127.0.0.1:9", "https://hooks.example.com"}


@pytest.mark.parametrize(
    "attempt, outcome",
    [
        pytest.param(judge_answer(204), "2xx", id="204"),
        pytest.param(judge_answer(301), "3xx", id="301"),
        pytest.param(judge_answer(429, "1"), "4xx", id="429"),
        pytest.param(judge_answer(410), "4xx", id="410"),
        pytest.param(judge_answer(503), "5xx", id="503"),
        pytest.param(judge_failure(TimeoutError(), 2.5), "timeout", id="timeout"),
        pytest.param(
            judge_failure(ConnectionRefusedError(111, "refused"), 2.5),
            "connection_error",
            id="refused",
        ),  # fmt: skip
        pytest.param(
            judge_failure(http.client.RemoteDisconnected("gone"), 2.5),
            "connection_error",
            id="remote-disconnected",
        ),  # fmt: skip
        pytest.param(judge_failure(TypeError("not JSON"), 2.5), "error", id="other-error"),
        pytest.param(Attempt(False), "error", id="no-error-text"),
    ],
)
def test_outcome_of_an_attempt(attempt, outcome):
    assert outcome_of(attempt) == outcome


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param("{base}hooks/xo?token=s3cr3t", id="path-and-query"),
        pytest.param("{base}?token=s3cr3t#s3cr3t", id="query-and-fragment"),
        pytest.param("http://alice:s3cr3t@127.0.0.1:{port}/in", id="user-and-password"),
        pytest.param("HTTP://127.0.0.1:{port}/s3cr3t/", id="upper-case-scheme"),
    ],
)
def test_the_endpoint_label_is_the_origin_without_path_query_or_password(
    no_leaked_threads, shape, webhook_receiver, flask_app, wrap, serve, registry
):
    port = webhook_receiver.url.rsplit(":", 1)[1].strip("/")
    url = shape.format(base=webhook_receiver.url, port=port)
    origin = f"http://127.0.0.1:{port}"
    hooks = [
        {"method": "vm.start", "type": "pre", "url": url},
        {"method": "vm.start", "type": "post", "url": webhook_receiver.url + "other/path"},
    ]
    middleware = wrap(flask_app.wsgi_app, hooks=hooks)
    register(middleware, registry)

    call_api(serve(middleware).url)
    webhook_receiver.wait_for(2)

    readings = Readings.of(registry, origin)
    wait_until(lambda: readings.count("hooks_delivered_total") == 2, 5, "2 deliveries")
    assert readings.count("hooks_accepted_total") == 2, "both URLs are one endpoint"
    labels = {s.labels.get("endpoint") for m in registry.collect() for s in m.samples}
    assert labels == {origin}
    exposition = generate_latest(registry).decode()
    assert "s3cr3t" not in exposition
    assert "alice" not in exposition
    assert "/other" not in exposition


def test_an_observer_that_raises_is_logged_once_per_event_and_delivery_goes_on(
    no_leaked_threads, webhook_receiver, refused_url, flask_app, wrap, serve, registry, caplog
):
    class Broken:
        def fail(self, *args):
            raise RuntimeError("broken observer")

        accepted = published = attempted = delivered = given_up = state_changed = fail

        def __repr__(self):
            return "<Broken>"

    hooks = [
        {"method": "vm.start", "type": "post", "url": webhook_receiver.url},
        {"method": "vm.start", "type": "post", "url": refused_url},
    ]
    middleware = wrap(flask_app.wsgi_app, hooks=hooks, retries=0)
    middleware.observe(Broken())  # told first: the metrics after it still hear everything
    register(middleware, registry)
    caplog.set_level(logging.ERROR, logger="xo_webhooks")

    call_api(serve(middleware).url, 3)  # the calls answer, although `accepted` raises
    webhook_receiver.wait_for(3)
    assert middleware.flush(10)

    assert_settles(lambda: (
        Readings.of(registry, endpoint_of(webhook_receiver.url)).summary()["delivered"],
        Readings.of(registry, endpoint_of(refused_url)).failed(),
    ), (3, {"retries_exhausted": 3}))  # fmt: skip
    logged = [r for r in caplog.records if "observer <Broken> failed" in r.getMessage()]
    events = sorted(r.getMessage().split(" on ")[1].split()[0] for r in logged)
    assert events == ["accepted", "attempted", "delivered", "given_up"], "once per event"
    assert all(r.exc_info and str(r.exc_info[1]) == "broken observer" for r in logged)
    assert middleware.stats()["delivered"] == 3


# -- gunicorn: two worker processes, one multiprocess registry ---------------------------


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Gunicorn]]:
    started: list[Gunicorn] = []

    def start(env: dict[str, str]) -> Gunicorn:
        started.append(
            Gunicorn(
                env,
                "--worker-class",
                "sync",
                "--graceful-timeout",
                "20",
                app="tests.metrics_app:create()",
                config="python:tests.metrics_app",
            )  # fmt: skip
        )
        return started[-1]

    yield start
    for server in started:
        server.stop()


def call_spread(url: str, least: int, pids: int) -> int:
    """Call vm.start from 4 client threads, at least *least* times and until *pids*
    worker processes have answered; return how many calls were made."""
    seen: set[str] = set()
    made = 0
    with ThreadPoolExecutor(4) as pool, requests.Session() as session:

        def call(n: int) -> str:
            answer = session.post(f"{url}/api", json={**CALL, "id": n}, timeout=10)
            assert answer.status_code == 200, answer.text
            return answer.headers["X-Worker-Pid"]

        while made < least or len(seen) < pids:
            assert made < 20 * least, f"only workers {seen} answered {made} calls"
            seen.update(pool.map(call, range(made, made + 8)))
            made += 8
    return made


@pytest.mark.slow
def test_gunicorn_workers_add_up_in_a_multiprocess_registry(gunicorn, webhook_receiver, tmp_path):
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    hooks = [{"method": "vm.start", "type": "pre/post", "url": webhook_receiver.url + "x?t=1"}]
    server = gunicorn({
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "XO_WEBHOOKS_HOOKS": json.dumps(hooks),
    })  # fmt: skip
    origin = endpoint_of(webhook_receiver.url)

    calls = call_spread(server.url, 24, pids=2)
    webhook_receiver.wait_for(2 * calls, timeout=20)

    def scrape() -> Readings:
        answer = requests.get(f"{server.url}/metrics", timeout=10)
        assert answer.status_code == 200
        return Readings.scraped(answer.text, origin)

    def totals() -> tuple[int, int, int, dict[str, int]]:
        readings = scrape()
        return (
            readings.count("hooks_accepted_total"),
            readings.count("hooks_delivered_total"),
            readings.count("hooks_pending"),
            readings.attempts(),
        )

    assert_settles(totals, (2 * calls, 2 * calls, 0, {"2xx": 2 * calls}), timeout=10)
    # The live gauges add up over the processes: each worker sees the endpoint closed.
    assert scrape().states() == {"closed": 2.0, "open": 0.0, "half-open": 0.0, "disabled": 0.0}
    assert len(list(multiproc.glob("counter_*.db"))) == 2, "both workers counted hooks"
    assert server.stop() == 0, "".join(server.log[-20:])
    # child_exit marked each worker dead: its live gauges no longer count, its counters do.
    assert list(multiproc.glob("gauge_livesum_*.db")) == []
    assert len(list(multiproc.glob("counter_*.db"))) == 2


# -- Celery: the API publishes, a worker delivers and serves its metrics ------------------


class CeleryWorker:
    """``celery -A xo_webhooks.celery worker`` in its own process group (a kill takes
    its pool processes too), logging to *log*."""

    def __init__(self, env: dict[str, str], log: Path, *pool: str) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "xo_webhooks.celery", "worker", *pool,
                 "--hostname", "metrics@%h", "--without-mingle", "--without-gossip",
                 "--without-heartbeat", "--loglevel", "INFO"],
                env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        wait_until(self._ready, 30, "the Celery worker to be ready")

    def _ready(self) -> bool:
        text = self.log.read_text(errors="replace")
        assert self.process.poll() is None, f"the worker exited:\n{text[-3000:]}"
        return " ready." in text

    def stop(self) -> None:
        """A warm shutdown (SIGTERM), then SIGKILL if it lingers."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


@pytest.fixture
def broker(redis_server: RedisServer) -> RedisServer:
    """The module's Redis, emptied for this test."""
    pytest.importorskip("celery", reason="the celery extra is not installed")
    redis_server.client().flushall()
    return redis_server


@pytest.fixture
def celery_worker(tmp_path: Path) -> Iterator[Callable[..., CeleryWorker]]:
    started: list[CeleryWorker] = []

    def start(env: dict[str, str], *pool: str) -> CeleryWorker:
        started.append(CeleryWorker(env, tmp_path / f"worker-{len(started)}.log", *pool))
        return started[-1]

    yield start
    for worker in started:
        worker.stop()


@pytest.mark.slow
@pytest.mark.parametrize(
    "pool, multiproc",
    [
        pytest.param(("--pool", "threads", "--concurrency", "2"), False, id="threads"),
        pytest.param(("--pool", "solo"), False, id="solo"),
        pytest.param(("--pool", "prefork", "--concurrency", "2"), True, id="prefork-multiproc"),
    ],
)
def test_celery_worker_serves_its_metrics_and_the_api_counts_published(
    pool, multiproc, broker, celery_worker, webhook_receiver, flask_app, wrap, serve, registry,
    tmp_path,
):  # fmt: skip
    webhook_receiver.respond_with(503, 204)  # one retry, by the worker
    hooks = [{"method": "vm.start", "type": "post", "url": webhook_receiver.url + "in?t=1"}]
    origin = endpoint_of(webhook_receiver.url)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XO_WEBHOOKS_", "PROM"))}
    env.update({
        "XO_WEBHOOKS_BROKER_URL": broker.url,
        "XO_WEBHOOKS_HOOKS": json.dumps(hooks),
        "XO_WEBHOOKS_RETRY_SCHEDULE": "10ms",
        "XO_WEBHOOKS_METRICS_PORT": str(port),
    })  # fmt: skip
    if multiproc:
        (tmp_path / "prometheus").mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prometheus")
    celery_worker(env, *pool)

    # Not dispatcher="celery": see test_dispatcher_given_as_a_setting_is_not_taken_for_one.
    celery = {"XO_WEBHOOKS_DISPATCHER": "celery", "XO_WEBHOOKS_BROKER_URL": broker.url}
    middleware = wrap(flask_app.wsgi_app, hooks=hooks, environ=celery)
    register(middleware, registry)
    call_api(serve(middleware).url, 3)
    assert middleware.flush(10)

    api = Readings.of(registry, origin)
    assert_settles(lambda: (
        api.count("hooks_accepted_total"), api.count("hooks_published_total"),
        api.count("hooks_pending"), api.count("hooks_delivered_total"), api.failed(),
    ), (3, 3, 0, 0, {}))  # fmt: skip

    webhook_receiver.wait_for(3, timeout=20)

    def worker_metrics() -> Readings:
        answer = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert answer.status_code == 200
        return Readings.scraped(answer.text, origin)

    assert_settles(lambda: (
        worker_metrics().count("hooks_delivered_total"), worker_metrics().attempts(),
        worker_metrics().failed(), worker_metrics().count("attempt_duration_seconds_count"),
        worker_metrics().count("delivery_delay_seconds_count"),
    ), (3, {"5xx": 1, "2xx": 3}, {}, 4, 3), timeout=10)  # fmt: skip
    scraped = worker_metrics()
    assert scraped.value("hooks_pending") is None, "the API's processes count pending hooks"
    assert scraped.value("hooks_accepted_total") is None


# -- the dispatcher setting, waitForResponse on Celery, the workers' shared states --------


def test_dispatcher_given_as_a_setting_is_not_taken_for_one(flask_app):
    """The README: settings come first from the keyword arguments of WebhookMiddleware,
    in snake_case, and ``dispatcher`` is a setting (``XO_WEBHOOKS_DISPATCHER``). But the
    keyword is also the ``dispatcher`` parameter (a Dispatcher object): the string is
    kept as the dispatcher, with no error, and every hook is then lost, each with an
    ``AttributeError: 'str' object has no attribute 'submit'`` in the log (``stats()``
    and ``observe()``, hence ``register()``, raise)."""
    hooks = [{"method": "vm.start", "type": "post", "url": "http://127.0.0.1:9/"}]
    try:
        middleware = WebhookMiddleware(
            flask_app.wsgi_app, hooks=hooks, environ={}, dispatcher="celery"
        )
    except (TypeError, ConfigError):
        return  # refused at once: fixed too
    pytest.importorskip("celery", reason="the celery extra is not installed")
    from xo_webhooks.celery import CeleryDispatcher

    assert isinstance(middleware.dispatcher, CeleryDispatcher), middleware.dispatcher
    middleware.close(1)


def test_celery_wait_for_response_opening_the_breaker_shows_in_the_state_gauge(
    broker, webhook_receiver, flask_app, wrap, serve, registry
):
    """With the thread dispatcher a ``waitForResponse`` attempt that opens the breaker
    sets ``endpoint_state{state="open"}`` (scenario wait-for-response-breaker-opens
    above). ``CeleryDispatcher.deliver_now`` settles the shared breaker too, but drops
    the transition that ``SharedBreakers.settle`` returns: the API's gauge keeps saying
    ``closed`` while ``endpoint_stats()`` says ``open``."""
    webhook_receiver.respond_with(503)
    hooks = [{"method": "vm.start", "type": "pre", "url": webhook_receiver.url,
              "waitForResponse": True}]  # fmt: skip
    celery = {"XO_WEBHOOKS_DISPATCHER": "celery", "XO_WEBHOOKS_BROKER_URL": broker.url}
    middleware = wrap(
        flask_app.wsgi_app, hooks=hooks, environ=celery, retries=0, breaker_threshold=1
    )
    register(middleware, registry)
    origin = endpoint_of(webhook_receiver.url)

    call_api(serve(middleware).url)  # its pre hook's one attempt is made in the call

    assert middleware.endpoint_stats()[origin]["state"] == "open"
    readings = Readings.of(registry, origin)
    assert readings.attempts() == {"5xx": 1}
    assert readings.failed() == {"retries_exhausted": 1}
    assert readings.states() == state_is("open")


@pytest.mark.slow
def test_no_celery_worker_says_open_once_the_shared_breaker_closed(
    broker, webhook_receiver, monkeypatch
):
    """Celery workers share each endpoint's breaker in Redis. Were each worker process
    to set ``endpoint_state`` on the transitions it caused itself, worker A that opened
    the breaker would say ``open`` after worker B's probe closed it, and summed over
    the pool's processes or the worker hosts, the README's query
    ``xo_webhooks_endpoint_state{state=~"open|half-open|disabled"} > 0`` would report
    the endpoint down after it is back. So workers read the state from
    the shared breakers at each scrape (``SharedStates``, as ``XO_WEBHOOKS_METRICS_PORT``
    sets it up). Two ``Worker`` objects with a registry each stand for two worker
    processes."""
    from xo_webhooks import load_settings
    from xo_webhooks.request.payload import pre_payload
    from xo_webhooks.sending import endpoints
    from xo_webhooks.sending.celery import Worker
    from xo_webhooks.sending.delivery import Delivery
    from xo_webhooks.sending.prometheus import Metrics, SharedStates

    monkeypatch.setattr(endpoints, "FIRST_PAUSE", 0.2)
    webhook_receiver.respond_with(503, 204)
    hooks = [{"method": "vm.start", "type": "pre", "url": webhook_receiver.url}]
    settings = load_settings(hooks, {}, broker_url=broker.url, retries=0, breaker_threshold=1)
    origin = endpoint_of(webhook_receiver.url)
    workers, registries = [], []
    for _ in range(2):
        workers.append(Worker(settings))
        registries.append(CollectorRegistry())
        workers[-1].observers.add(Metrics(registries[-1], pending=False, states=False))
        registries[-1].register(SharedStates(workers[-1].breakers, [origin]))
    a, b = workers

    def message(call_id: str) -> dict[str, Any]:
        payload = pre_payload(call_id, ("u1", "alice"), "vm.start", {}, 1_700_000_000_000)
        return Delivery(settings.hooks[0], payload).to_message()

    try:
        task = object()  # no retry, no hold: the worker never uses its task here
        assert a.run(task, message("call-1")) == "failed"  # 503: A opens the breaker
        probe_at = a.breakers.load(origin).probe_at
        wait_until(lambda: time.time() >= probe_at, 10, "the breaker's first pause")
        assert b.run(task, message("call-2")) == "delivered"  # B's probe closes it
        assert b.breakers.load(origin).state == "closed"

        def summed(state: str) -> float:
            return sum(Readings.of(r, origin).value("endpoint_state", state=state) or 0
                       for r in registries)  # fmt: skip

        assert summed("closed") >= 1
        assert summed("open") == 0, "worker A still says the endpoint is open"
    finally:
        for worker in workers:
            if worker._markers is not None:
                worker._markers.close()
