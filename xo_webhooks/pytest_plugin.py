"""pytest plugin: the ``webhook_receiver`` fixture.

Installing xo-webhooks registers it (entry point ``pytest11``); no import needed::

    def test_vm_start_sends_hooks(webhook_receiver):
        app = WebhookMiddleware(flask_app.wsgi_app, hooks=[
            {"method": "vm.start", "type": "pre/post", "url": webhook_receiver.url}])
        ...
        pre, post = webhook_receiver.wait_for(2)
        assert post.payload["result"] is True

See :class:`xo_webhooks.testing.WebhookReceiver` for scripting answers
(``webhook_receiver.respond_with(503, 204)``) and for what is recorded.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .testing import WebhookReceiver

__all__ = ["webhook_receiver"]


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    """A started :class:`~xo_webhooks.testing.WebhookReceiver` on 127.0.0.1, stopped at teardown."""
    with WebhookReceiver() as receiver:
        yield receiver
