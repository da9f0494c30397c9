"""What every scenario shares: rounds, statistics, result rows, the table.

Every figure is a ratio against a baseline measured in the same run, so machine noise
cancels out as far as possible: the two sides of a comparison run in interleaved rounds
(A B, B A, A B, ...), each round yields one ratio, and the median of those ratios is
reported with its min and max.
"""

from __future__ import annotations

import gc
import math
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

Runner = Callable[[], float]  # runs one round, returns a rate (operations per second)


@dataclass
class Spread:
    """The median of several rounds, with min and max."""

    median: float
    min: float
    max: float
    rounds: int

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values), len(values))


@dataclass
class Row:
    """One line of the table: a figure, what it is compared with, and its target."""

    scenario: str
    name: str
    value: Spread
    unit: str = "x"  # "x" for a ratio
    target: str | None = None  # e.g. ">= 0.95"
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        op, bound = self.target.split()
        value = self.value.median
        return value >= float(bound) if op == ">=" else value <= float(bound)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["met"] = self.met
        return data


def paired_rates(sides: dict[str, Runner], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each side once per round, alternating the order every round; return the rates
    by side. Warm-up rounds are run and dropped."""
    names = list(sides)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + rounds):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            gc.collect()
            rate = sides[name]()
            if i >= warmup:
                rates[name].append(rate)
    return rates


# Slices of a round in interleaved_rates: at about 70 calls each (a 0.25 s round of a
# 65 µs call), a burst of load from another process lands on both sides alike. At 10
# slices, scenario 1's rounds ranged from 0.78 to 1.16 on a busy machine; at 100, from
# 0.91 to 0.98, about the same median.
SLICES = 50


def interleaved_calls(count: int, rounds: int) -> int:
    """How many operations :func:`interleaved_rates` makes on each side, warm-up included."""
    return count // SLICES * SLICES * (rounds + 1)


def interleaved_rates(
    sides: dict[str, Callable[[int], None]], count: int, rounds: int, slices: int = SLICES
) -> dict[str, list[float]]:
    """Like :func:`paired_rates`, interleaved more finely for short operations: a round
    runs each side *slices* times on ``count / slices`` operations, alternating, and
    reports each side's rate over the round. A burst of load from another process then
    hits both sides alike. One warm-up round is dropped."""
    names = list(sides)
    per_slice = max(1, count // slices)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for i in range(1 + rounds):
        gc.collect()
        spent = dict.fromkeys(names, 0.0)
        for j in range(slices):
            for name in names if (i + j) % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                sides[name](per_slice)
                spent[name] += time.perf_counter() - start
        if i:
            for name in names:
                rates[name].append(per_slice * slices / spent[name])
    return rates


def ratios(numerator: list[float], denominator: list[float]) -> Spread:
    """Round-by-round ratios of two paired series."""
    return Spread.of([a / b for a, b in zip(numerator, denominator, strict=True)])


def timed_rate(count: int, work: Callable[[], None]) -> float:
    """Run *work* (which does *count* operations) and return operations per second."""
    start = time.perf_counter()
    work()
    return count / (time.perf_counter() - start)


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank percentile *p* (0-100) of *values*."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Wait until something accepts connections on 127.0.0.1:*port*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the process meant to listen on port {port} exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


def format_number(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.3f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def render_table(rows: list[Row]) -> str:
    """The rows as a fixed-width text table."""
    header = ("#", "measurement", "median", "min", "max", "unit", "target", "met")
    lines = [header]
    for row in rows:
        met = {None: "", True: "yes", False: "NO"}[row.met]
        lines.append((
            row.scenario, row.name,
            format_number(row.value.median, row.unit),
            format_number(row.value.min, row.unit),
            format_number(row.value.max, row.unit),
            row.unit, row.target or "", met,
        ))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = [
            cell.ljust(w) if i in (0, 1, 5, 6, 7) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
