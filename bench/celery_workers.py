"""Scenario C, the workers' side: how fast Celery workers deliver, at what CPU and Redis
cost per hook, beside the thread dispatcher: ``python bench/celery_workers.py`` (needs
``redis-server``, nginx or the Python receiver, and the ``celery`` extra).

Each configuration (1 worker with one pool process; 1 and 2 workers with
``--concurrency 2``, the default on 2 cores) is started once, then each round publishes
the pre and post hooks of ``hooks / 2`` calls (signed, one URL, through
``CeleryDispatcher.submit`` as the middleware does) and times them from the first
publish until the workers have counted every one delivered (the endpoint's shared
``delivered`` counter in Redis). Per round: hooks/s; CPU seconds of the worker
processes (main and pool processes, from ``/proc``) and of ``redis-server`` per hook;
Redis commands per hook (``INFO commandstats`` before and after, less this script's own
polling). Unless ``--no-old`` (or without git), the same for the code before the
batches of issue #18 (:data:`BASELINE`, from ``git archive``, published through
Celery's ``send_task`` as it did), a baseline measured in the same run. The thread
dispatcher delivers the same number of hooks from this process after each round of one
worker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import receivers  # noqa: E402
from celery_publish import SECRET, redis_server  # noqa: E402
from common import Row, Spread, render_table  # noqa: E402
from throughput import payloads  # noqa: E402

from xo_webhooks import load_settings  # noqa: E402
from xo_webhooks.sending.delivery import Delivery  # noqa: E402
from xo_webhooks.sending.dispatcher import ThreadDispatcher  # noqa: E402

REPO = HERE.parent
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of *pid* and its children, from ``/proc``."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                pending.extend(int(c) for c in children)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


class Workers:
    """``celery worker`` processes, stopped at exit (a warm shutdown).

    :param broker: the broker URL. :param hooks: ``XO_WEBHOOKS_HOOKS``.
    :param source: the folder whose ``xo_webhooks`` the workers import.
    """

    def __init__(
        self, broker: str, hooks: str, source: Path, count: int, concurrency: int = 2
    ) -> None:
        self.logs = Path(tempfile.mkdtemp(prefix="xo-bench-celery-"))
        self.concurrency = concurrency
        env = {k: v for k, v in os.environ.items() if not k.startswith("XO_WEBHOOKS_")}
        env.update(XO_WEBHOOKS_BROKER_URL=broker, XO_WEBHOOKS_HOOKS=hooks,
                   PYTHONPATH=str(source))  # fmt: skip
        self.processes = []
        for n in range(count):
            log = open(self.logs / f"w{n}.log", "wb")  # noqa: SIM115 - closed by the process
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "xo_webhooks.celery", "worker",
                 "--pool", "prefork", "--concurrency", str(concurrency), "--hostname", f"w{n}@%h",
                 "--without-mingle", "--without-gossip", "--without-heartbeat",
                 "--loglevel", "WARNING"],
                env=env, cwd=source, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            ))  # fmt: skip
            log.close()
        deadline = time.monotonic() + 60
        while not all(self._ready(n) for n in range(count)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not ready; logs in {self.logs}")
            time.sleep(0.1)

    def _ready(self, n: int) -> bool:
        if self.processes[n].poll() is not None:
            raise RuntimeError((self.logs / f"w{n}.log").read_text()[-3000:])
        # A worker at WARNING says nothing when ready: its pool processes are up.
        return len(Path(f"/proc/{self.processes[n].pid}/task/{self.processes[n].pid}/children")
                   .read_text().split()) >= self.concurrency  # fmt: skip

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.processes)

    def stop(self) -> None:
        for process in self.processes:
            os.killpg(process.pid, 15)
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait(5)


#: The last commit before the batches of issue #18: the baseline of rows C7-C8 (``HEAD``
#: was the baseline while the change was not committed; it is the change now).
BASELINE = "8ad8d0e"


def commands(client: Any) -> dict[str, int]:
    """Calls per command since the server started."""
    return {k[8:]: v["calls"] for k, v in client.info("commandstats").items()}


@contextlib.contextmanager
def old_source() -> Iterator[Path | None]:
    """The package before issue #18 (``git archive`` of :data:`BASELINE`), or ``None``
    without git (or that commit)."""
    with tempfile.TemporaryDirectory(prefix="xo-bench-baseline-") as tmp:
        archive = subprocess.run(
            ["git", "archive", BASELINE, "xo_webhooks"], cwd=REPO, capture_output=True
        )
        if archive.returncode != 0:
            yield None
            return
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        yield Path(tmp)


def deliver_round(
    dispatcher: Any, store: Any, settings: Any, hooks: int, worker_cpu: Any, redis_pid: int
) -> dict[str, float]:
    """Publish *hooks* and wait until the workers delivered them all."""
    from xo_webhooks.sending.celery_publisher import endpoint_of

    counts_key = f"xo-webhooks:endpoint-counts:{endpoint_of(settings.hooks[0].url)}"
    batch = [Delivery(settings.hooks[0], p) for p in payloads(hooks)]
    before_delivered = int(store.hget(counts_key, "delivered") or 0)
    before_commands = commands(store)
    cpu_before, redis_before = worker_cpu(), cpu_seconds(redis_pid)
    polls = 0
    started = time.perf_counter()
    for delivery in batch:
        dispatcher.submit(delivery)
    while int(store.hget(counts_key, "delivered") or 0) - before_delivered < hooks:
        polls += 1
        if time.perf_counter() - started > 300:
            raise RuntimeError("the workers did not deliver every hook in 300 s")
        time.sleep(0.005)
    elapsed = time.perf_counter() - started
    cpu, redis_cpu = worker_cpu() - cpu_before, cpu_seconds(redis_pid) - redis_before
    after = commands(store)
    # This script's own: one HGET per poll, the HGETs before and after, the INFO.
    spent = sum(after.values()) - sum(before_commands.values()) - (polls + 2) - 1
    return {
        "rate": hooks / elapsed,
        "cpu_us": cpu / hooks * 1e6,
        "redis_us": redis_cpu / hooks * 1e6,
        "commands": spent / hooks,
        "by_command": {k: v - before_commands.get(k, 0) for k, v in after.items()},
    }


def thread_round(url: str, hooks: int) -> float:
    """Hooks/s of a ThreadDispatcher (4 workers, endpoint concurrency 4) to *url*."""
    raw = [{"method": "vm.start", "type": "pre/post", "url": url, "secret": SECRET}]
    settings = load_settings(raw, {}, max_workers=4, endpoint_concurrency=4,
                             queue_size=hooks + 10, timeout=10.0)  # fmt: skip
    dispatcher = ThreadDispatcher(settings)
    batch = [Delivery(settings.hooks[0], p) for p in payloads(hooks)]
    started = time.perf_counter()
    for delivery in batch:
        dispatcher.submit(delivery)
    dispatcher.flush(120)
    elapsed = time.perf_counter() - started
    delivered = dispatcher.stats()["delivered"]
    dispatcher.close(0)
    if delivered != hooks:
        raise RuntimeError(f"thread dispatcher delivered {delivered} of {hooks}")
    return hooks / elapsed


def run(rounds: int = 5, hooks: int = 4000, old: bool = True, receiver: str = "auto") -> list[Row]:
    """Measure; return the rows (``C7``...)."""
    from xo_webhooks.celery import QUEUE, CeleryDispatcher

    rows: list[Row] = []
    results: dict[str, list[dict[str, float]]] = {}
    threads: list[float] = []
    with (
        redis_server() as (broker, proc),
        receivers.any_fast_receiver(receiver) as (url, _kind),
        old_source() as head,
    ):
        import redis

        store = redis.Redis.from_url(broker)
        raw = [{"method": "vm.start", "type": "pre/post", "url": url, "secret": SECRET}]
        settings = load_settings(raw, {}, dispatcher="celery", broker_url=broker,
                                 queue_size=10 * hooks)  # fmt: skip
        sources = [("new", REPO)]
        if old and head is not None:
            sources.append(("old", head))
        for name, source in sources:
            if name == "old":
                # Today's request path too: Celery's send_task (the given-app path).
                from xo_webhooks.sending.celery import celery_app

                dispatcher = CeleryDispatcher(settings, app=celery_app(settings, publisher=True))
            else:
                dispatcher = CeleryDispatcher(settings)
            shapes = [(1, 1), (1, 2), (2, 2)] if name == "new" else [(1, 2), (2, 2)]
            for count, concurrency in shapes:
                workers = Workers(broker, json.dumps(raw), source, count, concurrency)
                try:
                    key = f"{name} {count} {concurrency}"
                    deliver_round(dispatcher, store, settings, min(hooks, 400), workers.cpu,
                                  proc.pid)  # warm-up  # fmt: skip
                    results[key] = []
                    for _ in range(rounds):
                        per_round = hooks if name == "new" else max(400, hooks // 4)
                        measured = deliver_round(
                            dispatcher, store, settings, per_round, workers.cpu, proc.pid
                        )
                        results[key].append(measured)
                        if key == "new 1 2":
                            threads.append(thread_round(url, hooks))
                finally:
                    workers.stop()
                    store.delete(QUEUE)
            dispatcher.close(0)

    def spread(key: str, field: str) -> Spread:
        return Spread.of([r[field] for r in results[key]])

    for key in results:
        name, count, concurrency = key.split()
        label = f"before #18 ({BASELINE})" if name == "old" else "celery"
        suffix = f"{count} worker{'s' if count == '2' else ''} (--concurrency {concurrency})"
        target = ">= 3000" if key in ("new 1 2", "new 1 1") else None
        detail = {"by_command_last_round": results[key][-1]["by_command"]}
        rows += [
            Row("C7", f"{label}: hooks/s delivered, {suffix}", spread(key, "rate"),
                unit="/s", target=target),
            Row("C7", f"  {label}: worker CPU per hook, {suffix}", spread(key, "cpu_us"),
                unit="us"),
            Row("C8", f"  {label}: Redis commands per hook, {suffix}", spread(key, "commands"),
                unit="cmds", target="<= 4" if name == "new" else None, detail=detail),
            Row("C8", f"  {label}: redis-server CPU per hook, {suffix}",
                spread(key, "redis_us"), unit="us"),
        ]  # fmt: skip
    rows.append(Row("C9", "thread dispatcher (4 threads, this process): hooks/s",
                    Spread.of(threads), unit="/s"))  # fmt: skip
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hooks", type=int, default=4000, help="hooks per round")
    parser.add_argument(
        "--no-old", action="store_true", help=f"skip the code before #18 ({BASELINE})"
    )
    parser.add_argument("--receiver", choices=("auto", "nginx", "python"), default="auto")
    args = parser.parse_args(argv)
    print(render_table(run(args.rounds, args.hooks, not args.no_old, args.receiver)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
