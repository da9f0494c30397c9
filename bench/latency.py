"""Scenario 7: API latency over HTTP while every hook goes to a receiver that takes 2 s.

Two servers run side by side, each in its own process (werkzeug ``make_server``,
threaded, on 127.0.0.1): the bare app and the app wrapped with a pre/post hook on every
call, delivered by the default thread dispatcher to a receiver that waits 2 s before
answering. A ``requests.Session`` makes sequential calls to each, alternating every 50 calls;
the p50 and p99 of each round are compared. The hooks pile up in the queue; the calls
must not wait for them.

Run as a script, this module is one of the servers:
``python latency.py bare|wrapped PORT RECEIVER_URL``.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
from common import Row, Spread, free_port, percentile, wait_for_port

CALLS_PER_ROUND = 500
SLICE = 50


@contextlib.contextmanager
def server(kind: str, receiver_url: str) -> Iterator[str]:
    """Start a server process for the *kind* app; yield its URL; stop it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), kind, str(port), receiver_url]
    )
    try:
        wait_for_port(port, 20, alive=lambda: proc.poll() is None)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(rounds: int, receiver_url: str) -> list[Row]:
    from apps import API_PATH, CALLED_METHODS, rpc_body

    bodies = [rpc_body(m, i) for i, m in enumerate(CALLED_METHODS)]
    headers = {"Content-Type": "application/json"}
    samples: dict[str, list[list[float]]] = {"bare": [], "wrapped": []}
    with server("bare", receiver_url) as bare, server("wrapped", receiver_url) as wrapped:
        urls = {"bare": bare, "wrapped": wrapped}
        sessions = {name: requests.Session() for name in urls}
        try:

            def one_round(name: str, calls: int) -> list[float]:
                session, url = sessions[name], urls[name] + API_PATH
                times = []
                for i in range(calls):
                    start = time.perf_counter()
                    response = session.post(url, data=bodies[i % len(bodies)], headers=headers)
                    times.append((time.perf_counter() - start) * 1000)
                    if response.status_code != 200:
                        raise RuntimeError(f"{name} server answered {response.status_code}")
                return times

            for name in urls:  # warm-up: connections, imports, first-call caches
                one_round(name, 50)
            # Each round alternates the two servers every SLICE calls, so that a burst of
            # load from elsewhere on the machine hits both alike.
            for i in range(rounds):
                times: dict[str, list[float]] = {"bare": [], "wrapped": []}
                for j in range(CALLS_PER_ROUND // SLICE):
                    for name in ("bare", "wrapped") if (i + j) % 2 == 0 else ("wrapped", "bare"):
                        times[name].extend(one_round(name, SLICE))
                for name, values in times.items():
                    samples[name].append(values)
            stats = sessions["wrapped"].get(wrapped + "/_stats").json()
        finally:
            for session in sessions.values():
                session.close()
    if stats.get("accepted", 0) < 2 * rounds * CALLS_PER_ROUND:
        raise RuntimeError(f"the wrapped server did not queue a pre and post per call: {stats}")

    rows = []
    for p in (50, 99):
        per_round = {n: [percentile(r, p) for r in rs] for n, rs in samples.items()}
        rows.append(Row(
            "7", f"p{p} latency over HTTP, receiver taking 2 s: wrapped / bare",
            Spread.of([
                w / b for w, b in zip(per_round["wrapped"], per_round["bare"], strict=True)
            ]),
            target="<= 1.10",
            detail={"calls_per_round": CALLS_PER_ROUND, "wrapped_stats_at_end": stats},
        ))  # fmt: skip
        for name in ("bare", "wrapped"):
            rows.append(Row("7", f"  p{p} {name}", Spread.of(per_round[name]), unit="ms"))
    return rows


def serve(kind: str, port: int, receiver_url: str) -> None:
    from apps import CALLED_METHODS, create_app, hook
    from flask import jsonify
    from werkzeug.serving import make_server

    from xo_webhooks import WebhookMiddleware

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    app = create_app()
    middleware = None
    if kind == "wrapped":
        hooks = [hook(m, receiver_url) for m in CALLED_METHODS]
        middleware = WebhookMiddleware(app.wsgi_app, hooks, environ={}, shutdown_timeout=0)
        app.wsgi_app = middleware  # type: ignore[method-assign]

    @app.get("/_stats")
    def stats() -> Any:
        return jsonify(middleware.stats() if middleware else {})

    httpd = make_server("127.0.0.1", port, app, threaded=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        httpd.serve_forever()
    finally:
        if middleware is not None:
            middleware.close(0)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    serve(sys.argv[1], int(sys.argv[2]), sys.argv[3])
