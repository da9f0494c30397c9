"""Scenarios 1-3: what the middleware costs on the request path, in-process, no sockets.

1. 20 hooks configured, none matching the calls: wrapped / bare throughput.
2. Every call matches a pre/post hook; a no-op dispatcher stands in for delivery.
3. 1,000 hooks (one in ten a glob) vs 1 hook, both matching every call once.

And the request thread's time for one batch of 1,000 hooked calls (2,000 hooks), and for
a 1 MB batch of 49,000 hooked calls (the issue's flood), of which ``XO_WEBHOOKS_MAX_CALLS`` (1,000)
have their hooks sent: the rest are only counted and recorded (issue #14).
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

from apps import (
    CALLED_METHODS,
    UNMATCHED_METHODS,
    NoopDispatcher,
    WsgiCaller,
    built_off_the_request_thread,
    create_app,
    hook,
    rpc_body,
    unmatched_hooks,
)
from common import Row, Spread, interleaved_calls, interleaved_rates, ratios

from xo_webhooks import WebhookMiddleware

UNUSED_URL = "http://127.0.0.1:9/hook"  # never contacted: nothing is delivered here


def calls_per_round(caller: WsgiCaller, app: Any, seconds: float) -> int:
    """How many calls of *app* take about *seconds*."""
    caller.call_many(app, 50)
    start = time.perf_counter()
    caller.call_many(app, 200)
    per_call = (time.perf_counter() - start) / 200
    return max(500, int(seconds / per_call))


def run(rounds: int, round_seconds: float) -> list[Row]:
    flask_app = create_app()
    bare = flask_app.wsgi_app
    rows = []

    # 1. Hooks configured, none matching.
    caller = WsgiCaller([rpc_body(m, i) for i, m in enumerate(UNMATCHED_METHODS)])
    wrapped = WebhookMiddleware(bare, unmatched_hooks(20, UNUSED_URL), environ={})
    try:
        caller.check(bare)
        caller.check(wrapped)
        count = calls_per_round(caller, bare, round_seconds)
        rates = _pair(caller, count, rounds, bare=bare, wrapped=wrapped)
        rows.append(Row(
            "1", "no hook matches (20 hooks): wrapped / bare calls/s",
            ratios(rates["wrapped"], rates["bare"]), target=">= 0.95",
            detail=_detail(rates, count),
        ))  # fmt: skip
        if wrapped.stats()["accepted"]:
            raise RuntimeError("scenario 1: a hook matched; it should not")
    finally:
        wrapped.close(0)

    # 2. Every call matches a pre/post hook; a no-op dispatcher.
    caller = WsgiCaller([rpc_body(m, i) for i, m in enumerate(CALLED_METHODS)])
    noop = NoopDispatcher()
    hooks = unmatched_hooks(16, UNUSED_URL) + [hook(m, UNUSED_URL) for m in CALLED_METHODS]
    wrapped = WebhookMiddleware(bare, hooks, environ={}, dispatcher=noop)
    caller.check(wrapped)
    count = calls_per_round(caller, bare, round_seconds)
    noop.deferred = 0
    rates = _pair(caller, count, rounds, bare=bare, wrapped=wrapped)
    calls = interleaved_calls(count, rounds)
    if noop.deferred != 2 * calls:  # a job for the pre hooks and one for the posts
        raise RuntimeError(f"scenario 2: {noop.deferred} jobs for {calls} calls, not 2 each")
    built = [built_off_the_request_thread(caller, wrapped, noop, 2000) for _ in range(rounds)]
    if any(hooks != 2 * 2000 for hooks, _ in built):
        raise RuntimeError(f"scenario 2: {built[0][0]} hooks built for 2,000 calls, not 2 each")
    rows.append(Row(
        "2", "pre/post hook matches every call (no-op dispatcher): wrapped / bare",
        ratios(rates["wrapped"], rates["bare"]), target=">= 0.85", detail=_detail(rates, count),
    ))  # fmt: skip
    # The absolute cost per call, for the README; noisy, hence not a target.
    per_call = [1e6 / w - 1e6 / b for w, b in zip(rates["wrapped"], rates["bare"], strict=True)]
    rows.append(Row(
        "2", "  added latency per matching call", Spread.of(per_call), unit="us",
    ))  # fmt: skip
    rows.append(Row(
        "2", "  parse and build, on the intake thread: CPU per call",
        Spread.of([cpu for _, cpu in built]), unit="us",
    ))  # fmt: skip

    # 3. 1,000 hooks vs 1, both matching each call exactly once (through a glob).
    one = WebhookMiddleware(bare, [hook("vm.*", UNUSED_URL)], environ={}, dispatcher=noop)
    many_hooks = unmatched_hooks(999, UNUSED_URL) + [hook("vm.*", UNUSED_URL)]
    many = WebhookMiddleware(bare, many_hooks, environ={}, dispatcher=noop)
    if len(many.table.match("vm.start")) != 1 or len(one.table.match("vm.start")) != 1:
        raise RuntimeError("scenario 3: each call must match exactly one hook")
    rates = _pair(caller, count, rounds, one=one, many=many)
    rows.append(Row(
        "3", "1,000 hooks vs 1 (matching): calls/s ratio",
        ratios(rates["many"], rates["one"]), target=">= 0.95", detail=_detail(rates, count),
    ))  # fmt: skip
    rows += _batch_rows(bare, rounds)
    return rows


def _batch_rows(bare: Any, rounds: int) -> list[Row]:
    """The request thread's time added by the middleware to one large batch."""
    rows = []
    hooks = [hook(m, UNUSED_URL) for m in CALLED_METHODS]
    batches = (
        ("1,000-call batch", [{"jsonrpc": "2.0", "method": CALLED_METHODS[n % 4],
                               "params": {"id": n}} for n in range(1000)], 20),
        ("1 MB batch of 49,000 calls", [{"method": "vm.stop"}] * 49000, 10),
    )  # fmt: skip
    for label, calls, per_round in batches:
        body = json.dumps(calls, separators=(",", ":")).encode()
        caller = WsgiCaller([body])
        noop = NoopDispatcher()
        wrapped = WebhookMiddleware(bare, hooks, environ={}, dispatcher=noop)
        rates = _pair(caller, per_round, rounds, bare=bare, wrapped=wrapped)
        sent, built = built_off_the_request_thread(caller, wrapped, noop, 1)
        if sent != 2 * min(len(calls), wrapped.settings.max_calls):
            raise RuntimeError(f"{label}: {sent} hooks queued per batch")
        added = [1e3 / w - 1e3 / b for w, b in zip(rates["wrapped"], rates["bare"], strict=True)]
        detail = _detail(rates, per_round)
        detail["intake_thread_ms"] = built / 1e3  # parse and build, off the request thread
        rows.append(Row(
            "2", f"  {label}: request-thread time added ({sent:,} hooks queued)",
            Spread.of(added), unit="ms", detail=detail,
        ))  # fmt: skip
    return rows


def _pair(caller: WsgiCaller, count: int, rounds: int, **apps: Any) -> dict[str, list[float]]:
    sides = {name: functools.partial(caller.call_many, app) for name, app in apps.items()}
    return interleaved_rates(sides, count, rounds)


def _detail(rates: dict[str, list[float]], count: int) -> dict[str, Any]:
    detail: dict[str, Any] = {"calls_per_round": count}
    for name, values in rates.items():
        detail[f"{name}_calls_per_s"] = Spread.of(values).__dict__
    return detail
