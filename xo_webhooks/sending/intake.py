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
        self._jobs: deque[tuple[int, Job, int]] = deque()  # (number, job, size)
        self._put = 0  # jobs put so far: the next one's number
        self._bytes = 0
        self._order = threading.Lock()  # held while a job runs: one at a time, in order
        # The thread running a job now: a job whose code drains (an observer reading
        # stats()) must not run the jobs after it before it ends, nor wait for itself.
        self._runner: int | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._woken = False  # a job put with now=True waits
        self._sleeping = False  # the thread waits until woken, not POLL

    def put(self, job: Job, size: int = 0, now: bool = True) -> None:
        """Run *job* soon, after every job put before it. When the queue is full (or
        closed, or its thread cannot start), the caller runs the jobs put before it,
        then *job*. Never raises.

        With *now* false, the thread is not woken for it: it runs at the thread's next
        look (within :data:`POLL` seconds), or with the next job put with *now*. The
        middleware puts a request's pre job so, and its post job, once the server has
        taken the whole answer, with *now*: the thread then runs both while the
        request's thread waits for the next request, not in the middle of this one,
        where it would take the interpreter lock from it (measured over HTTP: 5-8% on
        the median latency)."""
        with self._cond:
            from_a_job = self._runner == threading.get_ident()  # it runs after that job
            room = (
                not self._closed
                and len(self._jobs) < self._max_jobs
                and self._bytes + size <= self._max_bytes
            )
            if room and self._thread is None:
                self._start()
            if from_a_job or (room and self._thread is not None):
                self._jobs.append((self._put, job, size))
                self._put += 1
                self._bytes += size
                if now or self._sleeping:
                    self._woken = True
                    self._cond.notify()
                return
            before = self._put
        while self._run_next(before):  # only those put before: others may keep coming
            pass
        with self._order:  # and once the one the thread took has ended
            self._run(job)

    def drain(self) -> None:
        """Run the jobs put before this call on this thread, after the one under way,
        if any; from a job itself, nothing (the jobs after it run once it ends)."""
        if self._runner == threading.get_ident():
            return
        with self._cond:
            before = self._put
        while self._run_next(before):
            pass

    def close(self, timeout: float | None = None) -> None:
        """Stop the thread (waiting up to *timeout* for it) and run what waits on this
        one; later jobs run on the caller of :meth:`put`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        while self._run_next(None):
            pass
        if thread is not None:
            thread.join(timeout)

    def _start(self) -> None:
        """Start the thread. Holds the lock."""
        thread = threading.Thread(target=self._work, name="xo-webhooks-intake", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # e.g. a process limit: callers run their jobs; next put retries
            logger.exception("could not start the xo-webhooks intake thread")
            return
        self._thread = thread

    def _run_next(self, before: int | None) -> bool:
        """Run the next waiting job, if one was put before number *before* (any, for
        ``None``); say whether one ran. Jobs run one at a time: a caller waits here for
        the one under way."""
        with self._order:
            with self._cond:
                if not self._jobs or (before is not None and self._jobs[0][0] >= before):
                    return False
                _, job, size = self._jobs.popleft()
                self._bytes -= size
            self._run(job)
        return True

    def _run(self, job: Job) -> None:
        """Run *job*. The caller holds ``_order``."""
        self._runner = threading.get_ident()
        try:
            _run(job)
        finally:
            self._runner = None

    def _work(self) -> None:
        idle = 0  # looks in a row that found no job
        while True:
            with self._cond:
                if not self._closed and not (self._woken and self._jobs):
                    self._sleeping = idle >= SLEEP_AFTER and not self._jobs
                    self._cond.wait(None if self._sleeping else POLL)
                    self._sleeping = False
                if self._closed:
                    return
                self._woken = False
                found = bool(self._jobs)
            idle = 0 if found else idle + 1
            while self._run_next(None):
                pass


def _run(job: Job) -> None:
    try:
        job()
    except Exception:  # a job's failure must not stop the ones after it
        logger.exception("xo-webhooks could not build the hooks of a request")
