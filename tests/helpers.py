"""Helpers the test modules share (fixtures are in conftest.py)."""

from __future__ import annotations

import base64
import contextlib
import select
import shutil
import socket
import subprocess
import threading
from typing import Any

import pytest

from .waiting import wait_until

#: The Standard Webhooks example secret (24 bytes), and another one (32 bytes).
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER_SECRET = "whsec_" + base64.b64encode(b"another key of thirty-two bytes!").decode()

#: A valid pre hook payload and its post hook.
PRE = {
    "type": "pre",
    "callId": "call-1",
    "userId": "u1",
    "userName": "alice",
    "method": "vm.start",
    "params": {"id": "vm-1"},
    "timestamp": 1700000000000,
}
POST = {**PRE, "type": "post", "timestamp": 1700000000532, "duration": 532, "result": True}

HOOKS = [{"method": "vm.start", "type": "pre/post", "url": "http://127.0.0.1:9/"}]


class RecordingDispatcher:
    """Keeps what the middleware hands over instead of sending it."""

    def __init__(self):
        self.deliveries = []

    def submit(self, delivery):
        self.deliveries.append(delivery)

    def deliver_now(self, delivery):
        self.deliveries.append(delivery)
        return True

    def flush(self, timeout=None):
        return True

    def close(self, timeout=None):
        pass

    def stats(self):
        return {}

    def payloads(self, kind):
        return [d.payload for d in self.deliveries if d.payload["type"] == kind]


def assert_ledger(stats: dict[str, Any]) -> None:
    """The ``stats()`` ledger balances: every hook accepted (or resumed from the spool)
    is delivered, failed, handed to the spool (to wait, or left there at shutdown),
    pending, on its way to the dead-letter store (recording), or (Celery) published;
    every failed one dead-lettered or lost."""
    assert stats["accepted"] + stats.get("resumed", 0) == (
        stats["delivered"]
        + stats.get("published", 0)
        + stats["failed"]
        + stats["pending"]
        + stats.get("spooled", 0)
        + stats.get("left", 0)
        + stats.get("recording", 0)
    ), stats
    assert stats["failed"] == stats["dead_lettered"] + stats["lost"], stats


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (it was just freed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skip_without_redis() -> None:
    """Skip the test, saying why, without redis-py (the celery extra) or redis-server."""
    pytest.importorskip("redis", reason="the celery extra (redis-py) is not installed")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (CI installs it: apt-get install redis-server)")


class RedisServer:
    """``redis-server`` on an ephemeral loopback port, without persistence; ``url`` is
    its database 0, ``url_of(n)`` another one."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = self.url_of(0)
        self.process: subprocess.Popen[bytes] | None = None

    def url_of(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = self.client()
        try:
            wait_until(lambda: self._answers(client), 10, "redis-server to answer PING")
        finally:
            client.close()
        return self

    def _answers(self, client: Any) -> bool:
        import redis

        try:
            return bool(client.ping())
        except redis.ConnectionError:
            assert self.process is not None and self.process.poll() is None, "redis-server died"
            return False

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def client(self, db: int = 0) -> Any:
        import redis

        return redis.Redis(port=self.port, db=db, socket_timeout=5)


class HungReceiver:
    """A receiver on 127.0.0.1 that accepts every connection and never answers: the
    peer of an attempt that can only time out. ``close()`` drops the connections."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._wake, self._waker = socket.socketpair()  # close() ends the accept loop
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/hook"
        self.origin = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self._accept, name=f"hung:{port}", daemon=True)
        self._thread.start()

    @property
    def accepted(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return len(self._held)

    def _accept(self) -> None:
        while True:
            ready, _, _ = select.select([self._listener, self._wake], [], [])
            if self._wake in ready:
                return
            connection, _ = self._listener.accept()
            with self._lock:
                self._held.append(connection)

    def close(self) -> None:
        if self._listener.fileno() == -1:
            return  # closed already
        self._waker.send(b"x")
        self._thread.join(5)
        with self._lock:
            held, self._held = self._held, []
        for connection in held:
            with contextlib.suppress(OSError):  # the client may have closed it first
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()
        for sock in (self._listener, self._wake, self._waker):
            sock.close()


@contextlib.contextmanager
def small_disk_at(folder: Any, size: str) -> Any:
    """Mount a tmpfs of *size* (``"1m"``) at the new folder *folder*, unmounted on exit;
    the test is skipped where mounting is not allowed (it needs root)."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
