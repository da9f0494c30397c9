"""The app the metrics tests run under gunicorn with several worker processes: the
Flask API wrapped by the middleware (configured from XO_WEBHOOKS_* only), its metrics
registered, and ``/metrics`` serving every worker's metrics through prometheus_client's
``MultiProcessCollector`` (``PROMETHEUS_MULTIPROC_DIR`` must be set). Each answer says
which worker process served it (``X-Worker-Pid``).

Also a gunicorn configuration (``--config python:tests.metrics_app``): the
``child_exit`` hook that prometheus_client's multiprocess mode asks for. The app is
built by :func:`create` in the workers (``tests.metrics_app:create()``), so that the
master, which reads this module as its configuration, registers no metrics."""

from __future__ import annotations

import os

from flask import Flask, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from xo_webhooks import WebhookMiddleware
from xo_webhooks.metrics import register

from .apps import create_app


def create() -> Flask:
    """The app of one gunicorn worker."""
    app = create_app()
    app.wsgi_app = WebhookMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    register(app.wsgi_app)  # prometheus_client's default registry: this process's files

    @app.get("/metrics")
    def metrics() -> Response:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)

    @app.after_request
    def tell_pid(response: Response) -> Response:
        response.headers["X-Worker-Pid"] = str(os.getpid())
        return response

    return app


def child_exit(server, worker):
    """gunicorn hook: a dead worker's live gauges (pending, endpoint states) stop counting."""
    multiprocess.mark_process_dead(worker.pid)


def worker_exit(server, worker):
    """gunicorn hook: deliver what is left before the worker exits (the README's snippet)."""
    app = getattr(worker, "wsgi", None)  # None if the worker died loading it
    if app is not None:
        app.wsgi_app.close()
