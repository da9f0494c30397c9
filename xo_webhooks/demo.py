"""A demo of the main job: a JSON-RPC app wrapped by the middleware sends hooks.

Run it with ``python -m xo_webhooks.demo`` (or ``xo-webhooks demo``). It starts a local
receiver and a small JSON-RPC app on 127.0.0.1, makes a few calls, and shows each call's
answer and the hooks the receiver got.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TextIO

import requests
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from .request.middleware import WebhookMiddleware
from .testing import WebhookReceiver

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

__all__ = ["jsonrpc_app", "run_demo", "main"]

VMS = {"vm-1": "halted", "vm-2": "running"}


def _start_vm(vm: str) -> dict[str, Any]:
    if vm not in VMS:
        raise LookupError(f"no such VM: {vm}")
    VMS[vm] = "running"
    return {"id": vm, "power_state": "Running"}


METHODS: dict[str, Callable[..., Any]] = {
    "vm.start": _start_vm,
    "vm.list": lambda: sorted(VMS),
    "system.ping": lambda: "pong",
}


def _answer(call: Any) -> dict[str, Any] | None:
    if not isinstance(call, dict) or not isinstance(call.get("method"), str):
        return {
            "jsonrpc": "2.0",
            "id": None,
            "error": {"code": -32600, "message": "Invalid Request"},
        }
    method = METHODS.get(call["method"])
    params = call.get("params") or {}
    if method is None:
        outcome: dict[str, Any] = {"error": {"code": -32601, "message": "Method not found"}}
    else:
        try:
            result = method(**params) if isinstance(params, dict) else method(*params)
            outcome = {"result": result}
        except (LookupError, TypeError) as e:
            outcome = {"error": {"code": 1, "message": str(e)}}
    if "id" not in call:
        return None
    return {"jsonrpc": "2.0", "id": call["id"], **outcome}


@Request.application
def jsonrpc_app(request: Request) -> Response:
    """A tiny JSON-RPC 2.0 API (``vm.start``, ``vm.list``, ``system.ping``), batches included."""
    try:
        data = json.loads(request.get_data())
    except ValueError:
        error = {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}}
        return Response(json.dumps(error), content_type="application/json")
    answers: Any
    if isinstance(data, list):
        answers = [a for a in map(_answer, data) if a is not None]
    else:
        answers = _answer(data)
    if not answers:
        return Response(status=204)
    return Response(json.dumps(answers), content_type="application/json")


class _Server:
    def __init__(self, app: Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]):
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/api"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def _rpc(call_id: int, method: str, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": call_id, "method": method, "params": params}


CALLS: list[tuple[str, Any]] = [
    ("a call that succeeds", _rpc(1, "vm.start", vm="vm-1")),
    ("a call that fails", _rpc(2, "vm.start", vm="nope")),
    ("a batch of two calls", [
        {"jsonrpc": "2.0", "id": 3, "method": "vm.list"},
        {"jsonrpc": "2.0", "id": 4, "method": "system.ping"},
    ]),
    ("a notification (no id)", {"jsonrpc": "2.0", "method": "vm.start", "params": {"vm": "vm-2"}}),
    ("a method with no hook", {"jsonrpc": "2.0", "id": 5, "method": "system.ping"}),
]  # fmt: skip


def run_demo(out: TextIO) -> int:
    """Run the demo, writing what happens to *out*; return the number of hooks received."""
    with WebhookReceiver() as receiver:
        hooks = [{"method": "vm.*", "type": "pre/post", "url": receiver.url}]
        middleware = WebhookMiddleware(jsonrpc_app, hooks=hooks, environ={}, retries=0)
        out.write(f"receiver on {receiver.url}; hook: {json.dumps(hooks[0])}\n")
        with _Server(middleware) as api, requests.Session() as session:
            for title, body in CALLS:
                answer = session.post(api.url, json=body, timeout=10)
                out.write(f"\n-> {title}: {json.dumps(body)}\n")
                out.write(f"<- HTTP {answer.status_code} {answer.text}\n")
            middleware.close(10)
        out.write("\nHooks received (in arrival order):\n")
        for hook in receiver.received:
            out.write(json.dumps(hook.payload, sort_keys=False) + "\n")
        out.write(f"\nstats: {middleware.stats()}\n")
        return len(receiver.received)


def main() -> int:
    """Entry point of ``python -m xo_webhooks.demo``."""
    import logging
    import sys

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log in the demo
    return 0 if run_demo(sys.stdout) else 1


if __name__ == "__main__":
    raise SystemExit(main())
