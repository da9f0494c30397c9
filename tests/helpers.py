"""Helpers the test modules share (fixtures are in conftest.py)."""

from __future__ import annotations

import base64
from typing import Any

#: The Standard Webhooks example secret (24 bytes), and another one (32 bytes).
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER_SECRET = "whsec_" + base64.b64encode(b"another key of thirty-two bytes!").decode()

#: A valid pre hook payload and its post hook.
PRE = {
    "type": "pre",
    "callId": "call-1",
    "userId": "u1",
    "userName": "alice",
    "method": "vm.start",
    "params": {"id": "vm-1"},
    "timestamp": 1700000000000,
}
POST = {**PRE, "type": "post", "timestamp": 1700000000532, "duration": 532, "result": True}

HOOKS = [{"method": "vm.start", "type": "pre/post", "url": "http://127.0.0.1:9/"}]


class RecordingDispatcher:
    """Keeps what the middleware hands over instead of sending it."""

    def __init__(self):
        self.deliveries = []

    def submit(self, delivery):
        self.deliveries.append(delivery)

    def deliver_now(self, delivery):
        self.deliveries.append(delivery)
        return True

    def flush(self, timeout=None):
        return True

    def close(self, timeout=None):
        pass

    def stats(self):
        return {}

    def payloads(self, kind):
        return [d.payload for d in self.deliveries if d.payload["type"] == kind]


def assert_ledger(stats: dict[str, Any]) -> None:
    """The ``stats()`` ledger balances: every hook accepted is delivered, failed,
    pending, or (Celery) published; every failed one dead-lettered or lost."""
    assert stats["accepted"] == (
        stats["delivered"] + stats.get("published", 0) + stats["failed"] + stats["pending"]
    ), stats
    assert stats["failed"] == stats["dead_lettered"] + stats["lost"], stats
