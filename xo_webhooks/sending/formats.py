"""Payload formats: how a hook payload is shaped for the receiver.

``json`` sends the payload as specified by ``schemas/hook-payload.schema.json``.

``office365`` sends an Office 365 connector MessageCard, as the Xen Orchestra web-hooks
plugin does: a title section (``XO PRE notification`` / ``XO POST notification``), then
one fact per payload field, non-string values JSON-encoded.

``slack`` sends a Slack incoming-webhook message: a one-line ``text`` summary (also the
notification fallback) and Block Kit section blocks with the params and the result or
error as code blocks, truncated to Slack's 3,000-character limit per text object.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["FORMATS", "render", "serialize"]

FORMATS = ("json", "office365", "slack")

# https://api.slack.com/reference/block-kit/blocks#section: a section's text holds 3000 chars.
SLACK_TEXT_LIMIT = 3000
TRUNCATED = "\n… (truncated)"
# MessageCard colours: XO's red for failures, neutral blue for pre, green for success.
THEME_PRE, THEME_OK, THEME_FAILED = "0072C6", "2EB67D", "BE1621"


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


def _office365(payload: dict[str, Any]) -> dict[str, Any]:
    # https://learn.microsoft.com/en-us/outlook/actionable-messages/message-card-reference
    if payload.get("type") != "post":
        color = THEME_PRE
    else:
        color = THEME_FAILED if payload.get("error") is not None else THEME_OK
    facts = [
        {"name": key, "value": value if isinstance(value, str) else _dumps(value)}
        for key, value in payload.items()
    ]
    return {
        "@type": "MessageCard",
        "@context": "https://schema.org/extensions",
        "summary": _summary(payload),
        "themeColor": color,
        "sections": [
            {"title": f"XO {str(payload.get('type', '')).upper()} notification"},
            {"facts": facts},
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


def _cut(escaped: str, size: int) -> str:
    """Return the first *size* characters of *escaped* without splitting an ``&...;`` entity."""
    cut = escaped[:size]
    amp = cut.rfind("&", max(0, size - 4))
    if amp != -1 and ";" not in cut[amp:]:
        cut = cut[:amp]
    return cut
