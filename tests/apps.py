"""Applications the tests wrap: a Flask JSON-RPC API, served for real by the fixtures."""

from __future__ import annotations

import json
from typing import Any

from flask import Flask, Response, request


class Boom(RuntimeError):
    """What ``vm.explode`` raises."""


def _dispatch(call: dict[str, Any]) -> dict[str, Any]:
    method, params = call.get("method"), call.get("params") or {}
    if method == "vm.start":
        return {"result": {"id": params.get("id"), "power_state": "Running"}}
    if method == "vm.fail":
        return {"error": {"code": 13, "message": "VM is locked", "data": {"token": "t0ps3cret"}}}
    if method == "session.signIn":
        request.environ["xo_webhooks.user"] = ("u-42", params.get("username"))
        return {"result": True}
    if method == "vm.explode":
        raise Boom("the VM exploded")
    return {"error": {"code": -32601, "message": "Method not found"}}


def create_app() -> Flask:
    """A Flask JSON-RPC 2.0 API at ``/api``: vm.start, vm.fail (a JSON-RPC error),
    vm.explode (raises), session.signIn (sets the late user), batches, notifications;
    ``/echo`` answers with the bytes it got, for pass-through tests."""
    app = Flask("jsonrpc-test-app")

    @app.post("/api")
    def api() -> Response:
        data = json.loads(request.get_data())
        calls = data if isinstance(data, list) else [data]
        answers = [{"jsonrpc": "2.0", "id": c["id"], **_dispatch(c)} for c in calls if "id" in c]
        for call in calls:
            if "id" not in call:
                _dispatch(call)
        if not answers:
            return Response(status=204)
        body = answers if isinstance(data, list) else answers[0]
        return Response(json.dumps(body), content_type="application/json")

    @app.route("/echo", methods=["GET", "POST", "PUT", "HEAD"])
    def echo() -> Response:
        body = request.get_data()
        return Response(
            body,
            status=201,
            content_type=request.content_type or "application/octet-stream",
            headers={"X-Seen-Length": str(len(body)), "X-Seen-Method": request.method},
        )

    return app


# -- plain WSGI apps, for the request path's own tests -------------------------------

CALL = {"jsonrpc": "2.0", "id": 1, "method": "vm.start", "params": {"id": "vm-1"}}
RESULT = b'{"jsonrpc": "2.0", "id": 1, "result": "ok"}'


def plain_app(environ, start_response):
    environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    start_response("200 OK", [("Content-Type", "application/json")])
    return [RESULT]


def late_start_app(environ, start_response):
    def body():  # start_response is only called at the first next()
        start_response("200 OK", [("Content-Type", "application/json")])
        yield RESULT[:10]
        yield RESULT[10:]

    return body()
