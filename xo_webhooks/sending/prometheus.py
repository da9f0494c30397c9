"""The Prometheus metrics of the hooks (public as :mod:`xo_webhooks.metrics`), kept by
an observer of a dispatcher or a Celery worker (:mod:`.observers`).

Every metric has an ``endpoint`` label: a hook URL's origin (scheme, host, port), never
its path or query, which may hold a token. The counters and histograms are updated
from the delivery threads; the request thread only adds one to ``accepted`` and to
``pending`` per hook (see the README's "Watching it in production" for the cost).

Under gunicorn with several worker processes, set ``PROMETHEUS_MULTIPROC_DIR`` (an
empty folder) for every process, and serve the registry through
``prometheus_client.multiprocess.MultiProcessCollector``: the counters add up, and
``pending`` and the endpoint states add up over the live processes. Celery workers
export the same metrics with ``XO_WEBHOOKS_METRICS_PORT`` (see the README).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from .endpoints import STATES
from .policy import Attempt

if TYPE_CHECKING:
    from .delivery import Delivery
    from .endpoints_redis import SharedBreakers

__all__ = ["Metrics", "SharedStates", "outcome_of"]

logger = logging.getLogger(__name__)

STATE_METRIC = "xo_webhooks_endpoint_state"
STATE_HELP = "1 for the state each endpoint's breaker is in (summed over processes)."
#: Seconds: attempts take up to the timeout (10 s by default).
ATTEMPT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: Seconds from the call to the delivery: a retry schedule spans more than a day.
DELAY_BUCKETS = (
    0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 7200, 18000, 36000, 86400,
    172800,
)  # fmt: skip


def outcome_of(attempt: Attempt) -> str:
    """An attempt's ``outcome`` label: ``2xx``, ``3xx``, ``4xx``, ``5xx`` (by status),
    ``timeout``, ``connection_error``, or ``error`` (no attempt could be made)."""
    if attempt.status is not None:
        return f"{attempt.status // 100}xx"
    error = attempt.error or ""
    if error.startswith("timed out"):
        return "timeout"
    if error.startswith("connection failed"):
        return "connection_error"
    return "error"


class Metrics:
    """The metrics, and the observer that updates them.

    :param registry: where to register them (prometheus_client's default one).
    :param pending: keep the ``pending`` gauge (not in Celery workers, where hooks are
        accepted by the API's processes).
    :param states: keep the endpoint state gauge (not in Celery workers, where it is
        read from the shared breakers at each scrape: :class:`SharedStates`).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        pending: bool = True,
        states: bool = True,
    ) -> None:
        registry = REGISTRY if registry is None else registry
        self.track_pending = pending
        self.track_states = states
        self._on_accept: dict[str, tuple[Any, Any]] = {}

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, ["endpoint", *labels], registry=registry)

        self.accepted_total = counter("xo_webhooks_hooks_accepted", "Hooks accepted.")
        self.published_total = counter(
            "xo_webhooks_hooks_published", "Hooks handed to the Celery broker."
        )
        self.delivered_total = counter("xo_webhooks_hooks_delivered", "Hooks delivered.")
        self.failed_total = counter(
            "xo_webhooks_hooks_failed", "Hooks given up on, by reason.", "reason"
        )
        self.attempts_total = counter(
            "xo_webhooks_attempts", "Delivery attempts, by outcome.", "outcome"
        )
        self.attempt_seconds = Histogram(
            "xo_webhooks_attempt_duration_seconds", "How long each attempt took.",
            ["endpoint"], buckets=ATTEMPT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.delay_seconds = Histogram(
            "xo_webhooks_delivery_delay_seconds",
            "Seconds from the call (its start for a pre hook, its end for a post hook) "
            "to the hook's delivery.",
            ["endpoint"], buckets=DELAY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.pending = Gauge(
            "xo_webhooks_hooks_pending", "Hooks accepted, not yet delivered or given up.",
            ["endpoint"], registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        if states:
            self.state = Gauge(
                STATE_METRIC, STATE_HELP, ["endpoint", "state"], registry=registry,
                multiprocess_mode="livesum",
            )  # fmt: skip

    # -- the observer's events (see xo_webhooks.sending.observers) --------------------

    def accepted(self, origin: str) -> None:
        # On the request thread: the two children are looked up once per endpoint, not
        # through labels() (a lock and a tuple) every time.
        children = self._on_accept.get(origin)
        if children is None:
            children = self._on_accept[origin] = (
                self.accepted_total.labels(origin),
                self.pending.labels(origin) if self.track_pending else None,
            )
        accepted, pending = children
        accepted.inc()
        if pending is not None:
            pending.inc()

    def published(self, origin: str) -> None:
        self.published_total.labels(origin).inc()
        if self.track_pending:
            self.pending.labels(origin).dec()

    def attempted(self, origin: str, attempt: Attempt, seconds: float) -> None:
        self.attempts_total.labels(origin, outcome_of(attempt)).inc()
        self.attempt_seconds.labels(origin).observe(seconds)

    def delivered(self, origin: str, delivery: Delivery) -> None:
        self.delivered_total.labels(origin).inc()
        if self.track_pending:
            self.pending.labels(origin).dec()
        called = _call_time(delivery.payload)
        if called is not None:
            self.delay_seconds.labels(origin).observe(max(0.0, time.time() - called))

    def given_up(self, origin: str, delivery: Delivery, record: dict[str, Any]) -> None:
        self.failed_total.labels(origin, delivery.reason or "final_answer").inc()
        if self.track_pending:
            self.pending.labels(origin).dec()

    def state_changed(self, origin: str, state: str) -> None:
        if not self.track_states:
            return
        for each in STATES:
            self.state.labels(origin, each).set(1 if each == state else 0)


class SharedStates:
    """A collector of the endpoint state gauge from the breakers that Celery workers
    share in Redis, read at each scrape: every worker then reports the same, current
    state, whichever process saw the last transition.

    :param breakers: the shared breakers.
    :param origins: the endpoints to report (the configured ones).
    """

    def __init__(self, breakers: SharedBreakers, origins: list[str]) -> None:
        self.breakers = breakers
        self.origins = origins

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(STATE_METRIC, STATE_HELP, labels=["endpoint", "state"])
        for origin in self.origins:
            try:
                state = self.breakers.load(origin).state
            except Exception:  # Redis unreachable: no sample rather than a wrong one
                logger.warning("could not read the breaker of %s", origin, exc_info=True)
                continue
            for each in STATES:
                family.add_metric([origin, each], 1 if each == state else 0)
        yield family


def _call_time(payload: dict[str, Any]) -> float | None:
    """When the call happened, in epoch seconds: a pre hook's ``timestamp`` is the
    call's start, a post hook's its end (both in milliseconds)."""
    timestamp = payload.get("timestamp")
    return timestamp / 1000 if isinstance(timestamp, (int, float)) else None
