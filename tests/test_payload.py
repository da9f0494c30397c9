"""Hook payloads: building them (request.payload), redacting them (sending.redaction)
and serialising them (sending.formats.serialize).

Every payload built here is also checked against the published JSON Schema.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
from typing import Any

import pytest

from xo_webhooks.config import DEFAULT_REDACT
from xo_webhooks.request.jsonrpc import Outcome, internal_error
from xo_webhooks.request.payload import post_payload, pre_payload
from xo_webhooks.schema import validate_payload
from xo_webhooks.sending.formats import serialize
from xo_webhooks.sending.redaction import MAX_DEPTH, REDACTED, TOO_DEEP, clean_payload, redact

USER = ("u-42", "alice@example.com")
PARAMS = {"id": "vm-1", "force": False}


def test_pre_payload_field_by_field() -> None:
    payload = pre_payload("call-1", USER, "vm.start", PARAMS, 1_700_000_000_000)
    assert payload == {
        "type": "pre",
        "callId": "call-1",
        "userId": "u-42",
        "userName": "alice@example.com",
        "method": "vm.start",
        "params": PARAMS,
        "timestamp": 1_700_000_000_000,
    }
    validate_payload(payload)


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        pytest.param(Outcome(result={"ok": True}), {"result": {"ok": True}}, id="result"),
        pytest.param(Outcome(result=None), {"result": None}, id="null-result"),
        pytest.param(Outcome(result=[1, 2]), {"result": [1, 2]}, id="array-result"),
        pytest.param(
            Outcome(error={"code": 12, "message": "no such VM", "data": {"id": "vm-1"}}),
            {"error": {"code": 12, "message": "no such VM", "data": {"id": "vm-1"}}},
            id="error",
        ),
        pytest.param(
            internal_error("boom"),
            {"error": {"code": -32603, "message": "boom"}},
            id="internal-error",
        ),
    ],
)
def test_post_payload_field_by_field(outcome: Outcome, expected: dict) -> None:
    payload = post_payload("call-1", USER, "vm.start", PARAMS, 1000, 1532, outcome)
    assert payload == {
        "type": "post",
        "callId": "call-1",
        "userId": "u-42",
        "userName": "alice@example.com",
        "method": "vm.start",
        "params": PARAMS,
        "timestamp": 1532,
        "duration": 532,
        **expected,
    }
    assert not ("result" in payload and "error" in payload)
    validate_payload(payload)


@pytest.mark.parametrize(
    ("start", "end", "duration"),
    [
        pytest.param(1000, 1000, 0, id="instant"),
        pytest.param(1000, 999, 0, id="clock-went-back"),
        pytest.param(5000, 0, 0, id="far-back"),
        pytest.param(0, 86_400_000, 86_400_000, id="a-day"),
    ],
)
def test_duration_is_never_negative(start: int, end: int, duration: int) -> None:
    payload = post_payload("c", USER, "m", {}, start, end, Outcome(result=1))
    assert (payload["duration"], payload["timestamp"]) == (duration, end)
    validate_payload(payload)


@pytest.mark.parametrize(
    ("user", "params"),
    [
        pytest.param((None, None), {}, id="anonymous"),
        pytest.param(("u", None), [], id="no-name"),
        pytest.param((None, "bob"), [1, {"a": None}], id="no-id-array-params"),
    ],
)
def test_payloads_with_missing_users_validate(user: Any, params: Any) -> None:
    pre = pre_payload("c", user, "m", params, 0)
    post = post_payload("c", user, "m", params, 0, 1, Outcome(result=params))
    assert (pre["userId"], pre["userName"]) == user
    validate_payload(pre)
    validate_payload(post)


@pytest.mark.parametrize(
    ("key", "redacted"),
    [
        pytest.param("password", True, id="exact"),
        pytest.param("userPassword", True, id="camel-case"),
        pytest.param("PASSWORD_CONFIRM", True, id="upper-case"),
        pytest.param("X-Api_Key", True, id="header-style-underscore"),
        pytest.param("X-Api-Key", True, id="header-style-hyphen"),
        pytest.param("private-key", True, id="hyphenated-private-key"),
        pytest.param("apiKey", True, id="apikey"),
        pytest.param("Authorization", True, id="authorization"),
        pytest.param("set-cookie", True, id="cookie"),
        pytest.param("refresh_token", True, id="token"),
        pytest.param("sshPrivateKey", True, id="private-key"),
        pytest.param("clientSecrets", True, id="plural"),
        pytest.param("name", False, id="harmless"),
        pytest.param("pass", False, id="shorter-than-a-word"),
        pytest.param("tok", False, id="prefix-of-a-word"),
    ],
)
def test_default_words(key: str, redacted: bool) -> None:
    value = {key: {"nested": "hunter2"}}
    assert redact(value, DEFAULT_REDACT) == {key: REDACTED if redacted else value[key]}


@pytest.mark.parametrize("word", ["private_key", "private-key", "Private_Key", "privatekey"])
@pytest.mark.parametrize(
    "key", ["privateKey", "private_key", "PRIVATE-KEY", "sshPrivate_Key", "x-private-key"]
)
def test_custom_words_ignore_case_hyphens_and_underscores(word: str, key: str) -> None:
    # Either side may be written snake_case, kebab-case or camelCase.
    value = {key: "-----BEGIN KEY-----", "public_key": "ssh-ed25519 AAAA"}
    assert redact(value, [word]) == {key: REDACTED, "public_key": "ssh-ed25519 AAAA"}


def test_words_are_case_insensitive_substrings() -> None:
    value = {"pinCode": 1234, "SPINNER": "on", "Pin": 1, "other": 2}
    expected = {"pinCode": REDACTED, "SPINNER": REDACTED, "Pin": REDACTED, "other": 2}
    assert redact(value, ["PIN"]) == expected


def test_redact_at_any_depth_and_inside_lists() -> None:
    value = {
        "vm": {"name": "web", "login": {"password": "p1", "user": "root"}},
        "disks": [{"token": "t1", "size": 1}, [{"size": 2, "api_key": "k"}]],
        "tags": ["password", "hunter2"],  # list items are values, not keys
        "secret": {"even": ["a", "whole", {"subtree": 1}]},
    }
    assert redact(value, DEFAULT_REDACT) == {
        "vm": {"name": "web", "login": {"password": REDACTED, "user": "root"}},
        "disks": [{"token": REDACTED, "size": 1}, [{"size": 2, "api_key": REDACTED}]],
        "tags": ["password", "hunter2"],
        "secret": REDACTED,
    }


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("password", id="string"),
        pytest.param(42, id="number"),
        pytest.param(None, id="null"),
        pytest.param(["token", 1], id="list-of-scalars"),
    ],
)
def test_values_without_keys_are_kept(value: Any) -> None:
    assert redact(value, DEFAULT_REDACT) == value


def test_redact_does_not_mutate_its_input() -> None:
    value = {"a": [{"password": "p"}], "b": {"token": "t", "c": {"secret": 1}}}
    before = copy.deepcopy(value)
    redacted = redact(value, DEFAULT_REDACT)
    assert value == before
    assert redacted["a"][0] is not value["a"][0]


def test_empty_word_list_disables_redaction() -> None:
    value = {"password": "p"}
    assert redact(value, []) is value
    payload = pre_payload("c", USER, "m", value, 0)
    assert clean_payload(payload, ()).payload is payload


def test_clean_payload_redacts_params_result_and_error_data_only() -> None:
    secret = {"password": "p", "ok": 1}
    error = {"code": 1, "message": "bad password", "data": [secret]}
    for payload in (
        pre_payload("c", ("password", "token"), "user.set", secret, 0),
        post_payload("c", ("password", "token"), "m", secret, 0, 1, Outcome(result=secret)),
        post_payload("c", ("password", "token"), "m", secret, 0, 1, Outcome(error=error)),
    ):
        before = copy.deepcopy(payload)
        redacted = clean_payload(payload, DEFAULT_REDACT).payload
        assert payload == before
        assert redacted["params"] == {"password": REDACTED, "ok": 1}
        assert (redacted["userId"], redacted["userName"]) == ("password", "token")
        if "result" in payload:
            assert redacted["result"] == {"password": REDACTED, "ok": 1}
        if "error" in payload:
            assert redacted["error"] == {**error, "data": [{"password": REDACTED, "ok": 1}]}
        validate_payload(redacted)


def test_error_without_data_is_kept() -> None:
    payload = post_payload("c", USER, "m", {}, 0, 1, Outcome(error={"code": 1, "message": "m"}))
    assert clean_payload(payload, DEFAULT_REDACT).payload["error"] == {"code": 1, "message": "m"}


def test_serialize_compact_utf8_json() -> None:
    payload = pre_payload("c", (None, "José"), "vm.start", {"name": "café ☕", "n": [1, 2]}, 5)
    raw = serialize(payload)
    assert isinstance(raw, bytes)
    assert raw.startswith(b'{"type":"pre","callId":"c",')
    assert b", " not in raw and b": " not in raw
    assert "café ☕".encode() in raw  # not \\u-escaped
    assert json.loads(raw.decode("utf-8")) == payload
    assert serialize(payload, "json") == raw


@pytest.mark.parametrize(
    ("fmt", "key"),
    [pytest.param("slack", "text", id="slack"), pytest.param("office365", "@type", id="o365")],
)
def test_serialize_other_formats(fmt: str, key: str) -> None:
    payload = post_payload("c", USER, "vm.start", {}, 0, 9, Outcome(result=True))
    assert key in json.loads(serialize(payload, fmt))


def test_serialize_unknown_format() -> None:
    with pytest.raises(ValueError, match="xml"):
        serialize(pre_payload("c", USER, "m", {}, 0), "xml")


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_serialize_writes_strict_json(number: float) -> None:
    payload = pre_payload("c", USER, "m", {"x": number}, 0)
    with pytest.raises(ValueError):  # never writes a body JSON parsers reject
        serialize(payload)


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("ｐａｓｓｗｏｒｄ", id="fullwidth"),
        pytest.param("pass\u200bword", id="zero-width-space"),
        pytest.param("pass\u00adword", id="soft-hyphen"),
        pytest.param("api.key", id="dot-separated"),
        pytest.param("ＡＰＩ　ＫＥＹ", id="fullwidth-with-ideographic-space"),
        pytest.param("db_pwd", id="pwd"),
        pytest.param("gpgPassphrase", id="passphrase"),
        pytest.param("awsCredentials", id="credential"),
    ],
)
def test_look_alike_and_new_default_keys_are_redacted(key: str) -> None:
    assert redact({key: "s3cr3t", "name": "ok"}, DEFAULT_REDACT) == {key: REDACTED, "name": "ok"}


def test_tuples_are_walked_and_sent_as_arrays() -> None:
    # middleware.call(params=...) may hold tuples: a secret inside one is still found.
    assert redact({"a": ({"token": "t"}, 1)}, DEFAULT_REDACT) == {"a": [{"token": REDACTED}, 1]}


def test_a_clean_payload_is_returned_as_it_is() -> None:
    payload = pre_payload("c", USER, "m", {"id": "vm-1", "tags": ["a", {"b": 1.5}]}, 0)
    cleaned = clean_payload(payload, DEFAULT_REDACT)
    assert cleaned.payload is payload and cleaned.replaced == 0


def test_stand_ins_for_what_strict_json_cannot_hold() -> None:
    deep: Any = 1
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    params = {
        "inf": math.inf, "-inf": -math.inf, "nan": math.nan, "s\udc00": "x\ud800y",
        "when": datetime.date(2026, 12, 1), "deep": deep, "ok": [1, "é", None, True],
    }  # fmt: skip
    payload = post_payload("c", ("u\ud800", None), "m", params, 0, 1, Outcome(result=math.nan))
    cleaned = clean_payload(payload, DEFAULT_REDACT)
    json.dumps(cleaned.payload, allow_nan=False).encode("utf-8")  # strict JSON now
    sent = cleaned.payload["params"]
    assert (sent["inf"], sent["-inf"], sent["nan"]) == ("Infinity", "-Infinity", "NaN")
    assert sent["s\ufffd"] == "x\ufffdy" and sent["when"] == "2026-12-01"
    assert TOO_DEEP in json.dumps(sent["deep"]) and sent["ok"] == [1, "é", None, True]
    assert cleaned.payload["userId"] == "u\ufffd" and cleaned.payload["result"] == "NaN"
    assert cleaned.replaced == 9
    assert math.isinf(params["inf"])  # the input is not modified


def test_keys_that_are_not_strings_are_kept_when_json_takes_them():
    # From middleware.call(): json.dumps takes str, int, float, bool and None keys.
    value = {1: "a", 2.5: "b", None: "c", False: "d", math.inf: "e", (1, 2): "f"}
    cleaned = redact(value, DEFAULT_REDACT)
    assert cleaned == {1: "a", 2.5: "b", None: "c", False: "d", "inf": "e", "(1, 2)": "f"}
    json.dumps(cleaned, allow_nan=False)
