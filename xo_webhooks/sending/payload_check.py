"""The hook payload schema written out in Python, to pass valid payloads in a few µs.

``jsonschema`` walks ``schemas/hook-payload.schema.json`` in about 45 µs per payload
here, nearly half of a delivery's CPU. :func:`surely_valid` checks the same rules
directly, for the payloads this package builds: it answers ``True`` only for a payload
the schema accepts, and ``False`` for anything else, including payloads the schema
would accept in a form this check does not expect (``1.0`` as an integer, a tuple).
``False`` means "ask ``jsonschema``", never "invalid": the schema stays the judge, and
tells what is wrong.

The check is written for one version of the schema, named by its digest; another
version (an edited schema) turns it off (:func:`applies`), and a test says so.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["surely_valid", "applies", "SCHEMA_DIGEST"]

#: The digest of the schema :func:`surely_valid` was written for (see :func:`digest`).
SCHEMA_DIGEST = "sha256:0dc048b7"

_KEYS = frozenset(
    ("type", "callId", "userId", "userName", "method", "params", "timestamp",
     "duration", "result", "error")
)  # fmt: skip
_POST_ONLY = ("duration", "result", "error")


def digest(schema: dict[str, Any]) -> str:
    """A short digest of *schema*'s content, whatever its layout."""
    canonical = json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(canonical).hexdigest()[:8]


def applies(schema: dict[str, Any]) -> bool:
    """Whether :func:`surely_valid` was written for *schema*."""
    return digest(schema) == SCHEMA_DIGEST


def surely_valid(payload: Any) -> bool:
    """Whether *payload* is certainly valid under the payload schema (see the module)."""
    if type(payload) is not dict or not _KEYS.issuperset(payload):
        return False
    get = payload.get
    call_id, method, user_id, user_name = (
        get("callId"), get("method"), get("userId"), get("userName")
    )  # fmt: skip
    if not (
        type(call_id) is str and call_id
        and type(method) is str and method
        and (user_id is None or type(user_id) is str)
        and (user_name is None or type(user_name) is str)
        and "userId" in payload and "userName" in payload
        and type(get("params")) in (dict, list)
        and _count(get("timestamp"))
    ):  # fmt: skip
        return False
    kind = get("type")
    if kind == "pre" and type(kind) is str:
        return not any(key in payload for key in _POST_ONLY)
    if kind != "post" or type(kind) is not str or not _count(get("duration")):
        return False
    if "result" in payload:
        return "error" not in payload
    error = get("error")
    return (
        type(error) is dict and type(error.get("code")) is int and type(error.get("message")) is str
    )


def _count(value: Any) -> bool:
    """A JSON integer of at least 0 (never a bool: JSON has no such integer)."""
    return type(value) is int and value >= 0
