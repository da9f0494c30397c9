"""Tests of xo_webhooks.request.jsonrpc: finding calls in requests and outcomes in responses.

Nothing here may raise on bad input: ``None`` means "not JSON-RPC, pass it through".
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from xo_webhooks.request.jsonrpc import (
    INTERNAL_ERROR,
    Call,
    Outcome,
    internal_error,
    outcome_key,
    parse_calls,
    parse_outcomes,
)


def body(document: Any) -> bytes:
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        pytest.param(
            {"jsonrpc": "2.0", "method": "vm.start", "params": {"id": "v1"}, "id": 1},
            Call("vm.start", {"id": "v1"}, 1),
            id="2.0",
        ),
        pytest.param(
            {"method": "vm.start", "params": {"id": "v1"}, "id": "a"},
            Call("vm.start", {"id": "v1"}, "a"),
            id="1.0-style-no-version",
        ),
        pytest.param(
            {"jsonrpc": "1.0", "method": "m", "params": [], "id": 0},
            Call("m", [], 0),
            id="explicit-1.0",
        ),
        pytest.param(
            {"jsonrpc": "2.0", "method": "m", "params": [1, "two"], "id": 2},
            Call("m", [1, "two"], 2),
            id="array-params",
        ),
        pytest.param({"jsonrpc": "2.0", "method": "m", "id": 3}, Call("m", {}, 3), id="no-params"),
        pytest.param({"method": "m", "params": None, "id": 4}, Call("m", {}, 4), id="null-params"),
        pytest.param(
            {"jsonrpc": "2.0", "method": "m"},
            Call("m", {}, None, is_notification=True),
            id="2.0-notification",
        ),
        pytest.param(
            {"method": "m", "params": [], "id": None},
            Call("m", [], None, is_notification=True),
            id="1.0-null-id-notification",
        ),
        pytest.param(
            {"jsonrpc": "2.0", "method": "m", "id": None},
            Call("m", {}, None, is_notification=False),
            id="2.0-null-id-is-a-call",
        ),
        pytest.param(
            {"jsonrpc": "2.0", "method": "m", "id": {"k": 1}},
            Call("m", {}, {"k": 1}),
            id="object-id-kept",
        ),
    ],
)
def test_parse_single_call(document: Any, expected: Call) -> None:
    assert parse_calls(body(document)) == [expected]


def test_parse_batch_keeps_order() -> None:
    batch = [
        {"jsonrpc": "2.0", "method": "vm.start", "params": {"id": "a"}, "id": 1},
        {"jsonrpc": "2.0", "method": "vm.stop"},
        {"jsonrpc": "2.0", "method": "vm.start", "params": {"id": "b"}, "id": 2},
    ]
    assert parse_calls(body(batch)) == [
        Call("vm.start", {"id": "a"}, 1),
        Call("vm.stop", {}, None, is_notification=True),
        Call("vm.start", {"id": "b"}, 2),
    ]


def test_parse_accepts_bytes_in_any_json_encoding() -> None:
    document = {"method": "vm.start", "params": {"name": "héllo"}, "id": 1}
    for encoding in ("utf-8", "utf-16", "utf-32"):
        text = json.dumps(document, ensure_ascii=False)
        assert parse_calls(text.encode(encoding)) == [Call("vm.start", {"name": "héllo"}, 1)]


VALID = {"jsonrpc": "2.0", "method": "m", "id": 1}

NOT_CALLS = [
    pytest.param(b"", id="empty-body"),
    pytest.param(b"{not json", id="malformed"),
    pytest.param(b"\xff\xfe\xfa", id="not-text"),
    pytest.param(b"method=vm.start", id="form-encoded"),
    pytest.param(b'"vm.start"', id="string"),
    pytest.param(b"42", id="number"),
    pytest.param(b"null", id="null"),
    pytest.param(b"[]", id="empty-batch"),
    pytest.param(body([VALID, 1]), id="batch-with-scalar"),
    pytest.param(body([VALID, {"jsonrpc": "2.0", "id": 2}]), id="batch-member-no-method"),
    pytest.param(body([[VALID]]), id="nested-batch"),
    pytest.param(body({"jsonrpc": "3.0", "method": "m", "id": 1}), id="version-3.0"),
    pytest.param(body({"jsonrpc": 2.0, "method": "m", "id": 1}), id="version-number"),
    pytest.param(body({"jsonrpc": "2.0", "id": 1}), id="no-method"),
    pytest.param(body({"jsonrpc": "2.0", "method": "", "id": 1}), id="empty-method"),
    pytest.param(body({"jsonrpc": "2.0", "method": 5, "id": 1}), id="method-number"),
    pytest.param(body({"jsonrpc": "2.0", "method": ["m"], "id": 1}), id="method-list"),
    pytest.param(body({"jsonrpc": "2.0", "method": None, "id": 1}), id="method-null"),
    pytest.param(body({**VALID, "params": "x"}), id="params-string"),
    pytest.param(body({**VALID, "params": 3}), id="params-number"),
    pytest.param(body({**VALID, "params": True}), id="params-bool"),
    pytest.param(b"[" * 100_000, id="deeply-nested-array"),
    pytest.param(b'{"a":' * 100_000, id="deeply-nested-object"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deeply-nested-well-formed"),
]


@pytest.mark.parametrize("raw", NOT_CALLS)
def test_not_a_call(raw: bytes) -> None:
    assert parse_calls(raw) is None


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        pytest.param(
            {"jsonrpc": "2.0", "result": {"ok": True}, "id": 1},
            {1: Outcome(result={"ok": True})},
            id="result",
        ),
        pytest.param({"jsonrpc": "2.0", "result": None, "id": "a"}, {"a": Outcome()}, id="null"),
        pytest.param({"result": 3, "error": None, "id": 1}, {1: Outcome(result=3)}, id="1.0-style"),
        pytest.param(
            {"jsonrpc": "2.0", "error": {"code": -32601, "message": "nope", "data": [1]}, "id": 7},
            {7: Outcome(error={"code": -32601, "message": "nope", "data": [1]})},
            id="error",
        ),
        pytest.param(
            {"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": None},
            {None: Outcome(error={"code": -32700, "message": "Parse error"})},
            id="error-null-id",
        ),
        pytest.param(
            [{"result": 1, "id": 1}, {"error": {"code": 1, "message": "m"}, "id": 2}],
            {1: Outcome(result=1), 2: Outcome(error={"code": 1, "message": "m"})},
            id="batch",
        ),
        pytest.param(
            {"result": 1, "id": {"b": 2, "a": 1}},
            {outcome_key({"a": 1, "b": 2}): Outcome(result=1)},
            id="object-id",
        ),
        pytest.param([], {}, id="empty-batch-is-empty"),
    ],
)
def test_parse_outcomes(document: Any, expected: dict) -> None:
    expected = {outcome_key(k) if not isinstance(k, tuple) else k: v for k, v in expected.items()}
    assert parse_outcomes(body(document)) == expected


NOT_RESPONSES = [
    pytest.param(b"<html>oops</html>", id="html"),
    pytest.param(b"", id="empty"),
    pytest.param(b'"ok"', id="string"),
    pytest.param(body({"result": 1}), id="no-id"),
    pytest.param(body({"id": 1}), id="neither-result-nor-error"),
    pytest.param(body({"id": 1, "error": None}), id="null-error-no-result"),
    pytest.param(body([{"result": 1, "id": 1}, 2]), id="batch-with-scalar"),
    pytest.param(body([{"result": 1, "id": 1}, {"id": 2}]), id="batch-with-invalid-member"),
    pytest.param(body({"id": 1, "error": "boom"}), id="error-string"),
    pytest.param(body({"id": 1, "error": {"message": "m"}}), id="error-no-code"),
    pytest.param(body({"id": 1, "error": {"code": "1", "message": "m"}}), id="code-string"),
    pytest.param(body({"id": 1, "error": {"code": 1.5, "message": "m"}}), id="code-float"),
    pytest.param(body({"id": 1, "error": {"code": True, "message": "m"}}), id="code-bool"),
    pytest.param(body({"id": 1, "error": {"code": 1}}), id="error-no-message"),
    pytest.param(body({"id": 1, "error": {"code": 1, "message": 2}}), id="message-number"),
    pytest.param(body({"id": 1, "error": False, "result": 1}), id="error-false"),
    pytest.param(b"[" * 100_000, id="deeply-nested"),
]


@pytest.mark.parametrize("raw", NOT_RESPONSES)
def test_not_a_response(raw: bytes) -> None:
    assert parse_outcomes(raw) is None


@pytest.mark.parametrize(
    ("request_id", "expected"),
    [
        pytest.param(1, ("number", 1), id="int"),
        pytest.param(1.0, ("number", 1), id="float-is-the-same-number"),
        pytest.param(True, ("bool", True), id="bool"),
        pytest.param("1", ("string", "1"), id="string"),
        pytest.param(None, None, id="null"),
        pytest.param(1.5, ("number", 1.5), id="float"),
        pytest.param({"b": 1, "a": [2]}, ("json", '{"a": [2], "b": 1}'), id="object-sorted"),
        pytest.param([1, "x"], ("json", '[1, "x"]'), id="array"),
    ],
)
def test_outcome_key(request_id: Any, expected: Any) -> None:
    assert outcome_key(request_id) == expected
    hash(outcome_key(request_id))  # usable as a dict key


def test_outcome_key_keeps_string_and_int_ids_apart() -> None:
    outcomes = parse_outcomes(body([{"result": "int", "id": 1}, {"result": "str", "id": "1"}]))
    assert outcomes == {
        outcome_key(1): Outcome(result="int"),
        outcome_key("1"): Outcome(result="str"),
    }


def test_outcomes_are_found_under_the_request_ids() -> None:
    calls = parse_calls(body([{"method": "m", "id": i} for i in (1, "x", {"n": 1}, [2])]))
    assert calls is not None
    responses = [{"result": n, "id": call.id} for n, call in enumerate(calls)]
    outcomes = parse_outcomes(body(responses))
    assert outcomes is not None
    assert [outcomes[outcome_key(c.id)].result for c in calls] == [0, 1, 2, 3]


def test_internal_error() -> None:
    outcome = internal_error("app raised ZeroDivisionError")
    assert INTERNAL_ERROR == -32603
    assert outcome == Outcome(error={"code": -32603, "message": "app raised ZeroDivisionError"})
    assert outcome.result is None


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_json_constants_are_read_as_the_apps_parser_reads_them(constant: bytes) -> None:
    # Python's json (Flask's) takes them, so the app runs such a call: it is inspected
    # (its hooks get stand-ins for these values: see test_redaction).
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "vm.start", "params": {"x": ' + constant + b"}}"
    (call,) = parse_calls(body) or []
    assert repr(call.params["x"]) == repr(json.loads(constant))
    outcomes = parse_outcomes(b'{"jsonrpc": "2.0", "id": 1, "result": ' + constant + b"}")
    assert outcomes is not None
    assert repr(outcomes[outcome_key(1)].result) == repr(json.loads(constant))


def test_ids_are_matched_with_their_json_type() -> None:
    # true is never 1 (Python's True == 1), nor "1"; 1 and 1.0 are one number.
    outcomes = parse_outcomes(
        body(
            [{"result": "bool", "id": True}, {"result": "int", "id": 1}, {"result": "s", "id": "1"}]
        )
    )
    assert outcomes is not None
    assert outcomes[outcome_key(True)].result == "bool"
    assert outcomes[outcome_key(1)].result == "int"
    assert outcomes[outcome_key(1.0)].result == "int"
    assert outcomes[outcome_key("1")].result == "s"
