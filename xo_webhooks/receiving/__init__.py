"""Internal: receiving hooks.

``receiver`` (the safe receiver: checks each request, then runs its script),
``scripts`` (the script runner) and ``server`` (the HTTP server of ``serve()``, guarded
against slow and greedy clients). It imports nothing of the request path nor of the
sending side. Public name: :mod:`xo_webhooks.receiver`.
"""

__all__: list[str] = []
