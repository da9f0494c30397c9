"""Internal: receiving hooks.

``receiver`` (the safe receiver: checks each request, then runs its script) and
``scripts`` (the script runner). It imports nothing of the request path nor of the
sending side. Public name: :mod:`xo_webhooks.receiver`.
"""

__all__: list[str] = []
