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
# Seconds between looks at whether a script has exited while its output stays open
# and quiet (the same tick as subprocess's own wait with a timeout).
_EXIT_POLL = 0.05
# Seconds a script's output is still read once it has exited: what is left in the pipe
# comes at once; a process the script left running may keep it open, and is not waited for.
_AFTER_EXIT = 0.1


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

    The time limit counts until the script exits, not until its output closes: a
    process it left running in the background may hold the output open long after (one
    in a session of its own, ``setsid``, even out of reach of the group kill). It is
    neither waited for nor killed: once the script has exited, what is left in the pipe
    is read for at most :data:`_AFTER_EXIT` seconds, and the pipe closed.

    Return the first :data:`OUTPUT_LIMIT` bytes of output, how many more were
    dropped, and whether the time limit was hit.
    """
    assert process.stdout is not None
    output = _Output(process.stdout.fileno())
    with selectors.DefaultSelector() as selector:
        selector.register(output.fd, selectors.EVENT_READ)
        timed_out = not _wait_for_exit(process, selector, output, deadline)
        if timed_out:
            with contextlib.suppress(ProcessLookupError):  # the group is already gone
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        _read_until(selector, output, time.monotonic() + _AFTER_EXIT)
    process.stdout.close()
    return bytes(output.kept), output.dropped, timed_out


def _wait_for_exit(
    process: subprocess.Popen[bytes],
    selector: selectors.BaseSelector,
    output: _Output,
    deadline: float,
) -> bool:
    """Read *output* until *process* exits; return ``False`` if *deadline* came first."""
    while process.poll() is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if output.closed:  # only the exit is left to wait for
            try:
                process.wait(remaining)
            except subprocess.TimeoutExpired:
                return False
            return True
        # Quiet but open output says nothing of the exit: look again every tick.
        if selector.select(min(remaining, _EXIT_POLL)):
            output.read()
    return True


def _read_until(selector: selectors.BaseSelector, output: _Output, until: float) -> None:
    """Read *output* until it closes, nothing comes, or *until* passes."""
    while not output.closed:
        remaining = until - time.monotonic()
        if remaining <= 0 or not selector.select(remaining):
            return
        output.read()


class _Output:
    """A script's output pipe: the first :data:`OUTPUT_LIMIT` bytes kept, the rest counted."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.kept = bytearray()
        self.dropped = 0
        self.closed = False  # every process holding it has closed it

    def read(self) -> None:
        """Read once what is there (the pipe is readable)."""
        chunk = os.read(self.fd, _READ_SIZE)
        if not chunk:
            self.closed = True
        room = max(0, OUTPUT_LIMIT - len(self.kept))
        self.kept += chunk[:room]
        self.dropped += len(chunk) - len(chunk[:room])
