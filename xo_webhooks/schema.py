"""Access to the JSON Schemas shipped with the package.

Consumer projects use these to validate what they receive::

    from xo_webhooks.schema import validate_payload
    validate_payload(json.loads(body))   # raises jsonschema.ValidationError
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, ValidationError

from ._text import shorten

__all__ = ["load_schema", "validator", "validate_payload", "error_message"]

SCHEMA_NAMES = ("hook-payload", "config")


def load_schema(name: str) -> dict[str, Any]:
    """Return a fresh copy of the schema called *name* (``"hook-payload"`` or ``"config"``)."""
    if name not in SCHEMA_NAMES:
        raise ValueError(f"unknown schema {name!r}; expected one of {list(SCHEMA_NAMES)}")
    text = resources.files("xo_webhooks.schemas").joinpath(f"{name}.schema.json").read_text("utf-8")
    return json.loads(text)


@cache
def validator(name: str) -> Draft202012Validator:
    """Return a cached validator for the schema called *name*."""
    return Draft202012Validator(load_schema(name))


def validate_payload(payload: Any) -> None:
    """Raise :class:`jsonschema.ValidationError` unless *payload* is a valid hook payload."""
    validator("hook-payload").validate(payload)


def error_message(error: ValidationError, limit: int = 300) -> str:
    """A validation error's message for people: what is wrong, without quoting a
    whole object or array (it may be large, or hold a secret), on one line of at most
    *limit* characters. The configuration, the receiver, the test receiver and
    ``xo-webhooks validate`` all describe errors with it."""
    alternatives = error.validator_value if error.validator == "oneOf" else None
    if isinstance(alternatives, list) and all(
        isinstance(a, dict) and "required" in a for a in alternatives
    ):
        return "must have exactly one of " + " or ".join(
            "+".join(a["required"]) for a in alternatives
        )
    if error.validator == "not" and error.validator_value == {}:  # a `false` schema
        # The payload schema's `if type is pre, then...` branch forbids the post fields.
        return "not allowed in a pre hook" if error.schema_path[0] == "then" else "not allowed"
    if error.validator == "const" and "description" in error.schema:
        # A bare "False was expected" says little; the schema's description says why.
        return shorten(f"{error.instance!r} is not allowed: {error.schema['description']}", limit)
    message = error.message
    if isinstance(error.instance, (dict, list)):
        kind = "the object" if isinstance(error.instance, dict) else "the array"
        if error.validator == "type":
            message = f"expected {error.validator_value}, got {kind.replace('the', 'an')}"
        elif message.startswith(repr(error.instance)):
            message = kind + message[len(repr(error.instance)) :]
        elif error.validator not in ("required", "additionalProperties"):
            message = f"{kind} is invalid ({error.validator})"
    return shorten(message, limit)
