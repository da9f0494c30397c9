"""Hook receivers on 127.0.0.1, each a subprocess that is always stopped afterwards.

- :func:`nginx`: nginx answering ``204`` to everything, one worker process: fast enough
  that a Python sender is the bottleneck.
- :func:`python_receiver`: the fallback when nginx is not installed: several Python
  processes sharing the port (``SO_REUSEPORT``), HTTP/1.1 keep-alive, ``204``.
- :func:`slow_receiver`: a threaded Python server that waits 2 s before each ``204``.

Run as a script, this module is the Python receiver itself:
``python receivers.py fast|slow PORT``.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from common import free_port, wait_for_port

NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 204; }}
    }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


@contextlib.contextmanager
def nginx() -> Iterator[str]:
    """Start nginx on a free port; yield its URL; stop it."""
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is not installed")
    with tempfile.TemporaryDirectory(prefix="xo-bench-nginx-") as tmp:
        port = free_port()
        conf = Path(tmp, "nginx.conf")
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=port))
        proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", tmp, "-e", f"{tmp}/error.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            try:
                wait_for_port(port, 10, alive=lambda: proc.poll() is None)
            except RuntimeError:
                log = Path(tmp, "error.log")
                detail = log.read_text()[-500:] if log.exists() else ""
                raise RuntimeError(f"nginx did not start: {detail.strip()}") from None
            yield f"http://127.0.0.1:{port}/hook"
        finally:
            _stop([proc], signal.SIGQUIT)  # graceful: workers finish, then exit


@contextlib.contextmanager
def python_receiver(processes: int = 2) -> Iterator[str]:
    """Start *processes* Python receivers sharing one port; yield the URL; stop them."""
    port = free_port()
    procs = [_spawn("fast", port) for _ in range(processes)]
    try:
        for proc in procs:
            wait_for_port(port, 10, alive=lambda p=proc: p.poll() is None)
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        _stop(procs)


@contextlib.contextmanager
def slow_receiver() -> Iterator[str]:
    """Start a receiver that answers after 2 s; yield its URL; stop it."""
    port = free_port()
    proc = _spawn("slow", port)
    try:
        wait_for_port(port, 10, alive=lambda: proc.poll() is None)
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        _stop([proc])


@contextlib.contextmanager
def any_fast_receiver(choice: str = "auto") -> Iterator[tuple[str, str]]:
    """nginx when available (or *choice* says so), the Python receiver otherwise; yield
    ``(url, description)``."""
    if choice in ("auto", "nginx") and nginx_binary():
        with nginx() as url:
            yield url, f"nginx ({nginx_version()}, 1 worker, return 204)"
            return
    if choice == "nginx":
        raise RuntimeError("nginx was asked for but is not installed")
    why = "asked for" if choice == "python" else "FALLBACK, nginx is not installed"
    with python_receiver() as url:
        yield url, f"Python receiver, 2 processes sharing the port ({why})"


def nginx_version() -> str:
    binary = nginx_binary()
    if binary is None:
        return "none"
    out = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr.strip()
    return out.split("/", 1)[-1] if "/" in out else out


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: every connection is refused."""
    return f"http://127.0.0.1:{free_port()}/hook"


def _spawn(kind: str, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), kind, str(port)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip


def _stop(procs: list[subprocess.Popen], sig: int = signal.SIGTERM) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)
    deadline = time.monotonic() + 5
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the Python receivers themselves --------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    delay = 0.0

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.delay:
            time.sleep(self.delay)
        self.send_response_only(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def handle_error(self, request: object, client_address: object) -> None:
        # A sender that is stopped mid-request resets its connection: expected here.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)  # type: ignore[arg-type]

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def main(argv: list[str]) -> None:
    kind, port = argv[0], int(argv[1])
    handler = type("Handler", (_Handler,), {"delay": 2.0 if kind == "slow" else 0.0})
    server = _Server(("127.0.0.1", port), handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main(sys.argv[1:])
