"""Hook payloads: what the Xen Orchestra plugin sends, field by field.

The request thread only assembles a small dict (:func:`pre_payload`,
:func:`post_payload`); redaction and rendering run later, on the sending side
(:mod:`xo_webhooks.sending.redaction`, :mod:`xo_webhooks.sending.formats`).
"""

from __future__ import annotations

from typing import Any

from .jsonrpc import Outcome

__all__ = ["pre_payload", "post_payload", "User"]

User = tuple[str | None, str | None]


def pre_payload(
    call_id: str, user: User, method: str, params: Any, timestamp: int
) -> dict[str, Any]:
    """The payload of a ``pre`` hook; *timestamp* is the call's start in epoch ms."""
    return {
        "type": "pre",
        "callId": call_id,
        "userId": user[0],
        "userName": user[1],
        "method": method,
        "params": params,
        "timestamp": timestamp,
    }


def post_payload(
    call_id: str, user: User, method: str, params: Any, start: int, end: int, outcome: Outcome
) -> dict[str, Any]:
    """The payload of a ``post`` hook; *start* and *end* are epoch ms."""
    payload = pre_payload(call_id, user, method, params, end)
    payload["type"] = "post"
    payload["duration"] = max(0, end - start)
    if outcome.error is not None:
        payload["error"] = outcome.error
    else:
        payload["result"] = outcome.result
    return payload
