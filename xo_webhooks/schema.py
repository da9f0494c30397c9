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

from jsonschema import Draft202012Validator

__all__ = ["load_schema", "validator", "validate_payload"]

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
