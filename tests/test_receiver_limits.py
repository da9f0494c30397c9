"""The receiver's server against slow and greedy clients (xo_webhooks.receiving.server):
a read deadline for the whole request, a cap on connections answered with a fast 503,
and an accept loop that backs off instead of spinning when file descriptors run out.

Everything runs on 127.0.0.1 with ephemeral ports; the last test runs the ``receive``
command in a process of its own, with a low open-file limit.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
import requests

from xo_webhooks.errors import ConfigError
from xo_webhooks.receiver import make_receiver
from xo_webhooks.receiving.server import RETRY_AFTER, ReceiverServer, _DeadlineHandler
from xo_webhooks.signing import sign

from .helpers import PRE, SECRET
from .waiting import wait_until

pytestmark = pytest.mark.usefixtures("no_leaked_threads")

# The start of a request that never ends: what a slowloris client sends.
PARTIAL = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def signed(body: bytes) -> dict[str, str]:
    """The headers of a valid signed hook with *body*."""
    msg_id, now = f"msg_{uuid.uuid4().hex}", int(time.time())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(now),
        "webhook-signature": sign(SECRET, msg_id, now, body),
        "content-type": "application/json",
    }


def signed_hook(port: int) -> requests.Response:
    """POST a valid signed hook to 127.0.0.1:*port*."""
    body = json.dumps(PRE).encode()
    return requests.post(f"http://127.0.0.1:{port}/", data=body, headers=signed(body), timeout=10)


def hook_request() -> bytes:
    """A valid signed hook as bytes to send on a socket."""
    body = json.dumps(PRE).encode()
    head = "".join(f"{key}: {value}\r\n" for key, value in signed(body).items())
    return b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s" % (
        len(body),
        head.encode(),
        body,
    )


def slow_client(port: int, stack: ExitStack) -> socket.socket:
    """A connection that sent the start of a request and waits; closed by *stack*."""
    sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
    sock.sendall(PARTIAL)
    return sock


def status_line(sock: socket.socket) -> bytes:
    """The status line of the next answer, read up to its blank line (204: no body)."""
    head = b""
    while not head.endswith(b"\r\n\r\n") and (byte := sock.recv(1)):
        head += byte
    return head.split(b"\r\n", 1)[0]


def answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


@pytest.fixture
def server() -> Iterator[object]:
    """``server(**limits)`` serves a signed receiver on a free port; stopped at teardown."""
    started: list[tuple[ReceiverServer, threading.Thread]] = []
    receiver = make_receiver(secret=SECRET)

    def start(**limits: float) -> ReceiverServer:
        served = ReceiverServer("127.0.0.1", 0, receiver, **limits)
        thread = threading.Thread(
            target=served.serve_forever, kwargs={"poll_interval": 0.01}, name="test-receiver"
        )
        thread.start()
        started.append((served, thread))
        return served

    yield start
    for served, thread in started:
        served.shutdown()
        thread.join(10)
        served.server_close()  # joins the request threads
    assert receiver.close(10)


# -- the read deadline -----------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed_at_the_read_timeout(server):
    port = server(read_timeout=0.3).server_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        assert answer(sock) == b""  # closed, not left waiting (the recv timeout is 10 s)
        assert 0.3 <= time.monotonic() - started < 5


def test_the_deadline_counts_for_the_whole_request_not_each_read(server):
    """A byte every 0.1 s, well within a timeout per read, is cut at the deadline."""
    port = server(read_timeout=0.5).server_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        for byte in PARTIAL + b"x" * 100:  # far more than 0.5 s of bytes
            sock.sendall(bytes([byte]))
            if select.select([sock], [], [], 0.1)[0]:  # the pace, and the server's close
                break
        assert answer(sock) == b""
        assert time.monotonic() - started < 5


def test_a_body_that_does_not_arrive_in_time_gets_408(server):
    port = server(read_timeout=0.3).server_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        status_line = answer(sock).split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 408 REQUEST TIMEOUT"


def test_each_answer_closes_its_connection(server):
    """werkzeug answers ``Connection: close`` and closes: a request never follows another
    on its connection, so none inherits what is left of another's deadline."""
    port = server(read_timeout=30).server_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(hook_request())
        lines = answer(sock).split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        assert time.monotonic() - started < 5  # closed after the answer, not at 30 s
    assert lines[0] == b"HTTP/1.1 204 NO CONTENT"
    assert b"Connection: close" in lines


@pytest.fixture
def kept_alive(monkeypatch):
    """Connections kept alive, as http.server does when werkzeug does not answer
    ``Connection: close``."""
    send_header = _DeadlineHandler.send_header

    def without_close(self, keyword, value):
        if keyword.lower() != "connection":
            send_header(self, keyword, value)

    monkeypatch.setattr(_DeadlineHandler, "send_header", without_close)


def test_kept_alive_each_request_gets_its_own_read_timeout(server, kept_alive):
    """The reviewed case: with a 1 s read_timeout, a second request on the connection
    sent at 0.8 s, its body ending at 1.2 s, is answered: it took 0.4 s."""
    port = server(read_timeout=1).server_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(hook_request())
        assert status_line(sock) == b"HTTP/1.1 204 NO CONTENT"
        time.sleep(max(0.0, started + 0.8 - time.monotonic()))  # the pace: late in the window
        request = hook_request()
        sock.sendall(request[:-10])
        time.sleep(0.4)  # the pace: the end of the body after the first deadline
        sock.sendall(request[-10:])
        assert status_line(sock) == b"HTTP/1.1 204 NO CONTENT"


def test_kept_alive_an_idle_connection_is_closed_at_the_read_timeout(server, kept_alive):
    port = server(read_timeout=0.5).server_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(hook_request())
        assert status_line(sock) == b"HTTP/1.1 204 NO CONTENT"
        idle = time.monotonic()
        assert answer(sock) == b""  # closed, not left waiting (the recv timeout is 10 s)
        assert 0.4 <= time.monotonic() - idle < 5  # kept alive until then


# -- the cap on connections ------------------------------------------------------------


def test_connections_beyond_the_cap_get_a_fast_503_with_retry_after(server):
    port = server(read_timeout=30, max_connections=3).server_port
    with ExitStack() as stack:
        slow = [slow_client(port, stack) for _ in range(3)]  # accepted in order: the cap
        started = time.monotonic()
        refused = signed_hook(port)
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == str(RETRY_AFTER)
        assert time.monotonic() - started < 2  # at once, not after the read timeout
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            assert answer(extra).startswith(b"HTTP/1.1 503 ")  # closed without a request
        slow[0].close()  # a slot frees when the server sees it go
        wait_until(lambda: signed_hook(port).status_code == 204, what="a free slot")


def test_slow_clients_below_the_cap_do_not_delay_honest_hooks(server):
    port = server(read_timeout=30, max_connections=64).server_port
    with ExitStack() as stack:
        for _ in range(50):
            slow_client(port, stack)
        started = time.monotonic()
        assert [signed_hook(port).status_code for _ in range(10)] == [204] * 10
        assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        pytest.param({"read_timeout": 0}, "read_timeout", id="zero-timeout"),
        pytest.param({"read_timeout": float("nan")}, "read_timeout", id="nan-timeout"),
        pytest.param({"read_timeout": float("inf")}, "read_timeout", id="inf-timeout"),
        pytest.param({"max_connections": 0}, "max_connections", id="no-connection"),
        pytest.param({"max_connections": 2.5}, "max_connections", id="fractional"),
    ],
)
def test_bad_limits_raise_config_error(limits, message):
    with pytest.raises(ConfigError, match=message):
        ReceiverServer("127.0.0.1", 0, make_receiver(), **limits)


# -- out of file descriptors, through the command ----------------------------------------

# The receive command with an open-file limit of 64 and a cap far above it, so that
# idle connections exhaust the descriptors before the cap protects them.
LAUNCHER = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from xo_webhooks.cli import main
sys.exit(main(["receive", "--port", "0", "--secret", sys.argv[1],
               "--max-connections", "1000", "--read-timeout", "60"]))
"""


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process *pid* so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_out_of_file_descriptors_it_backs_off_instead_of_spinning(tmp_path):
    log = tmp_path / "stderr"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, SECRET],
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if not k.startswith("XO_WEBHOOKS_")},
        )
    try:
        found = wait_until(lambda: re.search(r"127\.0\.0\.1:(\d+)/", log.read_text()))
        port = int(found.group(1))
        with ExitStack() as stack:
            for _ in range(80):  # more than 64 descriptors' worth
                slow_client(port, stack)
            wait_until(lambda: "cannot accept connections" in log.read_text(), what="EMFILE")
            before, started = cpu_seconds(process.pid), time.monotonic()
            time.sleep(1)  # the window measured: nothing to wait for, only time to let pass
            used = cpu_seconds(process.pid) - before
            elapsed = time.monotonic() - started
            assert used < 0.25 * elapsed, f"{used:.2f} s of CPU in {elapsed:.2f} s: a busy loop"
        # The slow clients are gone: their descriptors free, hooks are answered again.
        assert signed_hook(port).status_code == 204
        assert log.read_text().count("cannot accept connections") == 1  # said once
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_the_limits_are_options_of_the_receive_command():
    result = subprocess.run(
        [sys.executable, "-m", "xo_webhooks", "receive", "--port", "0", "--read-timeout", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "xo-webhooks: error: --read-timeout: must be a number of seconds > 0"
    )
