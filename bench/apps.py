"""The application under test, the hook sets, and a way to call WSGI apps without sockets.

The app is a small Flask JSON-RPC 2.0 endpoint, the kind the middleware is meant to
wrap. Calls go straight to the WSGI callable with a prebuilt environ and a no-op
``start_response``: werkzeug's test client costs more than the app itself and would
hide the ratio being measured.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, jsonify, request

API_PATH = "/api/"
# Methods the benchmark calls, round-robin; realistic names of a Xen Orchestra API.
CALLED_METHODS = ("vm.start", "vm.stop", "vm.snapshot", "vm.migrate")
UNMATCHED_METHODS = ("system.getMethodsInfo", "session.signIn", "host.stats", "sr.scan")
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw3NjFjYvZmi0="  # base64 of 32 bytes


def create_app() -> Flask:
    """A Flask app answering JSON-RPC 2.0 calls at ``/api/``."""
    app = Flask("bench_api")

    handlers: dict[str, Callable[[Any], Any]] = {
        "vm.start": lambda p: {"id": p.get("id"), "power_state": "Running"},
        "vm.stop": lambda p: {"id": p.get("id"), "power_state": "Halted"},
        "vm.snapshot": lambda p: {"id": p.get("id"), "snapshot": "snap-" + str(p.get("id"))},
        "vm.migrate": lambda p: True,
    }

    @app.post(API_PATH)
    def rpc() -> Any:
        call = request.get_json(force=True, silent=True)
        if not isinstance(call, dict) or "method" not in call:
            return jsonify(jsonrpc="2.0", id=None, error={"code": -32600, "message": "bad"})
        handler = handlers.get(call["method"], lambda p: {"ok": True})
        params = call.get("params") or {}
        return jsonify(jsonrpc="2.0", id=call.get("id"), result=handler(params))

    return app


def rpc_body(method: str, n: int = 1) -> bytes:
    return json.dumps({
        "jsonrpc": "2.0", "id": n, "method": method,
        "params": {"id": "0f3a7c4e-8b1d-4c2a-9e5f-6a7b8c9d0e1f", "force": False},
    }).encode()  # fmt: skip


def hook(method: str, url: str, type: str = "pre/post", secret: str | None = None) -> dict:
    data = {"method": method, "type": type, "url": url}
    if secret:
        data["secret"] = secret
    return data


def unmatched_hooks(count: int, url: str) -> list[dict[str, Any]]:
    """*count* hooks, one in ten of them a glob, none matching :data:`CALLED_METHODS`
    or :data:`UNMATCHED_METHODS`."""
    hooks = []
    for i in range(count):
        if i % 10 == 9:
            hooks.append(hook(f"plugin{i}.*", url))
        else:
            kind = ("pre", "post", "pre/post")[i % 3]
            hooks.append(hook(f"pool{i}.setting{i % 7}", url, type=kind))
    return hooks


class WsgiCaller:
    """Calls a WSGI app in-process, as a server would: a fresh copy of a prebuilt environ
    with the body as ``wsgi.input``, every chunk of the response consumed, ``close()``
    called."""

    def __init__(self, bodies: list[bytes]) -> None:
        from werkzeug.test import EnvironBuilder

        builder = EnvironBuilder(
            path=API_PATH, method="POST", data=b"{}", content_type="application/json",
            environ_base={"REMOTE_ADDR": "127.0.0.1"},
        )  # fmt: skip
        self.base = builder.get_environ()
        builder.close()
        self.bodies = [(body, str(len(body))) for body in bodies]
        self.status = ""

    def _start_response(self, status: str, headers: Any, exc_info: Any = None) -> Any:
        self.status = status
        return _write

    def call_many(self, app: Any, count: int) -> None:
        """Make *count* calls to *app*, cycling through the bodies."""
        base, bodies, start_response = self.base, self.bodies, self._start_response
        n = len(bodies)
        for i in range(count):
            body, length = bodies[i % n]
            environ = base.copy()
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = length
            response = app(environ, start_response)
            try:
                for _chunk in response:
                    pass
            finally:
                close = getattr(response, "close", None)
                if close is not None:
                    close()

    def check(self, app: Any) -> None:
        """Fail early if the app does not answer 200."""
        self.call_many(app, 1)
        if not self.status.startswith("200"):
            raise RuntimeError(f"the benchmark app answered {self.status!r}")


def _write(data: bytes) -> None:
    pass


class NoopDispatcher:
    """A dispatcher that accepts everything and sends nothing: only the request path
    is timed. Counts what it was given, to prove the hooks really matched.

    Like the thread dispatcher, it has ``defer()``: the middleware hands it the
    building of a request's hooks, as a job the thread dispatcher runs on its intake
    thread. During a timed run the jobs are counted and dropped (kept, their bodies
    would grow the heap the collector walks, and slow both sides); with ``keep`` set
    they are kept, for :meth:`run_deferred` to run, and prove, what they submit.
    """

    def __init__(self) -> None:
        self.submitted = 0
        self.deferred = 0
        self.keep = False
        self._jobs: list[Any] = []

    def submit(self, delivery: Any) -> None:
        self.submitted += 1

    def defer(self, job: Callable[[], object], size: int = 0, now: bool = True) -> None:
        self.deferred += 1
        if self.keep:
            self._jobs.append(job)

    def run_deferred(self) -> float:
        """Run the kept jobs (they submit their hooks here); return the CPU seconds of
        this thread they took."""
        jobs, self._jobs = self._jobs, []
        start = time.thread_time()
        for job in jobs:
            job()
        return time.thread_time() - start

    def deliver_now(self, delivery: Any) -> bool:
        self.submitted += 1
        return True

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def close(self, timeout: float | None = None) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {"accepted": self.submitted}


def built_off_the_request_thread(
    caller: WsgiCaller, app: Any, dispatcher: NoopDispatcher, calls: int
) -> tuple[int, float]:
    """Make *calls* calls of *app* keeping their deferred jobs, run those: return the
    hooks they submitted and their CPU per call in microseconds (the work the thread
    dispatcher's intake thread does, off the request thread)."""
    dispatcher.keep, dispatcher.submitted = True, 0
    try:
        caller.call_many(app, calls)
        cpu = dispatcher.run_deferred()
    finally:
        dispatcher.keep = False
    return dispatcher.submitted, cpu / calls * 1e6
