"""Dead-letter stores: the JSON Lines file (xo_webhooks.sending.deadletter), the Redis
list (xo_webhooks.sending.deadletter_redis, against a real ``redis-server`` on an
ephemeral loopback port), the choice between them (``open_dead_letter``) and what is
written to them (``DeadLetters``).

The contract of a store:

- ``append`` keeps a batch of records, one compact JSON value each, after whatever is
  there, and raises when it cannot (the caller then counts the hooks lost), leaving
  the store as it was: never a torn record (a full disk, for real on a small tmpfs);
- ``taken()`` removes every record and yields the usable ones; records appended
  meanwhile are kept apart; a crash in the block leaves the taken records in a working
  copy, which the file's next ``taken()`` takes unless its replay still holds its lock;
- damaged records, and records that cannot be sent (``record_problem``), are logged,
  never fatal, and put back as they were.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xo_webhooks import Hook, load_settings
from xo_webhooks.sending import deadletter
from xo_webhooks.sending.deadletter import (
    DeadLetterFile,
    parse_record,
    read_records,
    record_problem,
)
from xo_webhooks.sending.delivery import Delivery
from xo_webhooks.sending.dispatcher import ThreadDispatcher
from xo_webhooks.sending.policy import DeadLetters, open_dead_letter

from .helpers import POST, PRE, RedisServer, skip_without_redis, small_disk_at
from .waiting import wait_until

try:  # the celery extra: only the Redis tests need it
    import redis

    from xo_webhooks.sending import deadletter_redis
    from xo_webhooks.sending.deadletter_redis import DEFAULT_KEY, RedisDeadLetter
except ImportError:  # pragma: no cover - the extra is installed in CI
    redis = None

pytestmark = pytest.mark.usefixtures("no_leaked_threads")
needs_redis_py = pytest.mark.skipif(redis is None, reason="the celery extra is not installed")


def record(n: int, **extra: Any) -> dict[str, Any]:
    return {"id": f"msg_{n}", "url": "http://127.0.0.1:9/", "payload": {"n": n}, **extra}


def compact(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@pytest.fixture
def path(tmp_path) -> str:
    return str(tmp_path / "dead.jsonl")


# -- the file -----------------------------------------------------------------------------


def test_append_writes_one_compact_line_per_record(tmp_path):
    path = tmp_path / "new" / "folder" / "dead.jsonl"  # created as needed
    records = [record(1, note="café"), record(2, note="line\u2028separator")]
    DeadLetterFile(str(path)).append(records)
    assert path.read_bytes() == "".join(compact(r) + "\n" for r in records).encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # hooks may hold personal data
    assert read_records(str(path)) == records  # U+2028 does not split a record


def test_append_of_nothing_creates_no_file(path):
    DeadLetterFile(path).append([])
    DeadLetterFile(path).append(iter(()))
    assert not os.path.exists(path)


def test_appends_go_after_what_is_there(path):
    first, second = DeadLetterFile(path), DeadLetterFile(path)  # as two processes would
    first.append([record(1)])
    second.append([record(2), record(3)])
    first.append([record(4)])
    assert [r["payload"]["n"] for r in read_records(path)] == [1, 2, 3, 4]


def test_concurrent_writers_never_interleave(path):
    # Separate instances have separate thread locks: only the file's lock keeps the
    # lines whole, and each writer's check for a torn last line right.
    barrier = threading.Barrier(4)

    def write(worker: int) -> None:
        store = DeadLetterFile(path)
        barrier.wait()
        for n in range(25):
            store.append([record(worker * 100 + n, padding="x" * 2000)])

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert sorted(json.loads(line)["payload"]["n"] for line in lines) == sorted(
        w * 100 + n for w in range(4) for n in range(25)
    )


@pytest.mark.parametrize(
    ("last", "expected"),
    [
        pytest.param(b'{"url": "http://h/", "payl', [1, 3], id="torn-by-a-crash"),
        pytest.param(compact(record(2)).encode(), [1, 2, 3], id="complete-no-newline"),
    ],
)
def test_a_last_line_without_newline_does_not_swallow_the_next_record(path, last, expected):
    DeadLetterFile(path).append([record(1)])
    with open(path, "ab") as f:
        f.write(last)
    DeadLetterFile(path).append([record(3)])
    assert [r["payload"]["n"] for r in read_records(path)] == expected


def test_append_raises_when_the_file_cannot_be_written(tmp_path):
    with pytest.raises(IsADirectoryError):
        DeadLetterFile(str(tmp_path)).append([record(1)])
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        DeadLetterFile(str(tmp_path / "file" / "dead.jsonl")).append([record(1)])


def short_writes(monkeypatch, then: OSError | None, at_most: int = 491) -> list[int]:
    """Make os.write take at most *at_most* bytes a call, as on a disk that is nearly
    full; after the first call, raise *then* (when given), as a full one does. Returns
    the sizes written."""
    write, written = os.write, []

    def short(fd: int, data: Any) -> int:
        if written and then is not None:
            raise then
        written.append(write(fd, bytes(data[:at_most])))
        return written[-1]

    monkeypatch.setattr(os, "write", short)
    return written


def test_a_short_write_is_followed_by_the_rest(path, monkeypatch):
    DeadLetterFile(path).append([record(1)])
    written = short_writes(monkeypatch, then=None, at_most=100)
    DeadLetterFile(path).append([record(2, padding="x" * 1200)])
    assert len(written) > 1  # the record took several calls
    assert read_records(path) == [record(1), record(2, padding="x" * 1200)]


@pytest.mark.parametrize("torn", [b"", b'{"url": "http://h/", "pay'], ids=["whole", "torn"])
def test_a_write_that_fails_after_a_short_one_leaves_the_file_as_it_was(path, monkeypatch, torn):
    DeadLetterFile(path).append([record(1)])
    with open(path, "ab") as f:
        f.write(torn)  # a crash's torn line stays what it was: no newline added
    before = Path(path).read_bytes()
    written = short_writes(monkeypatch, then=OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match="No space left"):
        DeadLetterFile(path).append([record(2, padding="x" * 1200), record(3)])
    assert written == [491]  # part of a record was on disk, then taken back
    assert Path(path).read_bytes() == before


def test_a_failed_fsync_takes_the_records_back(path, monkeypatch):
    DeadLetterFile(path).append([record(1)])

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output"):
        DeadLetterFile(path).append([record(2)])
    assert read_records(path) == [record(1)]


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A folder on a tmpfs of 1 MiB of its own (see helpers.small_disk_at)."""
    with small_disk_at(tmp_path / "disk", "1m") as where:
        yield where


def fill(folder: Path) -> Path:
    """Fill the file system of *folder*; return the file that filled it."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)  # to the last byte: raises only once none fits
    return filler


def test_a_full_disk_loses_the_hooks_counted_and_leaves_no_torn_record(small_disk, caplog):
    """For real: the record's first bytes fill the last page of the file, the rest
    finds no room. The hook is lost, and said so; the file is as it was."""
    path = small_disk / "dead.jsonl"
    first = record(1, padding="x" * 3000)  # its page keeps about 1 KiB free
    DeadLetterFile(str(path)).append([first])
    filler = fill(small_disk)
    before = path.read_bytes()
    dead_letters = DeadLetters(load_settings(environ={}, dead_letter=str(path)))
    delivery = failed_delivery()
    delivery.payload["result"] = {"padding": "y" * 2000}  # more than the page's room
    assert dead_letters.keep([delivery]) is False
    assert path.read_bytes() == before
    (log,) = caplog.records
    assert log.levelno == logging.ERROR
    assert "No space left on device" in log.getMessage() and "lost" in log.getMessage()
    filler.unlink()
    assert dead_letters.keep([failed_delivery()])  # room again: kept
    assert [r["id"] for r in read_records(str(path))] == ["msg_1", "msg_1"]


def test_a_full_disk_counts_a_dispatchers_hook_lost(small_disk, refused_url):
    path = small_disk / "dead.jsonl"
    DeadLetterFile(str(path)).append([record(1, padding="x" * 3000)])
    fill(small_disk)
    before = path.read_bytes()
    settings = load_settings(environ={}, dead_letter=str(path), retries=0, timeout=5)
    dispatcher = ThreadDispatcher(settings)
    try:
        hook = Hook(method="vm.start", type="post", url=refused_url)
        dispatcher.submit(Delivery(hook, {**POST, "result": {"padding": "y" * 2000}}))
        assert dispatcher.flush(10)
    finally:
        dispatcher.close(5)
    stats = dispatcher.stats()
    assert (stats["failed"], stats["dead_lettered"], stats["lost"]) == (1, 0, 1)
    assert path.read_bytes() == before


def test_taken_moves_the_file_aside_and_removes_it_when_done(path):
    store = DeadLetterFile(path)
    store.append([record(1), record(2)])
    with store.taken() as records:
        (working,) = glob.glob(f"{path}.replaying-{os.getpid()}-*")
        assert [r["payload"]["n"] for r in records] == [1, 2]
        assert not os.path.exists(path)
        store.append([record(3)])  # e.g. the app, meanwhile: a new file
    assert not os.path.exists(working)
    assert [r["payload"]["n"] for r in read_records(path)] == [3]


def test_a_crash_while_taken_leaves_the_working_file(path):
    store = DeadLetterFile(path)
    store.append([record(1)])
    with pytest.raises(RuntimeError), store.taken():
        raise RuntimeError("replay crashed")
    (working,) = glob.glob(f"{path}.replaying-{os.getpid()}-*")
    assert [r["payload"]["n"] for r in read_records(working)] == [1]
    assert not os.path.exists(path)


def test_a_second_take_with_the_same_pid_takes_the_leftover_too(path):
    """A crashed replay's file is taken by the next replay, even when that one has the
    same pid (pid 1 in a container), which is alive: its lock says it is gone."""
    store = DeadLetterFile(path)
    store.append([record(1)])
    with pytest.raises(RuntimeError), store.taken():
        raise RuntimeError("replay crashed")
    store.append([record(2)])
    with store.taken() as records:
        assert [r["payload"]["n"] for r in records] == [1, 2]  # the older ones first
    assert os.listdir(os.path.dirname(path)) == []


def test_taken_leaves_the_working_file_of_a_live_replay(path):
    store = DeadLetterFile(path)
    store.append([record(1)])
    with store.taken() as first:  # a live replay: it holds its working file's lock
        (working,) = glob.glob(f"{path}.replaying-*")
        store.append([record(2)])
        with store.taken() as second:
            assert [r["payload"]["n"] for r in second] == [2]
        assert [r["payload"]["n"] for r in first] == [1]
        assert glob.glob(f"{path}.replaying-*") == [working]
        with pytest.raises(FileNotFoundError), store.taken():
            pass  # nothing to take: the live one's file is not
    assert os.listdir(os.path.dirname(path)) == []


def test_a_killed_replays_file_is_taken_once_its_process_is_gone(path):
    """A real process takes the file and is killed (SIGKILL: no cleanup at all) while
    it holds it; only then may another take it."""
    store = DeadLetterFile(path)
    store.append([record(1), record(2)])
    code = (
        "import sys\n"
        "from xo_webhooks.sending.deadletter import DeadLetterFile\n"
        "with DeadLetterFile(sys.argv[1]).taken() as records:\n"
        "    print(len(records), flush=True)\n"
        "    sys.stdin.read()\n"  # until killed
    )
    replaying = subprocess.Popen(
        [sys.executable, "-c", code, path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert replaying.stdout.readline() == "2\n"  # it holds the file now
        store.append([record(3)])
        with store.taken() as records:
            assert [r["payload"]["n"] for r in records] == [3]  # not the live one's
    finally:
        replaying.kill()
        replaying.communicate(timeout=30)
    (working,) = glob.glob(f"{path}.replaying-{replaying.pid}-*")
    with store.taken() as records:
        assert [r["payload"]["n"] for r in records] == [1, 2]
    assert not os.path.exists(working)


def test_a_replay_finishing_meanwhile_is_not_taken_for_dead(path, monkeypatch):
    """A replay that removes its working file (then lets its lock go) between another
    replay's opening of that file and its lock: the lock is free, but the file is no
    longer there, and is not taken."""
    store = DeadLetterFile(path)
    store.append([record(1)])
    running = contextlib.ExitStack()
    running.enter_context(store.taken())
    (working,) = glob.glob(f"{path}.replaying-*")
    opened = deadletter._open

    def open_then_the_owner_finishes(name: str, flags: int) -> int:
        fd = opened(name, flags)
        running.close()
        return fd

    monkeypatch.setattr(deadletter, "_open", open_then_the_owner_finishes)
    assert deadletter._claim(working) is None
    assert not os.path.exists(working)


def test_an_append_that_a_replay_overtakes_goes_to_the_new_file(path, monkeypatch):
    """The app opens the file; a replay takes it before the app writes: the record goes
    to the file now at the path, not into the replay's, read already and removed."""
    store = DeadLetterFile(path)
    store.append([record(1)])
    replaying = contextlib.ExitStack()
    opened, opens = deadletter._open, []

    def overtaken(name: str, flags: int) -> int:
        fd = opened(name, flags)
        opens.append(name)
        if len(opens) == 1:  # the app's first open: the replay starts now
            taken = replaying.enter_context(store.taken())
            assert [r["payload"]["n"] for r in taken] == [1]
        return fd

    monkeypatch.setattr(deadletter, "_open", overtaken)
    with replaying:
        store.append([record(2)])
        assert opens == [path, path, path]  # the app's, the replay's, the app's again
        (working,) = glob.glob(f"{path}.replaying-*")
        assert [r["payload"]["n"] for r in read_records(working)] == [1]
    assert [r["payload"]["n"] for r in read_records(path)] == [2]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_keep_a_lock_of_its_parent(path):
    """A worker forked while another thread of its parent appends: the child's copy of
    the descriptor would hold the file's lock for as long as the child lives."""
    held = deadletter._open_locked(path, os.O_RDWR | os.O_CREAT)
    (ready, readied), (go, went) = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: lives on, holding whatever it inherited
        try:
            os.write(readied, b"x")  # after the fork's hooks
            os.read(go, 1)
        finally:
            os._exit(0)
    os.close(readied)  # a child that died: end of file, not a wait
    os.close(go)
    try:
        assert os.read(ready, 1) == b"x"
        deadletter._unlock(held)  # the parent's append is done
        other = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: not held by the child
        finally:
            os.close(other)
    finally:
        os.write(went, b"x")
        os.close(went)
        os.close(ready)
        os.waitpid(pid, 0)


def test_taken_puts_back_unusable_lines_as_they_were(path, caplog):
    unusable = [
        b'{"url": "http://h/", "payl',  # torn
        b"[1, 2]",
        b'{"url": "http://h/", "payload": [1]}',
        b'{"url": "http://h/", "payload": {"name": "\xff"}, "attempts": "3"}',  # not UTF-8
    ]
    lines = [compact(record(1)).encode(), *unusable[:2], b"  ", *unusable[2:]]
    with open(path, "wb") as f:
        f.write(b"\n".join(lines))  # the last one torn: no newline
    store = DeadLetterFile(path)
    with store.taken() as records:
        assert ([r["payload"]["n"] for r in records], records.unusable) == ([1], 4)
        store.append([record(2)])  # what still failed, or the app's
    kept = [compact(record(2)).encode(), *unusable]
    with open(path, "rb") as f:
        assert f.read() == b"".join(line + b"\n" for line in kept)
    assert len(caplog.records) == 4
    with store.taken() as records:  # and again: nothing lost, nothing doubled
        assert ([r["payload"]["n"] for r in records], records.unusable) == ([2], 4)


def test_read_records_skips_and_logs_what_is_not_a_record(path, caplog):
    lines = [
        compact(record(1)),
        '{"url": "http://h/", "payl',  # torn
        "",  # blank: skipped silently
        "[1, 2]",  # JSON, not a record
        '{"url": "http://h/"}',  # no payload
        compact(record(2)),
    ]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    assert [r["payload"]["n"] for r in read_records(path)] == [1, 2]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}:2: a damaged dead-letter record (not JSON)",
        f"{path}:4: not a usable dead-letter record: not a JSON object",
        f"{path}:5: not a usable dead-letter record: its payload is not a JSON object",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_read_records_survives_bytes_that_are_not_utf8(path):
    with open(path, "wb") as f:
        f.write(b'{"url": "http://h/", "payload": {"name": "\xff"}}\n')
    assert read_records(path) == [{"url": "http://h/", "payload": {"name": "\ufffd"}}]


GOOD = {"id": "msg_1", "url": "https://h:8443/x?y", "format": "slack", "attempts": 3,
        "lastError": None, "payload": {"callId": 7, "type": "pre"}, "trace": "any"}  # fmt: skip


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        pytest.param(GOOD, None, id="usable"),
        pytest.param({"url": "http://h", "payload": {}}, None, id="least"),
        pytest.param([GOOD], "not a JSON object", id="list"),
        pytest.param({**GOOD, "url": 42}, "its url is not a string", id="url-int"),
        pytest.param({**GOOD, "url": "ftp://h/"}, "its url is not an http(s) URL", id="url-ftp"),
        pytest.param({**GOOD, "url": "http://h:99999/"}, "its url is not an http", id="port"),
        pytest.param({**GOOD, "url": "http://[::1/"}, "its url is not an http", id="ipv6"),
        pytest.param({**GOOD, "url": "http:///x"}, "its url is not an http", id="no-host"),
        pytest.param({**GOOD, "payload": [1]}, "its payload is not a JSON object", id="payload"),
        pytest.param({"url": "http://h"}, "its payload is not a JSON object", id="no-payload"),
        pytest.param({**GOOD, "payload": {"callId": [1]}}, "its payload's callId", id="call-id"),
        pytest.param({**GOOD, "id": 5}, "its id is not a string", id="id"),
        pytest.param({**GOOD, "format": "xml"}, "its format is not one of json,", id="format"),
        pytest.param({**GOOD, "format": ["json"]}, "its format is not one of", id="format-list"),
        pytest.param({**GOOD, "attempts": "3"}, "its attempts is not a count", id="attempts"),
        pytest.param({**GOOD, "attempts": True}, "its attempts is not a count", id="bool"),
        pytest.param({**GOOD, "attempts": -1}, "its attempts is not a count", id="negative"),
        pytest.param({**GOOD, "lastError": {}}, "its lastError is not a string", id="error"),
    ],
)
def test_record_problem_says_what_cannot_be_sent(value, problem):
    found = record_problem(value)
    assert found is None if problem is None else found.startswith(problem)


@pytest.mark.parametrize("text", [compact(record(1)), compact(record(1)).encode()])
def test_parse_record_takes_text_or_bytes(text):
    assert parse_record(text, "here") == record(1)


def test_parse_record_names_where_the_damage_is(caplog):
    assert parse_record(b"\x00garbage", "dead.jsonl:7") is None
    assert parse_record("42", "list[3]") is None
    assert [r.getMessage() for r in caplog.records] == [
        "dead.jsonl:7: a damaged dead-letter record (not JSON)",
        "list[3]: not a usable dead-letter record: not a JSON object",
    ]


# -- choosing a store ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "kind"),
    [
        pytest.param("/var/lib/xo/dead.jsonl", "DeadLetterFile", id="absolute-path"),
        pytest.param("dead.jsonl", "DeadLetterFile", id="relative-path"),
        pytest.param(
            "redis://127.0.0.1:6379/0", "RedisDeadLetter", id="redis", marks=needs_redis_py
        ),
        pytest.param(
            "rediss://127.0.0.1:6380/1?key=k", "RedisDeadLetter", id="rediss", marks=needs_redis_py
        ),
    ],
)
def test_open_dead_letter_chooses_by_scheme(target, kind):
    store = open_dead_letter(target)  # connects to nothing yet
    assert type(store).__name__ == kind
    if kind == "DeadLetterFile":
        assert store.path == target


def test_a_file_store_never_loads_redis():
    code = (
        "import sys\n"
        "from xo_webhooks.sending.policy import open_dead_letter\n"
        "open_dead_letter('dead.jsonl').append([])\n"
        "assert 'redis' not in sys.modules, 'redis was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- what DeadLetters writes ---------------------------------------------------------------


class Collector:
    """A store that keeps what it is given (as ``replay`` does)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def append(self, records) -> None:
        self.records.extend(records)


class Broken:
    def append(self, records) -> None:
        raise OSError(28, "No space left on device")


def failed_delivery() -> Delivery:
    hook = Hook(
        method="vm.start", type="post", url="http://127.0.0.1:9/",
        secret="whsec_" + "A" * 32, headers=(("Authorization", "Bearer t0k3n"),),
    )  # fmt: skip
    payload = {
        **POST,
        "params": {"id": "vm-1", "hunter2": "pw-in-params", "nested": [{"Hunter2": "deep"}]},
        "result": {"hunter2": "pw-in-result", "ok": True},
    }
    delivery = Delivery(hook, payload, id="msg_1", attempts=3, last_error="HTTP 503")
    return delivery


def test_dead_letters_redact_before_the_store_sees_a_record():
    settings = load_settings(environ={}, redact=["hunter2"])
    store = Collector()
    assert DeadLetters(settings, store=store).keep([failed_delivery()])
    (kept,) = store.records
    assert set(kept) == {
        "id", "url", "format", "payload", "attempts", "lastError", "failedAt", "hook"
    }  # fmt: skip
    assert kept["payload"]["params"] == {
        "id": "vm-1",
        "hunter2": "***",
        "nested": [{"Hunter2": "***"}],
    }
    assert kept["payload"]["result"] == {"hunter2": "***", "ok": True}
    assert (kept["id"], kept["attempts"], kept["lastError"]) == ("msg_1", 3, "HTTP 503")
    text = json.dumps(kept)
    for secret in ("pw-in", "deep", "t0k3n", "whsec_", "Authorization"):
        assert secret not in text  # nor the hook's secret and header values


def test_dead_letters_redact_error_data_and_write_the_file(path):
    settings = load_settings(environ={}, dead_letter=path)
    payload = {**PRE, "type": "post", "duration": 1,
               "error": {"code": 1, "message": "no", "data": {"token": "t0ps3cret"}}}  # fmt: skip
    delivery = Delivery(Hook(method="vm.start", type="post", url="http://127.0.0.1:9/"), payload)
    assert DeadLetters(settings).keep([delivery])
    with open(path, "rb") as f:
        assert b"t0ps3cret" not in f.read()
    (kept,) = read_records(path)
    assert kept["payload"]["error"] == {"code": 1, "message": "no", "data": {"token": "***"}}


def test_a_given_store_survives_reopen():
    store = Collector()
    dead_letters = DeadLetters(load_settings(environ={}, dead_letter="/nonexistent"), store=store)
    dead_letters.reopen()  # as after a fork
    assert dead_letters.store is store


def test_a_failing_store_loses_the_hooks_and_says_why(caplog):
    dead_letters = DeadLetters(load_settings(environ={}), store=Broken())
    assert dead_letters.keep([failed_delivery()]) is False
    (log,) = caplog.records
    assert log.levelno == logging.ERROR
    assert "the dead-letter store failed: OSError: [Errno 28] No space left on device" in (
        log.getMessage()
    )
    assert dead_letters.keep([]) is True  # nothing to keep: nothing lost


def test_kept_hooks_are_logged_once_per_interval(caplog):
    dead_letters = DeadLetters(load_settings(environ={}), store=Collector())
    for _ in range(3):
        assert dead_letters.keep([failed_delivery()])
    (log,) = caplog.records
    assert log.levelno == logging.WARNING and "written to" in log.getMessage()
    assert "vm-1" not in log.getMessage()  # never params


# -- the Redis list ------------------------------------------------------------------------


@pytest.fixture
def server(redis_server: RedisServer) -> RedisServer:
    """The module's Redis, emptied for this test."""
    with redis_server.client() as client:
        client.flushall()
    return redis_server


@pytest.fixture
def client(server: RedisServer) -> Iterator[Any]:
    """A client of the module's Redis, for the test to look with."""
    with server.client() as client:
        yield client


@pytest.fixture
def stores() -> Iterator[list[RedisDeadLetter]]:
    """Stores whose connections are closed at teardown."""
    made: list[RedisDeadLetter] = []
    yield made
    for store in made:
        store.client.close()


def open_store(stores: list[RedisDeadLetter], url: str, **kwargs: Any) -> RedisDeadLetter:
    stores.append(RedisDeadLetter(url, **kwargs))
    return stores[-1]


def working_keys(client: Any, key: str) -> list[str]:
    """The working lists of this process's replays of *key*."""
    pattern = f"{key}:replaying:{socket.gethostname()}:{os.getpid()}:*"
    return [k.decode() for k in client.keys(pattern)]


@needs_redis_py
@pytest.mark.parametrize(
    ("query", "key", "rest"),
    [
        pytest.param("", DEFAULT_KEY, "", id="default"),
        pytest.param("?key=hooks:failed", "hooks:failed", "", id="key"),
        pytest.param("?key=", DEFAULT_KEY, "", id="empty-key"),
        pytest.param("?key=a&key=b", "b", "", id="last-key-wins"),
        pytest.param("?socket_keepalive=true&key=k", "k", "?socket_keepalive=true", id="rest-kept"),
    ],
)
def test_the_key_parameter_names_the_list_and_is_taken_out_of_the_url(query, key, rest):
    store = RedisDeadLetter("redis://127.0.0.1:6379/2" + query)
    assert (store.key, store.url) == (key, "redis://127.0.0.1:6379/2" + rest)


@needs_redis_py
def test_repr_never_shows_a_password():
    store = RedisDeadLetter("redis://user:s3cret@127.0.0.1:6379/2?key=k")
    assert repr(store) == "RedisDeadLetter('redis://127.0.0.1:6379/2', key='k')"


def listed(client: Any, key: str) -> list[str]:
    return [v.decode() for v in client.lrange(key, 0, -1)]


def test_append_pushes_a_batch_in_one_command(server, client, stores):
    store = open_store(stores, server.url)
    records = [record(1, note="café"), record(2)]
    client.config_resetstat()
    store.append(records)
    store.append([])  # nothing: no command
    assert client.info("commandstats")["cmdstat_rpush"]["calls"] == 1
    assert listed(client, DEFAULT_KEY) == [compact(r) for r in records]
    store.append([record(3)])
    assert listed(client, DEFAULT_KEY)[2] == compact(record(3))  # appended after


def test_the_list_lives_in_the_database_and_key_of_the_url(server, client, stores):
    store = open_store(
        stores, f"redis://127.0.0.1:{server.port}?db=2&key=hooks:failed"
    )  # db: a redis-py option
    store.append([record(1)])
    with server.client(db=2) as other:
        assert listed(other, "hooks:failed") == [compact(record(1))]
    assert client.keys() == []  # nothing in database 0


def test_redis_taken_renames_the_list_and_deletes_it_when_done(server, client, stores):
    store = open_store(stores, server.url + "/0?key=dl")
    store.append([record(1), record(2)])
    with store.taken() as records:
        assert [r["payload"]["n"] for r in records] == [1, 2]
        (working,) = working_keys(client, "dl")
        assert client.exists("dl") == 0 and client.llen(working) == 2
        store.append([record(3)])  # meanwhile: a new list, not taken
    assert working_keys(client, "dl") == []
    assert listed(client, "dl") == [compact(record(3))]


def test_redis_a_crash_while_taken_leaves_the_working_list(server, client, stores):
    store = open_store(stores, server.url + "/0?key=dl")
    store.append([record(1)])
    with pytest.raises(RuntimeError), store.taken():
        raise RuntimeError("replay crashed")
    (working,) = working_keys(client, "dl")
    assert listed(client, working) == [compact(record(1))]
    assert client.exists("dl") == 0


def test_redis_taken_of_an_empty_store_yields_nothing(server, stores):
    with open_store(stores, server.url).taken() as records:
        assert records == []


def test_redis_taken_puts_back_damaged_values_as_they_were(server, client, stores, caplog):
    store = open_store(stores, server.url + "/0?key=dl")
    unusable = [b'{"url": "http://h/", "payl', b"[1]", b'{"url": 1, "payload": {}}']
    client.rpush("dl", compact(record(1)), *unusable[:2], compact(record(2)), unusable[2])
    with store.taken() as records:
        assert ([r["payload"]["n"] for r in records], records.unusable) == ([1, 2], 3)
        store.append([record(3)])  # what still failed, or a worker's
    assert working_keys(client, "dl") == []
    assert client.lrange("dl", 0, -1) == [compact(record(3)).encode(), *unusable]
    (where,) = {r.getMessage().split("[")[0] for r in caplog.records}
    assert where.startswith(f"dl:replaying:{socket.gethostname()}:{os.getpid()}:")
    assert [r.getMessage() for r in caplog.records] == [
        f"{where}[2]: a damaged dead-letter record (not JSON)",
        f"{where}[3]: not a usable dead-letter record: not a JSON object",
        f"{where}[5]: not a usable dead-letter record: its url is not a string",
    ]


def test_redis_a_crash_while_taken_puts_nothing_back(server, client, stores):
    store = open_store(stores, server.url + "/0?key=dl")
    client.rpush("dl", compact(record(1)), b"[1]")
    with pytest.raises(RuntimeError), store.taken():
        raise RuntimeError("replay crashed")
    (working,) = working_keys(client, "dl")
    assert client.lrange(working, 0, -1) == [compact(record(1)).encode(), b"[1]"]
    assert client.exists("dl") == 0  # the unusable value is not doubled


def test_an_unreachable_redis_fails_fast_then_is_tried_again(stores, monkeypatch):
    skip_without_redis()
    monkeypatch.setattr(deadletter_redis, "FAIL_FAST_SECONDS", 0.3)
    later = RedisServer()  # its port: nothing listens yet
    store = open_store(stores, later.url, timeout=0.5)
    with pytest.raises(redis.ConnectionError):
        store.append([record(1)])
    later.start()
    try:
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="unreachable less than"):
            store.append([record(2)])  # Redis is up, but not asked: it just failed
        assert time.monotonic() - started < 0.5  # no connect timeout waited

        def appended() -> bool:
            try:
                store.append([record(3)])
            except ConnectionError:
                return False
            return True

        wait_until(appended, 5, "an append once the fail-fast window is over")
        with later.client() as client:
            assert listed(client, DEFAULT_KEY) == [compact(record(3))]
    finally:
        later.stop()


def test_dead_letters_write_to_redis_and_log_no_password(server, client, stores, caplog):
    target = f"redis://:pw-never-logged@127.0.0.1:{server.port}/0?key=dl"
    client.config_set("requirepass", "pw-never-logged")  # this connection stays signed in
    try:
        dead_letters = DeadLetters(load_settings(environ={}, dead_letter=target))
        stores.append(dead_letters.store)
        assert dead_letters.keep([failed_delivery()])
        (value,) = listed(client, "dl")
    finally:
        client.config_set("requirepass", "")
    assert json.loads(value)["id"] == "msg_1"
    assert "pw-never-logged" not in caplog.text
    assert f"RedisDeadLetter('redis://127.0.0.1:{server.port}/0', key='dl')" in caplog.text


def test_reopen_gives_a_forked_child_a_free_log_lock(tmp_path):
    """A fork can happen while another thread holds the give-up log's lock: after
    reopen() (the dispatcher's after-fork hook) keeping a hook must not wait for it."""
    dead_letters = DeadLetters(load_settings(environ={}, dead_letter=str(tmp_path / "d.jsonl")))
    dead_letters._say["kept"]._lock.acquire()  # as a parent's thread would, at the fork
    dead_letters.reopen()
    kept: list[bool] = []
    worker = threading.Thread(
        target=lambda: kept.append(dead_letters.keep([failed_delivery()])), daemon=True
    )
    worker.start()
    worker.join(5)
    assert kept == [True]
