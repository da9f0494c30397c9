"""Scenario 11: what checking each ``json`` payload against the payload schema
(``XO_WEBHOOKS_VALIDATE``, on by default) costs per hook on the delivery threads.

This process's CPU per hook (``time.process_time``, so with the ``submit()`` calls
too) through a :class:`ThreadDispatcher` with 4 workers to a fast receiver on
127.0.0.1, validation on vs off, as in scenario 9: one dispatcher per side for the whole
run, so that every side sends over warm connections, the sides alternating every tenth
of a round. The issue's bound: validation may cost at most a quarter of a delivery's
CPU per hook (``on / off <= 1.25``), else it is off by default.

Also the check alone, in this thread (``time.thread_time``), on the same payloads:
``PayloadCheck.problem`` (the schema written out in Python, jsonschema only for what
it does not pass), with no dispatcher around it.
"""

from __future__ import annotations

import time

from common import Row, Spread, ratios
from observability import SLICES, WORKERS, DeliverySide, interleaved_cpu
from throughput import payloads

from xo_webhooks.sending.validation import PayloadCheck

BOUND = 1.25  # on / off: past it, the issue makes validation off by default


def check_alone(rounds: int, count: int) -> list[float]:
    """Microseconds of thread CPU per payload for the check alone, round by round."""
    check = PayloadCheck()
    sample = payloads(count)
    spent = []
    for i in range(1 + rounds):
        cpu = time.thread_time()
        for payload in sample:
            if check.problem(payload) is not None:
                raise RuntimeError(f"a benchmark payload is invalid: {check.problem(payload)}")
        if i:  # the first round warms up
            spent.append((time.thread_time() - cpu) / count * 1e6)
    return spent


def run(url: str, rounds: int, count: int, receiver: str) -> list[Row]:
    sides = {"off": DeliverySide(url, validate=False), "on": DeliverySide(url, validate=True)}
    try:
        for name, side in sides.items():
            if (side.dispatcher.sender.check is not None) != (name == "on"):
                raise RuntimeError(f"the sender does not validate as asked ({name})")
        cpu, rate = interleaved_cpu(sides, count, rounds)
    finally:
        for side in sides.values():
            side.close()
    detail = {
        "receiver": receiver,
        "hooks_per_round": count,
        "slices": SLICES,
        "workers": WORKERS,
        **{f"{name}_hooks_per_s": Spread.of(r).__dict__ for name, r in rate.items()},
        "hooks_per_s_on_over_off": ratios(rate["on"], rate["off"]).__dict__,
    }
    added = [a - b for a, b in zip(cpu["on"], cpu["off"], strict=True)]
    return [
        Row("11", "delivery, payload validation on / off: CPU per hook",
            ratios(cpu["on"], cpu["off"]), target=f"<= {BOUND}", detail=detail),
        Row("11", "  added CPU per hook", Spread.of(added), unit="us"),
        Row("11", "  CPU per hook, validation off", Spread.of(cpu["off"]), unit="us"),
        Row("11", "  the check alone (PayloadCheck), thread CPU per payload",
            Spread.of(check_alone(rounds, count)), unit="us"),
    ]  # fmt: skip
