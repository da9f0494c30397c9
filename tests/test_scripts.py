"""The script runner's contract (xo_webhooks.receiving.scripts): the receiver decides
which script may run; the runner runs it, off the request thread.

- the script gets the payload on its stdin and exactly the job's environment (nothing
  of the receiver's own), in the configured folder; it is executed directly, never
  through a shell;
- its exit status and its output (stdout and stderr, cut at ``OUTPUT_LIMIT`` bytes) are
  logged; past its time limit its process group is killed;
- ``submit`` refuses beyond ``max_pending`` jobs queued or running, and once closed;
  ``workers`` scripts run at once, on threads started by the first job;
- ``drain`` waits for every job; ``close`` runs what is queued, then stops the threads.

Through the receiver (which script, its XO_HOOK_* variables, a hanging script's
children) see test_receiver.py.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xo_webhooks.receiving.scripts import OUTPUT_LIMIT, ScriptJob, ScriptRunner

from .waiting import wait_until

pytestmark = pytest.mark.usefixtures("no_leaked_threads")

PAYLOAD = b'{"type":"post","callId":"c-1","method":"vm.start","note":"caf\xc3\xa9"}'


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.INFO, logger="xo_webhooks.receiving.scripts")
    return caplog


@pytest.fixture
def runners() -> Iterator[list[ScriptRunner]]:
    """Runners closed at teardown (a script left waiting dies at its time limit)."""
    made: list[ScriptRunner] = []
    yield made
    for runner in made:
        assert runner.close(30)


def make_runner(runners, tmp_path, workers=1, max_pending=10, timeout=10.0) -> ScriptRunner:
    runners.append(ScriptRunner(workers, max_pending, timeout, str(tmp_path)))
    return runners[-1]


def script(folder: Path, name: str, body: str) -> str:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def job(path: str, name: str = "job", stdin: bytes = PAYLOAD, **env: str) -> ScriptJob:
    return ScriptJob(name=name, path=path, stdin=stdin, env={"PATH": os.environ["PATH"], **env})


def messages(log) -> list[str]:
    return [r.getMessage() for r in log.records if r.name == "xo_webhooks.receiving.scripts"]


def runner_threads() -> list[str]:
    return sorted(
        t.name for t in threading.enumerate() if t.name.startswith("xo-webhooks-receiver-")
    )


def process_is_gone(pid: int, timeout: float = 10.0) -> bool:
    """Wait for *pid* to end, on a pidfd (an event, not a polling loop); if it does not,
    kill it (through the same pidfd: never another process) and return ``False``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        if select.select([fd], [], [], timeout)[0]:
            return True
        signal.pidfd_send_signal(fd, signal.SIGKILL)  # leave nothing behind
        return False
    finally:
        os.close(fd)


class Gates:
    """Scripts that say they started, then wait on their own fifo until :meth:`open`."""

    BODY = 'echo > "$GATE.started"\nread line < "$GATE"\necho > "$GATE.done"\n'

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = script(folder, "gated.sh", self.BODY)

    def job(self, name: str) -> ScriptJob:
        gate = self.folder / f"gate-{name}"
        if not gate.exists():
            os.mkfifo(gate)
        return job(self.path, name, GATE=str(gate))

    def started(self, name: str) -> bool:
        return (self.folder / f"gate-{name}.started").exists()

    def done(self, name: str) -> bool:
        return (self.folder / f"gate-{name}.done").exists()

    def open(self, name: str) -> None:
        """Let *name* go on, once it waits on its fifo (never blocks the test)."""

        def opened() -> bool:
            try:
                fd = os.open(self.folder / f"gate-{name}", os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:  # ENXIO: the script has not opened it yet
                assert e.errno == errno.ENXIO, e
                return False
            os.write(fd, b"go\n")
            os.close(fd)
            return True

        wait_until(opened, what=f"script {name} to wait on its gate")


@pytest.fixture
def gates(tmp_path) -> Gates:
    return Gates(tmp_path)


# -- what a script gets ---------------------------------------------------------------------


def test_a_script_gets_the_payload_on_stdin_and_only_the_job_environment(
    runners, tmp_path, monkeypatch
):
    monkeypatch.setenv("XO_WEBHOOKS_SECRET", "whsec_must-not-leak")
    monkeypatch.setenv("RECEIVER_ONLY", "must-not-leak")
    out = tmp_path / "out"
    out.mkdir()
    path = script(
        tmp_path, "record.sh", f'cat > "{out}/stdin"\nenv > "{out}/env"\npwd > "{out}/cwd"\n'
    )
    env = {"XO_HOOK_TYPE": "post", "XO_HOOK_METHOD": "vm.start", "XO_HOOK_CALL_ID": "c 1;$(id)"}
    runner = make_runner(runners, tmp_path)
    assert runner.submit(job(path, **env))
    assert runner.drain(10)
    assert (out / "stdin").read_bytes() == PAYLOAD
    seen = dict(line.split("=", 1) for line in (out / "env").read_text().splitlines())
    assert {k: seen[k] for k in env} == env  # values as given, never interpreted
    assert "RECEIVER_ONLY" not in seen and "XO_WEBHOOKS_SECRET" not in seen
    assert set(seen) - set(env) - {"PATH"} <= {"PWD", "SHLVL", "_", "OLDPWD"}  # the shell's own
    assert (out / "cwd").read_text().strip() == str(tmp_path)


def test_a_script_is_executed_without_a_shell(runners, tmp_path):
    folder = tmp_path / "odd; touch injected-1"
    folder.mkdir()
    path = script(folder, "hook $(touch injected-2) `touch injected-3`.sh", 'echo > "$PWD/ran"\n')
    runner = make_runner(runners, tmp_path)
    assert runner.submit(job(path))
    assert runner.drain(10)
    assert (tmp_path / "ran").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd; touch injected-1", "ran"]


def test_a_large_payload_does_not_block_a_script_that_never_reads_it(runners, tmp_path, log):
    path = script(tmp_path, "ignore.sh", "echo ignored\n")
    runner = make_runner(runners, tmp_path, timeout=10)
    assert runner.submit(job(path, stdin=b"x" * 4_000_000))
    assert runner.drain(10)
    assert messages(log) == ["hook script job exited with status 0; output: 'ignored\\n'"]


# -- what is logged -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "level", "message"),
    [
        pytest.param(
            "echo out\necho err >&2\n", logging.INFO,
            "hook script job exited with status 0; output: 'out\\nerr\\n'", id="status-0",
        ),
        pytest.param(
            "echo failing\nexit 3\n", logging.WARNING,
            "hook script job exited with status 3; output: 'failing\\n'", id="status-3",
        ),
        pytest.param(
            "printf 'caf\\351'\n", logging.INFO,
            "hook script job exited with status 0; output: 'caf\ufffd'", id="not-utf8",
        ),
    ],
)  # fmt: skip
def test_the_exit_status_and_output_are_logged(runners, tmp_path, log, body, level, message):
    runner = make_runner(runners, tmp_path)
    assert runner.submit(job(script(tmp_path, "s.sh", body)))
    assert runner.drain(10)
    (record,) = [r for r in log.records if r.name == "xo_webhooks.receiving.scripts"]
    assert (record.levelno, record.getMessage()) == (level, message)


@pytest.mark.parametrize(
    ("size", "dropped"),
    [
        pytest.param(OUTPUT_LIMIT, "", id="at-the-limit"),
        pytest.param(OUTPUT_LIMIT + 1, " (and 1 more bytes)", id="one-over"),
        pytest.param(300_000, f" (and {300_000 - OUTPUT_LIMIT} more bytes)", id="many-reads"),
    ],
)
def test_output_is_cut_at_the_limit_and_the_rest_counted(runners, tmp_path, log, size, dropped):
    body = f"head -c {size} /dev/zero | tr '\\0' x\n"
    runner = make_runner(runners, tmp_path)
    assert runner.submit(job(script(tmp_path, "loud.sh", body)))
    assert runner.drain(10)
    assert messages(log) == [
        f"hook script job exited with status 0; output: '{'x' * OUTPUT_LIMIT}'{dropped}"
    ]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param("echo $$ > pids\necho started\nexec sleep 600\n", id="still-writing"),
        pytest.param(  # its output closed: only the process is left to wait for
            "echo $$ > pids\necho started\nexec > /dev/null 2>&1\nexec sleep 600\n",
            id="output-closed",
        ),
        pytest.param(  # the whole process group goes
            "sleep 600 &\necho $$ $! > pids\necho started\nwait\n", id="with-a-child"
        ),
    ],
)
def test_a_script_past_its_time_limit_is_killed(runners, tmp_path, log, body):
    runner = make_runner(runners, tmp_path, timeout=0.3)
    started = time.monotonic()
    assert runner.submit(job(script(tmp_path, "hang.sh", body)))
    assert runner.drain(10)
    assert time.monotonic() - started < 5
    assert messages(log) == ["hook script job was killed after 0.3 s; output: 'started\\n'"]
    assert log.records[-1].levelno == logging.WARNING
    alive = [
        pid for pid in (tmp_path / "pids").read_text().split() if not process_is_gone(int(pid))
    ]
    assert alive == [], "these processes outlived the time limit"


def test_the_time_limit_counts_until_the_script_exits_not_until_its_output_closes(
    runners, tmp_path, log
):
    # A child in its own session (setsid) keeps the script's output open after the
    # script has exited 0: the worker must not wait for it, nor call the script killed.
    escaped = tmp_path / "escaped"
    body = f'setsid sh -c \'echo $$ > "$1"; exec sleep 600\' sh "{escaped}" &\necho started\n'
    runner = make_runner(runners, tmp_path, timeout=20)
    started = time.monotonic()
    assert runner.submit(job(script(tmp_path, "escape.sh", body)))
    drained = runner.drain(5)
    elapsed = time.monotonic() - started
    pid = int(wait_until(lambda: escaped.exists() and escaped.read_text().strip()))
    try:
        assert os.getsid(pid) == pid  # out of reach of the group kill, as documented
    finally:
        process_is_gone(pid, timeout=0)  # kills it
    assert drained and elapsed < 5, "the worker waited for the escaped child"
    assert messages(log) == ["hook script job exited with status 0; output: 'started\\n'"]


def under_a_file(tmp_path: Path) -> str:
    return script(tmp_path, "x.sh", "echo never\n") + "/y.sh"


@pytest.mark.parametrize(
    ("make_path", "reason"),
    [
        pytest.param(lambda tmp: str(tmp / "missing.sh"), "No such file", id="missing"),
        pytest.param(under_a_file, "Not a directory", id="under-a-file"),
    ],
)
def test_a_script_that_cannot_start_is_logged_and_the_worker_goes_on(
    runners, tmp_path, log, make_path, reason
):
    runner = make_runner(runners, tmp_path, workers=1)
    assert runner.submit(job(make_path(tmp_path), name="broken"))
    assert runner.submit(job(script(tmp_path, "ok.sh", "echo fine\n"), name="ok"))
    assert runner.drain(10)
    broken, ok = messages(log)
    assert broken.startswith("hook script broken could not start") and reason in broken
    assert ok == "hook script ok exited with status 0; output: 'fine\\n'"


# -- queue, workers, drain, close ---------------------------------------------------------


def test_workers_start_at_the_first_job_and_run_scripts_at_once(runners, tmp_path, gates):
    runner = make_runner(runners, tmp_path, workers=2)
    assert runner_threads() == []
    assert runner.submit(gates.job("a"))
    assert runner_threads() == ["xo-webhooks-receiver-0", "xo-webhooks-receiver-1"]
    assert runner.submit(gates.job("b"))
    wait_until(lambda: gates.started("a") and gates.started("b"), what="both scripts running")
    gates.open("a")
    gates.open("b")
    assert runner.drain(10)
    assert gates.done("a") and gates.done("b")


def test_submit_refuses_beyond_max_pending_jobs_queued_or_running(runners, tmp_path, gates):
    runner = make_runner(runners, tmp_path, workers=1, max_pending=2)
    assert runner.submit(gates.job("running"))
    wait_until(lambda: gates.started("running"), what="the first script to run")
    assert runner.submit(gates.job("queued"))
    assert runner.submit(gates.job("refused")) is False
    gates.open("running")
    gates.open("queued")
    assert runner.drain(10)
    assert not gates.started("refused")
    assert runner.submit(gates.job("later"))  # room again
    gates.open("later")
    assert runner.drain(10)


def test_drain_waits_for_running_and_queued_jobs(runners, tmp_path, gates):
    runner = make_runner(runners, tmp_path, workers=1)
    assert runner.drain(0)  # nothing to wait for
    assert runner.submit(gates.job("a"))
    assert runner.submit(gates.job("b"))
    assert runner.drain(0.05) is False
    gates.open("a")
    wait_until(lambda: gates.started("b"), what="the queued script to run")
    assert runner.drain(0.05) is False
    gates.open("b")
    assert runner.drain(10)


def test_close_runs_what_is_queued_then_stops(runners, tmp_path, gates):
    runner = make_runner(runners, tmp_path, workers=1)
    assert runner.submit(gates.job("running"))
    assert runner.submit(gates.job("queued"))
    wait_until(lambda: gates.started("running"), what="the first script to run")
    assert runner.close(0.05) is False  # a script still runs
    assert runner.closed
    assert runner.submit(gates.job("late")) is False
    gates.open("running")
    gates.open("queued")  # run although close() came after it was queued
    assert runner.close(10)  # twice is fine
    assert gates.done("queued") and not gates.started("late")
    assert runner_threads() == []


def test_close_before_any_job(runners, tmp_path):
    runner = make_runner(runners, tmp_path, workers=3)
    assert runner.close(0)
    assert runner.closed and runner.submit(job("/bin/true")) is False
    assert runner_threads() == []
