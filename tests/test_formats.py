"""Tests of xo_webhooks.sending.formats: each format holds what its receiving service requires."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import requests
from jsonschema import Draft202012Validator

from xo_webhooks.cli import build_parser
from xo_webhooks.schema import validate_payload
from xo_webhooks.sending.formats import (
    FORMATS,
    TEAMS_VALUE_LIMIT,
    TRUNCATED,
    render,
    serialize,
)
from xo_webhooks.testing import WebhookReceiver

from .helpers import PRE as HELPER_PRE
from .test_cli import XO, xo

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


# -- teams ------------------------------------------------------------------------------

# The parts of the Adaptive Card 1.4 schema (https://adaptivecards.io/explorer/) that the
# card uses, closed: a misspelt property or a colour Teams does not know fails here.
_COMMON = {"id", "spacing", "separator", "height", "isVisible", "requires", "fallback"}
ADAPTIVE_CARD_1_4 = {
    "type": "object",
    "required": ["type", "version", "body"],
    "additionalProperties": False,
    "properties": {
        "$schema": {"const": "http://adaptivecards.io/schemas/adaptive-card.json"},
        "type": {"const": "AdaptiveCard"},
        "version": {"const": "1.4"},
        # Teams' own extension, for full-width cards (Teams docs, "Format cards in Teams").
        "msteams": {
            "type": "object",
            "properties": {"width": {"enum": ["Full"]}},
            "additionalProperties": False,
        },
        "body": {
            "type": "array",
            "minItems": 1,
            "items": {"oneOf": [{"$ref": "#/$defs/TextBlock"}, {"$ref": "#/$defs/FactSet"}]},
        },
    },
    "$defs": {
        "TextBlock": {
            "type": "object",
            "required": ["type", "text"],
            "propertyNames": {
                "enum": sorted(_COMMON | {"type", "text", "color", "fontType",
                                          "horizontalAlignment", "isSubtle", "maxLines",
                                          "size", "weight", "wrap"})
            },
            "properties": {
                "type": {"const": "TextBlock"},
                "text": {"type": "string", "minLength": 1},
                "color": {"enum": ["Default", "Dark", "Light", "Accent", "Good", "Warning",
                                   "Attention"]},
                "size": {"enum": ["Default", "Small", "Medium", "Large", "ExtraLarge"]},
                "weight": {"enum": ["Default", "Lighter", "Bolder"]},
                "wrap": {"type": "boolean"},
            },
        },
        "FactSet": {
            "type": "object",
            "required": ["type", "facts"],
            "propertyNames": {"enum": sorted(_COMMON | {"type", "facts"})},
            "properties": {
                "type": {"const": "FactSet"},
                "facts": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["title", "value"],
                        "additionalProperties": False,
                        "properties": {"title": {"type": "string"}, "value": {"type": "string"}},
                    },
                },
            },
        },
    },
}  # fmt: skip


def check_teams_message(message: dict[str, Any]) -> dict[str, Any]:
    """Check the Workflows envelope and the card; return the card."""
    # https://learn.microsoft.com/en-us/microsoftteams/platform/webhooks-and-connectors/how-to/connectors-using
    assert message["type"] == "message"
    (attachment,) = message["attachments"]
    assert set(attachment) == {"contentType", "contentUrl", "content"}
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert attachment["contentUrl"] is None
    card = attachment["content"]
    validator = Draft202012Validator(ADAPTIVE_CARD_1_4)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(card)]
    assert not errors, errors
    return card


def teams_facts(payload: dict[str, Any]) -> dict[str, str]:
    card = render(payload, "teams")["attachments"][0]["content"]
    return {fact["title"]: fact["value"] for fact in card["body"][2]["facts"]}


@pytest.mark.parametrize("payload", PAYLOADS)
def test_teams_is_a_workflows_message_with_an_adaptive_card(payload: dict[str, Any]) -> None:
    check_teams_message(render(payload, "teams"))


def test_the_adaptive_card_check_catches_what_teams_rejects() -> None:
    card = render(PRE, "teams")["attachments"][0]["content"]
    for broken in (
        {**card, "version": "1.5"},
        {**card, "body": [{**card["body"][1], "color": "Red"}]},
        {**card, "body": [{"type": "FactSet", "facts": [{"name": "a", "value": "b"}]}]},
    ):
        assert list(Draft202012Validator(ADAPTIVE_CARD_1_4).iter_errors(broken))


def _teams_message(title: str, summary: str, color: str, facts: list[tuple[str, str]]) -> Any:
    return {
        "type": "message",
        "attachments": [{
            "contentType": "application/vnd.microsoft.card.adaptive",
            "contentUrl": None,
            "content": {
                "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                "type": "AdaptiveCard",
                "version": "1.4",
                "body": [
                    {"type": "TextBlock", "text": title, "size": "Medium", "weight": "Bolder",
                     "wrap": True},
                    {"type": "TextBlock", "text": summary, "color": color, "wrap": True},
                    {"type": "FactSet",
                     "facts": [{"title": t, "value": v} for t, v in facts]},
                ],
                "msteams": {"width": "Full"},
            },
        }],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(PRE, _teams_message(
            "XO PRE notification", "vm.start pre by alice", "Accent",
            [("type", "pre"), ("callId", "call-1"), ("userId", "u1"), ("userName", "alice"),
             ("method", "vm.start"), ("params", '{"id":"vm-1","force":false}'),
             ("timestamp", "1700000000000")],
        ), id="pre"),
        pytest.param(POST_OK, _teams_message(
            "XO POST notification", "vm.start post ok in 532 ms by alice", "Good",
            [("type", "post"), ("callId", "call-1"), ("userId", "u1"), ("userName", "alice"),
             ("method", "vm.start"), ("params", '{"id":"vm-1","force":false}'),
             ("timestamp", "1700000000532"), ("duration", "532"), ("result", "true")],
        ), id="post-ok"),
        pytest.param(POST_FAILED, _teams_message(
            "XO POST notification", "vm.start post failed in 12 ms: VM not found", "Attention",
            [("type", "post"), ("callId", "call-1"), ("userId", "null"), ("userName", "null"),
             ("method", "vm.start"), ("params", '{"id":"vm-1","force":false}'),
             ("timestamp", "1700000000012"), ("duration", "12"),
             ("error", '{"code":-32000,"message":"VM not found","data":{"id":"vm-1"}}')],
        ), id="post-failed"),
    ],
)  # fmt: skip
def test_teams_message_exact_structure(payload: dict[str, Any], expected: Any) -> None:
    assert render(payload, "teams") == expected


@pytest.mark.parametrize("payload", PAYLOADS)
def test_teams_carries_the_office365_card_information(payload: dict[str, Any]) -> None:
    office365 = render(payload, "office365")
    card = check_teams_message(render(payload, "teams"))

    title, summary, facts = card["body"]
    assert title["text"] == office365["sections"][0]["title"]
    assert summary["text"] == office365["summary"]
    assert [(f["title"], f["value"]) for f in facts["facts"]] == [
        (f["name"], cap(f["value"])) for f in office365["sections"][1]["facts"]
    ]  # the same, but for values too long for a Teams message (cut)


def cap(value: str) -> str:
    if len(value) <= TEAMS_VALUE_LIMIT:
        return value
    return value[: TEAMS_VALUE_LIMIT - len(TRUNCATED)] + TRUNCATED


def test_teams_colour_tells_the_outcome() -> None:
    colours = [render(p, "teams")["attachments"][0]["content"]["body"][1]["color"]
               for p in (PRE, POST_OK, POST_FAILED)]  # fmt: skip

    assert colours == ["Accent", "Good", "Attention"]


def test_teams_keeps_non_ascii_values_as_they_are() -> None:
    payload = {**POST_FAILED, "userName": "Zoë Ünal", "method": "vm.démarrer",
               "params": {"name": "サーバー ☕"},
               "error": {"code": 1, "message": "échec: disque plein 💾"}}  # fmt: skip

    card = check_teams_message(render(payload, "teams"))
    facts = teams_facts(payload)
    raw = serialize(payload, "teams")

    assert (
        card["body"][1]["text"]
        == "vm.démarrer post failed in 12 ms by Zoë Ünal: échec: disque plein 💾"
    )
    assert facts["userName"] == "Zoë Ünal"
    assert facts["params"] == '{"name":"サーバー ☕"}'  # not \\u-escaped
    assert "サーバー ☕".encode() in raw and b"\\u" not in raw
    assert json.loads(raw) == render(payload, "teams")


def test_teams_cuts_long_values_so_the_message_fits() -> None:
    # Teams takes about 28 KB; a Workflow may answer 202 to a larger one and drop it.
    card = check_teams_message(render(HUGE, "teams"))
    facts = teams_facts(HUGE)

    assert facts["result"] == "x" * (TEAMS_VALUE_LIMIT - len(TRUNCATED)) + TRUNCATED
    whole = _office365_fact(HUGE, "params")  # office365 keeps them whole, as XO does
    assert len(whole) > TEAMS_VALUE_LIMIT
    assert facts["params"] == whole[: TEAMS_VALUE_LIMIT - len(TRUNCATED)] + TRUNCATED
    assert "&amp;" not in facts["params"]  # <&> as they are: no escaping
    assert card["body"][1]["wrap"] is True
    assert len(serialize(HUGE, "teams")) < 28_000


def _office365_fact(payload: dict[str, Any], name: str) -> str:
    facts = render(payload, "office365")["sections"][1]["facts"]
    return next(f["value"] for f in facts if f["name"] == name)


def test_teams_is_a_cli_format() -> None:
    assert "teams" in FORMATS
    assert build_parser().parse_args(["test", "http://h/", "--format", "teams"]).format == "teams"


@pytest.mark.skipif(XO is None, reason="xo-webhooks is not installed: pip install -e .")
def test_cli_test_in_teams_format(webhook_receiver: WebhookReceiver) -> None:
    result = xo("test", webhook_receiver.url, "--format", "teams")

    assert result.returncode == 0, result
    assert "as teams" in result.stdout
    # The command has returned, and the receiver records a hook before answering it; its
    # wait_for() would fail, see test_receiver_wait_for_accepts_teams_messages.
    first, second = webhook_receiver.received
    pre, post = (check_teams_message(hook.payload) for hook in (first, second))
    assert pre["body"][0]["text"] == "XO PRE notification"
    assert pre["body"][1]["text"] == "vm.start pre by xo-webhooks test"
    assert post["body"][1]["text"].startswith("vm.start post ok in ")
    assert post["body"][1]["color"] == "Good"
    assert first.headers["content-type"] == "application/json"


def test_receiver_wait_for_accepts_teams_messages(webhook_receiver: WebhookReceiver) -> None:
    requests.post(webhook_receiver.url, json=render(PRE, "teams"), timeout=5)

    (hook,) = webhook_receiver.wait_for(1)
    assert hook.error is None
