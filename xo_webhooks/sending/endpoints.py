"""Endpoints and their circuit breakers.

An endpoint is a hook URL's origin: its scheme, host and port. Connections, failures
and outages belong to a host, not to a path: when ``https://hooks.example.com`` is
down, every hook URL on it is, and a hung receiver there must not hold the workers
that other endpoints need.

:class:`Breaker` is one endpoint's circuit breaker, a state machine that knows no
threads, clocks or stores: the thread dispatcher keeps one per endpoint in memory, the
Celery workers share one per endpoint in Redis. Its states:

- ``closed``: hooks flow;
- ``open``: after :attr:`Breaker.threshold` consecutive outage failures (no answer,
  5xx, 408, 429), no attempt is made; hooks wait, holding no thread;
- ``half-open``: after a pause (:data:`FIRST_PAUSE`, doubling after each failed probe,
  at most :data:`MAX_PAUSE`), one hook goes as a probe: a success closes the breaker,
  a failure opens it again;
- ``disabled``: the endpoint answered ``410 Gone``; every hook to it is given up on at
  once until the process restarts.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from dataclasses import dataclass
from typing import Any

from .._urls import endpoint_of
from .policy import Attempt

__all__ = [
    "endpoint_of",  # from _urls, where the configuration and the CLI find it too
    "probe_lease",
    "log_transition",
    "STATES",
    "Breaker",
    "Gate",
    "FIRST_PAUSE",
    "MAX_PAUSE",
]

logger = logging.getLogger(__name__)

#: The states of an endpoint's breaker.
STATES = ("closed", "open", "half-open", "disabled")
#: Seconds an endpoint stays open before its first probe, and the most it ever waits.
FIRST_PAUSE, MAX_PAUSE = 5.0, 300.0
GONE_STATUS = 410


def probe_lease(timeout: float) -> float:
    """Seconds a probe has to report before another may go (its sender may have died):
    two attempts' timeout, and some."""
    return 2 * timeout + 10


class Gate(enum.Enum):
    """What a breaker says about sending a hook now."""

    SEND = "send"  #: closed: send
    PROBE = "probe"  #: half-open: send this one as the probe
    WAIT = "wait"  #: open, or another hook is the probe: wait
    GONE = "gone"  #: disabled (410 Gone): give the hook up


@dataclass
class Breaker:
    """The circuit breaker of one endpoint (see the module docstring). Times are epoch
    seconds, given by the caller.

    :param threshold: consecutive outage failures that open it.
    """

    threshold: int
    state: str = "closed"
    failures: int = 0  #: consecutive outage failures
    opened_at: float | None = None  #: when it opened (kept while half-open)
    probe_at: float = 0.0  #: when the next probe may go (open)
    probe_until: float = 0.0  #: a probe's lease: another may go after it (half-open)
    pause: float = 0.0  #: the current pause between probes
    last_error: str | None = None
    last_success: float | None = None
    gone_at: float | None = None

    def admit(self, now: float, lease: float) -> Gate:
        """Whether a hook may be sent now. In half-open state only one hook is the
        probe until *lease* seconds have passed (a probe that never reported)."""
        if self.state == "closed":
            return Gate.SEND
        if self.state == "disabled":
            return Gate.GONE
        if now < self.next_probe():
            return Gate.WAIT
        self.state, self.probe_until = "half-open", now + lease
        return Gate.PROBE

    def next_probe(self) -> float:
        """When a probe may go: open, after the pause; half-open, once the probe on
        its way has had its lease."""
        return self.probe_at if self.state == "open" else self.probe_until

    def record(self, attempt: Attempt, now: float) -> str | None:
        """Count one attempt's result; return the transition it caused, if any:
        ``"opened"``, ``"reopened"`` (a failed probe), ``"closed"`` or ``"disabled"``.

        A 2xx answer, or any other answer than 5xx, 408, 429 and 410 (a 4xx is an
        answer, not an outage), shows the endpoint is up. An attempt that got no
        answer for a reason of its own (a payload that cannot be encoded) tells
        nothing; a half-open breaker then lets another probe go.
        """
        if self.state == "disabled":
            return None
        if attempt.status == GONE_STATUS:
            self.state, self.gone_at, self.last_error = "disabled", now, attempt.error
            return "disabled"
        if attempt.retryable:
            return self._failed(attempt.error, now)
        if attempt.delivered or attempt.status is not None:
            if attempt.delivered:
                self.last_success = now
            self.failures = 0
            if self.state == "closed":
                return None
            self.state, self.opened_at, self.pause = "closed", None, 0.0
            return "closed"
        if self.state == "half-open":
            self.probe_until = 0.0
        return None

    def _failed(self, error: str | None, now: float) -> str | None:
        self.failures += 1
        self.last_error = error
        if self.state == "half-open":
            self.pause = min(MAX_PAUSE, self.pause * 2)
            self.state, self.probe_at = "open", now + self.pause
            return "reopened"
        if self.state == "closed" and self.failures >= self.threshold:
            self.state, self.opened_at, self.pause = "open", now, FIRST_PAUSE
            self.probe_at = now + FIRST_PAUSE
            return "opened"
        return None

    def unavailable(self, origin: str) -> str:
        """Why a hook waiting for this endpoint is given up on, for its ``lastError``."""
        if self.state == "disabled":
            return f"endpoint {origin} is gone: it answered 410 Gone at {_when(self.gone_at)}"
        return (
            f"endpoint {origin} unavailable since {_when(self.opened_at)} "
            f"(last error: {self.last_error})"
        )

    def stats(self, pending: int, delivered: int, failed: int) -> dict[str, Any]:
        """What ``endpoint_stats()`` shows of the endpoint: this breaker, and the
        counters its dispatcher keeps beside it."""
        return {
            "state": self.state,
            "pending": pending,
            "delivered": delivered,
            "failed": failed,
            "consecutive_failures": self.failures,
            "last_error": self.last_error,
            "last_success": self.last_success,
            "opened_at": self.opened_at,
        }

    def to_dict(self) -> dict[str, Any]:
        """Every field, for a store shared by processes."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, threshold: int, fields: dict[str, Any]) -> Breaker:
        """A breaker from :meth:`to_dict`'s fields (unknown ones ignored)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"threshold"}
        return cls(threshold, **{k: v for k, v in fields.items() if k in known})


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "an unknown time"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def log_transition(
    origin: str,
    breaker: Breaker,
    transition: str | None,
    down_since: float | None,
    waited: int,
    gone: int,
) -> None:
    """One log line per transition of *origin*'s breaker, never one per hook.

    :param down_since: when it opened (for the line that says it closed).
    :param waited: distinct hooks that waited during the outage.
    :param gone: waiting hooks given up on when it was disabled (besides the one that
        got the ``410``).
    """
    if transition == "opened":
        logger.warning(
            "endpoint %s is down after %d consecutive failures (last: %s): no attempts to it "
            "for %g s, then one probe; its hooks wait",
            origin, breaker.failures, breaker.last_error, breaker.pause,
        )  # fmt: skip
    elif transition == "closed":
        down = time.time() - (down_since or time.time())
        logger.info(
            "endpoint %s is back after %.0f s down; %d hook(s) waited meanwhile, and those "
            "still pending flow again",
            origin, down, waited,
        )  # fmt: skip
    elif transition == "disabled":
        logger.error(
            "endpoint %s answered 410 Gone: disabled until restart; that hook and %d waiting "
            "one(s) dead-lettered now, every later one at once",
            origin, gone,
        )  # fmt: skip
    elif transition == "reopened":
        logger.debug("endpoint %s is still down; next probe in %g s", origin, breaker.pause)
