"""Scenario 6: memory with the receiver down.

100,000 hooks are offered to a dispatcher (queue bound 10,000, retries high, a long
backoff) whose receiver refuses every connection. The resident set must plateau once
the queue is full (hooks past the bound are rejected, not kept) and come back near
where it started once the dispatcher is closed and the garbage collected.

Each round runs in its own process (``python memory.py``, printing one JSON object),
so the RSS it reads is its own.
"""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from common import Row, Spread

OFFERED = 100_000
QUEUE_SIZE = 10_000
SAMPLE_EVERY = 5_000


def status_kib(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` figure of this process from /proc, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure() -> dict[str, Any]:
    """One round, in this process."""
    import logging

    from receivers import closed_port_url

    from xo_webhooks import load_settings
    from xo_webhooks.request.jsonrpc import Outcome
    from xo_webhooks.request.payload import post_payload, pre_payload
    from xo_webhooks.sending.delivery import Delivery
    from xo_webhooks.sending.dispatcher import ThreadDispatcher

    logging.getLogger("xo_webhooks").setLevel(logging.CRITICAL)  # one warning per attempt
    settings = load_settings(
        [{"method": "vm.start", "type": "pre/post", "url": closed_port_url()}], {},
        queue_size=QUEUE_SIZE, retries=100, backoff=3600.0, timeout=2.0, max_workers=4,
    )  # fmt: skip
    hook = settings.hooks[0]
    user = ("5f3c1e2a-user", "admin@example.org")
    dispatcher = ThreadDispatcher(settings)
    # Start the workers and their HTTP sessions before the baseline is taken.
    dispatcher.submit(Delivery(hook, pre_payload("warm-up", user, "vm.start", {}, 0)))
    time.sleep(0.5)
    gc.collect()
    start_kib = status_kib("VmRSS")
    start_blocks = sys.getallocatedblocks()
    samples = []
    t0 = time.perf_counter()
    for i in range(OFFERED // 2):
        call_id = uuid.uuid4().hex
        params = {"id": str(uuid.uuid4()), "force": False, "name": f"vm-{i}"}
        now = int(time.time() * 1000)
        outcome = Outcome(result={"id": params["id"], "power_state": "Running"})
        dispatcher.submit(Delivery(hook, pre_payload(call_id, user, "vm.start", params, now)))
        dispatcher.submit(
            Delivery(hook, post_payload(call_id, user, "vm.start", params, now, now + 9, outcome))
        )
        offered = 2 * (i + 1)
        if offered % SAMPLE_EVERY == 0:
            samples.append((offered, status_kib("VmRSS"), dispatcher.stats()["pending"]))
    offer_seconds = time.perf_counter() - t0
    time.sleep(1.0)  # let the workers make their first attempt on what is queued
    stats = dispatcher.stats()
    settled_kib = status_kib("VmRSS")
    peak_kib = status_kib("VmHWM")
    peak_blocks = sys.getallocatedblocks()

    dispatcher.close(0)  # gives up on everything still queued
    del dispatcher
    deadline = time.monotonic() + 10
    while threading.active_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # close(0) does not wait for the workers to exit
    gc.collect()
    after_blocks = sys.getallocatedblocks()
    after_kib = status_kib("VmRSS")
    trimmed_kib = after_kib
    try:  # glibc keeps freed arenas; ask it to give them back, to see what is really held
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        trimmed_kib = status_kib("VmRSS")
    except OSError:
        pass
    at_bound = next(kib for offered, kib, _ in samples if offered >= QUEUE_SIZE)
    return {
        "start_kib": start_kib,
        "at_queue_bound_kib": at_bound,
        "end_of_offer_kib": samples[-1][1],
        "settled_kib": settled_kib,
        "peak_kib": peak_kib,
        "after_close_gc_kib": after_kib,
        "after_malloc_trim_kib": trimmed_kib,
        "start_blocks": start_blocks,
        "peak_blocks": peak_blocks,
        "after_close_gc_blocks": after_blocks,
        "pending_at_end": stats["pending"],
        "stats": stats,
        "offer_seconds": offer_seconds,
        "samples": samples,
    }


def run(rounds: int) -> list[Row]:
    """*rounds* rounds, each in a fresh process; the rows of the table."""
    results = []
    for _ in range(rounds):
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve())],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"the memory round failed:\n{out.stderr[-2000:]}")
        results.append(json.loads(out.stdout))

    def spread(f) -> Spread:
        return Spread.of([f(r) for r in results])

    def mib(kib: float) -> float:
        return kib / 1024

    half = OFFERED // 2

    def rss_at(r: dict[str, Any], offered: int) -> int:
        return next(kib for n, kib, _ in r["samples"] if n >= offered)

    def above_start(r: dict[str, Any], key: str, unit: str = "kib") -> float:
        """How much of the growth to the peak is still there."""
        start, peak = r[f"start_{unit}"], r[f"peak_{unit}"]
        return (r[key] - start) / max(1, peak - start)

    return [
        Row("6", f"pending hooks after {OFFERED:,} offered (bound {QUEUE_SIZE:,})",
            spread(lambda r: r["pending_at_end"]), unit="hooks", target=f"<= {QUEUE_SIZE}",
            detail={"rounds": results}),
        Row("6", "RSS at start", spread(lambda r: mib(r["start_kib"])), unit="MiB"),
        Row("6", "peak RSS (VmHWM)", spread(lambda r: mib(r["peak_kib"])), unit="MiB"),
        Row("6", "bytes per queued hook ((peak - start) / bound)",
            spread(lambda r: (r["peak_kib"] - r["start_kib"]) * 1024 / QUEUE_SIZE), unit="B"),
        # The plateau: hooks past the bound are rejected, so offering the second
        # 50,000 must not grow the process (the first attempts of queued hooks, which
        # add their encoded body, are over by then).
        Row("6", f"RSS growth per hook offered from {half:,} to {OFFERED:,}",
            spread(lambda r: (rss_at(r, OFFERED) - rss_at(r, half)) * 1024 / half),
            unit="B", target="<= 10"),
        Row("6", "after close(0) + gc: RSS still above start / peak growth",
            spread(lambda r: above_start(r, "after_close_gc_kib"))),
        Row("6", "  same, after malloc_trim(0)",
            spread(lambda r: above_start(r, "after_malloc_trim_kib")), target="<= 0.25"),
        Row("6", "  Python memory blocks still allocated / peak growth",
            spread(lambda r: above_start(r, "after_close_gc_blocks", "blocks")),
            target="<= 0.1"),
    ]  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    print(json.dumps(measure()))
