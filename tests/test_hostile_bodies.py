"""Every call the app can run has its hooks: bodies written to slip past the quick scan
or to make a payload that strict JSON cannot hold, against a Flask app served for real.

For each body, the calls the app ran and the hooks that arrived must agree: a pre and a
post hook for each hooked call it ran (with stand-ins where strict JSON cannot hold a
value, see ``sending/redaction.py``), none for a call it did not run.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import requests
from flask import Flask, Response, request

from xo_webhooks import WebhookMiddleware
from xo_webhooks.request.middleware import _PARSE, _PRE
from xo_webhooks.schema import validate_payload
from xo_webhooks.sending.redaction import TOO_DEEP

from .waiting import wait_until

CALL = '{"jsonrpc": "2.0", "id": 1, "method": "vm.delete", "params": {"id": "vm-1"}}'


def nested(depth: int) -> str:
    return '{"jsonrpc": "2.0", "id": 1, "method": "vm.delete", "params": {"a": %s}}' % (
        "[" * depth + "]" * depth
    )


def deep_stand_in(params: Any) -> bool:
    return TOO_DEEP in json.dumps(params)


def _as_python_reads(text: str) -> Any:
    try:
        json.loads(text)
    except RecursionError:
        return None
    return deep_stand_in


BODIES = [
    pytest.param(CALL.encode(), {"id": "vm-1"}, id="utf-8"),
    pytest.param(b"\xef\xbb\xbf" + CALL.encode(), {"id": "vm-1"}, id="utf-8-bom"),
    pytest.param(CALL.encode("utf-16-le"), {"id": "vm-1"}, id="utf-16-le"),
    pytest.param(CALL.encode("utf-16-be"), {"id": "vm-1"}, id="utf-16-be"),
    pytest.param(CALL.encode("utf-16"), {"id": "vm-1"}, id="utf-16-bom"),
    pytest.param(CALL.encode("utf-32-le"), {"id": "vm-1"}, id="utf-32-le"),
    pytest.param(CALL.encode("utf-32-be"), {"id": "vm-1"}, id="utf-32-be"),
    pytest.param(CALL.encode("utf-32"), {"id": "vm-1"}, id="utf-32-bom"),
    pytest.param(
        CALL.replace("vm.delete", "vm.\\u0064elete").encode(), {"id": "vm-1"}, id="escaped-method"
    ),  # fmt: skip
    pytest.param(CALL.replace('"vm-1"', "1e400").encode(), {"id": "Infinity"}, id="1e400"),
    pytest.param(CALL.replace('"vm-1"', "-1e400").encode(), {"id": "-Infinity"}, id="-1e400"),
    pytest.param(CALL.replace('"vm-1"', "NaN").encode(), {"id": "NaN"}, id="NaN"),
    pytest.param(CALL.replace("vm-1", "\\ud800").encode(), {"id": "\ufffd"}, id="lone-surrogate"),
    pytest.param(
        CALL.replace('"id": "vm-1"', '"\\udfff": 1').encode(),
        {"\ufffd": 1},
        id="lone-surrogate-key",
    ),  # fmt: skip
    pytest.param(nested(500).encode(), deep_stand_in, id="nested-500"),
    # Python 3.11's json stops at about 1,000 levels (then no call runs, and no hook
    # goes); 3.12's reads it: the app runs the call, and its hooks get the stand-in.
    pytest.param(nested(1000).encode(), _as_python_reads(nested(1000)), id="nested-1000"),
    pytest.param(
        CALL.replace('"method"', '"method": "vm.list", "method"').encode(),
        {"id": "vm-1"},
        id="duplicate-method-hooked-last",
    ),  # fmt: skip
    pytest.param(
        CALL.replace('"params"', '"method": "vm.list", "params"').encode(),
        None,
        id="duplicate-method-hooked-first",
    ),  # fmt: skip
]


def recording_app() -> tuple[Flask, list[tuple[str, Any]]]:
    """A Flask JSON-RPC app that parses as Flask does and records each call it runs."""
    app = Flask("hostile-bodies")
    ran: list[tuple[str, Any]] = []

    @app.post("/api")
    def api() -> Response:
        call = request.get_json(force=True)
        ran.append((call["method"], call.get("params")))
        return Response(json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": True}),
                        content_type="application/json")  # fmt: skip

    return app, ran


@pytest.mark.parametrize(("body", "params"), BODIES)
def test_the_apps_calls_and_the_hooks_agree(body, params, serve, webhook_receiver):
    app, ran = recording_app()
    hooks = [{"method": "vm.delete", "type": "pre/post", "url": webhook_receiver.url}]
    middleware = WebhookMiddleware(app.wsgi_app, hooks=hooks, environ={}, timeout=2)
    app.wsgi_app = middleware
    url = serve(app).url + "/api"
    try:
        answer = requests.post(url, data=body, timeout=10,
                               headers={"Content-Type": "application/json"})  # fmt: skip
        # The post hook is queued once the server has closed the response.
        expected = 0 if params is None else 2
        wait_until(lambda: len(webhook_receiver.attempts) >= expected, what="the hooks")
        assert middleware.flush(10)
    finally:
        middleware.close(5)
    hooked = [p for method, p in ran if method == "vm.delete"]
    received = [h.payload for h in webhook_receiver.attempts]
    if params is None:  # the app ran no hooked call: no hook either
        assert hooked == [] and received == [], (answer.status_code, ran)
        return
    assert answer.status_code == 200 and len(hooked) == 1
    assert sorted(p["type"] for p in received) == ["post", "pre"]
    for payload in received:
        validate_payload(payload)
        assert payload["method"] == "vm.delete"
        if callable(params):
            assert params(payload["params"])
        else:
            assert payload["params"] == params
    assert middleware.stats()["delivered"] == 2


QUICK_SCAN_HOOKS = [
    {"method": m, "type": "pre", "url": "http://127.0.0.1:9/"}
    for m in ("vm.start", "*.*.*", "pool.set+(x)[1]", "sr.*.scan*")
]


@pytest.mark.parametrize(
    ("method", "hooked"),
    [
        pytest.param("vm.start", True, id="exact"),
        pytest.param("a.b.c", True, id="glob-dots"),
        pytest.param("pool.set+(x)[1]", True, id="regex-specials-are-literal"),
        pytest.param("pool.setx", False, id="no-such-name"),
        pytest.param("sr.main.scan.now", True, id="glob-runs"),
        pytest.param("host.stats", False, id="unhooked"),
    ],
)
def test_the_quick_scan_agrees_with_the_hook_table(method, hooked):
    middleware = WebhookMiddleware(lambda e, s: [], hooks=QUICK_SCAN_HOOKS, environ={})
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method}).encode()
    assert bool(middleware._scan(body)) is hooked
    assert bool(middleware.table.match(method)) is hooked


def test_the_quick_scan_is_linear_on_a_hostile_body():
    # A name that never ends, under hooks full of globs: a backtracking pattern would
    # take minutes on this megabyte; one pass over it takes milliseconds.
    middleware = WebhookMiddleware(lambda e, s: [], hooks=QUICK_SCAN_HOOKS, environ={})
    body = b'{"method": "' + b"a." * 500_000
    started = time.perf_counter()
    assert middleware._scan(body) == 0
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    ("body", "needs"),
    [
        pytest.param(b'{"id": 1, "method": "vm.start"}', _PRE, id="json.dumps"),
        pytest.param(b'{"id":1,"method":"vm.start"}', _PRE, id="JSON.stringify"),
        pytest.param(b'{"method" :\n\t"vm.start"}', _PRE, id="odd-spacing"),
        pytest.param(b'{"method": "host.stats"}', 0, id="unhooked"),
        pytest.param(b'{"method": "vm.start', 0, id="unterminated-name"),
        pytest.param(b'{"method", "vm.start"}', 0, id="no-colon"),
        pytest.param(b'{"params": {"id": 1}}', 0, id="no-method"),
        pytest.param(b'[{"method": "host.stats"}, {"method":"vm.start"}]', _PRE, id="batch"),
        pytest.param(b'{"x": "method", "method": "vm.start"}', _PRE, id="method-as-a-value"),
        pytest.param(b'{"method": "host.stats", "p": ["method"]}', 0, id="value-after"),
        pytest.param(b'{"method": "v\\u006d.start"}', _PARSE, id="escaped-name"),
        pytest.param(b'{"\\u006dethod": "vm.start"}', _PARSE, id="escaped-key"),
        pytest.param('{"method": "vm.start"}'.encode("utf-16-le"), _PARSE, id="utf-16"),
        pytest.param('{"method": "vm.start"}'.encode("utf-16"), _PARSE, id="utf-16-bom"),
        pytest.param('{"method": "vm.start"}'.encode("utf-32-be"), _PARSE, id="utf-32"),
        pytest.param(b'{"method": "host.stats"}\x00', _PARSE, id="zero-byte-past-the-start"),
    ],
)
def test_the_quick_scan_reads_every_spelling_of_a_call(body, needs):
    # One call in the usual spelling is read with bytes.split, anything else with the
    # regex: both must tell the same, down to a name that never ends.
    middleware = WebhookMiddleware(lambda e, s: [], hooks=QUICK_SCAN_HOOKS, environ={})
    assert middleware._scan(body) == needs
    assert middleware._scan(body) == needs  # the second time, from the names it knows
