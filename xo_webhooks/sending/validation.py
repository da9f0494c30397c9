"""Checks ``json``-format payloads against ``schemas/hook-payload.schema.json`` before
they are signed and sent (``XO_WEBHOOKS_VALIDATE``, on by default: a few µs per hook,
see :mod:`.payload_check`).

The check runs on the delivery thread, never on the request path: the payload is
checked once it is built and redacted, as it will be serialised. An invalid payload
is not sent: its attempt is final, so the dispatcher gives the hook up at once (reason
``invalid_payload``) and dead-letters it with the schema error as ``lastError``. The
receivers of other formats (Slack, Office 365, Teams) get no payload of this schema,
and are not checked. The error names where and what, never the value found there: it
may hold a secret that redaction, which goes by key names, did not catch.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from jsonschema.exceptions import ValidationError, best_match

from ..schema import error_message, load_schema, validator
from .payload_check import applies, surely_valid
from .policy import Attempt

__all__ = ["PayloadCheck", "INVALID_PAYLOAD", "MAX_LOGGED_METHODS"]

logger = logging.getLogger(__name__)

#: The give-up reason of a hook whose payload the schema rejects.
INVALID_PAYLOAD = "invalid_payload"
#: Methods whose invalid payloads are logged (once each); past that, those of other
#: methods are still dead-lettered, and the dead-letter log still tells of them.
MAX_LOGGED_METHODS = 1024


class PayloadCheck:
    """The schema check of the hook payloads one sender sends.

    A payload as this package builds it passes :func:`.payload_check.surely_valid`,
    the schema written out in Python (a few µs); any other is judged by the compiled
    ``jsonschema`` validator, built once per process (:func:`xo_webhooks.schema.validator`
    caches it) and shared by every delivery thread. Only an invalid payload pays for
    finding the most relevant error.
    """

    def __init__(self) -> None:
        self._validator = validator("hook-payload")
        self._quick = surely_valid if applies(load_schema("hook-payload")) else None
        self._lock = threading.Lock()
        self._logged: set[str] = set()  # methods whose invalid payloads were logged

    def problem(self, payload: Any) -> str | None:
        """Why *payload* is not a valid hook payload (``invalid payload at $.userId:
        expected string or null, got integer``), or ``None`` when it is."""
        quick = self._quick
        if (quick is not None and quick(payload)) or self._validator.is_valid(payload):
            return None
        error = best_match(self._validator.iter_errors(payload))
        return f"invalid payload at {error.json_path}: {_without_value(error)}"

    def check(self, payload: Any) -> Attempt | None:
        """``None`` when *payload* may be sent; else the final :class:`Attempt` that
        stands for it (no answer, not worth a retry: the breaker learns nothing), with
        a warning logged the first time a payload of its method is invalid."""
        problem = self.problem(payload)
        if problem is None:
            return None
        method = payload.get("method") if isinstance(payload, dict) else None
        self._warn(str(method), problem)
        return Attempt(False, problem, reason=INVALID_PAYLOAD)

    def _warn(self, method: str, problem: str) -> None:
        with self._lock:  # once per method: an app bug would otherwise flood the log
            if method in self._logged or len(self._logged) >= MAX_LOGGED_METHODS:
                return
            self._logged.add(method)
        logger.warning(
            "not sending the hooks of %r whose payload the schema rejects (they are "
            "dead-lettered; logged once per method): %s",
            method, problem,
        )  # fmt: skip


#: JSON's names of Python's types, as the schema speaks of them.
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean",
               int: "integer", float: "number", type(None): "null"}  # fmt: skip


def _without_value(error: ValidationError) -> str:
    """What is wrong, in the schema's terms, without quoting the value found."""
    if error.validator == "type":
        expected = error.validator_value
        names = expected if isinstance(expected, list) else [expected]
        found = _JSON_TYPES.get(type(error.instance), type(error.instance).__name__)
        return f"expected {' or '.join(map(str, names))}, got {found}"
    if error.validator in ("required", "additionalProperties", "not", "oneOf"):
        return error_message(error)  # names keys (the payload's, or the schema's) only
    if error.validator == "minLength":
        minimum = error.validator_value
        return "must not be empty" if minimum == 1 else f"shorter than {minimum} characters"
    if error.validator in ("const", "enum"):
        return f"must be one of {error.validator_value!r}"
    return f"fails {error.validator!r} ({error.validator_value!r})"
