"""The schema written out in Python (sending/payload_check.py) never passes a payload
that the payload schema rejects, and passes the payloads this package builds."""

from __future__ import annotations

import copy
import itertools

import pytest

from xo_webhooks.request.jsonrpc import Outcome, internal_error
from xo_webhooks.request.payload import post_payload, pre_payload
from xo_webhooks.schema import load_schema, validator
from xo_webhooks.sending.payload_check import applies, digest, surely_valid
from xo_webhooks.sending.validation import PayloadCheck

USER = ("5f3c1e2a", "admin@example.org")
PARAMS = {"id": "0f3a7c4e", "force": False}
BUILT = {
    "pre": pre_payload("c1", USER, "vm.start", PARAMS, 1_700_000_000_000),
    "post result": post_payload("c1", USER, "vm.start", PARAMS, 1, 13,
                                Outcome(result={"power_state": "Running"})),
    "post null result": post_payload("c1", (None, None), "vm.stop", [], 1, 1,
                                     Outcome(result=None)),
    "post error": post_payload("c1", USER, "vm.start", PARAMS, 1, 2, internal_error("boom")),
    "post error with data": post_payload(
        "c1", USER, "vm.start", PARAMS, 1, 2,
        Outcome(error={"code": -32000, "message": "no", "data": {"x": [1]}}),
    ),
}  # fmt: skip
# Values of every JSON type, and the Python look-alikes JSON Schema treats apart.
VALUES = [None, True, False, 0, 1, -1, 1.0, 2.5, "", "x", [], [1], {}, {"code": 1},
          {"code": 1, "message": "m"}, {"code": True, "message": "m"}, (1,)]  # fmt: skip
KEYS = ["type", "callId", "userId", "userName", "method", "params", "timestamp",
        "duration", "result", "error", "extra"]  # fmt: skip


def schema_accepts(payload: object) -> bool:
    return validator("hook-payload").is_valid(payload)


def mutations():
    """Each built payload with one key removed, or set to each of VALUES, or two keys
    changed at once (a type, and a post field)."""
    for name, base in BUILT.items():
        yield name, base
        for key in KEYS:
            if key in base:
                changed = dict(base)
                del changed[key]
                yield f"{name} without {key}", changed
            for i, value in enumerate(VALUES):
                changed = copy.deepcopy(base)
                changed[key] = value
                yield f"{name} {key}={value!r}#{i}", changed
        for (key, value), other in itertools.product(
            [("type", "pre"), ("type", "post"), ("timestamp", 0)], ["duration", "result", "error"]
        ):
            changed = copy.deepcopy(base)
            changed[key] = value
            changed.pop(other, None)
            yield f"{name} {key}={value!r} without {other}", changed


def test_the_check_is_written_for_the_shipped_schema():
    # If this fails, the schema was edited: bring sending/payload_check.py in line
    # with it, then update SCHEMA_DIGEST to the digest printed here.
    schema = load_schema("hook-payload")
    assert applies(schema), f"schema digest now {digest(schema)}"


def test_another_schema_turns_the_check_off():
    schema = load_schema("hook-payload")
    schema["properties"]["callId"]["maxLength"] = 8
    assert not applies(schema)


@pytest.mark.parametrize("name", list(BUILT))
def test_the_payloads_the_package_builds_pass_the_quick_check(name):
    assert surely_valid(BUILT[name]) and schema_accepts(BUILT[name])


def test_the_quick_check_never_passes_what_the_schema_rejects():
    checked = passed = 0
    for name, payload in mutations():
        checked += 1
        if surely_valid(payload):
            passed += 1
            assert schema_accepts(payload), name
    # The mutations reach both answers: it is no check that says False to everything.
    assert checked > 500 and 20 < passed < checked - 300


def test_what_the_quick_check_does_not_know_is_judged_by_the_schema():
    # 1.0 is an integer to JSON Schema; the quick check leaves it to jsonschema.
    payload = dict(BUILT["pre"], timestamp=1.0)
    assert not surely_valid(payload) and schema_accepts(payload)
    assert PayloadCheck().problem(payload) is None
    bad = dict(BUILT["pre"], timestamp=-1)
    assert PayloadCheck().problem(bad) == "invalid payload at $.timestamp: fails 'minimum' (0)"
