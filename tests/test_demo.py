"""The README's demo runs end to end and shows the hooks of each kind of call."""

from __future__ import annotations

import io
import json

from xo_webhooks.demo import run_demo
from xo_webhooks.schema import validate_payload


def test_demo_shows_every_hook():
    out = io.StringIO()
    assert run_demo(out) == 8  # 4 hooked calls (success, error, batch's vm.list, notification) x 2
    text = out.getvalue()
    hooks = [json.loads(line) for line in text.splitlines() if line.startswith('{"type"')]
    assert len(hooks) == 8
    for payload in hooks:
        validate_payload(payload)
    posts = [h for h in hooks if h["type"] == "post"]
    assert sorted(("error" in p, p["method"]) for p in posts) == [
        (False, "vm.list"), (False, "vm.start"), (False, "vm.start"), (True, "vm.start"),
    ]  # fmt: skip
    assert "'lost': 0" in text and "'pending': 0" in text
