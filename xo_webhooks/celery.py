"""Delivery on Celery: ``celery -A xo_webhooks.celery worker`` and the names a project
uses to publish from its own Celery setup.

The workers' app, :data:`app`, is built on first access from the ``XO_WEBHOOKS_*``
variables, so a process that only publishes (the API, with
``XO_WEBHOOKS_DISPATCHER=celery``) never reads them here. How delivery on Celery works
is in :mod:`xo_webhooks.sending.celery`. Needs the ``celery`` extra.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from .config import load_settings
from .sending.celery import QUEUE, TASK_NAME, VISIBILITY_TIMEOUT, Worker, celery_app
from .sending.celery_publisher import CeleryDispatcher

__all__ = ["CeleryDispatcher", "Worker", "celery_app", "TASK_NAME", "QUEUE", "VISIBILITY_TIMEOUT"]

_app: Celery | None = None

app: Celery  # built on first access by __getattr__ below


def __getattr__(name: str) -> Any:
    """``app``, the workers' Celery app, built on first access."""
    global _app
    if name == "app":
        if _app is None:
            _app = celery_app(load_settings())
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
