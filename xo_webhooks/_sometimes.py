"""Saying something at most once in a while: for a warning that a flood would repeat
on every request. Shared: imports nothing else of the package."""

from __future__ import annotations

import math
import threading
import time

__all__ = ["Sometimes"]


class Sometimes:
    """True at most once every *period* seconds (thread-safe); the first call is true.

    :param period: seconds between two true answers.
    """

    def __init__(self, period: float) -> None:
        self.period = period
        self._last = -math.inf
        self._lock = threading.Lock()

    def __call__(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.period:
                return False
            self._last = now
            return True

    def reset(self) -> None:
        """Forget the last time (in a child process after a fork: its lock may be held)."""
        self._lock = threading.Lock()
        self._last = -math.inf
