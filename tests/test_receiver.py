"""Tests of xo_webhooks.receiver: in-process with werkzeug's Client, end to end with a
real server and requests, and a property-based test that nothing crashes it."""

from __future__ import annotations

import io
import json
import logging
import os
import select
import socket
import stat
import threading
import time
import uuid
import warnings
from wsgiref.validate import validator as wsgiref_validator

import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from werkzeug.exceptions import ClientDisconnected
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.serving import make_server
from werkzeug.test import Client, EnvironBuilder, run_wsgi_app

from xo_webhooks.errors import ConfigError
from xo_webhooks.receiver import HookReceiver, make_receiver, serve
from xo_webhooks.receiving import receiver as receiver_module
from xo_webhooks.receiving.server import ReceiverServer
from xo_webhooks.signing import generate_secret, sign

pytestmark = pytest.mark.usefixtures("no_leaked_threads")

SECRET = generate_secret()
TS_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z

# Records what a script got: the payload (stdin), its environment and working folder.
RECORD = """#!/bin/sh
payload=$(cat)
printf '%s\\n' "$payload" >> "@OUT@/payloads"
printf '%s|%s|%s|%s|%s\\n' "$XO_HOOK_TYPE" "$XO_HOOK_METHOD" "$XO_HOOK_CALL_ID" \
    "${XO_WEBHOOKS_SECRET:-unset}" "$(pwd)" >> "@OUT@/runs"
echo "hello from $XO_HOOK_METHOD"
"""


# --- helpers ---------------------------------------------------------------------------


def hook(method: str = "vm.start", type: str = "post", **extra):
    payload = {
        "type": type,
        "callId": "call-1",
        "userId": "u-1",
        "userName": "admin@example.org",
        "method": method,
        "params": {"id": "vm-1"},
        "timestamp": TS_MS,
    }
    if type == "post":
        payload.update(duration=12, result=True)
    payload.update(extra)
    return payload


def encode(payload) -> bytes:
    return json.dumps(payload).encode()


def signed(body: bytes, secret: str = SECRET, msg_id: str | None = None, ts: int | None = None):
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    ts = int(time.time()) if ts is None else ts
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, msg_id, ts, body),
        "content-type": "application/json",
    }


def write_script(folder, name: str, text: str, *, executable: bool = True):
    path = folder / name
    path.write_text(text)
    if executable:
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def process_is_gone(pid: int, timeout: float = 10.0) -> bool:
    """Wait for *pid* to terminate, on a pidfd (an event, not a polling loop)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


class Endless:
    """A request body that never ends and records how much of it was read."""

    def __init__(self) -> None:
        self.consumed = 0

    def read(self, size: int = -1) -> bytes:
        assert size is not None and size >= 0, "an unbounded read of an endless body"
        self.consumed += size
        return b"x" * size


class Untouchable:
    """A request body that must not be read at all."""

    def read(self, size: int = -1) -> bytes:
        raise AssertionError("the body was read although Content-Length is over the limit")


class Unreadable:
    """A request body whose reading fails, as when the client goes away mid-body."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def read(self, size: int = -1) -> bytes:
        raise self.error


class FailOnHookLine(logging.Filter):
    """A faulty log filter of the application's: it raises on the INFO line of a hook
    whose params hold "boom", which makes the receiver fail inside its own code."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and "boom" in record.getMessage():
            raise RuntimeError("the filter broke: boom")
        return True


def run(app, environ) -> tuple[str, bytes]:
    """Call *app* in process; return its status line and body."""
    app_iter, status, _ = run_wsgi_app(app, environ, buffered=True)
    return status, b"".join(app_iter)


def raw_request(port: int, data: bytes) -> int:
    """Send *data* as is over one connection; return the response status."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):  # the server closes every connection
            received += chunk
    return int(received.split(b" ", 2)[1])


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.INFO, logger="xo_webhooks.receiving")
    return caplog


@pytest.fixture
def folders(tmp_path):
    """tmp/x/hook-scripts (the scripts), tmp/out (what scripts record), tmp/markers."""
    scripts = tmp_path / "x" / "hook-scripts"
    scripts.mkdir(parents=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "markers").mkdir()
    write_script(scripts, "vm.start-post.sh", RECORD.replace("@OUT@", str(tmp_path / "out")))
    write_script(scripts, "vm.start-pre.sh", RECORD.replace("@OUT@", str(tmp_path / "out")))
    return scripts, tmp_path / "out", tmp_path / "markers"


@pytest.fixture
def receivers():
    made: list[HookReceiver] = []

    def factory(*args, **kwargs) -> HookReceiver:
        made.append(make_receiver(*args, **kwargs))
        return made[-1]

    yield factory
    for receiver in made:
        assert receiver.close(timeout=10)


@pytest.fixture
def live():
    """Serve a WSGI app on 127.0.0.1 on a free port; return its URL and port."""
    started = []

    def start(app):
        server = make_server("127.0.0.1", 0, app, threaded=True)
        server.daemon_threads = False  # so that server_close() joins the request threads
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.01}, name="test-server"
        )
        thread.start()
        started.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}/", server.server_port

    yield start
    for server, thread in started:
        server.shutdown()
        thread.join(10)
        server.server_close()
        assert not thread.is_alive()


# --- HTTP rules, in process ------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "HEAD", "OPTIONS"])
def test_only_post_is_accepted(receivers, method):
    response = Client(receivers()).open("/", method=method, data=encode(hook()))
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"


def test_a_valid_hook_is_acknowledged_with_204(receivers):
    response = Client(receivers()).post("/", data=encode(hook()))
    assert response.status_code == 204 and response.data == b""


def test_content_length_over_the_limit_is_refused_unread(receivers):
    app = receivers(max_body=100)
    environ = EnvironBuilder(method="POST").get_environ()
    environ.update(CONTENT_LENGTH=str(10**12), **{"wsgi.input": Untouchable()})
    _, status, _ = run_wsgi_app(app, environ, buffered=True)
    assert status.startswith("413")
    assert Client(app).post("/", data=b"x" * 101).status_code == 413
    assert Client(app).post("/", data=b" " * 100).status_code == 400  # at the limit: read


def test_a_chunked_body_is_read_only_up_to_the_limit(receivers):
    app = receivers(max_body=1000)
    body = Endless()
    environ = EnvironBuilder(method="POST", headers={"Transfer-Encoding": "chunked"}).get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ.update({"wsgi.input": body, "wsgi.input_terminated": True})
    _, status, _ = run_wsgi_app(app, environ, buffered=True)
    assert status.startswith("413")
    assert 1000 < body.consumed <= 1001


def test_a_chunked_body_within_the_limit_is_accepted(receivers):
    environ = EnvironBuilder(method="POST", headers={"Transfer-Encoding": "chunked"}).get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ.update({"wsgi.input": io.BytesIO(encode(hook())), "wsgi.input_terminated": True})
    _, status, _ = run_wsgi_app(receivers(), environ, buffered=True)
    assert status.startswith("204")


def test_a_chunked_body_the_server_did_not_frame_is_refused(receivers):
    environ = EnvironBuilder(method="POST", headers={"Transfer-Encoding": "chunked"}).get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ["wsgi.input"] = Endless()
    _, status, _ = run_wsgi_app(receivers(), environ, buffered=True)
    assert status.startswith("411")


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(OSError(104, "Connection reset by peer"), id="reset"),
        pytest.param(ValueError("I/O operation on closed file"), id="closed"),
        pytest.param(ClientDisconnected(), id="client-disconnected"),
    ],
)
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_that_cannot_be_read_gets_400(receivers, error, framing):
    environ = EnvironBuilder(method="POST").get_environ()
    if framing == "content-length":
        environ["CONTENT_LENGTH"] = "100"
    else:
        environ.pop("CONTENT_LENGTH", None)
        environ.update(HTTP_TRANSFER_ENCODING="chunked", **{"wsgi.input_terminated": True})
    environ["wsgi.input"] = Unreadable(error)
    assert run(receivers(), environ) == ("400 BAD REQUEST", b"the body could not be read\n")


@pytest.mark.parametrize(
    ("length", "body", "reason"),
    [
        pytest.param("abc", b"", b"invalid Content-Length", id="not-a-number"),
        pytest.param("-1", b"", b"invalid Content-Length", id="negative"),
        pytest.param("1e3", b"", b"invalid Content-Length", id="exponent"),
        pytest.param("9" * 19, b"", b"invalid Content-Length", id="19-digits"),
        pytest.param("100", b"{}", b"the body is shorter than its Content-Length", id="short-body"),
    ],
)
def test_a_body_that_does_not_match_its_content_length_gets_400(receivers, length, body, reason):
    environ = EnvironBuilder(method="POST").get_environ()
    environ.update(CONTENT_LENGTH=length, **{"wsgi.input": io.BytesIO(body)})
    assert run(receivers(), environ) == ("400 BAD REQUEST", reason + b"\n")


def test_a_failure_inside_the_receiver_is_a_logged_500_without_details(receivers, log):
    app = receivers()
    failing = FailOnHookLine()
    logging.getLogger("xo_webhooks.receiving.receiver").addFilter(failing)
    try:
        response = Client(app).post("/", data=encode(hook(params={"id": "boom"})))
        ok = Client(app).post("/", data=encode(hook()))
    finally:
        logging.getLogger("xo_webhooks.receiving.receiver").removeFilter(failing)
    assert response.status_code == 500
    assert response.get_data() == b"internal error\n"  # no traceback, no message
    assert response.headers["Content-Type"].startswith("text/plain")
    assert ok.status_code == 204  # and it goes on answering
    (error,) = [r for r in log.records if r.levelno == logging.ERROR]
    assert error.getMessage() == "the receiver failed on a request"
    assert error.exc_info is not None and error.exc_info[0] is RuntimeError


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(b"", "not JSON", id="empty"),
        pytest.param(b"{", "not JSON", id="truncated"),
        pytest.param(b"NaN", "not JSON", id="nan"),
        pytest.param(b'{"a": Infinity}', "not JSON", id="infinity"),
        pytest.param(b"[" * 100_000, "nested too deeply", id="deep-100000"),
        pytest.param(b"[" * 50_000 + b"]" * 50_000, "nested too deeply", id="deep-balanced"),
        pytest.param(b"9" * 5000, "not JSON", id="int-too-long"),
        pytest.param(b'{"method": "vm.\xff"}', "not UTF-8", id="invalid-utf8"),
        pytest.param(b'"\xed\xa0\x80"', "not UTF-8", id="encoded-surrogate"),
        pytest.param(encode(hook()).decode().encode("utf-16"), "not UTF-8", id="utf-16"),
        pytest.param(b"\xef\xbb\xbf" + encode(hook()), "not JSON", id="bom"),
    ],
)
def test_bodies_that_are_not_utf8_json_get_400(receivers, body, reason):
    response = Client(receivers()).post("/", data=body)
    assert response.status_code == 400
    assert reason in response.get_data(as_text=True)


def test_a_payload_nested_just_below_the_parser_limit_is_handled(receivers, log):
    # Nesting below the limit is JSON like any other: the schema decides.
    deep = json.loads("[" * 900 + "]" * 900)
    response = Client(receivers()).post("/", data=encode(deep))
    assert response.status_code == 400
    assert response.get_data(as_text=True) == (
        "not a valid hook payload: $: expected object, got an array\n"
    )
    for payload in (hook(params=deep), hook(result=deep)):
        assert Client(receivers()).post("/", data=encode(payload)).status_code == 204
    assert "the receiver failed" not in log.text


@pytest.mark.parametrize(
    ("payload", "path", "words"),
    [
        pytest.param(hook(type="middle"), "$.type", "is not one of", id="type"),
        pytest.param({**hook(), "callId": ""}, "$.callId", "should be non-empty", id="callId"),
        pytest.param({**hook(), "timestamp": "now"}, "$.timestamp", "not of type", id="ts"),
        pytest.param({**hook(), "extra": 1}, "$", "extra", id="extra-key"),
        pytest.param(
            hook(type="pre", result=1), "$.result", "not allowed in a pre hook", id="pre-result"
        ),
        pytest.param({**hook(), "error": {"code": 1}}, "$", "", id="result-and-error"),
        pytest.param([hook()], "$", "expected object, got an array", id="array"),
        pytest.param(
            {k: v for k, v in hook().items() if k != "method"}, "$", "'method'", id="no-method"
        ),
    ],
)
def test_schema_failures_get_400_with_path_and_reason(receivers, payload, path, words):
    response = Client(receivers()).post("/", data=encode(payload))
    assert response.status_code == 400
    text = response.get_data(as_text=True)
    assert text.startswith("not a valid hook payload: ")
    assert f"{path}: " in text and words in text


def test_a_huge_invalid_value_is_not_echoed_in_full(receivers):
    response = Client(receivers()).post("/", data=encode({**hook(), "timestamp": "x" * 500_000}))
    assert response.status_code == 400 and len(response.data) < 1000


# --- signatures, in process ------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        pytest.param(lambda body: {}, "missing", id="unsigned"),
        pytest.param(
            lambda body: signed(body, secret=generate_secret()), "no matching", id="forged"
        ),
        pytest.param(lambda body: signed(body, ts=int(time.time()) - 301), "too old", id="stale"),
        pytest.param(lambda body: signed(body, ts=int(time.time()) + 301), "too new", id="future"),
        pytest.param(
            lambda body: {**signed(body), "webhook-signature": "v1,@@"}, "malformed", id="malformed"
        ),
        pytest.param(lambda body: signed(body + b" "), "no matching", id="other-body"),
    ],
)
def test_without_a_valid_signature_401(receivers, log, headers, reason):
    body = encode(hook())
    response = Client(receivers(secret=SECRET)).post("/", data=body, headers=headers(body))
    assert response.status_code == 401
    assert reason in response.get_data(as_text=True)
    assert SECRET not in log.text and SECRET[6:] not in response.get_data(as_text=True)


def test_custom_tolerance(receivers):
    app = receivers(secret=SECRET, tolerance=3600)
    body = encode(hook())
    response = Client(app).post("/", data=body, headers=signed(body, ts=int(time.time()) - 1800))
    assert response.status_code == 204
    strict = Client(receivers(secret=SECRET, tolerance=5))
    response = strict.post("/", data=body, headers=signed(body, ts=int(time.time()) - 60))
    assert response.status_code == 401


def test_signature_is_checked_before_the_body_is_parsed(receivers):
    response = Client(receivers(secret=SECRET)).post("/", data=b"[" * 100_000)
    assert response.status_code == 401


def test_a_replayed_id_is_acknowledged_but_not_run_twice(receivers, folders, log):
    scripts, out, _ = folders
    app = receivers(scripts, SECRET)
    body = encode(hook())
    headers = signed(body)
    client = Client(app)
    assert [client.post("/", data=body, headers=headers).status_code for _ in range(3)] == [204] * 3
    assert app.drain(10)
    assert len(lines(out / "runs")) == 1
    assert "replayed webhook-id" in log.text


def test_a_full_replay_cache_refuses_new_hooks_rather_than_forget_an_id(
    receivers, folders, monkeypatch
):
    monkeypatch.setattr(receiver_module, "SEEN_IDS", 3)
    scripts, out, _ = folders
    app = receivers(scripts, SECRET)
    client = Client(app)
    body = encode(hook())
    sent = {msg_id: signed(body, msg_id=msg_id) for msg_id in "abcd"}
    assert [client.post("/", data=body, headers=sent[m]).status_code for m in "abc"] == [204] * 3
    full = client.post("/", data=body, headers=sent["d"])
    assert full.status_code == 503
    assert 295 <= int(full.headers["Retry-After"]) <= 302  # when "a" expires
    assert client.post("/", data=body, headers=sent["a"]).status_code == 204  # not run again
    assert app.drain(10)
    assert len(lines(out / "runs")) == 3


def test_an_id_is_kept_until_it_expires_and_no_longer():
    seen = receiver_module._SeenIds(2)
    assert seen.add("a", until=10, now=0)
    assert not seen.add("a", until=10, now=10)  # a replay, up to the last moment
    assert seen.add("b", until=30, now=1)
    with pytest.raises(receiver_module._ReplaysFull) as full:
        seen.add("c", until=40, now=5)
    assert full.value.retry_after == 5  # when "a" expires
    assert seen.add("c", until=40, now=10.5)  # "a" expired: room again
    assert seen.add("a", until=50, now=30.5)  # "b" expired; "a" is new again
    assert not seen.add("c", until=40, now=31)


def test_an_id_expiring_behind_a_later_one_waits_for_it():
    seen = receiver_module._SeenIds(2)
    assert seen.add("late", until=100, now=0)  # a sender whose clock runs ahead
    assert seen.add("early", until=10, now=1)
    with pytest.raises(receiver_module._ReplaysFull) as full:
        seen.add("next", until=60, now=20)
    assert full.value.retry_after == 80
    assert seen.add("early", until=70, now=21)  # expired, so new, though still stored


def test_a_signed_id_is_kept_while_its_signature_lives(receivers, monkeypatch):
    kept = []  # how long each id is kept, in seconds

    def add(self, msg_id, until, now):
        kept.append(until - now)
        return True

    monkeypatch.setattr(receiver_module._SeenIds, "add", add)
    app = receivers(secret=SECRET, tolerance=300)
    body = encode(hook())
    ages = [0, 200, 290]
    for age in ages:
        headers = signed(body, ts=int(time.time()) - age)
        assert Client(app).post("/", data=body, headers=headers).status_code == 204
    # until webhook-timestamp + tolerance, plus a second; the timestamp is whole seconds
    assert all(300 - age < seconds <= 301 - age for age, seconds in zip(ages, kept, strict=True))
    unsigned = receivers(tolerance=300)
    assert Client(unsigned).post("/", data=body, headers={"webhook-id": "x"}).status_code == 204
    assert kept[-1] == 300


# --- scripts ---------------------------------------------------------------------------


def test_script_contract(receivers, folders, monkeypatch):
    monkeypatch.setenv("XO_WEBHOOKS_SECRET", SECRET)  # must not reach the script
    scripts, out, _ = folders
    app = receivers(scripts)
    pre, post = encode(hook(type="pre", callId="c-7")), encode(hook(callId="c-7"))
    for body in (pre, post):
        assert Client(app).post("/", data=body).status_code == 204
    assert app.drain(10)
    assert sorted(lines(out / "payloads")) == sorted([pre.decode(), post.decode()])
    assert sorted(lines(out / "runs")) == [
        f"post|vm.start|c-7|unset|{scripts}",
        f"pre|vm.start|c-7|unset|{scripts}",
    ]


def test_the_hook_log_line(receivers, log):
    client = Client(receivers())
    error = {"code": -32000, "message": "no such VM"}
    failed = {k: v for k, v in hook(error=error).items() if k != "result"}
    for payload in (hook(type="pre"), hook(), failed):
        assert client.post("/", data=encode(payload)).status_code == 204
    assert [r.getMessage() for r in log.records if r.name == "xo_webhooks.receiving.receiver"] == [
        '2023-11-14T22:13:20.000Z [vm.start|pre] {"id": "vm-1"}',
        '2023-11-14T22:13:20.000Z [vm.start|post] {"id": "vm-1"} → result: true',
        '2023-11-14T22:13:20.000Z [vm.start|post] {"id": "vm-1"} → error: '
        '{"code": -32000, "message": "no such VM"}',
    ]


def test_odd_values_are_escaped_in_the_log(receivers, log):
    client = Client(receivers())
    payload = hook(method="vm.start\nFAKE LOG LINE", timestamp=10**30, result="\u2028\x1b[31m")
    assert client.post("/", data=encode(payload)).status_code == 204
    (line,) = [r.getMessage() for r in log.records]
    assert "\n" not in line and "\x1b" not in line
    assert line.startswith("timestamp=1000000000000000000000000000000 ['vm.start\\nFAKE")


def test_exit_status_and_truncated_output_are_logged(receivers, folders, log):
    scripts, _, _ = folders
    write_script(scripts, "vm.fail-post.sh", "#!/bin/sh\nprintf 'x%.0s' $(seq 10000)\nexit 3\n")
    app = receivers(scripts)
    assert Client(app).post("/", data=encode(hook("vm.fail"))).status_code == 204
    assert app.drain(10)
    (record,) = [r for r in log.records if "vm.fail-post.sh" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "exited with status 3" in record.getMessage()
    assert "'" + "x" * 4096 + "' (and 5904 more bytes)" in record.getMessage()


@pytest.mark.parametrize(
    ("name", "text", "executable", "message"),
    [
        pytest.param(
            "vm.x-post.sh", "#!/bin/sh\ntouch @M@\n", False, "not executable", id="not-executable"
        ),
        pytest.param("vm.x-post.sh", "touch @M@\n", True, "could not start", id="no-shebang"),
    ],
)
def test_scripts_that_cannot_run_are_reported(
    receivers, folders, log, name, text, executable, message
):
    scripts, _, markers = folders
    write_script(scripts, name, text.replace("@M@", str(markers / "ran")), executable=executable)
    app = receivers(scripts)
    assert Client(app).post("/", data=encode(hook("vm.x"))).status_code == 204
    assert app.drain(10)
    assert message in log.text and not (markers / "ran").exists()


def test_a_hanging_script_and_its_children_are_killed(receivers, folders, log):
    scripts, out, _ = folders
    write_script(
        scripts,
        "vm.hang-post.sh",
        f'#!/bin/sh\nsleep 600 &\necho $! > "{out}/child"\necho started\nwait\n'
        f'touch "{out}/finished"\n',
    )
    app = receivers(scripts, script_timeout=0.5)
    assert Client(app).post("/", data=encode(hook("vm.hang"))).status_code == 204
    assert app.drain(30)
    assert "vm.hang-post.sh was killed after 0.5 s; output: 'started\\n'" in log.text
    assert not (out / "finished").exists()
    assert process_is_gone(int((out / "child").read_text()))


def test_drain_waits_for_running_scripts_and_a_full_queue_answers_503(receivers, folders):
    scripts, out, _ = folders
    fifo = out / "gate"
    os.mkfifo(fifo)
    write_script(scripts, "vm.wait-post.sh", f'#!/bin/sh\nread line < "{fifo}"\n')
    app = receivers(scripts, max_workers=1, max_queue=1)
    client = Client(app)
    assert client.post("/", data=encode(hook("vm.wait"))).status_code == 204
    second = {"data": encode(hook()), "headers": {"webhook-id": "second"}}
    response = client.post("/", **second)
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert app.drain(0.05) is False
    with open(fifo, "w") as gate:  # blocks until the script opens the fifo
        gate.write("go\n")
    assert app.drain(10)
    assert client.post("/", **second).status_code == 204  # its id was not remembered
    assert app.drain(10)
    assert len(lines(out / "runs")) == 1


def test_after_close_hooks_get_503(receivers, folders):
    scripts, out, _ = folders
    app = receivers(scripts)
    assert Client(app).post("/", data=encode(hook())).status_code == 204
    assert app.close(10) and app.close(10)
    assert Client(app).post("/", data=encode(hook())).status_code == 503
    assert Client(app).post("/", data=encode(hook("vm.noscript"))).status_code == 503
    assert app.drain(0) and len(lines(out / "runs")) == 1


# --- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"secret": "whsec_@@@secretvalue"}, "secret", id="bad-secret"),
        pytest.param({"scripts_dir": "/nonexistent/hook-scripts"}, "not a folder", id="no-dir"),
        pytest.param({"max_body": -1}, "max_body", id="max_body"),
        pytest.param({"script_timeout": 0}, "script_timeout", id="script_timeout"),
        pytest.param({"tolerance": -1}, "tolerance", id="tolerance"),
        pytest.param({"tolerance": float("inf")}, "tolerance", id="tolerance-inf"),
        pytest.param({"tolerance": float("nan")}, "tolerance", id="tolerance-nan"),
        pytest.param({"max_workers": 0}, "max_workers", id="max_workers"),
        pytest.param({"max_queue": 0}, "max_queue", id="max_queue"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        make_receiver(**kwargs)
    assert "secretvalue" not in str(info.value)


def test_repr_hides_the_secret(receivers, folders):
    app = receivers(folders[0], SECRET)
    assert SECRET[6:] not in repr(app) and "signed" in repr(app)


@pytest.mark.parametrize("checker", [LintMiddleware, wsgiref_validator], ids=["lint", "wsgiref"])
@pytest.mark.parametrize(
    ("method", "body", "status"),
    [
        ("POST", encode(hook()), 204),
        ("POST", b"x" * 2000, 413),
        ("POST", b"{", 400),
        ("GET", b"", 405),
    ],
)
def test_wsgi_compliance(receivers, checker, method, body, status):
    client = Client(checker(receivers(max_body=1000)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # werkzeug omits Content-Length on a 204 on purpose (RFC 9110 forbids it; pallets/
        # werkzeug#1294) while its older lint check still asks for "Content-Length: 0".
        warnings.filterwarnings("ignore", "204 responses must have an empty content length")
        response = client.open("/", method=method, data=body)
        response.close()
    assert response.status_code == status


# --- end to end: a real server, requests -----------------------------------------------

UNSAFE_METHODS = [
    "../../bin/sh",
    "../outside/evil",
    "out/evil",
    "link",
    "/bin/sh",
    "vm.start/../../../bin/sh",
    "vm.start;id",
    "vm.start && id",
    "vm.start|id",
    "$(id)",
    "`id`",
    "vm.start\n",
    "vm.start\nid",
    "vm.start\r\nX-Injected: 1",
    "vm.start\x00",
    "vm.start\x00../../bin/sh",
    " vm.start",
    "vm.stárt",
    "a" * 201,
    "a" * 100_000,
]


def test_no_unintended_file_runs(receivers, folders, live, log):
    scripts, out, markers = folders
    tmp = scripts.parent.parent
    marker = '#!/bin/sh\ntouch "{}"\n'.format
    # Executables a shell or a path traversal would reach, each leaving a marker.
    (tmp / "bin").mkdir()
    (tmp / "outside").mkdir()
    write_script(tmp / "bin", "sh-pre.sh", marker(markers / "bin-sh"))
    write_script(tmp / "outside", "evil-pre.sh", marker(markers / "outside-evil"))
    (scripts / "out").symlink_to(tmp / "outside")
    (scripts / "link-pre.sh").symlink_to(tmp / "outside" / "evil-pre.sh")
    for name in [
        "vm.start;id",
        "$(id)",
        "`id`",
        "vm.start\n",
        "vm.start\nid",
        " vm.start",
        "vm.start && id",
        "vm.start|id",
        "a" * 201,
    ]:
        write_script(scripts, f"{name}-pre.sh", marker(markers / str(len(os.listdir(scripts)))))
    # A symlink that stays inside the folder is fine, and so is a name of 200 characters.
    (scripts / "alias-pre.sh").symlink_to(scripts / "vm.start-pre.sh")
    write_script(scripts, "a" * 200 + "-pre.sh", RECORD.replace("@OUT@", str(out)))

    app = receivers(scripts)
    url, _ = live(app)
    for method in UNSAFE_METHODS:
        response = requests.post(url, data=encode(hook(method, "pre")), timeout=10)
        assert response.status_code == 204, method
    assert app.drain(10)
    assert os.listdir(markers) == []
    assert not (out / "runs").exists()
    assert log.text.count("no script for method") == len(UNSAFE_METHODS) - 1
    assert "refused script link-pre.sh: it resolves outside the scripts folder" in log.text

    # ... and it keeps answering, and running what it should.
    for method in ["vm.start", "alias", "a" * 200]:
        response = requests.post(url, data=encode(hook(method, "pre")), timeout=10)
        assert response.status_code == 204
    assert app.drain(10)
    assert sorted(run.split("|")[1] for run in lines(out / "runs")) == [
        "a" * 200,
        "alias",
        "vm.start",
    ]
    assert os.listdir(markers) == []


def test_end_to_end_signatures(receivers, folders, live, log):
    scripts, out, _ = folders
    app = receivers(scripts, SECRET)
    url, _ = live(app)
    body = encode(hook())
    good = signed(body)
    assert requests.post(url, data=body, headers=good, timeout=10).status_code == 204
    assert requests.post(url, data=body, headers=good, timeout=10).status_code == 204  # replay
    forged = signed(body, secret=generate_secret())
    stale = signed(body, ts=int(time.time()) - 3600)
    future = signed(body, ts=int(time.time()) + 3600)
    tampered = {**signed(body), "webhook-id": "msg_other"}
    for headers in (forged, stale, future, tampered, {}):
        assert requests.post(url, data=body, headers=headers, timeout=10).status_code == 401
    assert app.drain(10)
    assert lines(out / "payloads") == [body.decode()]
    assert SECRET[6:] not in log.text


def test_end_to_end_bad_bodies(receivers, live):
    app = receivers(max_body=1000)
    url, port = live(app)
    assert requests.post(url, data=b"[" * 1000, timeout=10).status_code == 400
    assert requests.post(url, data=b'{"\xff": 1}', timeout=10).status_code == 400
    assert requests.get(url, timeout=10).status_code == 405
    # Over the limit with a Content-Length: refused before the body is sent in full.
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n"
    assert raw_request(port, head + b"[" * 100) == 413
    # Over the limit, chunked: refused once the limit is passed.
    head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = b"".join(b"%x\r\n%s\r\n" % (300, b"[" * 300) for _ in range(5)) + b"0\r\n\r\n"
    assert raw_request(port, head + chunks) == 413
    # Chunked and within the limit: accepted.
    assert requests.post(url, data=iter([encode(hook())]), timeout=10).status_code == 204
    # Still answering after all that.
    assert requests.post(url, data=encode(hook()), timeout=10).status_code == 204


def test_end_to_end_a_failure_inside_the_receiver(receivers, live, log):
    failing = FailOnHookLine()
    logging.getLogger("xo_webhooks.receiving.receiver").addFilter(failing)
    try:
        url, _ = live(receivers())
        response = requests.post(url, data=encode(hook(params={"id": "boom"})), timeout=10)
        ok = requests.post(url, data=encode(hook()), timeout=10)
    finally:
        logging.getLogger("xo_webhooks.receiving.receiver").removeFilter(failing)
    assert (response.status_code, response.content) == (500, b"internal error\n")
    assert "Traceback" not in response.text and "boom" not in response.text
    assert ok.status_code == 204
    assert "the receiver failed on a request" in log.text


def test_serve(tmp_path, folders, monkeypatch):
    scripts, out, _ = folders
    created = []
    ready = threading.Event()

    class Captured(ReceiverServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)
            ready.set()

    monkeypatch.setattr(receiver_module, "ReceiverServer", Captured)
    limits = {"read_timeout": 5, "max_connections": 8}
    thread = threading.Thread(
        target=serve, kwargs={"port": 0, "scripts_dir": scripts, "secret": SECRET, **limits}
    )
    thread.start()
    try:
        assert ready.wait(10)
        assert (created[0].read_timeout, created[0].max_connections) == (5, 8)
        url = f"http://127.0.0.1:{created[0].server_port}/"
        body = encode(hook())
        assert requests.post(url, data=body, headers=signed(body), timeout=10).status_code == 204
        assert requests.post(url, data=body, timeout=10).status_code == 401
    finally:
        if created:
            created[0].shutdown()
        thread.join(30)
    assert not thread.is_alive()
    assert lines(out / "payloads") == [body.decode()]  # serve() waited for the script


# --- property-based: never a crash -----------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
payloads = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["pre", "post"]) | st.text(max_size=4),
        "callId": st.text(max_size=8),
        "userId": st.none() | st.text(max_size=4),
        "userName": st.none() | st.text(max_size=4),
        "method": st.sampled_from(["vm.start", "../../bin/sh", "$(id)"]) | st.text(max_size=20),
        "params": st.dictionaries(st.text(max_size=4), json_values, max_size=3) | json_values,
        "timestamp": st.integers(min_value=-1, max_value=2**80) | st.floats(allow_nan=False),
    },
    optional={
        "duration": st.integers(min_value=-1),
        "result": json_values,
        "error": st.fixed_dictionaries({"code": st.integers(), "message": st.text(max_size=5)})
        | json_values,
    },
)


@st.composite
def valid_payloads(draw):
    """Payloads that pass the schema, so that the whole path to 204 is exercised."""
    payload = {
        "type": draw(st.sampled_from(["pre", "post"])),
        "callId": draw(st.text(min_size=1, max_size=10)),
        "userId": draw(st.none() | st.text(max_size=5)),
        "userName": draw(st.none() | st.text(max_size=5)),
        "method": draw(
            st.sampled_from(["vm.start", "../../bin/sh", "$(id)", "a" * 201])
            | st.text(min_size=1, max_size=30)
        ),
        "params": draw(
            st.dictionaries(st.text(max_size=4), json_values, max_size=3)
            | st.lists(json_values, max_size=3)
        ),
        "timestamp": draw(st.integers(min_value=0, max_value=2**70)),
    }
    if payload["type"] == "post":
        payload["duration"] = draw(st.integers(min_value=0, max_value=2**40))
        if draw(st.booleans()):
            payload["result"] = draw(json_values)
        else:
            payload["error"] = {"code": draw(st.integers()), "message": draw(st.text(max_size=9))}
    return payload


bodies = st.one_of(
    valid_payloads().map(lambda p: json.dumps(p).encode()),
    valid_payloads().map(lambda p: json.dumps(p, ensure_ascii=False).encode("utf-8", "replace")),
    payloads.map(lambda p: json.dumps(p).encode()),
    payloads.map(lambda p: json.dumps(p, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=60)
headers = st.dictionaries(
    st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature", "Content-Type"]),
    header_text,
)


@pytest.fixture(scope="module")
def fuzz_clients(tmp_path_factory):
    scripts = tmp_path_factory.mktemp("empty-hook-scripts")  # nothing runs, no threads start
    apps = {"unsigned": make_receiver(scripts), "signed": make_receiver(scripts, SECRET)}
    logger = logging.getLogger("xo_webhooks.receiving")
    level = logger.level
    logger.setLevel(logging.DEBUG)  # so that the log lines are built too
    yield {name: Client(app) for name, app in apps.items()}
    logger.setLevel(level)
    for app in apps.values():
        assert app.close(10)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    body=bodies,
    headers=headers,
    sign_it=st.booleans(),
    mode=st.sampled_from(["signed", "unsigned"]),
    http_method=st.sampled_from(["POST", "POST", "POST", "PUT"]),
)
def test_random_requests_never_crash_the_receiver(
    fuzz_clients, body, headers, sign_it, mode, http_method
):
    if sign_it:
        headers = {**headers, **signed(body)}
    response = fuzz_clients[mode].open("/", method=http_method, data=body, headers=headers)
    event(f"status {response.status_code}")  # see --hypothesis-show-statistics
    assert 200 <= response.status_code < 300 or 400 <= response.status_code < 500
