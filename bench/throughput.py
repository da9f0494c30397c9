"""Scenarios 4 and 5: delivery throughput and its CPU cost, against a fast receiver.

4. N hooks through a :class:`ThreadDispatcher` (4 workers), timed from the first
   ``submit`` until ``flush`` returns, against two baselines run in the same rounds
   with the same worker count: the naive client (one ``requests.post`` per hook, a new
   connection each time, in a thread pool) and a bare ``http.client`` keep-alive loop
   per thread (the floor of what a Python sender can do). Signing on and off.
5. CPU seconds of this process per delivered hook (``time.process_time``), and the
   app's in-process throughput while the dispatcher is busy delivering vs idle.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import requests
from apps import SECRET, UNMATCHED_METHODS, WsgiCaller, create_app, hook, rpc_body
from common import Row, Spread, paired_rates, ratios

from xo_webhooks import load_settings, signing
from xo_webhooks.request.jsonrpc import Outcome
from xo_webhooks.request.payload import post_payload, pre_payload
from xo_webhooks.sending.delivery import Delivery
from xo_webhooks.sending.dispatcher import ThreadDispatcher

WORKERS = 4


def payloads(count: int) -> list[dict[str, Any]]:
    """*count* realistic payloads: the pre and post hooks of ``count / 2`` calls."""
    out = []
    user = ("5f3c1e2a-user", "admin@example.org")
    params = {"id": "0f3a7c4e-8b1d-4c2a-9e5f-6a7b8c9d0e1f", "force": False}
    now = int(time.time() * 1000)
    for _i in range(count // 2 + 1):
        call_id = uuid.uuid4().hex
        out.append(pre_payload(call_id, user, "vm.start", params, now))
        result = Outcome(result={"id": params["id"], "power_state": "Running"})
        out.append(post_payload(call_id, user, "vm.start", params, now, now + 12, result))
    return out[:count]


def _settings(url: str, signed: bool, queue_size: int, **extra: Any):
    raw = hook("vm.start", url, secret=SECRET if signed else None)
    return load_settings(
        [raw], {}, max_workers=WORKERS, queue_size=queue_size, timeout=10.0, **extra
    )


class Side:
    """One way of delivering hooks: a rate and a CPU cost per round."""

    def __init__(self, send_all: Callable[[list[dict[str, Any]]], None], count: int):
        self.send_all = send_all
        self.count = count
        self.cpu_per_hook: list[float] = []  # microseconds

    def __call__(self) -> float:
        batch = payloads(self.count)  # built outside the timing: a fresh copy each round
        cpu, start = time.process_time(), time.perf_counter()
        self.send_all(batch)
        elapsed = time.perf_counter() - start
        self.cpu_per_hook.append((time.process_time() - cpu) / self.count * 1e6)
        return self.count / elapsed


def dispatcher_side(url: str, signed: bool, count: int) -> Side:
    settings = _settings(url, signed, queue_size=count)
    target = settings.hooks[0]

    def send_all(batch: list[dict[str, Any]]) -> None:
        dispatcher = ThreadDispatcher(settings)
        try:
            for payload in batch:
                dispatcher.submit(Delivery(target, payload))
            if not dispatcher.flush(120):
                raise RuntimeError("the dispatcher did not drain in 120 s")
            stats = dispatcher.stats()
            if stats["delivered"] != len(batch):
                raise RuntimeError(f"the dispatcher delivered {stats}, not {len(batch)}")
        finally:
            dispatcher.close(0)

    return Side(send_all, count)


def _headers(signed: bool, body: bytes) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if signed:
        msg_id, timestamp = "msg_" + uuid.uuid4().hex, int(time.time())
        headers["webhook-id"] = msg_id
        headers["webhook-timestamp"] = str(timestamp)
        headers["webhook-signature"] = signing.sign(SECRET, msg_id, timestamp, body)
    return headers


def naive_side(url: str, signed: bool, count: int) -> Side:
    """What a user would write from the plugin's description."""

    def post(payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        response = requests.post(url, data=body, headers=_headers(signed, body), timeout=10)
        if response.status_code != 204:
            raise RuntimeError(f"naive client: HTTP {response.status_code}")

    def send_all(batch: list[dict[str, Any]]) -> None:
        with ThreadPoolExecutor(WORKERS) as pool:
            for _ in pool.map(post, batch):
                pass

    return Side(send_all, count)


def bare_side(url: str, signed: bool, count: int) -> Side:
    """One keep-alive ``http.client`` connection per thread, nothing else."""
    parts = urlsplit(url)

    def loop(share: list[dict[str, Any]], errors: list[BaseException]) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        try:
            for payload in share:
                body = json.dumps(payload).encode()
                conn.request("POST", parts.path, body, _headers(signed, body))
                response = conn.getresponse()
                response.read()
                if response.status != 204:
                    raise RuntimeError(f"http.client: HTTP {response.status}")
        except BaseException as e:
            errors.append(e)
        finally:
            conn.close()

    def send_all(batch: list[dict[str, Any]]) -> None:
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=loop, args=(batch[i::WORKERS], errors)) for i in range(WORKERS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    return Side(send_all, count)


def run_delivery(url: str, rounds: int, hooks: int, baseline_hooks: int) -> list[Row]:
    """Scenario 4 and the CPU half of scenario 5."""
    rows: list[Row] = []
    for signed in (False, True):
        label = "signed" if signed else "unsigned"
        sides = {
            "dispatcher": dispatcher_side(url, signed, hooks),
            "naive": naive_side(url, signed, baseline_hooks),
            "http.client": bare_side(url, signed, baseline_hooks),
        }
        for side in sides.values():  # warm-up: imports, first connections, caches
            count, side.count = side.count, 200
            side()
            side.count = count
            side.cpu_per_hook.clear()
        rates = paired_rates(sides, rounds, warmup=0)  # type: ignore[arg-type]
        detail = {
            "hooks_per_round": {name: side.count for name, side in sides.items()},
            **{f"{name}_hooks_per_s": Spread.of(r).__dict__ for name, r in rates.items()},
        }
        rows.append(Row(
            "4", f"{label}: dispatcher / naive requests.post hooks/s",
            ratios(rates["dispatcher"], rates["naive"]), target=">= 3", detail=detail,
        ))  # fmt: skip
        rows.append(Row(
            "4", f"{label}: dispatcher / bare http.client keep-alive",
            ratios(rates["dispatcher"], rates["http.client"]), target=">= 0.6",
        ))  # fmt: skip
        for name in ("dispatcher", "naive", "http.client"):
            rows.append(Row("4", f"  {label} {name} hooks/s", Spread.of(rates[name]), unit="/s"))
        cpu = {name: side.cpu_per_hook for name, side in sides.items()}
        for name in ("dispatcher", "naive", "http.client"):
            rows.append(Row("5", f"{label} {name}: CPU per hook", Spread.of(cpu[name]), unit="us"))
        rows.append(Row(
            "5", f"{label}: CPU per hook, dispatcher / http.client",
            ratios(cpu["dispatcher"], cpu["http.client"]),
        ))  # fmt: skip
    return rows


def run_api_under_load(url: str, rounds: int, round_seconds: float) -> list[Row]:
    """Scenario 5, second half: the bare app's calls/s while the dispatcher delivers a
    backlog to the receiver in the same process, vs with the dispatcher idle."""
    bare = create_app().wsgi_app
    caller = WsgiCaller([rpc_body(m, i) for i, m in enumerate(UNMATCHED_METHODS)])
    caller.call_many(bare, 200)
    start = time.perf_counter()
    caller.call_many(bare, 500)
    count = max(500, int(round_seconds / ((time.perf_counter() - start) / 500)))
    backlog = 20000  # several times what the workers deliver during one round
    settings = _settings(url, signed=False, queue_size=backlog)
    target = settings.hooks[0]
    delivered: list[float] = []  # hooks/s delivered while the app was being called

    def idle() -> float:
        start = time.perf_counter()
        caller.call_many(bare, count)
        return count / (time.perf_counter() - start)

    def busy() -> float:
        dispatcher = ThreadDispatcher(settings)
        deliveries = [Delivery(target, p) for p in payloads(backlog)]
        try:
            for delivery in deliveries:
                dispatcher.submit(delivery)
            time.sleep(0.2)  # let the workers reach their pace
            before = dispatcher.stats()["delivered"]
            start = time.perf_counter()
            caller.call_many(bare, count)
            elapsed = time.perf_counter() - start
            sent = dispatcher.stats()["delivered"] - before
            if dispatcher.stats()["pending"] == 0:
                raise RuntimeError("the backlog drained before the round ended")
            delivered.append(sent / elapsed)
            return count / elapsed
        finally:
            dispatcher.close(0)

    rates = paired_rates({"idle": idle, "busy": busy}, rounds)
    return [
        Row(
            "5", "app calls/s while 4 workers deliver / idle (same process)",
            ratios(rates["busy"], rates["idle"]),
            detail={f"{k}_calls_per_s": Spread.of(v).__dict__ for k, v in rates.items()},
        ),
        Row("5", "  hooks/s delivered meanwhile", Spread.of(delivered[1:]), unit="/s"),
    ]  # fmt: skip


def measure_once(url: str, kind: str, signed: bool, count: int) -> float | None:
    """One round of one side (for profiling by hand)."""
    make = {"dispatcher": dispatcher_side, "naive": naive_side, "http.client": bare_side}[kind]
    return make(url, signed, count)()
