"""The app the server tests run under gunicorn: the Flask API wrapped by the middleware,
configured from the environment only (XO_WEBHOOKS_*)."""

from xo_webhooks import WebhookMiddleware

from .apps import create_app

app = create_app()
app.wsgi_app = WebhookMiddleware(app.wsgi_app)  # type: ignore[method-assign]
