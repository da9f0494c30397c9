"""Scenario 12: what the requests transport costs per hook against the default one.

``XO_WEBHOOKS_TRANSPORT=requests`` (``transport="requests"``, or any
``session_factory``) sends each hook through a ``requests.Session`` of the delivery
thread, with the semantics of the default ``http.client`` transport
(:mod:`xo_webhooks.sending.transport`). Hooks/s and this process's CPU per hook
(``time.process_time``, so with the ``submit()`` calls too) through a
:class:`ThreadDispatcher` with 4 workers to the fast receiver of scenarios 4-5, one
transport against the other, as in scenarios 9 and 11: one dispatcher per side for the
whole run, so that both send over warm connections, the sides alternating every tenth
of a round.
"""

from __future__ import annotations

import time
from typing import Any

from apps import hook
from common import Row, Spread, ratios
from observability import SLICES, WORKERS, interleaved_cpu
from throughput import payloads

from xo_webhooks import load_settings
from xo_webhooks.sending.delivery import Delivery
from xo_webhooks.sending.dispatcher import ThreadDispatcher
from xo_webhooks.sending.transport import Transport
from xo_webhooks.sending.transport_requests import RequestsTransport

#: Chosen, not set by #15 (which asks for the default's semantics, not its speed): the
#: requests transport may take up to twice the CPU per hook of the default, and keep at
#: least half its hooks/s.
MIN_RATE, MAX_CPU = 0.5, 2.0


class DeliverySide:
    """A dispatcher kept for the whole run, with the settings *extra* gives.

    :param url: the receiver.
    :param dispatcher: the dispatcher class (a :class:`ThreadDispatcher` by default).
    :param extra: settings, e.g. ``transport="requests"``.
    """

    def __init__(self, url: str, dispatcher: type[ThreadDispatcher] = ThreadDispatcher,
                 **extra: Any) -> None:  # fmt: skip
        settings = load_settings(
            [hook("vm.start", url)], {}, max_workers=WORKERS, queue_size=10_000, timeout=10.0,
            **extra,
        )  # fmt: skip
        self.target = settings.hooks[0]
        self.dispatcher = dispatcher(settings)
        self.sent = 0

    def send(self, count: int) -> tuple[float, float]:
        """Deliver *count* hooks; return the wall and CPU seconds they took."""
        deliveries = [Delivery(self.target, p) for p in payloads(count)]
        cpu, start = time.process_time(), time.perf_counter()
        for delivery in deliveries:
            self.dispatcher.submit(delivery)
        if not self.dispatcher.flush(60):
            raise RuntimeError("the dispatcher did not drain in 60 s")
        wall = time.perf_counter() - start
        time.sleep(0.002)  # let the workers finish their last settle (sleeping costs none)
        used = time.process_time() - cpu
        self.sent += count
        delivered = self.dispatcher.stats()["delivered"]
        if delivered != self.sent:
            raise RuntimeError(f"the dispatcher delivered {delivered} hooks, not {self.sent}")
        return wall, used

    def close(self) -> None:
        self.dispatcher.close(0)


def run(url: str, rounds: int, count: int, receiver: str) -> list[Row]:
    sides = {"http": DeliverySide(url), "requests": DeliverySide(url, transport="requests")}
    for name, kind in (("http", Transport), ("requests", RequestsTransport)):
        if not isinstance(sides[name].dispatcher.sender.transport, kind):
            raise RuntimeError(f"the {name} side sends through {sides[name].dispatcher.sender}")
    try:
        cpu, rate = interleaved_cpu(sides, count, rounds)  # type: ignore[arg-type]
    finally:
        for side in sides.values():
            side.close()
    detail = {
        "receiver": receiver,
        "hooks_per_round": count,
        "slices": SLICES,
        "workers": WORKERS,
        "cpu_us_per_hook": {name: Spread.of(c).__dict__ for name, c in cpu.items()},
    }
    added = [a - b for a, b in zip(cpu["requests"], cpu["http"], strict=True)]
    return [
        Row("12", "delivery, requests transport / http.client (default): hooks/s",
            ratios(rate["requests"], rate["http"]), target=f">= {MIN_RATE}", detail=detail),
        Row("12", "delivery, requests transport / http.client: CPU per hook",
            ratios(cpu["requests"], cpu["http"]), target=f"<= {MAX_CPU:g}"),
        Row("12", "  added CPU per hook", Spread.of(added), unit="us"),
        Row("12", "  CPU per hook, http.client", Spread.of(cpu["http"]), unit="us"),
        Row("12", "  hooks/s, http.client", Spread.of(rate["http"]), unit="/s"),
        Row("12", "  hooks/s, requests", Spread.of(rate["requests"]), unit="/s"),
    ]  # fmt: skip
