"""Scenario 10: what the spool costs (``spool=path``: every hook accepted is also queued
for the spooler's thread, which writes it to a SQLite file every 0.2 s unless it was
delivered meanwhile; retries wait in the file), each figure against the same
dispatcher without a spool, in the same run.

a. Delivery: bursts of hooks through a :class:`ThreadDispatcher` (4 workers) to the
   fast receiver, one dispatcher per side for the whole run, the sides alternating
   round after round (as in scenario 4; twice its rounds, of half its hooks). Hooks/s
   from the first ``submit()`` until the last hook is delivered (noted by the
   sender), and until ``flush()`` returns (with a spool it also waits for the
   spooler's next pass, which removes the delivered hooks from the file); this
   process's CPU per hook (``time.process_time``: the spooler's thread included),
   until ``flush()`` returns.
b. Retries through the spool: the same with a threaded HTTP server in this process
   that answers ``503`` to every third request, and a retry schedule of 50 ms steps.
   With a spool each retry is written to the file and claimed back from it. Hooks/s
   only: the server's CPU is this process's too.
c. The request path: ``submit()`` per hook, timed around the calls alone, on both
   dispatchers at once, the sides alternating every tenth of a round (as in scenarios
   1-3). The submitting thread's own CPU time (``time.thread_time``: not the time it
   waits for the GIL while other threads run) carries the target; wall time is
   reported. First with the workers idle (the hooks go to an endpoint that never
   answers, so that they wait in memory and in the spool, the spooler writing them
   meanwhile), then, reported, with the workers delivering them to the fast receiver.
"""

from __future__ import annotations

import gc
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from apps import hook
from common import Row, Spread, paired_rates, ratios
from throughput import payloads

from xo_webhooks import load_settings
from xo_webhooks.config import Settings
from xo_webhooks.sending.delivery import Delivery, Sender
from xo_webhooks.sending.dispatcher import ThreadDispatcher
from xo_webhooks.sending.policy import Attempt

WORKERS = 4
QUEUE_SIZE = 10_000
RETRY_SCHEDULE = ",".join(["50ms"] * 10)  # a hook fails twice in a row now and then
FAILING_HOOKS = 200  # per side and round in (b): retries through the spool are slow
SUBMIT_SLICE = 100  # hooks per slice in (c); 10 slices per side and round
SLICES = 10


class ClockedSender(Sender):
    """The usual sender, noting when it last delivered a hook."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.last_delivered = 0.0

    def send(self, delivery: Delivery) -> Attempt:
        attempt = super().send(delivery)
        if attempt.delivered:
            self.last_delivered = time.perf_counter()
        return attempt


class Side:
    """A :class:`ThreadDispatcher` with or without a spool, and the hooks sent to it."""

    def __init__(self, url: str, spool: str | None, timeout: float = 10.0,
                 **extra: Any) -> None:  # fmt: skip
        self.spool = spool
        self.settings = load_settings(
            [hook("vm.start", url)], {}, max_workers=WORKERS, queue_size=QUEUE_SIZE,
            timeout=timeout, spool=spool, **extra,
        )  # fmt: skip
        self.target = self.settings.hooks[0]
        self.sender = ClockedSender(self.settings)
        self.dispatcher = ThreadDispatcher(self.settings, sender=self.sender)
        self.sent = 0

    def deliveries(self, count: int) -> list[Delivery]:
        return [Delivery(self.target, p) for p in payloads(count)]

    def flush(self) -> None:
        """Wait until every hook sent is delivered (and, with a spool, out of it)."""
        if not self.dispatcher.flush(120):
            raise RuntimeError(f"{self.name}: the dispatcher did not drain in 120 s")

    def verify(self) -> None:
        """Every hook sent was delivered, none given up, the spool never failed."""
        stats = self.dispatcher.stats()
        if stats["delivered"] != self.sent or stats["failed"] or stats["spool_errors"]:
            raise RuntimeError(f"{self.name}: {self.sent} hooks sent, {stats}")

    def check(self, written: bool = True) -> dict[str, int]:
        """The dispatcher's counters; with a spool, proof that it was used: its hooks
        wait there, and (*written*) its file with the write-ahead log grew past the
        size of an empty spool."""
        stats = self.dispatcher.stats()
        if self.spool is not None:
            where = {e["spool"] for e in self.dispatcher.endpoint_stats().values()}
            size = sum(os.path.getsize(f) for f in (self.spool, self.spool + "-wal")
                       if os.path.exists(f))  # fmt: skip
            if where != {"spool"} or (written and size < 64 * 1024):
                raise RuntimeError(f"the spool {self.spool} was not used: {where}, {size} B")
        return stats

    @property
    def name(self) -> str:
        return "spool" if self.spool else "no spool"

    def close(self) -> None:
        self.dispatcher.close(0)


class Burst:
    """One side of (a) and (b): a burst of hooks per round, until all are delivered."""

    def __init__(self, side: Side, count: int) -> None:
        self.side = side
        self.count = count
        self.flushed_rate: list[float] = []  # hooks/s until flush() returned
        self.cpu: list[float] = []  # microseconds of process CPU per hook
        self.lag: list[float] = []  # ms from the last delivery until flush() returned

    def __call__(self) -> float:
        side = self.side
        batch = side.deliveries(self.count)  # built outside the timing
        cpu, start = time.process_time(), time.perf_counter()
        for delivery in batch:
            side.dispatcher.submit(delivery)
        side.sent += self.count
        side.flush()
        flushed = time.perf_counter()
        used = time.process_time() - cpu
        side.verify()
        last = side.sender.last_delivered
        self.flushed_rate.append(self.count / (flushed - start))
        self.cpu.append(used / self.count * 1e6)
        self.lag.append((flushed - last) * 1e3)
        return self.count / (last - start)

    def clear(self) -> None:
        self.flushed_rate.clear()
        self.cpu.clear()
        self.lag.clear()


def paired_bursts(sides: dict[str, Side], count: int, rounds: int) -> dict[str, Any]:
    """Rounds of one burst per side, alternating; a smaller burst first to warm up."""
    bursts = {name: Burst(side, count) for name, side in sides.items()}
    for burst in bursts.values():
        burst.count = min(200, count)
        burst()
        burst.count = count
        burst.clear()
    rates = paired_rates(bursts, rounds, warmup=0)  # type: ignore[arg-type]
    return {"rate": rates, "bursts": bursts}


# -- (a) delivery to the fast receiver ------------------------------------------------


def run_delivery(url: str, tmp: str, rounds: int, count: int, receiver: str) -> list[Row]:
    sides = {"spool": Side(url, os.path.join(tmp, "a.sqlite")), "none": Side(url, None)}
    try:
        found = paired_bursts(sides, count, rounds)
        stats = {name: side.check() for name, side in sides.items()}
    finally:
        for side in sides.values():
            side.close()
    rate, bursts = found["rate"], found["bursts"]
    flushed = {name: b.flushed_rate for name, b in bursts.items()}
    cpu = {name: b.cpu for name, b in bursts.items()}
    detail = {
        "receiver": receiver, "hooks_per_round": count, "workers": WORKERS,
        **{f"{n}_hooks_per_s_until_flush": Spread.of(r).__dict__ for n, r in flushed.items()},
        **{f"{n}_stats": s for n, s in stats.items()},
    }  # fmt: skip
    added = [a - b for a, b in zip(cpu["spool"], cpu["none"], strict=True)]
    return [
        Row("10", "delivery to the fast receiver, spool / none: hooks/s",
            ratios(rate["spool"], rate["none"]), target=">= 0.6", detail=detail),
        Row("10", "  spool hooks/s", Spread.of(rate["spool"]), unit="/s"),
        Row("10", "  no spool hooks/s", Spread.of(rate["none"]), unit="/s"),
        Row("10", "  until flush() returns, spool / none: hooks/s",
            ratios(flushed["spool"], flushed["none"])),
        Row("10", "  flush() returns after the last delivery, spool",
            Spread.of(bursts["spool"].lag), unit="ms"),
        Row("10", "delivery, spool / none: process CPU per hook",
            ratios(cpu["spool"], cpu["none"])),
        Row("10", "  added CPU per hook", Spread.of(added), unit="us"),
        Row("10", "  CPU per hook, no spool", Spread.of(cpu["none"]), unit="us"),
    ]  # fmt: skip


# -- (b) a receiver failing one hook in three -------------------------------------------


class _FailingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server: FailingServer

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.server.fails():
            self.send_response_only(503)
            self.send_header("Content-Length", "0")
        else:
            self.send_response_only(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class FailingServer(ThreadingHTTPServer):
    """Answers ``503`` to every third request, ``204`` to the others."""

    daemon_threads = True
    request_queue_size = 1024

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FailingHandler)
        self._lock = threading.Lock()
        self.requests = 0

    def fails(self) -> bool:
        with self._lock:
            self.requests += 1
            return self.requests % 3 == 0


@contextmanager
def failing_receiver() -> Iterator[str]:
    server = FailingServer()
    thread = threading.Thread(target=server.serve_forever, name="bench-503", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def run_retries(tmp: str, rounds: int) -> list[Row]:
    with failing_receiver() as url:
        sides = {
            "spool": Side(url, os.path.join(tmp, "b.sqlite"), retry_schedule=RETRY_SCHEDULE),
            "none": Side(url, None, retry_schedule=RETRY_SCHEDULE),
        }
        try:
            found = paired_bursts(sides, FAILING_HOOKS, rounds)
            stats = {name: side.check() for name, side in sides.items()}
        finally:
            for side in sides.values():
                side.close()
    spooled = stats["spool"]
    if not spooled["spooled"] or spooled["resumed"] != spooled["spooled"]:
        raise RuntimeError(f"(b): the retries did not go through the spool: {spooled}")
    if not stats["none"]["retried"]:
        raise RuntimeError(f"(b): no hook was retried: {stats['none']}")
    rate, bursts = found["rate"], found["bursts"]
    flushed = {name: b.flushed_rate for name, b in bursts.items()}
    detail = {
        "receiver": "Python ThreadingHTTPServer in this process, 503 to every third request",
        "retry_schedule": RETRY_SCHEDULE, "hooks_per_round": FAILING_HOOKS,
        **{f"{n}_hooks_per_s_until_flush": Spread.of(r).__dict__ for n, r in flushed.items()},
        **{f"{n}_stats": s for n, s in stats.items()},
    }  # fmt: skip
    return [
        Row("10", "1 in 3 answered 503, retries every 50 ms: spool / none hooks/s",
            ratios(rate["spool"], rate["none"]), detail=detail),
        Row("10", "  spool hooks/s", Spread.of(rate["spool"]), unit="/s"),
        Row("10", "  no spool hooks/s", Spread.of(rate["none"]), unit="/s"),
    ]  # fmt: skip


# -- (c) the request path ------------------------------------------------------------


@contextmanager
def hung_endpoint() -> Iterator[str]:
    """A URL on 127.0.0.1 whose socket listens and never accepts: the kernel completes
    the connections, and no answer ever comes."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    finally:
        sock.close()


def submit_slices(sides: dict[str, Side], i: int) -> dict[str, list[float]]:
    """Round *i*: :data:`SLICES` slices of ``submit()`` per side, alternating (as
    :func:`common.interleaved_rates`); the wall and thread CPU seconds of each side."""
    names = list(sides)
    batches = {
        name: [side.deliveries(SUBMIT_SLICE) for _ in range(SLICES)] for name, side in sides.items()
    }  # built outside the timing
    gc.collect()
    spent = {name: [0.0, 0.0] for name in names}
    for j in range(SLICES):
        for name in names if (i + j) % 2 == 0 else names[::-1]:
            submit, batch = sides[name].dispatcher.submit, batches[name][j]
            own, start = time.thread_time(), time.perf_counter()
            for delivery in batch:
                submit(delivery)
            spent[name][0] += time.perf_counter() - start
            spent[name][1] += time.thread_time() - own
    for side in sides.values():
        side.sent += SUBMIT_SLICE * SLICES
    return spent


class PerHook:
    """Microseconds per hook of each side, wall and thread CPU, round by round."""

    def __init__(self, names: list[str]) -> None:
        self.cpu: dict[str, list[float]] = {name: [] for name in names}
        self.wall: dict[str, list[float]] = {name: [] for name in names}

    def add(self, spent: dict[str, list[float]]) -> None:
        hooks = SUBMIT_SLICE * SLICES
        for name, (wall, cpu) in spent.items():
            self.wall[name].append(wall / hooks * 1e6)
            self.cpu[name].append(cpu / hooks * 1e6)


def idle_submits(tmp: str, rounds: int) -> PerHook:
    """Workers idle: the hooks go to an endpoint that never answers (its 2 attempts in
    flight hold 2 workers; the others wait, and every further hook waits in memory and,
    with a spool, in the file). Fresh dispatchers every round, so that the hooks
    pending stay a round's (the garbage collector's work grows with them)."""
    per_hook = PerHook(["spool", "none"])
    with hung_endpoint() as hung:
        for i in range(1 + rounds):  # one warm-up round, dropped
            sides = {"spool": Side(hung, os.path.join(tmp, f"c{i}.sqlite"), timeout=300.0),
                     "none": Side(hung, None, timeout=300.0)}  # fmt: skip
            try:
                for side in sides.values():  # start the threads, outside the timing
                    for delivery in side.deliveries(10):
                        side.dispatcher.submit(delivery)
                    side.sent += 10
                spent = submit_slices(sides, i)
                for side in sides.values():  # too soon to find the hooks in the file
                    stats = side.check(written=False)
                    if stats["pending"] != side.sent or stats["spooled"]:
                        raise RuntimeError(f"{side.name}: {side.sent} hooks submitted, {stats}")
            finally:
                for side in sides.values():
                    side.close()
            if i:
                per_hook.add(spent)
    return per_hook


def busy_submits(url: str, tmp: str, rounds: int) -> tuple[PerHook, dict[str, Any]]:
    """Workers delivering to the fast receiver what was submitted since the round
    began; after each round, untimed, the dispatchers deliver the rest (``flush()``)."""
    sides = {"spool": Side(url, os.path.join(tmp, "c.sqlite")), "none": Side(url, None)}
    per_hook = PerHook(list(sides))
    try:
        for i in range(1 + rounds):  # one warm-up round, dropped
            spent = submit_slices(sides, i)
            for side in sides.values():
                side.flush()
                side.verify()
            if i:
                per_hook.add(spent)
        stats = {name: side.check() for name, side in sides.items()}
    finally:
        for side in sides.values():
            side.close()
    return per_hook, stats


def run_submit(url: str, tmp: str, rounds: int) -> list[Row]:
    idle = idle_submits(tmp, rounds)
    busy, stats = busy_submits(url, tmp, rounds)
    detail = {
        "hooks_per_slice": SUBMIT_SLICE, "slices": SLICES,
        **{f"idle_{n}_wall_us_per_hook": Spread.of(w).__dict__ for n, w in idle.wall.items()},
        **{f"busy_{n}_wall_us_per_hook": Spread.of(w).__dict__ for n, w in busy.wall.items()},
        **{f"busy_{n}_stats": s for n, s in stats.items()},
    }  # fmt: skip
    added = [a - b for a, b in zip(idle.cpu["spool"], idle.cpu["none"], strict=True)]
    return [
        Row("10", "submit() per hook, workers idle, thread CPU: spool / none",
            ratios(idle.cpu["spool"], idle.cpu["none"]), target="<= 1.10", detail=detail),
        Row("10", "  submit() CPU per hook, no spool", Spread.of(idle.cpu["none"]), unit="us"),
        Row("10", "  added by the spool", Spread.of(added), unit="us"),
        Row("10", "  wall time per hook: spool / none",
            ratios(idle.wall["spool"], idle.wall["none"])),
        Row("10", "submit() per hook, workers delivering, thread CPU: spool / none",
            ratios(busy.cpu["spool"], busy.cpu["none"])),
        Row("10", "  submit() CPU per hook, no spool", Spread.of(busy.cpu["none"]), unit="us"),
        Row("10", "  wall time per hook: spool / none",
            ratios(busy.wall["spool"], busy.wall["none"])),
    ]  # fmt: skip


def run(url: str, rounds: int, request_rounds: int, hooks_per_round: int,
        receiver: str) -> list[Row]:  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="xo-bench-spool-") as tmp:
        rows = run_submit(url, tmp, request_rounds)
        rows += run_delivery(url, tmp, 2 * rounds, hooks_per_round, receiver)
        rows += run_retries(tmp, rounds)
    return rows
