"""Hook payloads: what the Xen Orchestra plugin sends, field by field.

The request thread only assembles a small dict (:func:`pre_payload`,
:func:`post_payload`); redaction and serialisation (:func:`redact_payload`,
:func:`serialize`) run later, on a delivery thread.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache
from typing import Any, Optional

from . import formats
from .jsonrpc import Outcome

__all__ = ["pre_payload", "post_payload", "redact", "redact_payload", "serialize", "REDACTED"]

REDACTED = "***"
User = tuple[Optional[str], Optional[str]]


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


def redact(value: Any, words: Iterable[str]) -> Any:
    """Return *value* with every value under a key whose name contains one of *words*
    replaced by ``"***"``, at any depth. Case, ``-`` and ``_`` are ignored, so
    ``api_key`` also catches ``X-Api-Key`` and ``apiKey``. *value* is not modified."""
    words = tuple(sorted({_normalize(w) for w in words}))
    if not words:
        return value
    return _redact(value, words)


def _normalize(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


@lru_cache(maxsize=4096)
def _is_secret(key: str, words: tuple[str, ...]) -> bool:
    # Payloads repeat the same few keys: the answer is cached per key and word list.
    name = _normalize(key)
    return any(w in name for w in words)


def _redact(value: Any, words: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {
            k: REDACTED if _is_secret(str(k), words) else _redact(v, words)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact(v, words) for v in value]
    return value


def redact_payload(payload: dict[str, Any], words: Iterable[str]) -> dict[str, Any]:
    """Return a copy of *payload* with secrets redacted in ``params``, ``result`` and
    ``error.data``; the same object when *words* is empty."""
    words = tuple(words)
    if not words:
        return payload
    payload = dict(payload)
    for key in ("params", "result"):
        if key in payload:
            payload[key] = redact(payload[key], words)
    error = payload.get("error")
    if isinstance(error, dict) and "data" in error:
        payload["error"] = {**error, "data": redact(error["data"], words)}
    return payload


def serialize(payload: dict[str, Any], fmt: str = "json") -> bytes:
    """Format *payload* as *fmt* and serialise it into the bytes of a request body."""
    body = formats.render(payload, fmt)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
