"""The command line in-process, through ``xo_webhooks.cli.main`` (as httpx tests its
CLI with a runner): the same commands tests/test_cli.py runs as real subprocesses,
here where coverage and tracebacks see them, against a real receiver on 127.0.0.1."""

from __future__ import annotations

import io
import json

import pytest

from xo_webhooks import __version__
from xo_webhooks.cli import main
from xo_webhooks.sending.deadletter import DeadLetterFile, read_records
from xo_webhooks.signing import verify

from .helpers import POST, PRE, SECRET


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """Only the variables a test sets: never the developer's own XO_WEBHOOKS_*."""
    import os

    for name in list(os.environ):
        if name.startswith("XO_WEBHOOKS_"):
            monkeypatch.delenv(name)


def set_hooks(monkeypatch, url: str, **extra) -> None:
    hook = {"method": "vm.*", "type": "pre/post", "url": url, **extra}
    monkeypatch.setenv("XO_WEBHOOKS_HOOKS", json.dumps([hook]))


def test_version_and_usage(capsys):
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out
    assert main(["no-such-command"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_check_config_prints_the_hooks_without_secrets(monkeypatch, capsys):
    set_hooks(monkeypatch, "https://ops:hunter2@127.0.0.1:9/h", secret=SECRET)
    monkeypatch.setenv("XO_WEBHOOKS_RETRIES", "2")
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert "1 hook(s):" in out and "vm.*" in out and "XO_WEBHOOKS_RETRY_SCHEDULE=1s,2s" in out
    assert "hunter2" not in out and SECRET not in out


def test_check_config_names_the_bad_variable(monkeypatch, capsys):
    monkeypatch.setenv("XO_WEBHOOKS_HOOKS", '[{"method": "vm.start", "type": "later"}]')
    assert main(["check-config"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("xo-webhooks: error: XO_WEBHOOKS_HOOKS[0]")


def test_test_sends_a_signed_pre_and_post_hook(webhook_receiver, capsys):
    assert main(["test", webhook_receiver.url, "--secret", SECRET]) == 0
    pre, post = webhook_receiver.wait_for(2)
    assert (pre.payload["type"], post.payload["type"]) == ("pre", "post")
    for hook in (pre, post):
        verify(SECRET, hook.body, hook.headers)
    assert capsys.readouterr().out.count("HTTP 204") == 2


def test_test_reports_a_failing_receiver(webhook_receiver, capsys):
    webhook_receiver.respond_with(410)
    assert main(["test", webhook_receiver.url]) == 1
    assert "HTTP 410" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("payloads", "status", "says"),
    [
        pytest.param([PRE, POST], 0, "valid", id="valid"),
        pytest.param([{**PRE, "type": "later"}], 1, "$.type", id="invalid"),
        pytest.param([], 1, "no payload found", id="empty"),
    ],
)
def test_validate_reads_json_lines_from_a_file_or_stdin(
    payloads, status, says, tmp_path, monkeypatch, capsys
):
    text = "".join(json.dumps(p) + "\n" for p in payloads)
    path = tmp_path / "hooks.jsonl"
    path.write_text(text)
    assert main(["validate", str(path)]) == status
    from_file = capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    assert main(["validate", "-"]) == status
    from_stdin = capsys.readouterr()
    assert says in from_file.out + from_file.err and says in from_stdin.out + from_stdin.err


def test_replay_sends_the_records_and_keeps_what_still_fails(
    webhook_receiver, monkeypatch, tmp_path, capsys
):
    path = str(tmp_path / "dead.jsonl")
    records = [
        {"id": f"msg_{n}", "url": webhook_receiver.url, "format": "json",
         "payload": {**POST, "callId": f"c{n}"}, "attempts": 6, "lastError": "HTTP 503"}
        for n in range(3)
    ]  # fmt: skip
    DeadLetterFile(path).append(records)
    webhook_receiver.respond_with(lambda n, hook: 404 if hook.payload["callId"] == "c1" else 204)
    monkeypatch.setenv("XO_WEBHOOKS_RETRIES", "0")
    assert main(["replay", path]) == 1  # one still fails
    assert "read 3, delivered 2, still failing 1" in capsys.readouterr().out
    (left,) = read_records(path)
    assert (left["id"], left["lastError"]) == ("msg_1", "HTTP 404")


def test_replay_keeps_only_the_schedules_short_waits(
    webhook_receiver, monkeypatch, tmp_path, capsys
):
    path = str(tmp_path / "dead.jsonl")
    record = {"id": "msg_1", "url": webhook_receiver.url, "format": "json",
              "payload": POST, "attempts": 8, "lastError": "HTTP 503"}  # fmt: skip
    DeadLetterFile(path).append([record])
    webhook_receiver.respond_with(503)
    monkeypatch.setenv("XO_WEBHOOKS_RETRY_SCHEDULE", "0s,10ms,2h,1s")  # 2h: stop there
    assert main(["replay", path]) == 1
    assert "read 1, delivered 0, still failing 1" in capsys.readouterr().out
    assert len(webhook_receiver.attempts) == 3  # the first attempt, then 0s and 10ms
    (left,) = read_records(path)
    assert (left["id"], left["lastError"]) == ("msg_1", "HTTP 503")


def test_replay_keeps_a_share_of_the_queue_for_endpoints_no_longer_configured(
    webhook_receiver, monkeypatch, tmp_path, capsys
):
    path = str(tmp_path / "dead.jsonl")
    records = [{"id": f"msg_{n}", "url": webhook_receiver.url, "format": "json",
                "payload": {**POST, "callId": f"c{n}"}, "attempts": 1, "lastError": "HTTP 503"}
               for n in range(2)]  # fmt: skip
    DeadLetterFile(path).append(records)
    hooks = [{"method": "vm.*", "type": "post", "url": "http://127.0.0.1:9/elsewhere"}]
    monkeypatch.setenv("XO_WEBHOOKS_HOOKS", json.dumps(hooks))
    monkeypatch.setenv("XO_WEBHOOKS_QUEUE_SIZE", "4")  # shared by 2 endpoints: 2 places each
    assert main(["replay", path]) == 0
    assert "read 2, delivered 2, still failing 0" in capsys.readouterr().out
    assert len(webhook_receiver.received) == 2


def test_replay_of_a_missing_file(tmp_path, capsys):
    assert main(["replay", str(tmp_path / "none.jsonl")]) == 1
    assert "no such file" in capsys.readouterr().err
