"""Scenario 8: one receiver's outage never holds back the others.

Two :class:`ThreadDispatcher` (4 workers, 2 s timeout) with the same settings: two
endpoints on 127.0.0.1, a healthy receiver in this process, which notes when each hook
arrives (``time.monotonic()``, by its ``webhook-id``), and a hung one, a socket that
accepts connections and never answers. The "hung" dispatcher first gets 1,000 hooks for
the hung endpoint, which soon holds its share of the workers (``endpoint_concurrency``,
2); the "baseline" one gets none. Then each sends 200 hooks to the healthy receiver,
one every 5 ms, each with its submit time: the p99 of arrival minus submit is compared,
round by round. A round alternates the two sides every 20 hooks (in the other order
the next round), so that a burst of load from elsewhere hits both alike.

The measured hooks all go within the first 6 s after the hung hooks, while the hung
endpoint's breaker is still closed (its 5 failures, 2 at a time, take 3 timeouts): the
case where it holds the most workers. Before the hung hooks, 20 go the same way to each
side, unmeasured, so that every worker has its connection to the healthy receiver open
(waiting workers take paced hooks in turn); otherwise the p99 of 200 hooks is that of
opening connections. Fresh dispatchers every round, so that no round inherits a breaker
or a connection.
"""

from __future__ import annotations

import contextlib
import gc
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from common import Row, Spread, percentile, ratios

from xo_webhooks import Hook, load_settings
from xo_webhooks.request.payload import pre_payload
from xo_webhooks.sending.delivery import Delivery
from xo_webhooks.sending.dispatcher import ThreadDispatcher
from xo_webhooks.sending.endpoints import endpoint_of

HUNG_HOOKS = 1_000
HEALTHY_HOOKS = 200  # per side and round
SLICES = 10  # a round alternates the two sides every HEALTHY_HOOKS / SLICES hooks
SIDES = ("baseline", "hung")
WARM_HOOKS = 20  # sent the same way before the measured ones, not measured
INTERVAL = 0.005  # seconds between two healthy hooks
WORKERS = 4
TIMEOUT = 2.0
QUEUE_SIZE = 2_400  # each of the 2 endpoints keeps 1,200 places: room for the 1,000


class ArrivalServer(ThreadingHTTPServer):
    """A fast receiver (HTTP/1.1 keep-alive, ``204``) that notes when each hook arrives."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ArrivalHandler)
        self.arrived: dict[str, float] = {}  # webhook-id -> time.monotonic()
        self.changed = threading.Condition()
        self.connections = 0

    def wait_for(self, ids: list[str], timeout: float) -> dict[str, float]:
        """Wait until every hook of *ids* has arrived; return their arrival times."""
        with self.changed:
            if not self.changed.wait_for(lambda: all(i in self.arrived for i in ids), timeout):
                missing = sum(i not in self.arrived for i in ids)
                raise RuntimeError(f"{missing} of {len(ids)} hooks to the healthy receiver "
                                   f"did not arrive in {timeout:g} s")  # fmt: skip
            return {i: self.arrived.pop(i) for i in ids}

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections += 1  # one call per connection accepted
        super().process_request(request, client_address)


class _ArrivalHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the dispatcher's transport expects
    server: ArrivalServer

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        now = time.monotonic()  # the whole request is in: the hook has arrived
        with self.server.changed:
            self.server.arrived[self.headers.get("webhook-id", "")] = now
            self.server.changed.notify_all()
        self.send_response_only(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class HungServer:
    """A socket on 127.0.0.1 that accepts every connection and never answers; the
    connections stay open until :meth:`close`."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.settimeout(0.05)  # so that the accepting thread sees the stop
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="bench-hung", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)

    def wait_for_connections(self, count: int, timeout: float) -> None:
        """Wait until *count* connections in all have been accepted."""
        deadline = time.monotonic() + timeout
        while len(self.accepted) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the hung endpoint got {len(self.accepted)} connections, "
                                   f"not {count}, in {timeout:g} s")  # fmt: skip
            time.sleep(0.005)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def send_paced(dispatcher: ThreadDispatcher, hook: Hook, count: int) -> dict[str, float]:
    """Submit *count* hooks to *hook*, one every :data:`INTERVAL`; return their submit
    times (``time.monotonic()``) by ``webhook-id``."""
    submitted: dict[str, float] = {}
    start = time.monotonic()
    for n in range(count):
        # An absolute schedule: a late hook does not delay the next ones. The first waits
        # too, so that slices sent one after the other keep the pace.
        pause = start + (n + 1) * INTERVAL - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        delivery = Delivery(hook, pre_payload(f"call-{n}", (None, None), "vm.start", {}, 1))
        submitted[delivery.id] = time.monotonic()
        dispatcher.submit(delivery)
    return submitted


@contextlib.contextmanager
def endpoints() -> Iterator[tuple[ArrivalServer, HungServer]]:
    """Start the healthy receiver and the hung endpoint; yield them; stop both."""
    healthy = ArrivalServer()
    serving = threading.Thread(
        target=healthy.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    serving.start()
    hung = HungServer()
    try:
        yield healthy, hung
    finally:
        hung.close()
        healthy.shutdown()
        healthy.server_close()
        serving.join(5)


def run(rounds: int) -> list[Row]:
    with endpoints() as (healthy, hung):
        healthy_url = f"http://127.0.0.1:{healthy.server_address[1]}/hook"
        hung_url = f"http://127.0.0.1:{hung.port}/hook"
        # Both sides configure both endpoints, so their settings and shares are the same:
        # the one difference is the 1,000 hooks waiting for the hung endpoint.
        settings = load_settings(
            [{"method": "vm.start", "type": "pre", "url": u} for u in (healthy_url, hung_url)],
            environ={}, timeout=TIMEOUT, max_workers=WORKERS, queue_size=QUEUE_SIZE,
            retry_schedule="1s,1s,2s",
        )  # fmt: skip
        to_healthy, to_hung = settings.hooks
        hung_origin = endpoint_of(hung_url)
        held = settings.endpoint_concurrency
        delays: dict[str, list[list[float]]] = {name: [] for name in SIDES}  # ms, per round
        # Connections the healthy receiver accepted in each side's warm-up, and after it.
        opened_in_warm_up: dict[str, list[int]] = {name: [] for name in SIDES}
        opened_in_measurement: list[int] = []
        hung_at_end: list[dict[str, Any]] = []

        def one_round(i: int) -> None:
            gc.collect()
            before = set(threading.enumerate())
            dispatchers = {name: ThreadDispatcher(settings) for name in SIDES}
            try:
                # Warm-up, before the hung endpoint gets any hook: else a dispatcher that
                # let it hold every worker would be measured only once its breaker opened.
                for name in SIDES:
                    connections = healthy.connections
                    warm = send_paced(dispatchers[name], to_healthy, WARM_HOOKS)
                    healthy.wait_for(list(warm), 10)
                    opened_in_warm_up[name].append(healthy.connections - connections)
                connections = len(hung.accepted)
                for n in range(HUNG_HOOKS):
                    payload = pre_payload(f"hung-{n}", (None, None), "vm.start", {}, 1)
                    dispatchers["hung"].submit(Delivery(to_hung, payload))
                # The hung endpoint holds its workers before the measurement starts.
                hung.wait_for_connections(connections + held, 5)
                connections = healthy.connections
                submitted: dict[str, dict[str, float]] = {name: {} for name in SIDES}
                for j in range(SLICES):
                    for name in SIDES if (i + j) % 2 == 0 else SIDES[::-1]:
                        sent = send_paced(dispatchers[name], to_healthy, HEALTHY_HOOKS // SLICES)
                        submitted[name].update(sent)
                arrived = healthy.wait_for([k for sent in submitted.values() for k in sent], 10)
                opened_in_measurement.append(healthy.connections - connections)
                state = dispatchers["hung"].endpoint_stats()[hung_origin]
                if state["pending"] != HUNG_HOOKS:
                    raise RuntimeError(f"the hung endpoint has {state['pending']} hooks "
                                       f"pending, not {HUNG_HOOKS}: {state}")  # fmt: skip
                hung_at_end.append(state)
            finally:
                for dispatcher in dispatchers.values():
                    dispatcher.close(0)
            # Workers blocked on the hung endpoint end at their timeout; wait for them, so
            # that the next round starts with no thread of this one left.
            deadline = time.monotonic() + TIMEOUT + 5
            for thread in set(threading.enumerate()) - before:
                thread.join(max(0.0, deadline - time.monotonic()))
            for name in SIDES:
                delays[name].append([(arrived[k] - t) * 1000 for k, t in submitted[name].items()])

        for i in range(1 + rounds):  # the first round warms up (imports, caches): dropped
            one_round(i)
    for kept in (*delays.values(), *opened_in_warm_up.values(), opened_in_measurement):
        del kept[0]
    hung_at_end = hung_at_end[1:]
    detail = {
        "healthy_hooks_per_round": HEALTHY_HOOKS,
        "slices": SLICES,
        "interval_ms": INTERVAL * 1000,
        "hung_hooks_pending": HUNG_HOOKS,
        "workers": WORKERS,
        "endpoint_concurrency": held,
        "timeout_s": TIMEOUT,
        "connections_to_healthy_opened_in_warm_up": opened_in_warm_up,
        "connections_to_healthy_opened_in_measurement": opened_in_measurement,
        "hung_endpoint_at_end_of_round": hung_at_end,
    }
    by_p = {p: {n: [percentile(r, p) for r in rs] for n, rs in delays.items()} for p in (50, 99)}
    rows = [
        Row(
            "8", "p99 submit-to-arrival, 1,000 hooks hung on another endpoint / none",
            ratios(by_p[99]["hung"], by_p[99]["baseline"]), target="<= 2", detail=detail,
        ),
    ]  # fmt: skip
    for p in (99, 50):
        for name in SIDES:
            rows.append(Row("8", f"  p{p} {name}", Spread.of(by_p[p][name]), unit="ms"))
    return rows
