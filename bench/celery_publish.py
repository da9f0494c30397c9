"""Scenario C: what a hook costs on the request path with the Celery dispatcher, beside
the thread dispatcher: ``python bench/celery_publish.py`` (needs ``redis-server`` and
the ``celery`` extra).

Both sides time ``submit()`` alone, per hook, on prebuilt deliveries of a realistic
pre payload, in interleaved rounds:

- thread: ``ThreadDispatcher.submit`` enqueues; its one delivery thread sits on a
  receiver that accepts the connection and never answers, so it burns no CPU;
- celery: ``CeleryDispatcher.submit`` redacts and publishes to a ``redis-server``
  started here on 127.0.0.1 (the loopback round trip is part of the cost); no worker
  runs, the queue is emptied between rounds;
- celery, the code path before #18: the same dispatcher given a Celery app, which it publishes
  with through ``send_task`` (kombu's producer, as every earlier version did);
- celery, ``submit_many``: the pre hooks of a call to two URLs in one message, per hook.

Then the broker's failure modes, which bound the request path: the first publish of a
process (it connects), a hung broker (SIGSTOP: connected, no answer) and a stopped one
(connections refused). Prints a table and writes ``bench/results-celery.json``;
:func:`run` returns the rows for ``bench/run.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import Row, Spread, free_port, render_table, wait_for_port  # noqa: E402

from xo_webhooks import load_settings  # noqa: E402
from xo_webhooks.request.payload import pre_payload  # noqa: E402
from xo_webhooks.sending.delivery import Delivery  # noqa: E402
from xo_webhooks.sending.dispatcher import ThreadDispatcher  # noqa: E402

#: The request path's publish, per hook, that issue 18 asks for.
PUBLISH_TARGET = "<= 50"

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw3NjFjYvZmi0="
PARAMS = {"id": "0f3a7c4e-8b1d-4c2a-9e5f-6a7b8c9d0e1f", "force": False, "password": "x"}


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A ``redis-server`` without persistence on a free loopback port."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, 10, alive=lambda: proc.poll() is None)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        proc.send_signal(signal.SIGCONT)  # in case a scenario left it stopped
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def silent_receiver() -> Iterator[str]:
    """A URL that accepts connections and never answers: a delivery thread waits on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook"


def deliveries(settings: Any, count: int) -> list[Delivery]:
    hook, user, start_ms = settings.hooks[0], ("u-1", "alice"), 1_700_000_000_000
    return [
        Delivery(hook, pre_payload(f"call-{n}", user, "vm.start", PARAMS, start_ms))
        for n in range(count)
    ]


def timed_submits(submit: Callable[[Delivery], None], batch: list[Delivery]) -> float:
    """Microseconds per ``submit()`` over *batch*."""
    gc.collect()
    start = time.perf_counter()
    for delivery in batch:
        submit(delivery)
    return (time.perf_counter() - start) / len(batch) * 1e6


def timed_calls(submit_many: Callable[[list[Delivery]], None], batch: list[Delivery]) -> float:
    """Microseconds per hook of ``submit_many()`` over *batch*, two hooks per call."""
    gc.collect()
    pairs = [batch[n : n + 2] for n in range(0, len(batch), 2)]
    start = time.perf_counter()
    for pair in pairs:
        submit_many(pair)
    return (time.perf_counter() - start) / len(batch) * 1e6


def paired(settings: Any, count: int) -> list[Delivery]:
    """The pre hooks of *count* / 2 calls, each to the two hooks of *settings*."""
    return [
        Delivery(hook, delivery.payload)
        for delivery in deliveries(settings, count // 2)
        for hook in settings.hooks
    ]


def run(rounds: int = 7, per_round: int = 2000) -> list[Row]:
    """Measure; return the table's rows (scenario ``C1``...``C6``)."""
    from xo_webhooks.celery import QUEUE, CeleryDispatcher
    from xo_webhooks.sending.celery import celery_app

    logging.getLogger("xo_webhooks").setLevel(logging.CRITICAL)  # C5, C6 fail on purpose
    rows: list[Row] = []
    with redis_server() as (broker, proc), silent_receiver() as url:
        hooks = [{"method": "vm.start", "type": "pre/post", "url": url, "secret": SECRET}]
        settings = load_settings(
            hooks, {}, dispatcher="celery", broker_url=broker, max_workers=1, timeout=3600,
            queue_size=10 * rounds * per_round + 10,
        )  # fmt: skip
        two = [{**hooks[0], "url": url + "/second"}, *hooks]
        two_settings = load_settings(
            two, {}, dispatcher="celery", broker_url=broker, queue_size=10 * rounds * per_round
        )
        thread = ThreadDispatcher(settings)
        celery = CeleryDispatcher(settings)
        today = CeleryDispatcher(settings, app=celery_app(settings, publisher=True))
        many = CeleryDispatcher(two_settings)
        import redis

        store = redis.Redis.from_url(broker)

        try:
            timed_submits(thread.submit, deliveries(settings, 200))  # warm-up
            timed_submits(celery.submit, deliveries(settings, 200))
            timed_submits(today.submit, deliveries(settings, 200))
            timed_calls(many.submit_many, paired(two_settings, 200))
            from xo_webhooks.sending.celery_wire import Broker, pack

            wire = Broker(broker, 1.0)
            floor_message = pack("LPUSH", "bench:floor", b"x" * 1200)  # a message's size

            def floor(count: int) -> float:
                """Microseconds per bare LPUSH round trip on a kept connection."""
                start = time.perf_counter()
                for _ in range(count):
                    wire.execute([floor_message])
                return (time.perf_counter() - start) / count * 1e6

            costs: dict[str, list[float]] = {
                "thread": [], "celery": [], "today": [], "many": [], "floor": []
            }  # fmt: skip
            slices = 10  # the sides alternate every per_round / 10 hooks: a burst of load
            size = per_round // slices  # from another process hits them alike
            for i in range(rounds):
                sides: list[tuple[str, Callable[[], float]]] = [
                    ("thread", lambda: timed_submits(thread.submit, deliveries(settings, size))),
                    ("celery", lambda: timed_submits(celery.submit, deliveries(settings, size))),
                    ("today", lambda: timed_submits(today.submit, deliveries(settings, size))),
                    ("many", lambda: timed_calls(many.submit_many, paired(two_settings, size))),
                    ("floor", lambda: floor(size)),
                ]
                spent = dict.fromkeys(costs, 0.0)
                for j in range(slices):
                    for name, measure in sides if (i + j) % 2 == 0 else sides[::-1]:
                        spent[name] += measure() / slices
                for name in costs:
                    costs[name].append(spent[name])
                store.delete(QUEUE, "bench:floor")
            wire.close()
            published = celery.stats()["published"]
            expected = 200 + rounds * slices * size
            if published != expected:
                raise RuntimeError(f"{published} hooks published, expected {expected}")
        finally:
            for dispatcher in (thread, celery, today, many):
                dispatcher.close(0)
        ratio = Spread.of([c / t for c, t in zip(costs["celery"], costs["thread"], strict=True)])
        gain = Spread.of([c / t for c, t in zip(costs["celery"], costs["today"], strict=True)])
        detail = {"hooks_per_round": per_round, "broker": "redis-server on 127.0.0.1"}
        rows += [
            Row("C1", "thread dispatcher: submit() per hook (enqueue)",
                Spread.of(costs["thread"]), unit="us", detail=detail),
            Row("C2", "celery dispatcher: submit() per hook (publish to Redis)",
                Spread.of(costs["celery"]), unit="us", target=PUBLISH_TARGET, detail=detail),
            Row("C2", "  before #18: submit() through send_task (kombu)",
                Spread.of(costs["today"]), unit="us", detail=detail),
            Row("C2", "  celery submit() / before #18", gain, detail=detail),
            Row("C2", "celery submit_many(), a call's 2 pre hooks in 1 message: per hook",
                Spread.of(costs["many"]), unit="us", target=PUBLISH_TARGET, detail=detail),
            Row("C2", "  the floor: a bare LPUSH round trip to Redis on a kept connection",
                Spread.of(costs["floor"]), unit="us", detail=detail),
            Row("C3", "celery / thread submit() cost", ratio, detail=detail),
        ]  # fmt: skip

        # C4: the first publish of a process connects to the broker.
        first = []
        for _ in range(rounds):
            fresh = CeleryDispatcher(settings)
            first.append(timed_submits(fresh.submit, deliveries(settings, 1)) / 1000)
            fresh.close(0)
        rows.append(Row("C4", "celery: first submit() of a process (connects), ms",
                        Spread.of(first), unit="ms"))  # fmt: skip

        # C5: a hung broker (SIGSTOP): connected, never answers. 50 calls of 2 hooks.
        slowest, per_call = [], []
        for _ in range(rounds):
            hung = CeleryDispatcher(settings)
            timed_submits(hung.submit, deliveries(settings, 1))  # connected while it answers
            proc.send_signal(signal.SIGSTOP)
            try:
                calls = [timed_submits(hung.submit, deliveries(settings, 2)) * 2 / 1000
                         for _ in range(50)]  # fmt: skip
            finally:
                proc.send_signal(signal.SIGCONT)
            slowest.append(max(calls))
            per_call.append(sum(calls) / len(calls))
            hung.close(0)
            time.sleep(1.1)  # past the dispatcher's fail-fast second, for the next round
        rows.append(Row("C5", "celery, broker hung (SIGSTOP): slowest call of 2 hooks, ms",
                        Spread.of(slowest), unit="ms", target="<= 500",
                        detail={"mean_call_ms": per_call}))  # fmt: skip

        # C6: the broker stopped: connections refused.
        proc.terminate()
        proc.wait(5)
        down = []
        for _ in range(rounds):
            gone = CeleryDispatcher(settings)
            down.append(timed_submits(gone.submit, deliveries(settings, 200)))
            gone.close(0)
        rows.append(Row("C6", "celery, broker stopped (refused): submit() per hook",
                        Spread.of(down), unit="us"))  # fmt: skip
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds per measurement (>= 5)")
    parser.add_argument("--hooks", type=int, default=2000, help="hooks per round")
    parser.add_argument("--output", type=Path, default=HERE / "results-celery.json")
    args = parser.parse_args(argv)
    if args.rounds < 5:
        print("at least 5 rounds per measurement", file=sys.stderr)
        return 2
    if shutil.which("redis-server") is None:
        print("redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    rows = run(args.rounds, args.hooks)
    table = render_table(rows)
    print(table)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": {name: version(name) for name in ("celery", "kombu", "redis")},
        "redis_server": subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "table": table,
        "rows": [r.as_json() for r in rows],
    }
    args.output.write_text(json.dumps(info, indent=2, default=str) + "\n")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
