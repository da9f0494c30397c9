"""The ``xo-webhooks`` command, run as the installed program in subprocesses.

Each run gets an explicit environment: the developer's own ``XO_WEBHOOKS_*`` variables
are removed, and a test adds what it needs. Hooks go to the ``webhook_receiver`` fixture
(the package's pytest plugin, through its entry point). Long-running subcommands
(``serve``, ``receive``) listen on port 0 on 127.0.0.1, print the address they got, and
are stopped with SIGTERM, or killed at teardown if a test failed first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import requests

from xo_webhooks import __version__
from xo_webhooks.request.jsonrpc import Outcome
from xo_webhooks.request.payload import post_payload, pre_payload
from xo_webhooks.signing import verify

from .helpers import SECRET
from .waiting import wait_until

# The script installed for this interpreter first: a shim earlier on PATH (pyenv, a
# different virtualenv) could run another installation.
XO = shutil.which("xo-webhooks", path=os.path.dirname(sys.executable)) or shutil.which(
    "xo-webhooks"
)
TIMEOUT = 30  # seconds for any one command

pytestmark = pytest.mark.skipif(XO is None, reason="xo-webhooks is not installed: pip install -e .")


def environment(**variables: str) -> dict[str, str]:
    """``os.environ`` without any ``XO_WEBHOOKS_*`` variable, plus *variables*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XO_WEBHOOKS_")}
    env.update(variables)
    return env


def hooks_env(url: str, **extra: Any) -> dict[str, str]:
    hook = {"method": "vm.*", "type": "pre/post", "url": url, **extra}
    return environment(XO_WEBHOOKS_HOOKS=json.dumps([hook]))


def xo(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None, cwd: Any = None
) -> subprocess.CompletedProcess[str]:
    """Run ``xo-webhooks *args`` to completion."""
    assert XO is not None
    return subprocess.run(
        [XO, *args],
        env=environment() if env is None else env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=cwd,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def error_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    """Check that *result* failed with *status* and one error line; return the line."""
    assert result.returncode == status, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("xo-webhooks: error: ")
    return lines[0]


def pre(call_id: str = "c1") -> dict[str, Any]:
    return pre_payload(call_id, ("u1", "alice"), "vm.start", {"id": "vm-1"}, 1_700_000_000_000)


def post(call_id: str = "c1") -> dict[str, Any]:
    return post_payload(
        call_id, ("u1", "alice"), "vm.start", {"id": "vm-1"},
        1_700_000_000_000, 1_700_000_000_532, Outcome(result=True),
    )  # fmt: skip


# -- long-running subcommands ------------------------------------------------------------


class Lines:
    """Collects the lines of a pipe from a thread; lets a test wait for one."""

    def __init__(self, pipe: IO[str]) -> None:
        self.lines: list[str] = []
        self.closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[str]) -> None:
        with pipe:
            for line in pipe:
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def search(self, pattern: str, timeout: float = 15) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    found = re.search(pattern, line)
                    if found:
                        return found
                remaining = deadline - time.monotonic()
                if self.closed or remaining <= 0:
                    raise AssertionError(f"no line matching {pattern!r} in:\n{self.text}")
                self._cond.wait(remaining)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class Running:
    """``xo-webhooks *args`` running in the background."""

    def __init__(self, args: tuple[str, ...], env: dict[str, str], cwd: Path) -> None:
        assert XO is not None
        self.process = subprocess.Popen(
            [XO, *args],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self.stdout = Lines(self.process.stdout)
        self.stderr = Lines(self.process.stderr)

    def stop(self, timeout: float = TIMEOUT) -> int:
        """SIGTERM, as a process manager stops it; return the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(timeout)
        self.stdout.join(5)
        self.stderr.join(5)
        return status

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.stdout.join(5)
        self.stderr.join(5)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """``start(*args, env=...)`` runs the command in the background; every process is
    stopped at teardown."""
    started: list[Running] = []

    def launch(*args: str, env: dict[str, str]) -> Running:
        started.append(Running(args, env, tmp_path))
        return started[-1]

    yield launch
    for running in started:
        running.kill()


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


# -- the command itself -------------------------------------------------------------------

COMMANDS = ["serve", "check-config", "test", "validate", "receive", "replay", "spool", "demo"]


def test_version():
    result = xo("--version")
    assert (result.returncode, result.stdout) == (0, f"xo-webhooks {__version__}\n")


def test_python_dash_m_runs_the_same_command():
    result = subprocess.run(
        [sys.executable, "-m", "xo_webhooks", "--version"],
        env=environment(), capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (0, f"xo-webhooks {__version__}\n")


def test_main_returns_the_exit_status_instead_of_exiting(capsys):
    from xo_webhooks.cli import main

    assert main(["--version"]) == 0
    assert main(["serve", "no-colon"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("xo-webhooks serve: error: ")


def test_help_lists_every_command():
    result = xo("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\b", result.stdout, re.MULTILINE), command


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_each_command(command):
    result = xo(command, "--help")
    assert result.returncode == 0, result
    assert result.stdout.startswith(f"usage: xo-webhooks {command}")


@pytest.mark.parametrize(
    "args, says",
    [
        pytest.param([], "required: COMMAND", id="no-command"),
        pytest.param(["frobnicate"], "invalid choice: 'frobnicate'", id="unknown-command"),
        pytest.param(["test"], "required: URL", id="test-without-url"),
        pytest.param(["test", "ftp://x/"], "expected an http:// or https:// URL", id="test-ftp"),
        pytest.param(["test", "http://127.0.0.1/", "--format", "xml"], "invalid choice: 'xml'",
                     id="test-format"),
        pytest.param(["serve", "myapi"], "expected MODULE:APP", id="serve-without-colon"),
        pytest.param(["serve", "a:b", "--port", "70000"], "port from 0 to 65535", id="port"),
        pytest.param(["replay"], "required: FILE", id="replay-without-file"),
    ],
)  # fmt: skip
def test_usage_errors_exit_2_with_the_reason(args, says):
    result = xo(*args)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("xo-webhooks") and ": error: " in last and says in last


# -- check-config -------------------------------------------------------------------------


def test_check_config_prints_the_hooks_and_settings():
    hooks = [
        {"method": "vm.start", "type": "pre", "url": "http://127.0.0.1:9/pre",
         "waitForResponse": True, "secret": SECRET},
        {"method": "vm.*", "type": "post", "url": "https://ops:hunter2@example.com/h",
         "format": "slack"},
    ]  # fmt: skip
    env = environment(XO_WEBHOOKS_HOOKS=json.dumps(hooks), XO_WEBHOOKS_RETRIES="2")
    result = xo("check-config", env=env)
    assert result.returncode == 0, result
    rows = [line.split() for line in result.stdout.splitlines()]
    assert ["METHOD", "TYPE", "URL", "FORMAT", "WAITFORRESPONSE", "SIGNED"] in rows
    assert ["vm.start", "pre", "http://127.0.0.1:9/pre", "json", "yes", "yes"] in rows
    assert ["vm.*", "post", "https://ops:***@example.com/h", "slack", "no", "no"] in rows
    assert "XO_WEBHOOKS_RETRY_SCHEDULE=1s,2s" in result.stdout
    assert "2 endpoint(s):" in result.stdout
    assert ["http://127.0.0.1:9", "hooks[0]"] in rows
    assert ["https://example.com", "hooks[1]"] in rows  # no credentials in an endpoint
    assert "XO_WEBHOOKS_TIMEOUT=10" in result.stdout
    assert SECRET not in result.stdout and "hunter2" not in result.stdout


def test_check_config_reads_the_config_file(tmp_path):
    config = tmp_path / "hooks.json"
    config.write_text(json.dumps({"hooks": [{"method": "vm.start", "type": "post",
                                             "url": "http://127.0.0.1:9/"}]}))  # fmt: skip
    result = xo("check-config", env=environment(XO_WEBHOOKS_CONFIG=str(config)))
    assert result.returncode == 0, result
    assert "1 hook(s):" in result.stdout and "http://127.0.0.1:9/" in result.stdout


@pytest.mark.parametrize(
    "variables, says",
    [
        pytest.param(
            {"XO_WEBHOOKS_HOOKS": '[{"method": "vm.start", "type": "pree", "url": "http://x/"}]'},
            "XO_WEBHOOKS_HOOKS[0].type: 'pree' is not one of", id="bad-type"),
        pytest.param({"XO_WEBHOOKS_HOOKS": "[{"}, "XO_WEBHOOKS_HOOKS: not valid JSON", id="json"),
        pytest.param({"XO_WEBHOOKS_TIMEOUT": "soon"}, "XO_WEBHOOKS_TIMEOUT: ", id="timeout"),
        pytest.param({"XO_WEBHOOKS_CONFIG": "/nonexistent/hooks.json"},
                     "XO_WEBHOOKS_CONFIG=/nonexistent/hooks.json: cannot read", id="no-file"),
    ],
)  # fmt: skip
def test_check_config_reports_a_bad_configuration_in_one_line(variables, says):
    line = error_line(xo("check-config", env=environment(**variables)), 1)
    assert says in line


def test_check_config_without_hooks_says_so():
    result = xo("check-config")
    assert result.returncode == 0, result
    assert result.stdout.startswith("no hooks configured")
    assert "passes every request through" in result.stdout


# -- validate -----------------------------------------------------------------------------


def test_validate_one_payload(tmp_path):
    path = tmp_path / "post.json"
    path.write_text(json.dumps(post(), indent=2))  # one value over several lines
    result = xo("validate", str(path))
    assert (result.returncode, result.stdout) == (0, "the payload is valid\n")


def test_validate_json_lines_names_the_line_and_path_of_each_error(tmp_path):
    bad = {**post("c2"), "params": 5}
    not_both = {**post("c3"), "error": {"code": 1, "message": "no"}}
    lines = [pre(), post(), bad, pre("c3"), not_both]
    path = tmp_path / "hooks.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in lines) + "\n{oops\n")
    result = xo("validate", str(path))
    assert result.returncode == 1, result
    out = result.stdout.splitlines()
    assert f"{path}:3: $.params: 5 is not of type 'object', 'array'" in out
    assert f"{path}:5: $: must have exactly one of result or error" in out
    assert any(line.startswith(f"{path}:7: not JSON: ") for line in out)
    assert not any(f"{path}:{n}:" in result.stdout for n in (1, 2, 4, 6))
    assert out[-1] == "3 of 6 payloads invalid"


def test_validate_reads_stdin():
    stream = json.dumps(pre()) + "\n" + json.dumps(post()) + "\n"
    for args in (["-"], []):
        result = xo("validate", *args, stdin=stream)
        assert (result.returncode, result.stdout) == (0, "2 payloads valid\n"), args
    result = xo("validate", stdin=json.dumps({**pre(), "duration": 3}))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "<stdin>: $.duration: not allowed in a pre hook",
        "the payload is invalid",
    ]


@pytest.mark.parametrize(
    "args, stdin, says",
    [
        pytest.param(["/nonexistent/hooks.jsonl"], None,
                     "cannot read /nonexistent/hooks.jsonl: No such file", id="missing-file"),
        pytest.param([], "", "<stdin>: no payload found", id="empty"),
    ],
)  # fmt: skip
def test_validate_fails_in_one_line_without_input(args, stdin, says):
    assert says in error_line(xo("validate", *args, stdin=stdin), 1)


# -- test ---------------------------------------------------------------------------------


def test_test_sends_a_pre_then_a_post_hook(webhook_receiver):
    result = xo("test", webhook_receiver.url)
    assert result.returncode == 0, result
    first, second = webhook_receiver.wait_for(2)
    assert (first.payload["type"], second.payload["type"]) == ("pre", "post")
    assert first.payload["callId"] == second.payload["callId"]
    assert first.payload["method"] == "vm.start" and "result" in second.payload
    assert re.search(r"^\s+pre\s+HTTP 204 in \d+ ms$", result.stdout, re.MULTILINE)
    assert re.search(r"^\s+post\s+HTTP 204 in \d+ ms$", result.stdout, re.MULTILINE)
    assert "webhook-signature" not in first.headers


def test_test_in_slack_format(webhook_receiver):
    result = xo("test", webhook_receiver.url, "--format", "slack")
    assert result.returncode == 0, result
    first, second = webhook_receiver.wait_for(2)
    assert first.payload["text"].startswith("vm.start pre")
    assert second.payload["text"].startswith("vm.start post ok in ")
    assert second.payload["blocks"][0]["type"] == "section"


def test_test_signs_with_the_secret_from_the_option_or_the_environment(webhook_receiver):
    assert xo("test", webhook_receiver.url, "--secret", SECRET).returncode == 0
    env = environment(XO_WEBHOOKS_SECRET=SECRET)
    assert xo("test", webhook_receiver.url, env=env).returncode == 0
    hooks = webhook_receiver.wait_for(4)
    for hook in hooks:
        verify(SECRET, hook.body, hook.headers)  # raises if unsigned or wrong


def test_test_rejects_a_malformed_secret_as_a_usage_error(webhook_receiver):
    line = error_line(xo("test", webhook_receiver.url, "--secret", "whsec_!!"), 2)
    assert line.startswith("xo-webhooks: error: --secret: ") and "!!" not in line
    assert webhook_receiver.attempts == []


def test_test_fails_when_the_receiver_does(webhook_receiver):
    webhook_receiver.respond_with(500)
    result = xo("test", webhook_receiver.url)
    assert result.returncode == 1, result
    assert re.search(r"pre\s+failed after \d+ ms: HTTP 500", result.stdout)
    assert "2 of 2 hooks failed" in result.stdout
    assert len(webhook_receiver.attempts) == 2  # the first attempt only, no retries


def test_test_fails_when_nothing_listens(refused_url):
    result = xo("test", refused_url)
    assert result.returncode == 1, result
    assert result.stdout.count("failed after") == 2 and "connection failed" in result.stdout


# -- replay -------------------------------------------------------------------------------


def dead_letters(path: Path, url: str, *payloads: dict[str, Any]) -> None:
    records = [
        {"id": f"msg_{n}", "url": url, "format": "json", "payload": p, "attempts": 6,
         "lastError": "HTTP 503"}
        for n, p in enumerate(payloads)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_replay_delivers_a_dead_letter_file(tmp_path, webhook_receiver):
    path = tmp_path / "dead.jsonl"
    dead_letters(path, webhook_receiver.url, pre(), post())
    result = xo("replay", str(path))
    assert result.returncode == 0, result
    assert result.stdout == "read 2, delivered 2, still failing 0\n"
    first, second = webhook_receiver.wait_for(2)
    assert [first.payload, second.payload] == [pre(), post()]
    assert first.headers["user-agent"].startswith("xo-webhooks/")
    assert not path.exists() or path.read_text() == ""


def test_replay_keeps_what_still_fails(tmp_path, webhook_receiver):
    webhook_receiver.respond_with(500)
    path = tmp_path / "dead.jsonl"
    dead_letters(path, webhook_receiver.url, post())
    result = xo("replay", str(path), env=environment(XO_WEBHOOKS_RETRIES="0"))
    assert result.returncode == 1, result
    assert result.stdout == "read 1, delivered 0, still failing 1\n"
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert (record["payload"], record["lastError"]) == (post(), "HTTP 500")


def test_replay_of_a_missing_file_fails_in_one_line(tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert error_line(xo("replay", str(missing)), 1) == (
        f"xo-webhooks: error: cannot replay {missing}: no such file"
    )


def test_replay_with_a_spool_hands_what_still_waits_to_the_spool(tmp_path, webhook_receiver):
    webhook_receiver.respond_with(503)
    path, spool = tmp_path / "dead.jsonl", tmp_path / "hooks.sqlite3"
    dead_letters(path, webhook_receiver.url, pre(), post())
    env = environment(XO_WEBHOOKS_SPOOL=str(spool), XO_WEBHOOKS_RETRY_SCHEDULE="1h")
    result = xo("replay", str(path), env=env)
    assert result.returncode == 0, result  # nothing failed for good: it waits
    assert result.stdout == "read 2, delivered 0, still failing 0, waiting in the spool 2\n"
    assert len(webhook_receiver.wait_for_attempts(1)) == 1  # the pre: the post waits for it
    assert not path.exists() or path.read_text() == ""
    shown = xo("spool", str(spool), env=env)
    origin = webhook_receiver.url.rstrip("/")
    # The pre hook waits an hour for its retry; its post is due, and waits for it.
    assert shown.stdout.splitlines()[1].split()[:5] == [origin, "1", "1", "0", "0s"], shown


# -- spool --------------------------------------------------------------------------------


def spooled(path: Path, url: str, count: int, due_in: float, state: str = "closed") -> None:
    """*count* hooks to *url* in the spool at *path*, due in *due_in* seconds, none held,
    and the endpoint's breaker in *state*."""
    from xo_webhooks.sending.endpoints import Breaker, endpoint_of
    from xo_webhooks.sending.spool import Row, Spool

    now = time.time()
    origin = endpoint_of(url)
    rows = [
        Row(f"msg_{n}", origin, url, json.dumps(f"c{n}"), "post",
            json.dumps({"id": f"msg_{n}", "url": url, "format": "json", "payload": post(),
                        "attempts": 2, "lastError": "HTTP 503", "created": now - 90}),
            now + due_in, now + 3600, now - 90, None)
        for n in range(count)
    ]  # fmt: skip
    breaker = Breaker(5, state=state, opened_at=now - 60, probe_at=now + 300)
    spool = Spool(str(path))
    try:
        spool.write(rows, [], [(origin, breaker.to_dict())], "elsewhere/1/x", now)
    finally:
        spool.close()


def test_spool_shows_each_endpoints_hooks_and_breaker(tmp_path):
    path = tmp_path / "hooks.sqlite3"
    spooled(path, "http://127.0.0.1:9/a", 3, due_in=600, state="open")
    result = xo("spool", str(path))
    assert result.returncode == 0, result
    header, row = result.stdout.splitlines()
    assert header.split() == ["ENDPOINT", "DUE", "WAITING", "LEASED", "OLDEST", "BREAKER"]
    assert row.split() == ["http://127.0.0.1:9", "0", "3", "0", "1m", "30s", "open"]


def test_spool_retry_now_makes_waiting_hooks_due_and_lets_a_probe_go(tmp_path):
    path = tmp_path / "hooks.sqlite3"
    spooled(path, "http://127.0.0.1:9/a", 3, due_in=600, state="open")
    result = xo("spool", str(path), "--retry-now")
    assert (result.returncode, result.stdout) == (
        0, "3 waiting hook(s) due now; endpoints that are down get a probe now\n"
    ), result  # fmt: skip
    row = xo("spool", str(path)).stdout.splitlines()[1].split()
    assert row[1:4] == ["3", "0", "0"] and row[-1] == "open"


def test_spool_dead_letter_moves_what_is_left(tmp_path):
    path, dead = tmp_path / "hooks.sqlite3", tmp_path / "dead.jsonl"
    spooled(path, "http://127.0.0.1:9/a", 2, due_in=0)
    result = xo(
        "spool", str(path), "--dead-letter", env=environment(XO_WEBHOOKS_DEAD_LETTER=str(dead))
    )
    assert (result.returncode, result.stdout) == (0, f"moved 2 hook(s) to {dead}\n"), result
    records = [json.loads(line) for line in dead.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["msg_0", "msg_1"]
    assert {(r["lastError"], r["attempts"]) for r in records} == {("HTTP 503", 2)}
    assert all("created" not in r and r["failedAt"] for r in records)
    assert xo("spool", str(path)).stdout == f"{path}: empty\n"


@pytest.mark.parametrize(
    ("args", "env", "status", "message"),
    [
        pytest.param(["{missing}"], {}, 1, "cannot open the spool {missing}: no such file",
                     id="missing"),
        pytest.param([], {}, 2, "give the spool's PATH, or set XO_WEBHOOKS_SPOOL", id="no-path"),
        pytest.param(["{corrupt}"], {}, 1,
                     "cannot read the spool {corrupt}: file is not a database", id="corrupt"),
        pytest.param(["{corrupt}", "--dead-letter"], {}, 1,
                     "--dead-letter needs XO_WEBHOOKS_DEAD_LETTER: where to move the hooks",
                     id="dead-letter-unset"),
    ],
)  # fmt: skip
def test_spool_errors_are_one_line(tmp_path, args, env, status, message):
    names = {"missing": tmp_path / "nope.sqlite3", "corrupt": tmp_path / "corrupt.sqlite3"}
    names["corrupt"].write_bytes(b"not a database" * 100)
    result = xo("spool", *[a.format(**names) for a in args], env=environment(**env))
    assert error_line(result, status) == "xo-webhooks: error: " + message.format(**names)


def test_spool_rejects_both_actions_at_once(tmp_path):
    result = xo("spool", str(tmp_path / "x"), "--retry-now", "--dead-letter")
    assert result.returncode == 2 and "not allowed with argument" in result.stderr


# -- serve --------------------------------------------------------------------------------

PLAIN_APP = """
import json

def app(environ, start_response):
    size = int(environ.get("CONTENT_LENGTH") or 0)
    call = json.loads(environ["wsgi.input"].read(size))
    body = json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": {"started": True}})
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body.encode()]

not_callable = 42
"""

FLASK_APP = """
from flask import Flask, jsonify, request

app = Flask(__name__)

@app.post("/api")
def api():
    call = request.get_json()
    return jsonify(jsonrpc="2.0", id=call["id"], result="flask")
"""


WRAPPED_APP = """
from cli_plain_api import app as plain
from xo_webhooks import WebhookMiddleware

app = WebhookMiddleware(plain)  # as the README shows; serve must not wrap it again
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "apps"
    folder.mkdir()
    (folder / "cli_plain_api.py").write_text(PLAIN_APP)
    (folder / "cli_flask_api.py").write_text(FLASK_APP)
    (folder / "cli_wrapped_api.py").write_text(WRAPPED_APP)
    (folder / "cli_broken_api.py").write_text("import json\n\nVALUE = 1 / 0\n")
    return folder


def with_path(env: dict[str, str], folder: Path) -> dict[str, str]:
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")]))
    return env


def call(url: str, id: int = 1) -> Any:
    body = {"jsonrpc": "2.0", "id": id, "method": "vm.start", "params": {"id": "vm-1"}}
    answer = requests.post(url, json=body, timeout=10)
    answer.raise_for_status()
    return answer.json()


@pytest.mark.slow
def test_serve_wraps_the_app_and_flushes_on_sigterm(start, app_dir, webhook_receiver):
    # Slow answers keep the post hook pending when SIGTERM comes: the flush must send it.
    webhook_receiver.respond_with(204, delay=0.5)
    server = start("serve", "cli_plain_api:app", "--port", "0",
                   env=with_path(hooks_env(webhook_receiver.url), app_dir))  # fmt: skip
    url = server.stdout.search(r"^listening on (http://127\.0\.0\.1:\d+/)").group(1)
    assert "vm.*" in server.stdout.text and webhook_receiver.url in server.stdout.text

    assert call(url) == {"jsonrpc": "2.0", "id": 1, "result": {"started": True}}
    assert server.stop() == 0, server.stderr.text
    first, second = webhook_receiver.wait_for(2, timeout=1)  # already there: flushed
    assert (first.payload["type"], second.payload["type"]) == ("pre", "post")
    assert second.payload["result"] == {"started": True}
    assert "stopped: 2 hook(s) delivered, 0 failed" in server.stdout.text
    assert "Traceback" not in server.stderr.text


@pytest.mark.slow
def test_serve_wraps_a_flask_app_through_wsgi_app(start, app_dir, webhook_receiver):
    server = start("serve", "cli_flask_api:app", "--port", "0",
                   env=with_path(hooks_env(webhook_receiver.url), app_dir))  # fmt: skip
    url = server.stdout.search(r"^listening on (http://127\.0\.0\.1:\d+/)").group(1)
    assert call(url + "api")["result"] == "flask"
    first, second = webhook_receiver.wait_for(2)
    assert second.payload["result"] == "flask"
    assert server.stop() == 0, server.stderr.text


@pytest.mark.slow
def test_serve_does_not_wrap_an_app_twice(start, app_dir, webhook_receiver):
    server = start("serve", "cli_wrapped_api:app", "--port", "0",
                   env=with_path(hooks_env(webhook_receiver.url), app_dir))  # fmt: skip
    url = server.stdout.search(r"^listening on (http://127\.0\.0\.1:\d+/)").group(1)
    call(url)
    assert server.stop() == 0, server.stderr.text
    assert [h.payload["type"] for h in webhook_receiver.received] == ["pre", "post"]


@pytest.mark.slow
def test_serve_without_hooks_passes_requests_through(start, app_dir):
    server = start("serve", "cli_plain_api:app", "--port", "0",
                   env=with_path(environment(), app_dir))  # fmt: skip
    url = server.stdout.search(r"^listening on (http://127\.0\.0\.1:\d+/)").group(1)
    assert server.stdout.lines[0].startswith("no hooks configured")
    assert call(url)["result"] == {"started": True}
    assert server.stop() == 0


@pytest.mark.parametrize(
    "spec, says",
    [
        pytest.param("cli_missing_api:app", "cannot import 'cli_missing_api': no module named",
                     id="no-module"),
        pytest.param("cli_plain_api:nope", "'cli_plain_api' has no attribute 'nope'",
                     id="no-attribute"),
        pytest.param("cli_plain_api:not_callable", "is not a WSGI application", id="not-wsgi"),
        pytest.param("cli_broken_api:app", "importing 'cli_broken_api' failed: "
                     "ZeroDivisionError: division by zero (at ", id="import-raises"),
    ],
)  # fmt: skip
def test_serve_reports_an_app_it_cannot_load_in_one_line(app_dir, spec, says):
    result = xo("serve", spec, "--port", "0", env=with_path(environment(), app_dir))
    assert says in error_line(result, 1)


def test_serve_finds_an_app_in_the_current_folder(app_dir):
    # As with gunicorn and flask: no PYTHONPATH needed. (A missing attribute proves the
    # module was imported, without starting a server.)
    result = xo("serve", "cli_plain_api:nope", cwd=app_dir)
    assert "'cli_plain_api' has no attribute 'nope'" in error_line(result, 1)


def test_serve_reports_a_bad_configuration_in_one_line(app_dir):
    env = with_path(environment(XO_WEBHOOKS_HOOKS='[{"method": "vm.start"}]'), app_dir)
    line = error_line(xo("serve", "cli_plain_api:app", "--port", "0", env=env), 1)
    assert line.startswith("xo-webhooks: error: XO_WEBHOOKS_HOOKS[0]: ")


def test_serve_reports_a_busy_port_in_one_line(app_dir, busy_port):
    env = with_path(environment(), app_dir)
    line = error_line(xo("serve", "cli_plain_api:app", "--port", str(busy_port), env=env), 1)
    assert line.endswith(f"cannot listen on 127.0.0.1:{busy_port}: Address already in use")


# -- receive ------------------------------------------------------------------------------


@pytest.fixture
def scripts(tmp_path: Path) -> Path:
    folder = tmp_path / "hook-scripts"
    folder.mkdir()
    script = folder / "vm.start-post.sh"
    script.write_text(
        "#!/bin/sh\n"
        'printf "%s %s\\n" "$XO_HOOK_METHOD" "$XO_HOOK_TYPE" > "$OUT.env"\n'
        'cat > "$OUT.tmp" && mv "$OUT.tmp" "$OUT"\n'  # the test waits for $OUT: write it whole
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder


def receiver_url(receiver: Running) -> str:
    return receiver.stderr.search(r"receiving hooks on (http://127\.0\.0\.1:\d+/)").group(1)


@pytest.mark.slow
def test_receive_runs_the_script_of_a_hook(start, scripts, tmp_path):
    out = tmp_path / "received.json"
    receiver = start("receive", "--port", "0", "--scripts", str(scripts),
                     env=environment(OUT=str(out)))  # fmt: skip
    url = receiver_url(receiver)
    assert requests.post(url, json=post(), timeout=10).status_code == 204
    assert requests.post(url, json={"type": "post"}, timeout=10).status_code == 400
    wait_until(out.exists, what="the hook script's output")
    assert json.loads(out.read_text()) == post()
    assert Path(f"{out}.env").read_text() == "vm.start post\n"
    assert receiver.stop() == 0, receiver.stderr.text
    assert "[vm.start|post]" in receiver.stderr.text
    assert "Traceback" not in receiver.stderr.text


@pytest.mark.slow
def test_receive_takes_the_secret_from_the_environment(start):
    receiver = start("receive", "--port", "0", env=environment(XO_WEBHOOKS_SECRET=SECRET))
    url = receiver_url(receiver)
    assert requests.post(url, json=post(), timeout=10).status_code == 401
    assert receiver.stop() == 0


@pytest.mark.parametrize(
    "args, variables, status, says",
    [
        pytest.param(["--scripts", "/nonexistent/scripts"], {}, 1,
                     "--scripts: '/nonexistent/scripts' is not a folder", id="no-scripts"),
        pytest.param(["--secret", "bad"], {}, 2, "--secret: ", id="bad-secret-option"),
        pytest.param([], {"XO_WEBHOOKS_SECRET": "bad"}, 1, "XO_WEBHOOKS_SECRET: ",
                     id="bad-secret-variable"),
    ],
)  # fmt: skip
def test_receive_reports_a_bad_setting_in_one_line(args, variables, status, says):
    result = xo("receive", "--port", "0", *args, env=environment(**variables))
    line = error_line(result, status)
    assert says in line and "'bad'" not in line  # a secret is never echoed


# -- demo ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo():
    result = xo("demo")
    assert result.returncode == 0, result
    assert "Hooks received" in result.stdout and '"method": "vm.start"' in result.stdout
