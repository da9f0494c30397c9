"""Tests of xo_webhooks.schema: the shipped JSON Schemas and payload validation."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, ValidationError

from xo_webhooks.schema import SCHEMA_NAMES, load_schema, validate_payload, validator

from .helpers import POST, PRE

ROOT = Path(__file__).resolve().parent.parent
ERROR = {"code": -32000, "message": "no such VM"}


@pytest.mark.parametrize("name", ["hook-payload", "config"])
def test_load_schema(name: str) -> None:
    schema = load_schema(name)
    assert isinstance(schema, dict)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"urn:xo-webhooks:schema:{name}"
    Draft202012Validator.check_schema(schema)
    assert name in SCHEMA_NAMES


def test_load_schema_returns_a_fresh_copy() -> None:
    load_schema("config")["properties"].clear()
    assert "hooks" in load_schema("config")["properties"]
    assert validator("config") is validator("config")


@pytest.mark.parametrize("name", ["hook_payload", "Config", "", "../config", "config.schema.json"])
def test_unknown_schema_name(name: str) -> None:
    with pytest.raises(ValueError, match="unknown schema"):
        load_schema(name)


VALID = [
    pytest.param(PRE, id="pre"),
    pytest.param({**PRE, "userId": None, "userName": None}, id="pre-anonymous"),
    pytest.param({**PRE, "params": []}, id="pre-array-params"),
    pytest.param({**PRE, "params": {}, "timestamp": 0}, id="pre-empty-params"),
    pytest.param(POST, id="post-result"),
    pytest.param({**POST, "result": None}, id="post-null-result"),
    pytest.param({**POST, "duration": 0}, id="post-zero-duration"),
    pytest.param(
        {**{k: v for k, v in POST.items() if k != "result"}, "error": ERROR}, id="post-error"
    ),
    pytest.param(
        {**{k: v for k, v in POST.items() if k != "result"}, "error": {**ERROR, "data": [1]}},
        id="post-error-data",
    ),
]


@pytest.mark.parametrize("payload", VALID)
def test_valid_payloads(payload: dict) -> None:
    validate_payload(payload)


def without(payload: dict, *keys: str) -> dict:
    return {k: v for k, v in payload.items() if k not in keys}


INVALID = [
    pytest.param({**PRE, "extra": 1}, id="extra-key"),
    pytest.param({**POST, "extra": 1}, id="post-extra-key"),
    pytest.param({**PRE, "duration": 3}, id="pre-duration"),
    pytest.param({**PRE, "result": 1}, id="pre-result"),
    pytest.param({**PRE, "result": None}, id="pre-null-result"),
    pytest.param({**PRE, "error": ERROR}, id="pre-error"),
    pytest.param({**POST, "error": ERROR}, id="post-result-and-error"),
    pytest.param(without(POST, "result"), id="post-neither"),
    pytest.param(without(POST, "duration"), id="post-no-duration"),
    pytest.param({**POST, "duration": -1}, id="negative-duration"),
    pytest.param({**POST, "duration": 1.5}, id="fractional-duration"),
    pytest.param({**PRE, "timestamp": 1.5}, id="fractional-timestamp"),
    pytest.param({**PRE, "timestamp": "1700000000000"}, id="string-timestamp"),
    pytest.param({**PRE, "timestamp": True}, id="bool-timestamp"),
    pytest.param({**PRE, "timestamp": -1}, id="negative-timestamp"),
    pytest.param(without(PRE, "callId"), id="no-call-id"),
    pytest.param({**PRE, "callId": ""}, id="empty-call-id"),
    pytest.param(without(PRE, "userId"), id="no-user-id"),
    pytest.param({**PRE, "userName": 7}, id="numeric-user-name"),
    pytest.param({**PRE, "method": ""}, id="empty-method"),
    pytest.param({**PRE, "params": None}, id="null-params"),
    pytest.param({**PRE, "params": "id=vm-1"}, id="string-params"),
    pytest.param({**PRE, "type": "pre/post"}, id="type-pre/post"),
    pytest.param(without(PRE, "type"), id="no-type"),
    pytest.param({**without(POST, "result"), "error": {"message": "m"}}, id="error-no-code"),
    pytest.param({**without(POST, "result"), "error": {"code": 1}}, id="error-no-message"),
    pytest.param({**without(POST, "result"), "error": {**ERROR, "code": "E"}}, id="error-code-str"),
    pytest.param({**without(POST, "result"), "error": "boom"}, id="error-string"),
    pytest.param([PRE], id="array"),
    pytest.param(None, id="null"),
]


@pytest.mark.parametrize("payload", INVALID)
def test_invalid_payloads(payload: Any) -> None:
    with pytest.raises(ValidationError):
        validate_payload(payload)


@pytest.mark.slow
def test_wheel_ships_schemas_and_py_typed(tmp_path: Path) -> None:
    # Build from a copy so build/ and *.egg-info never land in the shared checkout.
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".*cache",
            ".benchmarks",
            "tests",
            "bench",
        ),
    )
    dist = tmp_path / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(source)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {
        "xo_webhooks/schemas/hook-payload.schema.json",
        "xo_webhooks/schemas/config.schema.json",
        "xo_webhooks/py.typed",
    } <= names
