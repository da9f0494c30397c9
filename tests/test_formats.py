"""Tests of xo_webhooks.sending.formats: each format holds what its receiving service requires."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from xo_webhooks.schema import validate_payload
from xo_webhooks.sending.formats import FORMATS, render

from .helpers import PRE as HELPER_PRE

PRE = {**HELPER_PRE, "params": {"id": "vm-1", "force": False}}
POST_OK = {**PRE, "type": "post", "timestamp": 1700000000532, "duration": 532, "result": True}
POST_FAILED = {
    **PRE,
    "type": "post",
    "userId": None,
    "userName": None,
    "timestamp": 1700000000012,
    "duration": 12,
    "error": {"code": -32000, "message": "VM not found", "data": {"id": "vm-1"}},
}
HUGE = {**POST_OK, "params": {"disks": ["<&>" * 50] * 100}, "result": "x" * 10000}

PAYLOADS = [
    pytest.param(PRE, id="pre"),
    pytest.param(POST_OK, id="post-ok"),
    pytest.param(POST_FAILED, id="post-failed"),
    pytest.param(HUGE, id="huge"),
]


def check_message_card(card: dict[str, Any], payload: dict[str, Any]) -> None:
    # https://learn.microsoft.com/en-us/outlook/actionable-messages/message-card-reference
    assert card["@type"] == "MessageCard"
    assert card["@context"] == "https://schema.org/extensions"
    assert card.get("summary") or card.get("text")  # one of them is required
    assert isinstance(card["themeColor"], str)
    assert isinstance(card["sections"], list)
    for section in card["sections"]:
        assert isinstance(section, dict)
        for fact in section.get("facts", []):
            assert set(fact) == {"name", "value"}
            assert isinstance(fact["name"], str)
            assert isinstance(fact["value"], str)


def check_slack_message(message: dict[str, Any]) -> None:
    # https://api.slack.com/reference/block-kit/blocks#section
    assert isinstance(message["text"], str)
    assert message["text"].strip()
    assert 1 <= len(message["blocks"]) <= 50
    for block in message["blocks"]:
        assert block["type"] == "section"
        assert set(block) <= {"type", "text", "block_id", "fields", "accessory"}
        text = block["text"]
        assert text["type"] in ("mrkdwn", "plain_text")
        assert 1 <= len(text["text"]) <= 3000


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_through_json(payload: dict[str, Any], fmt: str) -> None:
    body = render(payload, fmt)

    assert json.loads(json.dumps(body)) == body


@pytest.mark.parametrize("payload", PAYLOADS)
def test_json_is_the_payload_itself(payload: dict[str, Any]) -> None:
    assert render(payload) is payload
    validate_payload(render(payload, "json"))


@pytest.mark.parametrize("payload", PAYLOADS)
def test_office365_is_a_message_card(payload: dict[str, Any]) -> None:
    check_message_card(render(payload, "office365"), payload)


@pytest.mark.parametrize(
    ("payload", "title"),
    [
        pytest.param(PRE, "XO PRE notification", id="pre"),
        pytest.param(POST_OK, "XO POST notification", id="post"),
    ],
)
def test_office365_title_section_then_one_fact_per_field(
    payload: dict[str, Any], title: str
) -> None:
    card = render(payload, "office365")

    first, second = card["sections"]
    assert first == {"title": title}  # as the Xen Orchestra plugin lays it out
    facts = {fact["name"]: fact["value"] for fact in second["facts"]}
    assert list(facts) == list(payload)
    assert facts["method"] == "vm.start"  # strings as they are
    assert facts["params"] == '{"id":"vm-1","force":false}'  # others JSON-encoded
    assert facts["timestamp"] == str(payload["timestamp"])


def test_office365_null_and_error_values_are_json() -> None:
    card = render(POST_FAILED, "office365")

    facts = {fact["name"]: fact["value"] for fact in card["sections"][1]["facts"]}
    assert facts["userName"] == "null"
    assert json.loads(facts["error"]) == POST_FAILED["error"]


def test_office365_colour_tells_the_outcome() -> None:
    colours = {render(p, "office365")["themeColor"] for p in (PRE, POST_OK, POST_FAILED)}

    assert len(colours) == 3


@pytest.mark.parametrize("payload", PAYLOADS)
def test_slack_is_a_valid_block_kit_message(payload: dict[str, Any]) -> None:
    check_slack_message(render(payload, "slack"))


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        pytest.param(PRE, "vm.start pre by alice", id="pre"),
        pytest.param(POST_OK, "vm.start post ok in 532 ms by alice", id="post-ok"),
        pytest.param(POST_FAILED, "vm.start post failed in 12 ms: VM not found", id="failed"),
        pytest.param({**PRE, "userName": None}, "vm.start pre", id="no-user"),
    ],
)
def test_slack_text_summarises_the_call(payload: dict[str, Any], text: str) -> None:
    message = render(payload, "slack")

    assert message["text"] == text
    assert message["blocks"][0]["text"]["text"] == text


def test_slack_blocks_hold_params_and_result_or_error() -> None:
    ok = [b["text"]["text"] for b in render(POST_OK, "slack")["blocks"]]
    failed = [b["text"]["text"] for b in render(POST_FAILED, "slack")["blocks"]]
    pre = [b["text"]["text"] for b in render(PRE, "slack")["blocks"]]

    assert ok[1].startswith("*params*\n```") and '"id": "vm-1"' in ok[1]
    assert ok[2] == "*result*\n```true```"
    assert failed[2].startswith("*error*\n```") and "VM not found" in failed[2]
    assert len(pre) == 2  # no result yet


@pytest.mark.parametrize("shift", range(5))  # moves the cut across each kind of entity
def test_slack_truncates_long_values_without_breaking_escapes(shift: int) -> None:
    payload = {**HUGE, "params": {"disks": ["x" * shift + "<&>" * 5000]}}
    blocks = render(payload, "slack")["blocks"]

    for block in blocks[1:]:
        text = block["text"]["text"]
        assert len(text) <= 3000
        assert text.endswith("(truncated)```")
        assert "<" not in text and ">" not in text  # escaped as &lt; &gt;
        assert not re.search(r"&(?!amp;|lt;|gt;)", text)  # no entity cut in half
    assert "&lt;&amp;&gt;" in blocks[1]["text"]["text"]


def test_unknown_format_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        render(PRE, "xml")
