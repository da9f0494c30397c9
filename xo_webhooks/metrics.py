"""Prometheus metrics of the hooks, per endpoint (``pip install 'xo-webhooks[prometheus]'``)::

    from xo_webhooks.metrics import register
    register(middleware)  # then expose prometheus_client's registry as usual

The metrics are described in :class:`Metrics` and in the README's "Watching it in
production". Needs ``prometheus_client``; the rest of the package never imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from .sending.prometheus import Metrics, outcome_of

if TYPE_CHECKING:
    from .request.middleware import WebhookMiddleware

__all__ = ["Metrics", "register", "outcome_of"]


def register(middleware: WebhookMiddleware, registry: CollectorRegistry | None = None) -> Metrics:
    """Export *middleware*'s hooks as Prometheus metrics in *registry* (prometheus_client's
    default one); every configured endpoint starts in state ``closed``. Register once,
    at start (``pending`` counts the hooks accepted from then on)."""
    metrics = Metrics(registry)
    for origin in middleware.endpoint_stats():
        metrics.state_changed(origin, "closed")
    middleware.observe(metrics)
    return metrics
