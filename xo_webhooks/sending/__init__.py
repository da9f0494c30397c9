"""Internal: sending hooks, off the request path.

``policy`` (what an answer means, when to retry, where a given-up hook goes),
``delivery`` (a hook on its way, and one attempt), ``transport`` (HTTP),
``formats`` and ``redaction`` (the body that leaves), ``dispatcher`` (the thread
dispatcher) and ``recorder`` (its dead-letter writer thread), ``celery`` (delivery on
Celery), ``deadletter`` and ``deadletter_redis`` (the stores), ``replay``. It imports
nothing of the request path nor of the receiving side. Public names:
:mod:`xo_webhooks.celery`, ``xo-webhooks replay``.
"""

__all__: list[str] = []
