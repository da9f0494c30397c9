"""``xo-webhooks replay`` never loses a dead-letter record: lines it cannot use stay in
the file as they were (counted, exit 1), a record of an unexpected shape never crashes
it, and what a replay that died left is taken by the next one (xo_webhooks.sending.
replay, through ``replay()`` and the command line in-process, against a real receiver
on 127.0.0.1)."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import pytest

from xo_webhooks import load_settings
from xo_webhooks.cli import main
from xo_webhooks.sending.deadletter import DeadLetterFile, read_records
from xo_webhooks.sending.replay import ReplayReport, replay

from .helpers import POST

pytestmark = pytest.mark.usefixtures("no_leaked_threads")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """Only the variables a test sets: never the developer's own XO_WEBHOOKS_*."""
    for name in list(os.environ):
        if name.startswith("XO_WEBHOOKS_"):
            monkeypatch.delenv(name)


def record(url: str, n: int, **extra: Any) -> dict[str, Any]:
    return {"id": f"msg_{n}", "url": url, "format": "json",
            "payload": {**POST, "callId": f"c{n}"}, "attempts": 6, "lastError": "HTTP 503",
            **extra}  # fmt: skip


def write_lines(path: str, lines: list[bytes]) -> None:
    with open(path, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))


def line(value: Any) -> bytes:
    return json.dumps(value).encode()


SETTINGS = load_settings([], {}, retries=0, timeout=5)
NOWHERE = "http://127.0.0.1:9/"


def test_replay_keeps_damaged_lines_counts_them_and_exits_1(tmp_path, webhook_receiver, capsys):
    path = str(tmp_path / "dead.jsonl")
    damaged = [b'{"id": "msg_x", "url": "http://127.0.0.1:9/", "payl', b"\xff\xfe not JSON"]
    write_lines(path, [line(record(webhook_receiver.url, 1)), *damaged])
    assert main(["replay", path]) == 1  # delivered all it could, but lines are left
    assert capsys.readouterr().out == (
        "read 3, delivered 1, still failing 0, unusable 2 (kept as they were)\n"
    )
    assert [h.headers["webhook-id"] for h in webhook_receiver.wait_for(1)] == ["msg_1"]
    with open(path, "rb") as f:
        assert f.read() == b"".join(d + b"\n" for d in damaged)
    assert os.listdir(tmp_path) == ["dead.jsonl"]


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({"url": NOWHERE, "payload": [1, 2]}, id="payload-list"),
        pytest.param({"url": NOWHERE, "payload": "text"}, id="payload-text"),
        pytest.param({"url": 42, "payload": POST}, id="url-number"),
        pytest.param({"url": "http://127.0.0.1:99999/", "payload": POST}, id="url-port"),
        pytest.param({"url": "http://[::1/", "payload": POST}, id="url-ipv6"),
        pytest.param({"url": NOWHERE, "payload": {**POST, "callId": [1]}}, id="call-id"),
        pytest.param({"url": NOWHERE, "payload": POST, "id": [1]}, id="id-list"),
        pytest.param({"url": NOWHERE, "payload": POST, "attempts": "6"}, id="attempts"),
        pytest.param({"url": NOWHERE, "payload": POST, "format": "xml"}, id="format"),
    ],
)
def test_a_record_of_an_unexpected_shape_is_kept_not_a_crash(tmp_path, webhook_receiver, value):
    path = str(tmp_path / "dead.jsonl")
    unexpected = line(value)
    write_lines(path, [line(record(webhook_receiver.url, 1)), unexpected])
    report = replay(path, SETTINGS)
    with open(path, "rb") as f:
        assert f.read() == unexpected + b"\n"  # as it was: not sent, nor rewritten
    assert os.listdir(tmp_path) == ["dead.jsonl"]  # no working file left behind
    assert report == ReplayReport(read=2, delivered=1, failed=0, unusable=1)


def test_replay_takes_what_a_replay_that_died_left(tmp_path, webhook_receiver, capsys):
    """A leftover named with a live pid (ours: pid reuse, or pid 1 in a container) is
    taken all the same: nobody holds its lock."""
    path = str(tmp_path / "dead.jsonl")
    left = f"{path}.replaying-{os.getpid()}-0123abcd"
    DeadLetterFile(left).append([record(webhook_receiver.url, 1)])
    write_lines(left + ".tmp", [b"not a working file"])  # another name: not taken
    DeadLetterFile(path).append([record(webhook_receiver.url, 2)])
    assert main(["replay", path]) == 0
    assert capsys.readouterr().out == "read 2, delivered 2, still failing 0\n"
    received = webhook_receiver.wait_for(2)
    assert sorted(h.headers["webhook-id"] for h in received) == ["msg_1", "msg_2"]
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(left) + ".tmp"]


def test_replay_with_only_a_leftover_takes_it(tmp_path, webhook_receiver):
    path = str(tmp_path / "dead.jsonl")
    DeadLetterFile(f"{path}.replaying-1-0123abcd").append([record(webhook_receiver.url, 1)])
    assert replay(path, SETTINGS) == ReplayReport(read=1, delivered=1, failed=0)
    assert os.listdir(tmp_path) == []


def test_replay_leaves_a_live_replays_working_file(tmp_path, webhook_receiver):
    path = str(tmp_path / "dead.jsonl")
    store = DeadLetterFile(path)
    store.append([record(webhook_receiver.url, 1)])
    with store.taken() as taken:  # a replay still running: it holds its file's lock
        (working,) = glob.glob(f"{path}.replaying-*")
        store.append([record(webhook_receiver.url, 2)])
        assert replay(path, SETTINGS) == ReplayReport(read=1, delivered=1, failed=0)
        assert [h.headers["webhook-id"] for h in webhook_receiver.wait_for(1)] == ["msg_2"]
        assert [r["id"] for r in read_records(working)] == [r["id"] for r in taken] == ["msg_1"]
    assert os.listdir(tmp_path) == []


def test_replay_sends_a_masked_record_to_the_hook_with_its_fingerprint(
    tmp_path, webhook_receiver, monkeypatch, capsys
):
    # The record holds the URL masked (query values ***); the configured hook with
    # its fingerprint has the whole URL, and that is where the hook goes.
    url = webhook_receiver.url + "in?sig=S3CR3T"
    settings = load_settings([{"method": "*", "type": "pre/post", "url": url}], {})
    masked = webhook_receiver.url + "in?sig=***"
    path = str(tmp_path / "dead.jsonl")
    kept = record(masked, 1, hook=settings.hooks[0].fingerprint)
    unknown = record(masked, 2, hook="sha256:0000000000000000")
    write_lines(path, [line(kept), line(unknown)])
    monkeypatch.setenv(
        "XO_WEBHOOKS_HOOKS", json.dumps([{"method": "*", "type": "post", "url": url}])
    )
    monkeypatch.setenv("XO_WEBHOOKS_RETRIES", "0")
    assert main(["replay", path]) == 1  # one could go nowhere: said, kept, exit 1
    out = capsys.readouterr().out
    assert out.startswith("read 2, delivered 1, still failing 0, for no configured hook 1")
    (sent,) = webhook_receiver.attempts
    assert sent.path.endswith("/in?sig=S3CR3T")
    assert [r["id"] for r in read_records(path)] == ["msg_2"]


def test_replay_of_an_unreadable_target_fails_in_one_line(tmp_path, capsys):
    from .helpers import free_port

    folder = tmp_path / "dead.jsonl"
    folder.mkdir()  # a folder where the file should be
    assert main(["replay", str(folder)]) == 1
    assert "cannot replay" in capsys.readouterr().err
    pytest.importorskip("redis")
    assert main(["replay", f"redis://127.0.0.1:{free_port()}/0"]) == 1  # nothing listens
    assert "cannot replay redis://127.0.0.1:" in capsys.readouterr().err
