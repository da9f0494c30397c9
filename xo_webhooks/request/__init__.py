"""Internal: the request path, on the app's thread.

``middleware`` (the WSGI middleware), ``wsgi`` (reading the body, observing the
response), ``jsonrpc`` (parsing calls and answers), ``matching`` (which hooks a method
triggers), ``payload`` (the pre and post payloads). It hands deliveries to the sending
side and imports nothing of the receiving side. The public name of the middleware is
:class:`xo_webhooks.WebhookMiddleware`.
"""

__all__: list[str] = []
