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

from common import Row, Spread, ratios
from observability import SLICES, WORKERS, DeliverySide, interleaved_cpu

from xo_webhooks.sending.transport import Transport
from xo_webhooks.sending.transport_requests import RequestsTransport

#: Chosen, not set by #15 (which asks for the default's semantics, not its speed): the
#: requests transport may take up to twice the CPU per hook of the default, and keep at
#: least half its hooks/s.
MIN_RATE, MAX_CPU = 0.5, 2.0


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
