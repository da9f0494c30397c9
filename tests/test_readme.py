"""The README's code runs as written: the Node.js signature check against hooks this
package signs, and the pytest plugin example in a consumer-like test session."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from xo_webhooks.signing import generate_secret, sign

pytest_plugins = ["pytester"]

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def block_after(heading: str, language: str) -> str:
    """The first ``language`` code block after *heading* in the README."""
    start = README.index(heading)
    found = re.compile(rf"```{language}\n(.*?)```", re.S).search(README, start)
    assert found, f"no {language} block after {heading!r}"
    return found.group(1)


NODE_CHECK = """
const [secret, body, headers] = JSON.parse(require('fs').readFileSync(0, 'utf8'))
try { verifyHook(secret, Buffer.from(body, 'base64'), headers); console.log('valid') }
catch (e) { console.log('invalid: ' + e.message) }
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
@pytest.mark.parametrize("tamper", [False, True], ids=["genuine", "tampered"])
def test_node_snippet_verifies_our_signatures(tamper):
    import base64

    secret, body, now = generate_secret(), b'{"type":"pre","method":"vm.start"}', int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(now),
        "webhook-signature": sign(secret, "msg_1", now, body),
    }
    sent = body.replace(b"vm.start", b"vm.stop") if tamper else body
    script = block_after("### Checking a signature in Node.js", "js") + NODE_CHECK
    stdin = json.dumps([secret, base64.b64encode(sent).decode(), headers])
    out = subprocess.run(
        ["node", "-e", script], input=stdin, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    expected = "invalid: no matching signature" if tamper else "valid"
    assert out.stdout.strip() == expected


def test_pytest_plugin_example_passes_as_a_consumer_test(pytester):
    example = block_after("## Testing with the pytest plugin", "python")
    pytester.makepyfile(test_consumer=example)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
