"""Payload formats: how a hook payload is shaped for the receiver.

``json`` sends the payload as specified by ``schemas/hook-payload.schema.json``.

``office365`` sends an Office 365 connector MessageCard, as the Xen Orchestra web-hooks
plugin does: a title section (``XO PRE notification`` / ``XO POST notification``), then
one fact per payload field, non-string values JSON-encoded.

``slack`` sends a Slack incoming-webhook message: a one-line ``text`` summary (also the
notification fallback) and Block Kit section blocks with the params and the result or
error as code blocks, truncated to Slack's 3,000-character limit per text object.

``teams`` sends a Microsoft Teams Workflows message (the replacement for Office 365
connectors, which Workflows do not accept): one Adaptive Card 1.4 attachment with the
``office365`` card's information: the same title, the one-line summary in the outcome's
colour, and a FactSet of the same facts.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["FORMATS", "render", "serialize"]

FORMATS = ("json", "office365", "slack", "teams")

# https://api.slack.com/reference/block-kit/blocks#section: a section's text holds 3000 chars.
SLACK_TEXT_LIMIT = 3000
# Teams takes a message of about 28 KB, and a Workflow may accept a larger one (202)
# and drop it later: the params and the result or error get 8,000 characters each.
TEAMS_VALUE_LIMIT = 8000
TRUNCATED = "\n… (truncated)"
# MessageCard colours: XO's red for failures, neutral blue for pre, green for success.
THEME_PRE, THEME_OK, THEME_FAILED = "0072C6", "2EB67D", "BE1621"
# Adaptive Card TextBlock colours (named, the host theme picks the shade): the same blue,
# green and red meaning as the MessageCard's.
COLOR_PRE, COLOR_OK, COLOR_FAILED = "Accent", "Good", "Attention"


def render(payload: dict[str, Any], fmt: str = "json") -> Any:
    """Return the JSON-serialisable body of a hook with *payload* in format *fmt*.

    :param payload: a hook payload (the fields of ``schemas/hook-payload.schema.json``).
    :param fmt: one of :data:`FORMATS`.
    :raises ValueError: if *fmt* is not a known format.
    """
    if fmt == "json":
        return payload
    if fmt == "office365":
        return _office365(payload)
    if fmt == "slack":
        return _slack(payload)
    if fmt == "teams":
        return _teams(payload)
    raise ValueError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}")


def serialize(payload: dict[str, Any], fmt: str = "json") -> bytes:
    """Format *payload* as *fmt* and serialise it into the bytes of a request body."""
    body = render(payload, fmt)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _summary(payload: dict[str, Any]) -> str:
    """One line: ``vm.start pre by alice``, ``vm.start post ok in 532 ms by alice``,
    ``vm.start post failed in 12 ms by alice: VM not found``; no ``by`` when userName is null."""
    text = f"{payload.get('method', '?')} {payload.get('type', '?')}"
    error = payload.get("error")
    if payload.get("type") == "post":
        text += f" {'failed' if error is not None else 'ok'} in {payload.get('duration', '?')} ms"
    if payload.get("userName") is not None:
        text += f" by {payload['userName']}"
    if payload.get("type") == "post" and error is not None:
        message = error.get("message") if isinstance(error, dict) else None
        text += f": {message if message is not None else _dumps(error)}"
    return text


def _dumps(value: Any, indent: int | None = None) -> str:
    # Compact like JavaScript's JSON.stringify, which the XO plugin uses for its facts.
    separators = (",", ": ") if indent else (",", ":")
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, default=str)


def _outcome(payload: dict[str, Any]) -> str:
    """``"pre"``, ``"ok"`` or ``"failed"``: what the card's colour tells."""
    if payload.get("type") != "post":
        return "pre"
    return "failed" if payload.get("error") is not None else "ok"


def _title(payload: dict[str, Any]) -> str:
    return f"XO {str(payload.get('type', '')).upper()} notification"


def _facts(payload: dict[str, Any]) -> list[tuple[str, str]]:
    """One ``(name, value)`` per payload field, in order; non-strings JSON-encoded as XO does."""
    return [
        (key, value if isinstance(value, str) else _dumps(value)) for key, value in payload.items()
    ]


def _office365(payload: dict[str, Any]) -> dict[str, Any]:
    # https://learn.microsoft.com/en-us/outlook/actionable-messages/message-card-reference
    color = {"pre": THEME_PRE, "ok": THEME_OK, "failed": THEME_FAILED}[_outcome(payload)]
    return {
        "@type": "MessageCard",
        "@context": "https://schema.org/extensions",
        "summary": _summary(payload),
        "themeColor": color,
        "sections": [
            {"title": _title(payload)},
            {"facts": [{"name": name, "value": value} for name, value in _facts(payload)]},
        ],
    }


def _teams(payload: dict[str, Any]) -> dict[str, Any]:
    # The message a Workflows "when a Teams webhook request is received" trigger posts:
    # https://learn.microsoft.com/en-us/microsoftteams/platform/webhooks-and-connectors/how-to/connectors-using
    # Card schema: https://adaptivecards.io/explorer/ (1.4, the highest Teams renders everywhere).
    color = {"pre": COLOR_PRE, "ok": COLOR_OK, "failed": COLOR_FAILED}[_outcome(payload)]
    card = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": [
            {
                "type": "TextBlock",
                "text": _title(payload),
                "size": "Medium",
                "weight": "Bolder",
                "wrap": True,
            },
            {"type": "TextBlock", "text": _capped(_summary(payload)), "color": color, "wrap": True},
            {
                "type": "FactSet",
                "facts": [
                    {"title": name, "value": _capped(value)} for name, value in _facts(payload)
                ],
            },
        ],
        "msteams": {"width": "Full"},  # room for the JSON-encoded params and result
    }
    return {
        "type": "message",
        "attachments": [
            {
                "contentType": "application/vnd.microsoft.card.adaptive",
                "contentUrl": None,
                "content": card,
            }
        ],
    }


def _slack(payload: dict[str, Any]) -> dict[str, Any]:
    # https://api.slack.com/messaging/webhooks and https://api.slack.com/block-kit
    text = _summary(payload)
    if len(text) > SLACK_TEXT_LIMIT:  # a long error message; Slack's own cap is 40,000
        text = text[: SLACK_TEXT_LIMIT - len(TRUNCATED)] + TRUNCATED
    blocks = [_section(_escape(text))]
    blocks.append(_code_section("params", payload.get("params", {})))
    if "error" in payload:
        blocks.append(_code_section("error", payload["error"]))
    elif "result" in payload:
        blocks.append(_code_section("result", payload["result"]))
    return {"text": text, "blocks": blocks}


def _section(mrkdwn: str) -> dict[str, Any]:
    if len(mrkdwn) > SLACK_TEXT_LIMIT:
        mrkdwn = _cut(mrkdwn, SLACK_TEXT_LIMIT - len(TRUNCATED)) + TRUNCATED
    return {"type": "section", "text": {"type": "mrkdwn", "text": mrkdwn}}


def _code_section(label: str, value: Any) -> dict[str, Any]:
    head, fence = f"*{label}*\n```", "```"
    body = _escape(_dumps(value, indent=2))
    room = SLACK_TEXT_LIMIT - len(head) - len(fence)
    if len(body) > room:
        body = _cut(body, room - len(TRUNCATED)) + TRUNCATED
    return _section(head + body + fence)


def _escape(text: str) -> str:
    # Slack reads &, < and > as control characters in every text, code blocks included.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _capped(text: str, limit: int = TEAMS_VALUE_LIMIT) -> str:
    """*text*, cut to *limit* characters with a mark that it was."""
    return text if len(text) <= limit else text[: limit - len(TRUNCATED)] + TRUNCATED


def _cut(escaped: str, size: int) -> str:
    """Return the first *size* characters of *escaped* without splitting an ``&...;`` entity."""
    cut = escaped[:size]
    amp = cut.rfind("&", max(0, size - 4))
    if amp != -1 and ";" not in cut[amp:]:
        cut = cut[:amp]
    return cut
