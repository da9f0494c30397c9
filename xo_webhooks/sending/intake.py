"""Work handed off by the request path, run in order on a thread of its own.

For a request that may hold a hooked call, the middleware hands the dispatcher a job
that parses the body, matches its calls and submits their pre hooks, and, once the app
has answered, one that submits their post hooks. Running them here keeps that work off
the API's request thread; running them one at a time, in the order given, keeps a
call's pre hooks ahead of its post hooks. The queue is bounded: when it is full, the
caller runs what waits, then its own job, so memory stays bounded and nothing is lost.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

__all__ = ["Intake", "Job"]

logger = logging.getLogger(__name__)

Job = Callable[[], object]

#: Most jobs waiting, and most request-body bytes they hold, before callers run them.
MAX_JOBS = 4096
MAX_BYTES = 32 * 1024 * 1024
#: Seconds a job put without waking the thread (``put(now=False)``) may wait for it.
POLL = 0.01
#: Looks in a row that found nothing before the thread sleeps until woken.
SLEEP_AFTER = 100


class Intake:
    """Runs jobs in the order :meth:`put` was called, from one thread started on first
    use; :meth:`drain` runs the waiting ones on the caller's thread instead.

    :param max_jobs: most jobs waiting before :meth:`put` runs them on the caller.
    :param max_bytes: most bytes (the *size* given with each job) waiting, likewise.
    """

    def __init__(self, max_jobs: int = MAX_JOBS, max_bytes: int = MAX_BYTES) -> None:
        self._max_jobs = max_jobs
        self._max_bytes = max_bytes
        self._cond = threading.Condition()
        self._jobs: deque[tuple[Job, int]] = deque()
        self._bytes = 0
        self._order = threading.Lock()  # held while jobs run: one at a time, in order
        # The thread running jobs now: a job whose code drains (an observer reading
        # stats()) must not run the jobs after it before it ends, nor wait for itself.
        self._runner: int | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._woken = False  # a job put with now=True waits
        self._sleeping = False  # the thread waits until woken, not POLL

    def put(self, job: Job, size: int = 0, now: bool = True) -> None:
        """Run *job* soon, after every job put before it. When the queue is full (or
        closed), the caller runs the waiting jobs and then *job*. Never raises.

        With *now* false, the thread is not woken for it: it runs at the thread's next
        look (within :data:`POLL` seconds), or with the next job put with *now*. The
        middleware puts a request's pre job so, and its post job, once the answer is
        sent, with *now*: the thread then runs both while the request's thread waits for
        the next request, not in the middle of this one, where it would take the
        interpreter lock from it (measured over HTTP: 5-8% on the median latency)."""
        with self._cond:
            if (
                not self._closed
                and len(self._jobs) < self._max_jobs
                and self._bytes + size <= self._max_bytes
            ) or self._runner == threading.get_ident():  # from a job: it runs after it
                self._jobs.append((job, size))
                self._bytes += size
                if self._thread is None:
                    self._start()
                if now or self._sleeping:
                    self._woken = True
                    self._cond.notify()
                return
        with self._order:
            self._run_waiting(then=job)

    def drain(self) -> None:
        """Run the waiting jobs on this thread, after the one under way, if any; from
        a job itself, nothing (the jobs after it run once it ends)."""
        if self._runner == threading.get_ident():
            return
        with self._order:
            self._run_waiting()

    def close(self, timeout: float | None = None) -> None:
        """Stop the thread (waiting up to *timeout* for it) and run what waits on this
        one; later jobs run on the caller of :meth:`put`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        self.drain()
        if thread is not None:
            thread.join(timeout)

    def _start(self) -> None:
        thread = threading.Thread(target=self._work, name="xo-webhooks-intake", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # e.g. a process limit: the next put tries again
            logger.exception("could not start the xo-webhooks intake thread")
            return
        self._thread = thread

    def _take(self) -> Job | None:
        """The next job; ``None`` when none waits. Holds the lock."""
        if not self._jobs:
            return None
        job, size = self._jobs.popleft()
        self._bytes -= size
        return job

    def _run_waiting(self, then: Job | None = None) -> None:
        """Run every waiting job, then *then*. The caller holds ``_order``."""
        self._runner = threading.get_ident()
        try:
            while True:
                with self._cond:
                    job = self._take()
                if job is None:
                    break
                _run(job)
            if then is not None:
                _run(then)
        finally:
            self._runner = None

    def _work(self) -> None:
        idle = 0  # looks in a row that found no job
        while True:
            with self._cond:
                if not (self._woken and self._jobs) and not self._closed:
                    self._sleeping = idle >= SLEEP_AFTER
                    self._cond.wait(None if self._sleeping else POLL)
                    self._sleeping = False
                if self._closed:
                    return
                self._woken = False
                found = bool(self._jobs)
            idle = 0 if found else idle + 1
            if found:
                self.drain()


def _run(job: Job) -> None:
    try:
        job()
    except Exception:  # a job's failure must not stop the ones after it
        logger.exception("xo-webhooks could not build the hooks of a request")
