"""Running hook scripts: no shell, one process group each, a time limit, and the
output kept for the log. The receiver decides *which* script may run; this module
only runs it, off the request thread."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import selectors
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

__all__ = ["ScriptJob", "ScriptRunner", "OUTPUT_LIMIT"]

logger = logging.getLogger(__name__)

OUTPUT_LIMIT = 4096  # bytes of a script's output kept for the log
_READ_SIZE = 65536


@dataclass(frozen=True)
class ScriptJob:
    """A hook script to run: its name for the log, real path, stdin and environment."""

    name: str
    path: str
    stdin: bytes
    env: dict[str, str]


class ScriptRunner:
    """Worker threads, started at the first job, that run scripts one at a time each.

    :param workers: how many scripts run at once.
    :param max_pending: most jobs queued or running; beyond it :meth:`submit` refuses.
    :param timeout: seconds a script may run before its process group is killed.
    :param cwd: the folder scripts run in.
    """

    def __init__(self, workers: int, max_pending: int, timeout: float, cwd: str | None) -> None:
        self._workers = workers
        self._max_pending = max_pending
        self._timeout = timeout
        self._cwd = cwd
        self._queue: queue.SimpleQueue[ScriptJob | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._pending = 0  # queued or running
        self._closed = False
        self._changed = threading.Condition()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def submit(self, job: ScriptJob) -> bool:
        """Queue *job*; return ``False`` if the runner is closed or full."""
        with self._changed:
            if self._closed or self._pending >= self._max_pending:
                return False
            if not self._threads:
                for n in range(self._workers):
                    thread = threading.Thread(
                        target=self._work, name=f"xo-webhooks-receiver-{n}", daemon=True
                    )
                    thread.start()
                    self._threads.append(thread)
            self._pending += 1
            self._queue.put(job)
        return True

    def drain(self, timeout: float | None) -> bool:
        """Wait until no job is queued or running; return whether that happened."""
        with self._changed:
            return self._changed.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float | None) -> bool:
        """Run what is queued, then stop the threads; return whether they all stopped."""
        with self._changed:
            if not self._closed:
                self._closed = True
                for _ in self._threads:
                    self._queue.put(None)  # one stop sign per worker, after the queued jobs
            threads = list(self._threads)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._run(job)
            except Exception:
                logger.exception("hook script %s could not be run", job.name)
            finally:
                with self._changed:
                    self._pending -= 1
                    self._changed.notify_all()

    def _run(self, job: ScriptJob) -> None:
        # The payload goes through a temporary file rather than a pipe, so that a
        # script that never reads its stdin cannot block this thread.
        with tempfile.TemporaryFile() as stdin:
            stdin.write(job.stdin)
            stdin.seek(0)
            try:
                process = subprocess.Popen(
                    [job.path],
                    stdin=stdin,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    cwd=self._cwd,
                    env=job.env,
                    shell=False,
                    close_fds=True,
                    start_new_session=True,  # its own process group, killed as a whole
                )
            except OSError as e:
                logger.error("hook script %s could not start (missing #! line?): %s", job.name, e)
                return
        started = time.monotonic()
        output, dropped, timed_out = _collect(process, started + self._timeout)
        shown = repr(output.decode("utf-8", "replace"))
        if dropped:
            shown += f" (and {dropped} more bytes)"
        if timed_out:
            logger.warning(
                "hook script %s was killed after %g s; output: %s", job.name, self._timeout, shown
            )
        elif process.returncode == 0:
            logger.info("hook script %s exited with status 0; output: %s", job.name, shown)
        else:
            logger.warning(
                "hook script %s exited with status %d; output: %s",
                job.name,
                process.returncode,
                shown,
            )


def _collect(process: subprocess.Popen[bytes], deadline: float) -> tuple[bytes, int, bool]:
    """Read what *process* prints until it exits or *deadline* passes, then kill its group.

    Return the first :data:`OUTPUT_LIMIT` bytes of output, how many more were
    dropped, and whether the time limit was hit.
    """
    assert process.stdout is not None
    kept = bytearray()
    dropped = 0
    timed_out = False
    fd = process.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            if not selector.select(remaining):
                continue
            chunk = os.read(fd, _READ_SIZE)
            if not chunk:  # end of output: every process of the group closed it
                break
            room = max(0, OUTPUT_LIMIT - len(kept))
            kept += chunk[:room]
            dropped += len(chunk) - len(chunk[:room])
    if not timed_out:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    if timed_out:
        with contextlib.suppress(ProcessLookupError):  # the group is already gone
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    process.stdout.close()
    return bytes(kept), dropped, timed_out
