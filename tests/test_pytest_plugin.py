"""The webhook_receiver fixture comes through the pytest11 entry point, with no import."""

from __future__ import annotations

import pytest
import requests

pytest_plugins = ["pytester"]

PRE = {
    "type": "pre",
    "callId": "call-1",
    "userId": None,
    "userName": None,
    "method": "vm.start",
    "params": {},
    "timestamp": 0,
}

CONSUMER_TEST = """
import requests

def test_consumer(webhook_receiver):
    webhook_receiver.respond_with(503, 204)
    payload = {"type": "pre", "callId": "c", "userId": None, "userName": None,
               "method": "vm.start", "params": {}, "timestamp": 0}
    assert requests.post(webhook_receiver.url, json=payload, timeout=5).status_code == 503
    assert requests.post(webhook_receiver.url, json=payload, timeout=5).status_code == 204
    (hook,) = webhook_receiver.wait_for(1)
    assert hook.payload == payload
    assert len(webhook_receiver.attempts) == 2
"""


def test_fixture_is_registered_by_the_entry_point(webhook_receiver) -> None:  # type: ignore[no-untyped-def]
    response = requests.post(webhook_receiver.url, json=PRE, timeout=5)

    assert response.status_code == 204
    (hook,) = webhook_receiver.wait_for(1)
    assert hook.payload == PRE
    assert hook.error is None


def test_consumer_project_gets_the_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_consumer=CONSUMER_TEST)

    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")

    result.assert_outcomes(passed=1)
