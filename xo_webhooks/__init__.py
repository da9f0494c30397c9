"""xo-webhooks: Xen Orchestra-style web hooks for any WSGI application.

Wrap a JSON-RPC app and every configured method call sends an HTTP POST with a JSON
payload before it runs ("pre") and after it completes ("post")::

    from xo_webhooks import WebhookMiddleware
    app.wsgi_app = WebhookMiddleware(app.wsgi_app)   # hooks from XO_WEBHOOKS_HOOKS
"""

import logging

__version__ = "0.1.0"

from .config import Hook, Settings, load_settings  # noqa: E402
from .errors import ConfigError, SignatureError, WebhookError  # noqa: E402
from .middleware import WebhookMiddleware  # noqa: E402

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

logging.getLogger("xo_webhooks").addHandler(logging.NullHandler())
