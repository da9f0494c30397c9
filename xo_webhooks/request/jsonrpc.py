"""JSON-RPC 2.0 (and 1.0-style) parsing: just enough to find calls and their outcomes.

Nothing here raises on bad input: a body that is not JSON-RPC yields ``None`` and the
middleware passes the request through untouched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["Call", "Outcome", "parse_calls", "parse_outcomes", "outcome_key", "internal_error"]

INTERNAL_ERROR = -32603
_MISSING: Any = object()


@dataclass(frozen=True)
class Call:
    """One JSON-RPC call of a request (a batch holds several).

    :param method: the method name.
    :param params: the params as sent; ``{}`` when the call has none.
    :param id: the request id; ``None`` for a notification (see ``is_notification``).
    :param is_notification: the call has no ``id`` member, so expects no response.
    """

    method: str
    params: dict[str, Any] | list[Any]
    id: Any = None
    is_notification: bool = False


@dataclass(frozen=True)
class Outcome:
    """What a call ended with: a result, or a JSON-RPC error object."""

    result: Any = None
    error: dict[str, Any] | None = None


def internal_error(message: str) -> Outcome:
    """An outcome carrying the JSON-RPC internal error (-32603) with *message*."""
    return Outcome(error={"code": INTERNAL_ERROR, "message": message})


#: Reads what the app's own parser would: Python's ``json`` takes ``NaN`` and
#: ``Infinity`` (Flask's does), so a call holding them is inspected too; a hook's
#: payload gets stand-ins for them (see ``sending/redaction.py``).
_DECODER = json.JSONDecoder()


def _loads(body: bytes) -> Any:
    return _DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))


def parse_calls(body: bytes) -> list[Call] | None:
    """Return the calls of a JSON-RPC request body, or ``None`` if it is not one.

    A batch whose members are not all valid calls is not inspected at all: the app
    answers it as it sees fit, and no hook is sent for a request it rejects.
    """
    try:
        data = _loads(body)
    except (ValueError, RecursionError):
        return None
    items = data if isinstance(data, list) else [data]
    if not items:
        return None
    calls = []
    for item in items:
        call = _parse_call(item)
        if call is None:
            return None
        calls.append(call)
    return calls


def _parse_call(item: Any) -> Call | None:
    if not isinstance(item, dict):
        return None
    method = item.get("method")
    version = item.get("jsonrpc", _MISSING)
    if not isinstance(method, str) or not method or version not in (_MISSING, "2.0", "1.0"):
        return None
    params = item.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, (dict, list)):
        return None
    if "id" not in item:
        return Call(method, params, None, is_notification=True)
    # JSON-RPC 1.0 marks notifications with "id": null; 2.0 allows null ids but
    # discourages them. Both get a post hook once the app has answered.
    return Call(method, params, item["id"], is_notification=version != "2.0" and item["id"] is None)


def parse_outcomes(body: bytes) -> dict[Any, Outcome] | None:
    """Map each response id of a JSON-RPC response body to its outcome.

    Returns ``None`` when the body is not a JSON-RPC response. An error response to a
    request the server could not identify has the id ``None``.
    """
    try:
        data = _loads(body)
    except (ValueError, RecursionError):
        return None
    items = data if isinstance(data, list) else [data]
    outcomes: dict[Any, Outcome] = {}
    for item in items:
        if not isinstance(item, dict) or "id" not in item:
            return None
        outcome = _parse_outcome(item)
        if outcome is None:
            return None
        outcomes[outcome_key(item["id"])] = outcome
    return outcomes


def _parse_outcome(item: dict[str, Any]) -> Outcome | None:
    error = item.get("error")
    if error is not None:
        valid = (
            isinstance(error, dict)
            and isinstance(error.get("code"), int)
            and not isinstance(error.get("code"), bool)
            and isinstance(error.get("message"), str)
        )
        return Outcome(error=error) if valid else None
    if "result" in item:
        return Outcome(result=item["result"])
    return None


def outcome_key(request_id: Any) -> Any:
    """The key under which :func:`parse_outcomes` files the response to *request_id*.

    An id is matched with its JSON type: ``true`` is never the id ``1`` (Python's
    ``True == 1`` would say so), nor ``"1"``. Numbers are matched by value, so ``1``
    and ``1.0`` are one id: a server may write back ``1.0`` as ``1`` (JavaScript
    does), and JSON-RPC 2.0 says ids should have no fractional part. ``None`` (null)
    stays ``None``: the id of an error the server could not tie to a call.
    """
    if request_id is None:
        return None
    if isinstance(request_id, bool):
        return ("bool", request_id)
    if isinstance(request_id, (int, float)):
        return ("number", request_id)
    if isinstance(request_id, str):
        return ("string", request_id)
    # Objects and arrays (not valid ids, but seen) are unhashable: filed by their text.
    return ("json", json.dumps(request_id, sort_keys=True))
