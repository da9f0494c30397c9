"""xo-webhooks: Xen Orchestra-style web hooks for any WSGI application.

Wrap a JSON-RPC app and every configured method call sends an HTTP POST with a JSON
payload before it runs ("pre") and after it completes ("post")::

    from xo_webhooks import WebhookMiddleware
    app.wsgi_app = WebhookMiddleware(app.wsgi_app)   # hooks from XO_WEBHOOKS_HOOKS

The public API is what this module exports, and the modules ``schema``, ``signing``,
``errors``, ``receiver``, ``testing``, ``pytest_plugin`` and ``celery``. The
subpackages ``request``, ``sending`` and ``receiving`` are internal.
"""

import logging

from ._version import __version__
from .config import Hook, Settings, load_settings
from .errors import ConfigError, SignatureError, WebhookError
from .request.middleware import WebhookMiddleware

__all__ = [
    "WebhookMiddleware",
    "Hook",
    "Settings",
    "load_settings",
    "ConfigError",
    "SignatureError",
    "WebhookError",
    "__version__",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
