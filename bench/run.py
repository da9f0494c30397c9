"""Run the xo-webhooks benchmark: ``python bench/run.py`` (or ``make bench``).

Every figure is a ratio against a baseline measured in the same run (see
``bench/README.md`` for the scenarios). Prints a table and writes it, with the machine
and the versions used, to ``bench/results.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bookkeeping  # noqa: E402
import celery_publish  # noqa: E402
import celery_workers  # noqa: E402
import isolation  # noqa: E402
import latency  # noqa: E402
import memory  # noqa: E402
import observability  # noqa: E402
import receivers  # noqa: E402
import request_path  # noqa: E402
import spool  # noqa: E402
import throughput  # noqa: E402
import transports  # noqa: E402
import validation  # noqa: E402
from common import Row, render_table  # noqa: E402

SCENARIOS = ("1", "2", "3", "4", "5", "6", "7", "8", "C", "10", "11", "12", "13", "9")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per measurement (>= 5)")
    parser.add_argument(
        "--request-rounds", type=int, default=15,
        help="rounds for the in-process request-path scenarios 1-3 (cheap, noisy)",
    )  # fmt: skip
    parser.add_argument("--round-seconds", type=float, default=0.25,
                        help="length of one in-process round")  # fmt: skip
    parser.add_argument(
        "--hooks",
        type=int,
        default=20_000,
        help="hooks through the dispatcher per configuration, over all rounds",
    )
    parser.add_argument(
        "--naive-hooks",
        type=int,
        default=2_000,
        help="hooks per round for the naive client (it is slow)",
    )
    parser.add_argument("--receiver", choices=("auto", "nginx", "python"), default="auto")
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help="comma-separated scenarios to run, e.g. 1,2,3"
    )
    parser.add_argument("--output", type=Path, default=HERE / "results.json")
    return parser.parse_args(argv)


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            names = (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
            model = next(names, "")
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": model,
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
    }


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("xo-webhooks", "werkzeug", "requests", "urllib3", "flask"):
        try:
            found[name] = version(name)
        except Exception:
            found[name] = "not installed"
    found["nginx"] = receivers.nginx_version()
    return found


def source() -> dict[str, Any]:
    """The commit measured, and whether the library had uncommitted changes."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "--short", "HEAD") or "unknown",
        "library_modified": bool(git("status", "--porcelain", "--", "xo_webhooks")),
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.rounds < 5 or args.request_rounds < 5:
        print("at least 5 rounds per measurement", file=sys.stderr)
        return 2
    only = set(args.only.split(","))
    logging.getLogger("xo_webhooks").setLevel(logging.CRITICAL)  # failures are expected in 6 and 8
    started = time.perf_counter()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "source": source(),
    }
    print(f"xo-webhooks benchmark, {info['date']}")
    print(f"machine: {info['machine']['cores']} cores, {info['machine']['cpu']}, "
          f"load average {info['machine']['load_average_at_start'][0]:.2f}")  # fmt: skip
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    src = info["source"]
    dirty = " + uncommitted changes to xo_webhooks/" if src["library_modified"] else ""
    print(f"source: {src['commit']}{dirty}")

    rows: list[Row] = []
    timings: dict[str, float] = {}

    def step(name: str, fn, *a: Any) -> None:
        t = time.perf_counter()
        print(f"... {name}", flush=True)
        rows.extend(fn(*a))
        timings[name] = round(time.perf_counter() - t, 1)

    if only & {"1", "2", "3"}:
        step("1-3 request path", request_path.run, args.request_rounds, args.round_seconds)
    if only & {"4", "5"}:
        with receivers.any_fast_receiver(args.receiver) as (url, receiver):
            info["receiver"] = receiver
            print(f"receiver: {receiver} at {url}", flush=True)
            per_round = max(1, args.hooks // args.rounds)
            step("4-5 delivery throughput", throughput.run_delivery,
                 url, args.rounds, per_round, args.naive_hooks)  # fmt: skip
            step("5 app under delivery load", throughput.run_api_under_load,
                 url, args.rounds, args.round_seconds)  # fmt: skip
    if "6" in only:
        step("6 memory (one process per round)", memory.run, args.rounds)
    if "7" in only:
        with receivers.slow_receiver() as url:
            info["slow_receiver"] = "Python ThreadingHTTPServer, 2 s before 204"
            step("7 latency over HTTP", latency.run, args.rounds, url)
    if "8" in only:
        step("8 isolation from a hung endpoint", isolation.run, args.rounds)
    if "C" in only:
        if shutil.which("redis-server") is None:
            print("C skipped: redis-server is not installed (apt-get install redis-server)")
        else:
            step("C celery publish cost", celery_publish.run, args.rounds)
            step("C celery workers: hooks/s, CPU and Redis commands per hook",
                 celery_workers.run, args.rounds, 4000, True, args.receiver)  # fmt: skip
    if "10" in only:
        with receivers.any_fast_receiver(args.receiver) as (url, receiver):
            print(f"receiver for 10: {receiver} at {url}", flush=True)
            step("10 spool cost", spool.run, url, args.rounds, args.request_rounds,
                 max(1, args.hooks // args.rounds // 2), receiver)  # fmt: skip
    if "11" in only:
        with receivers.any_fast_receiver(args.receiver) as (url, receiver):
            print(f"receiver for 11: {receiver} at {url}", flush=True)
            step("11 payload validation cost per hook", validation.run, url,
                 args.rounds * 3, args.hooks // args.rounds // 2, receiver)  # fmt: skip
    if "12" in only:
        with receivers.any_fast_receiver(args.receiver) as (url, receiver):
            print(f"receiver for 12: {receiver} at {url}", flush=True)
            step("12 requests transport against the default", transports.run, url,
                 args.rounds * 3, args.hooks // args.rounds // 2, receiver)  # fmt: skip
    if "13" in only:
        with receivers.any_fast_receiver(args.receiver) as (url, receiver):
            print(f"receiver for 13: {receiver} at {url}", flush=True)
            step("13 per-endpoint lanes and breaker cost per hook", bookkeeping.run, url,
                 args.rounds * 3, args.hooks // args.rounds // 2, receiver)  # fmt: skip
    if "9" in only:  # last: it sets OpenTelemetry's global tracer provider, for good
        if observability.missing():
            print(f"9 skipped: {', '.join(observability.missing())} not installed "
                  "(pip install -e '.[test]')")  # fmt: skip
        else:
            with receivers.any_fast_receiver(args.receiver) as (url, receiver):
                print(f"receiver for 9: {receiver} at {url}", flush=True)
                step("9 observability cost per hook", observability.run, url,
                     args.request_rounds, args.round_seconds, args.rounds * 3,
                     args.hooks // args.rounds // 2, receiver)  # fmt: skip
    rows = [r for r in rows if r.scenario in only or r.scenario.startswith("C")]

    info["wall_seconds"] = round(time.perf_counter() - started, 1)
    info["step_seconds"] = timings
    info["machine"]["load_average_at_end"] = os.getloadavg()
    table = render_table(rows)
    print()
    if "receiver" in info:
        print(f"receiver for 4-5: {info['receiver']}")
    print(table)
    missed = [r for r in rows if r.met is False]
    print(f"\n{sum(r.met is True for r in rows)} targets met, {len(missed)} missed; "
          f"{info['wall_seconds']:.0f} s")  # fmt: skip
    info["table"] = table
    info["rows"] = [r.as_json() for r in rows]
    args.output.write_text(json.dumps(info, indent=2, default=str) + "\n")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
