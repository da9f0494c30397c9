"""The durable spool (``XO_WEBHOOKS_SPOOL``): hooks kept in a SQLite file that outlives
the process that accepted them, shared by the processes of a host.

What the storage (:class:`xo_webhooks.sending.spool.Spool`, no threads, no clock) promises:

- a row is free (any process may claim it) or owned under a lease; a claim takes only
  rows that are due and free, up to its room and to the per-endpoint limit (counting
  the hooks the claimer holds in memory already), and leases them to the claimer;
- a call's post hook to a URL is never claimed while its pre hook to that URL is in the
  spool, whoever holds it;
- a lease that ran out frees a row, and so does renewing when its owner is a process of
  this host that is gone; rows whose deadline has passed come back to be given up on;
- an endpoint whose shared breaker is open gives no hook until its probe is due, then
  one (the probe), and no other while that probe's lease runs, for any process;
- ``retry_now`` makes waiting hooks due and lets down endpoints probe now; ``taken``
  hands over the free hooks and deletes them only if the caller succeeded; ``summary``
  counts due, waiting and leased hooks per endpoint with its breaker state;
- a file it cannot read (not a database, a newer schema) is a ``sqlite3.DatabaseError``.

What the thread dispatcher with a spool promises, over real HTTP on 127.0.0.1:

- a hook still pending after a commit interval is in the file, held by its process;
  ``flush()`` also waits for the spool to be empty, and the ``stats()`` ledger
  balances with ``spooled``, ``left`` and ``resumed``;
- a retry, and the hooks of an endpoint that is down, wait in the spool, not in memory,
  and come back with their ``webhook-id``; a post hook never overtakes its pre hook;
- ``close()`` leaves what is pending in the spool (counted ``left``, never
  dead-lettered) and frees the hooks it held: the next dispatcher sends them;
- two dispatchers on one file send each hook once;
- a spool that fails (a corrupted file, a lock held too long) fails no submit: the
  hooks stay in memory, the failure is logged once and counted, and the spool is used
  again once it works;
- a spool path that cannot hold one, or asked for with Celery, is a ``ConfigError``.

The spooler's intervals are shortened here so that each test takes well under 5 s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

from xo_webhooks import ConfigError, Hook, load_settings
from xo_webhooks.sending import endpoints
from xo_webhooks.sending import spool as spool_module
from xo_webhooks.sending import spooler as spooler_module
from xo_webhooks.sending.deadletter import read_records
from xo_webhooks.sending.delivery import Delivery
from xo_webhooks.sending.dispatcher import ThreadDispatcher
from xo_webhooks.sending.endpoints import Breaker, endpoint_of
from xo_webhooks.sending.spool import LEASE, EndpointSummary, Row, Spool, owner_token
from xo_webhooks.testing import ReceivedHook, WebhookReceiver

from .helpers import POST, PRE, assert_ledger, free_port, small_disk_at
from .waiting import wait_until

pytestmark = pytest.mark.usefixtures("no_leaked_threads")

V = TypeVar("V")

#: A fixed "now" for the storage tests (epoch seconds): the spool has no clock.
T = 1_700_000_000.0
URL_A, URL_A2, URL_B = "http://127.0.0.1:9/a", "http://127.0.0.1:9/a2", "http://127.0.0.1:10/b"
ORIGIN_A, ORIGIN_B = endpoint_of(URL_A), endpoint_of(URL_B)
#: Owners of another host: ``renew`` never takes them for gone.
PEER, OTHER = "peer-host/1/aaaa", "peer-host/2/bbbb"
ME = "my-host/3/cccc"
PROBE_LEASE = 30.0


@pytest.fixture(autouse=True)
def fast_spooler(monkeypatch) -> None:
    """The spooler writes every 10 ms, looks for due hooks every 50 ms and tries a
    failed spool again after 100 ms (0.2 s, 1 s and 5 s in production)."""
    monkeypatch.setattr(spooler_module, "COMMIT_INTERVAL", 0.01)
    monkeypatch.setattr(spooler_module, "POLL_INTERVAL", 0.05)
    monkeypatch.setattr(spooler_module, "RETRY_INTERVAL", 0.1)


# -- the storage ---------------------------------------------------------------------------


@pytest.fixture
def spool(tmp_path) -> Iterator[Spool]:
    opened = Spool(str(tmp_path / "spool" / "s.sqlite3"))
    yield opened
    opened.close()


def message(hook_id: str, url: str, call: Any, kind: str) -> str:
    payload = {**(PRE if kind == "pre" else POST), "callId": call}
    return json.dumps({"id": hook_id, "url": url, "format": "json", "payload": payload,
                       "attempts": 0, "lastError": None})  # fmt: skip


def row(
    hook_id: str,
    *,
    url: str = URL_A,
    call: Any = "c1",
    kind: str = "pre",
    due: float = T,
    deadline: float = T + 3600,
    created: float = T,
    owner: str | None = None,
) -> Row:
    return Row(hook_id, endpoint_of(url), url, json.dumps(call), kind,
               message(hook_id, url, call, kind), due, deadline, created, owner)  # fmt: skip


def claim(
    spool: Spool,
    owner: str,
    now: float,
    room: int = 100,
    per_endpoint: int = 100,
    held: dict[str, int] | None = None,
) -> tuple[list[str], list[str]]:
    """The ids a claim took: (due, expired)."""
    claimed = spool.claim(owner, now, room, per_endpoint, held or {}, PROBE_LEASE)
    return [m["id"] for m in claimed.due], [m["id"] for m in claimed.expired]


def open_breaker(probe_at: float) -> dict[str, Any]:
    """An endpoint's breaker as a process saves it when the endpoint is down."""
    return Breaker(2, state="open", failures=2, opened_at=T, probe_at=probe_at,
                   pause=5.0, last_error="HTTP 503").to_dict()  # fmt: skip


def holders(path: str) -> dict[str, tuple[str | None, float]]:
    """Each hook's ``(owner, lease_until)``, read from the file itself (a reader: it
    never takes the write lock from the spooler it watches); none before it exists."""
    if not os.path.exists(path):
        return {}
    with contextlib.closing(sqlite3.connect(path)) as db:
        try:
            rows = db.execute("SELECT id, owner, lease_until FROM hooks").fetchall()
        except sqlite3.OperationalError:  # the spooler is creating its tables
            return {}
        return {r[0]: (r[1], r[2]) for r in rows}


def test_a_row_written_owned_is_leased_and_a_free_one_is_claimable(spool):
    spool.write([row("owned", owner=PEER), row("free")], [], [], PEER, T)

    assert holders(spool.path) == {"owned": (PEER, T + LEASE), "free": (None, 0.0)}
    assert claim(spool, ME, T) == (["free"], [])
    assert holders(spool.path)["free"] == (ME, T + LEASE)  # now leased to the claimer
    assert claim(spool, OTHER, T) == ([], [])  # nothing free is left
    assert claim(spool, ME, T) == ([], [])  # not even for the claimer: it has them
    assert spool.count() == 2
    assert spool.holds(["owned", "free", "never"]) == {"owned", "free"}


def test_a_claim_takes_due_hooks_up_to_its_room_and_the_per_endpoint_limit(spool):
    spool.write([row(f"a{n}", due=T - 10 + n) for n in range(5)], [], [], PEER, T)
    spool.write([row("later", due=T + 10)], [], [], PEER, T)
    spool.write([row(f"b{n}", url=URL_B, due=T - 10 + n) for n in range(3)], [], [], PEER, T)

    # Three of each endpoint at most, the one already holding two counted: the oldest due.
    due, _ = claim(spool, ME, T, per_endpoint=3, held={ORIGIN_B: 2})
    assert sorted(due) == ["a0", "a1", "a2", "b0"]
    two, _ = claim(spool, ME, T, room=2, per_endpoint=3)  # two in all
    assert len(two) == 2
    rest, _ = claim(spool, ME, T, per_endpoint=3)
    assert sorted(two + rest) == ["a3", "a4", "b1", "b2"]
    assert claim(spool, ME, T) == ([], [])
    assert claim(spool, ME, T + 9.9) == ([], [])  # "later" is not due yet
    assert claim(spool, ME, T + 10) == (["later"], [])
    assert claim(spool, OTHER, T, room=0) == ([], [])


def test_a_post_hook_is_not_claimed_while_its_pre_hook_is_in_the_spool(spool):
    spool.write(
        [
            row("pre", kind="pre", owner=PEER),  # held by another process
            row("post", kind="post", due=T - 5),
            row("post-other-url", url=URL_A2, kind="post"),
            row("post-other-call", call="c2", kind="post"),
            row("pre-1", call="1", kind="pre", owner=OTHER),
            row("post-1", call="1", kind="post"),
            row("post-int-1", call=1, kind="post"),  # call 1, not "1"
        ],
        [], [], PEER, T,
    )  # fmt: skip
    due, _ = claim(spool, ME, T)
    assert sorted(due) == ["post-int-1", "post-other-call", "post-other-url"]

    spool.release(PEER)  # the pre hook free, and due: it goes, its post still waits
    assert claim(spool, ME, T) == (["pre"], [])
    assert claim(spool, OTHER, T + 1) == ([], [])
    spool.write([], ["pre"], [], ME, T + 1)  # delivered
    assert claim(spool, OTHER, T + 1) == (["post"], [])


def test_a_leased_row_is_claimed_once_its_lease_ran_out(spool):
    spool.write([row("h1", owner=PEER)], [], [], PEER, T)
    assert claim(spool, ME, T + LEASE - 1) == ([], [])
    assert claim(spool, ME, T + LEASE) == ([], [])  # the lease runs until then

    spool.renew(PEER, T + 30)  # its owner renews: another lease from then
    assert claim(spool, ME, T + LEASE + 1) == ([], [])
    assert claim(spool, ME, T + 30 + LEASE + 0.5) == (["h1"], [])
    assert holders(spool.path)["h1"] == (ME, T + 30 + 2 * LEASE + 0.5)


def exited_pid() -> int:
    """The pid of a process of this host that has just exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(10)
    return process.pid


def test_renew_frees_the_rows_of_a_process_of_this_host_that_is_gone(spool):
    host = owner_token().partition("/")[0]  # this host: its name and pid namespace
    gone = f"{host}/{exited_pid()}/x"
    alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    try:
        live = f"{host}/{alive.pid}/y"
        elsewhere = f"other-host/{exited_pid()}/z"  # another host's pids mean nothing here
        me = owner_token()
        spool.write([row("gone", owner=gone), row("live", owner=live),
                     row("elsewhere", owner=elsewhere), row("mine", owner=me)],
                    [], [], me, T)  # fmt: skip

        spool.renew(me, T + 10)
        assert holders(spool.path) == {
            "gone": (None, 0.0),
            "live": (live, T + LEASE),
            "elsewhere": (elsewhere, T + LEASE),
            "mine": (me, T + 10 + LEASE),
        }
        assert claim(spool, ME, T + 10) == (["gone"], [])  # taken over at once
    finally:
        assert alive.stdin is not None
        alive.stdin.close()
        alive.wait(10)


def test_rows_past_their_deadline_come_back_to_be_given_up_on(spool):
    spool.write([row("late", due=T + 50, deadline=T - 1), row("ok"),
                 row("late-held", due=T + 2 * LEASE, deadline=T, owner=PEER)],
                [], [], PEER, T)  # fmt: skip
    spool.write([row("b-late", url=URL_B, deadline=T)], [],
                [(ORIGIN_B, open_breaker(T + 100))], PEER, T)  # fmt: skip

    due, first = claim(spool, ME, T, room=1)
    assert (due, len(first)) == ([], 1)  # expired ones take the room first
    due, second = claim(spool, ME, T)
    assert due == ["ok"]
    # Whatever they waited for (not due yet, an endpoint down), but not another's.
    assert sorted(first + second) == ["b-late", "late"]
    spool.write([], [*first, *second, "ok"], [], ME, T)  # given up on, and delivered
    assert claim(spool, ME, T + LEASE + 1) == ([], ["late-held"])  # its lease ran out


# A regression test: once, the hook came back twice, due and expired.
def test_a_due_hook_past_its_deadline_is_claimed_only_to_be_given_up_on(spool):
    spool.write([row("late", due=T - 100, deadline=T - 1)], [], [], PEER, T - 100)
    assert claim(spool, ME, T) == ([], ["late"])


def test_an_open_shared_breaker_gives_one_probe_at_a_time(spool):
    spool.write([row(f"h{n}", due=T - 10 + n) for n in range(3)], [],
                [(ORIGIN_A, open_breaker(T + 5))], PEER, T)  # fmt: skip
    spool.write([row("b0", url=URL_B)], [], [], PEER, T)

    assert claim(spool, ME, T + 4.9) == (["b0"], [])  # another endpoint flows
    spool.write([], ["b0"], [], ME, T + 4.9)
    assert claim(spool, ME, T + 5) == (["h0"], [])  # the probe: one hook
    assert claim(spool, ME, T + 6) == ([], [])
    assert claim(spool, OTHER, T + 6) == ([], [])  # the probe serves every process
    assert claim(spool, OTHER, T + 5 + PROBE_LEASE) == ([], [])
    # Its probe never reported within its lease: another may go.
    assert claim(spool, OTHER, T + 5 + PROBE_LEASE + 0.5) == (["h1"], [])

    # A process saw it reopen: the next probe after the new pause.
    spool.write([], [], [(ORIGIN_A, open_breaker(T + 100))], OTHER, T + 40)
    assert claim(spool, ME, T + 99) == ([], [])
    spool.write([], [], [(ORIGIN_A, Breaker(2).to_dict())], OTHER, T + 101)  # closed
    due, _ = claim(spool, ME, T + 101)  # all three: the probes' leases ran out
    assert sorted(due) == ["h0", "h1", "h2"]
    # Others adopt the state a process saved, never their own, each save once.
    ((origin, fields, version),) = spool.breakers(0, ME, T + 101)
    assert (origin, fields["state"]) == (ORIGIN_A, "closed")
    assert spool.breakers(version, ME, T + 101) == []
    assert spool.breakers(0, OTHER, T + 101) == []


def test_retry_now_makes_waiting_hooks_due_and_lets_down_endpoints_probe(spool):
    spool.write([row("w1", due=T + 100), row("w2", due=T + 200), row("due"),
                 row("held", due=T + 100, owner=PEER)], [], [], PEER, T)  # fmt: skip
    spool.write([row("b1", url=URL_B), row("b2", url=URL_B, due=T + 1)], [],
                [(ORIGIN_B, open_breaker(T + 1000))], PEER, T)  # fmt: skip
    assert claim(spool, ME, T, room=0) == ([], [])

    assert spool.retry_now(T + 1) == 2  # w1 and w2: not the due one, not the held one
    due, _ = claim(spool, ME, T + 1)
    assert sorted(due) == ["b1", "due", "w1", "w2"]  # B gives one hook: its probe
    (breaker,) = [fields for origin, fields, _ in spool.breakers(0, ME, T + 1)]
    assert (breaker["state"], breaker["probe_at"]) == ("open", T + 1)
    assert claim(spool, OTHER, T + 2) == ([], [])  # b2 waits for the probe's result


def test_taken_hands_over_the_free_hooks_and_deletes_them_once_done(spool):
    spool.write([row("new", created=T - 1), row("old", created=T - 2),
                 row("held", owner=PEER)], [], [], PEER, T)  # fmt: skip

    with pytest.raises(RuntimeError), spool.taken(T) as messages:
        assert [m["id"] for m in messages] == ["old", "new"]
        raise RuntimeError("the dead-letter file cannot be written")
    assert spool.count() == 3  # a failure keeps them

    with spool.taken(T) as messages:
        assert [m["id"] for m in messages] == ["old", "new"]
        assert messages[0]["payload"]["callId"] == "c1"
    assert holders(spool.path) == {"held": (PEER, T + LEASE)}


def test_summary_counts_due_waiting_and_leased_hooks_per_endpoint(spool):
    spool.write([row("due1", created=T - 30), row("due2"), row("waiting", due=T + 60),
                 row("leased", owner=PEER)], [], [], PEER, T)  # fmt: skip
    spool.write([row("b", url=URL_B, created=T - 5)], [],
                [(ORIGIN_B, open_breaker(T + 5))], PEER, T)  # fmt: skip

    assert spool.summary(T + 1) == [  # by endpoint: "...:10" before "...:9"
        EndpointSummary(ORIGIN_B, due=1, waiting=0, leased=0, oldest=T - 5, state="open"),
        EndpointSummary(ORIGIN_A, due=2, waiting=1, leased=1, oldest=T - 30, state="closed"),
    ]
    assert spool.summary(T + LEASE + 61)[1] == EndpointSummary(
        ORIGIN_A, due=4, waiting=0, leased=0, oldest=T - 30, state="closed"
    )


def test_a_spool_of_a_newer_schema_is_refused(tmp_path):
    path = str(tmp_path / "s.sqlite3")
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version={spool_module.SCHEMA_VERSION + 1}")
    with pytest.raises(sqlite3.DatabaseError, match="newer than this version knows"):
        Spool(path)
    with contextlib.closing(sqlite3.connect(path)) as db:  # left as it was
        assert db.execute("PRAGMA user_version").fetchone()[0] == spool_module.SCHEMA_VERSION + 1
        assert db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    path = tmp_path / "s.sqlite3"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(sqlite3.DatabaseError):
        Spool(str(path))
    assert path.read_bytes() == b"not a database" * 100  # never overwritten


# -- the thread dispatcher with a spool ------------------------------------------------------


@pytest.fixture
def spool_path(tmp_path) -> str:
    return str(tmp_path / "spool" / "s.sqlite3")


@pytest.fixture
def dead_file(tmp_path) -> str:
    return str(tmp_path / "dead.jsonl")


@pytest.fixture
def dispatch(spool_path, dead_file) -> Iterator[Callable[..., ThreadDispatcher]]:
    """``dispatch(url, **settings)``: a dispatcher with one pre/post hook to *url*, its
    spool in *spool_path* and its dead letters in *dead_file*; closed at teardown."""
    made: list[ThreadDispatcher] = []

    def make(url: str, **overrides: Any) -> ThreadDispatcher:
        overrides.setdefault("spool", spool_path)
        overrides.setdefault("dead_letter", dead_file)
        overrides.setdefault("timeout", 2)
        hooks: list[Mapping[str, Any]] = [{"method": "*", "type": "pre/post", "url": url}]
        made.append(ThreadDispatcher(load_settings(hooks, environ={}, **overrides)))
        return made[-1]

    yield make
    for dispatcher in made:
        dispatcher.close(0)


def pre(hook: Hook, call_id: str) -> Delivery:
    return Delivery(hook, {**PRE, "callId": call_id})


def post(hook: Hook, call_id: str) -> Delivery:
    return Delivery(hook, {**POST, "callId": call_id})


def ids(hooks: list[ReceivedHook]) -> list[str]:
    return [h.headers["webhook-id"] for h in hooks]


def count_in(path: str) -> int:
    """The hooks in the spool file."""
    spool = Spool(path)
    try:
        return spool.count()
    finally:
        spool.close()


def summary_of(path: str) -> list[EndpointSummary]:
    """What ``xo-webhooks spool`` shows of the spool file, now."""
    spool = Spool(path)
    try:
        return spool.summary(time.time())
    finally:
        spool.close()


def waited(get: Callable[[], V], ready: Callable[[V], bool], what: str) -> V:
    """``get()``, as soon as *ready* says so (5 s at most)."""
    found: list[V] = []

    def check() -> bool:
        found[:] = [get()]
        return ready(found[0])

    wait_until(check, 5, what)
    return found[0]


def ledger(dispatcher: ThreadDispatcher) -> dict[str, int]:
    stats = dispatcher.stats()
    assert_ledger(stats)
    return stats


def dead_letters(path: str) -> list[dict[str, Any]]:
    return read_records(path) if os.path.exists(path) else []


def spool_rows(path: str, deliveries: list[Delivery], now: float) -> None:
    """Write *deliveries* to the spool, free and due at *now*, as a process that
    stopped would have left them."""
    rows = [
        Row(d.id, endpoint_of(d.hook.url), d.hook.url, json.dumps(d.call_id), str(d.kind),
            json.dumps({**d.to_message(), "created": now}), now, now + 3600, now, None)
        for d in deliveries
    ]  # fmt: skip
    spool = Spool(path)
    try:
        spool.write(rows, [], [], "test-host/1/test", now)
    finally:
        spool.close()


class Gate:
    """A ``respond_with`` callable that holds each request until :meth:`open` (5 s at
    most), then answers *status*; ``arrived`` is set at the first request."""

    def __init__(self, status: int = 204) -> None:
        self.status = status
        self.arrived = threading.Event()
        self._open = threading.Event()

    def __call__(self, number: int, hook: ReceivedHook) -> int:
        self.arrived.set()
        self._open.wait(5)
        return self.status

    def open(self) -> None:
        self._open.set()


def test_hooks_are_in_the_spool_while_pending_and_gone_once_delivered(
    webhook_receiver, dispatch, spool_path
):
    gate = Gate()
    webhook_receiver.respond_with(gate)
    dispatcher = dispatch(webhook_receiver.url)
    (hook,) = dispatcher.settings.hooks
    first = pre(hook, "c0")
    dispatcher.submit(first)
    assert gate.arrived.wait(5)
    # In flight, it is in the file, held by this process: a crash would not lose it.
    found = waited(lambda: holders(spool_path), lambda rows: first.id in rows, "c0 written")
    owner, lease_until = found[first.id]
    assert owner is not None and lease_until > time.time()
    gate.open()

    for n in range(1, 20):
        dispatcher.submit(pre(hook, f"c{n}"))
    assert dispatcher.flush(5)
    assert count_in(spool_path) == 0
    received = webhook_receiver.wait_for(20)
    assert sorted(h.payload["callId"] for h in received) == sorted(f"c{n}" for n in range(20))
    assert ids(received)[0] == first.id
    stats = ledger(dispatcher)
    assert (stats["accepted"], stats["delivered"], stats["pending"]) == (20, 20, 0)
    assert (stats["spooled"], stats["left"], stats["resumed"]) == (0, 0, 0)
    assert stats["spool_errors"] == 0
    assert dispatcher.endpoint_stats()[endpoint_of(hook.url)]["spool"] == "spool"


def test_a_retry_waits_in_the_spool_not_in_memory(webhook_receiver, dispatch, spool_path):
    webhook_receiver.respond_with(503, 204)
    dispatcher = dispatch(webhook_receiver.url, retry_schedule="800ms")
    (hook,) = dispatcher.settings.hooks
    delivery = pre(hook, "c1")
    dispatcher.submit(delivery)

    wait_until(lambda: dispatcher.stats()["spooled"] == 1, 5, "the retry handed to the spool")
    assert dispatcher.stats()["pending"] == 0  # nothing of it left in memory
    # Written free (any process may send it), due after its delay.
    wait_until(lambda: holders(spool_path) == {delivery.id: (None, 0.0)}, 5, "it written free")
    assert count_in(spool_path) == 1
    (waiting,) = summary_of(spool_path)
    assert (waiting.due, waiting.waiting, waiting.leased) == (0, 1, 0)

    assert dispatcher.flush(5)
    (received,) = webhook_receiver.wait_for(1)
    assert ids(webhook_receiver.attempts) == [delivery.id, delivery.id]  # the same webhook-id
    assert [h.status for h in webhook_receiver.attempts] == [503, 204]
    assert count_in(spool_path) == 0
    stats = ledger(dispatcher)
    assert (stats["spooled"], stats["resumed"], stats["left"]) == (1, 1, 0)
    assert (stats["delivered"], stats["retried"], stats["failed"]) == (1, 1, 0)


def test_a_post_hook_never_overtakes_its_pre_hook_waiting_in_the_spool(
    webhook_receiver, dispatch, spool_path
):
    gate = Gate(503)  # the pre hook's first attempt fails, once it is in the file

    def answer(number: int, hook: ReceivedHook) -> int:
        return gate(number, hook) if number == 1 else 204

    webhook_receiver.respond_with(answer)
    dispatcher = dispatch(webhook_receiver.url, retry_schedule="300ms")
    (hook,) = dispatcher.settings.hooks
    first, then = pre(hook, "c1"), post(hook, "c1")
    dispatcher.submit(first)
    assert gate.arrived.wait(5)
    wait_until(lambda: first.id in holders(spool_path), 5, "the pre hook written")
    gate.open()
    wait_until(lambda: dispatcher.stats()["spooled"] == 1, 5, "the pre hook in the spool")
    dispatcher.submit(then)
    assert dispatcher.stats()["spooled"] == 2  # the post hook waits there too, at once

    assert dispatcher.flush(5)
    attempts = webhook_receiver.attempts
    assert [(h.payload["type"], h.payload["callId"], h.status) for h in attempts] == [
        ("pre", "c1", 503), ("pre", "c1", 204), ("post", "c1", 204),
    ]  # fmt: skip
    assert ids(attempts) == [first.id, first.id, then.id]
    stats = ledger(dispatcher)
    assert (stats["delivered"], stats["spooled"], stats["resumed"]) == (2, 2, 2)


# A regression test: once, the pre hook was taken for gone from the spool
# and the post hook was sent at once, before the pre hook's retry.
def test_a_post_hook_waits_for_a_pre_hook_spooled_while_the_spooler_was_busy(
    webhook_receiver, dispatch, spool_path
):
    dispatcher = dispatch(webhook_receiver.url, retry_schedule="300ms")
    (hook,) = dispatcher.settings.hooks
    dispatcher.submit(pre(hook, "warm-up"))  # the spooler runs
    assert dispatcher.flush(5)
    webhook_receiver.clear()
    webhook_receiver.respond_with(503, 204)
    claiming, looked = threading.Event(), threading.Event()
    spooler = dispatcher._spooler
    assert spooler is not None
    client = spooler._client

    def spy_room() -> tuple[int, dict[str, int]]:
        claiming.set()
        return client.room()

    def spy_looked() -> None:
        looked.set()
        client.looked()

    spooler._client = dataclasses.replace(client, room=spy_room, looked=spy_looked)
    with contextlib.closing(sqlite3.connect(spool_path, isolation_level=None)) as locker:
        locker.execute("BEGIN IMMEDIATE")  # the next claim waits (within the busy timeout)
        claiming.clear()
        assert claiming.wait(5)  # the spooler wrote, and is claiming
        first = pre(hook, "c1")
        dispatcher.submit(first)
        wait_until(lambda: dispatcher.stats()["spooled"] == 1, 5, "the pre hook spooled")
        locker.execute("ROLLBACK")
    looked.clear()
    assert looked.wait(5)  # that cycle ended: it counted
    then = post(hook, "c1")
    dispatcher.submit(then)

    assert dispatcher.flush(5)
    assert [(h.payload["type"], h.status) for h in webhook_receiver.attempts] == [
        ("pre", 503), ("pre", 204), ("post", 204),
    ]  # fmt: skip


def test_close_leaves_pending_hooks_in_the_spool_for_the_next_dispatcher(
    webhook_receiver, dispatch, spool_path, dead_file
):
    gate = Gate(503)  # a receiver that answers slowly, and with an error
    webhook_receiver.respond_with(gate)
    first = dispatch(webhook_receiver.url, max_workers=1, retry_schedule="1m")
    (hook,) = first.settings.hooks
    deliveries = [pre(hook, f"c{n}") for n in range(5)]
    for delivery in deliveries:
        first.submit(delivery)
    assert gate.arrived.wait(5)  # c0 in flight, the four others waiting for the worker

    first.close(0)
    stats = ledger(first)
    assert (stats["left"], stats["pending"], stats["failed"]) == (4, 1, 0)
    gate.open()  # the attempt in flight fails after close(): its retry is left too
    stats = waited(lambda: ledger(first), lambda s: s["pending"] == 0, "c0 settled")
    assert (stats["accepted"], stats["left"], stats["spooled"]) == (5, 5, 0)
    assert (stats["failed"], stats["dead_lettered"], stats["lost"]) == (0, 0, 0)
    assert dead_letters(dead_file) == []
    # All five are in the file, free: c0 too, which the first dispatcher held at close
    # (its late attempt's outcome is written by a thread of its own, just after).
    free = {d.id: (None, 0.0) for d in deliveries}
    waited(lambda: holders(spool_path), lambda rows: rows == free, "all five free")

    # c0's retry is due in a minute: the operator makes it due now (spool --retry-now).
    opened = Spool(str(spool_path))
    assert opened.retry_now(time.time()) == 1
    opened.close()
    webhook_receiver.clear()
    webhook_receiver.respond_with(204)
    second = dispatch(webhook_receiver.url)
    fresh = pre(hook, "fresh")
    second.submit(fresh)  # its threads start with its first hook
    assert second.flush(5)
    received = webhook_receiver.wait_for(6)
    assert Counter(ids(received)) == Counter([d.id for d in deliveries] + [fresh.id])
    stats = ledger(second)
    assert (stats["resumed"], stats["delivered"], stats["failed"]) == (5, 6, 0)
    assert count_in(spool_path) == 0


def test_an_endpoint_down_waits_in_the_spool_and_a_probe_from_there_brings_it_back(
    dispatch, spool_path, dead_file, monkeypatch
):
    monkeypatch.setattr(endpoints, "FIRST_PAUSE", 0.1)
    monkeypatch.setattr(endpoints, "MAX_PAUSE", 0.2)
    port = free_port()  # nothing listens there yet: the endpoint is down
    url = f"http://127.0.0.1:{port}/"
    origin = endpoint_of(url)
    # Probes every 0.2 s at most; each hook can be one eight times before it runs out.
    dispatcher = dispatch(url, breaker_threshold=2, retry_schedule=",".join(["500ms"] * 8))
    (hook,) = dispatcher.settings.hooks
    deliveries = [pre(hook, f"c{n}") for n in range(10)]
    for delivery in deliveries:
        dispatcher.submit(delivery)

    wait_until(lambda: dispatcher.endpoint_stats()[origin]["state"] != "closed", 5, "it opened")
    assert dispatcher.endpoint_stats()[origin]["spool"] == "spool"
    # Each hook is handed to the spool (the probes come back there too), and the
    # breaker is shared through the file with the other processes.
    wait_until(lambda: ledger(dispatcher)["spooled"] >= 10, 5, "the ten hooks spooled")
    (summary,) = waited(
        lambda: summary_of(spool_path),
        lambda found: bool(found) and found[0].state in ("open", "half-open"),
        "the open breaker in the spool",
    )
    assert summary.due + summary.waiting + summary.leased == 10

    with WebhookReceiver(port=port) as receiver:  # it comes back
        assert dispatcher.flush(5)
        received = receiver.wait_for(10)
        assert Counter(ids(received)) == Counter(d.id for d in deliveries)  # each once
    assert dispatcher.endpoint_stats()[origin]["state"] == "closed"
    stats = ledger(dispatcher)
    assert (stats["delivered"], stats["failed"], stats["pending"]) == (10, 0, 0)
    assert stats["resumed"] == stats["spooled"] >= 10
    assert dead_letters(dead_file) == []
    assert count_in(spool_path) == 0


def test_two_dispatchers_on_one_spool_send_each_hook_once(webhook_receiver, dispatch, spool_path):
    # Memory for 40 hooks each (what one claim takes at most), and a receiver that
    # takes its time: neither dispatcher can take all 200 at once.
    webhook_receiver.respond_with(204, delay=0.005)
    first = dispatch(webhook_receiver.url, queue_size=40)
    second = dispatch(webhook_receiver.url, queue_size=40)
    (hook,) = first.settings.hooks
    deliveries = [pre(hook, f"c{n}") for n in range(200)]
    spool_rows(spool_path, deliveries, time.time())

    starters = [pre(hook, "first"), pre(hook, "second")]
    first.submit(starters[0])  # the threads of each start with its first hook
    second.submit(starters[1])
    assert first.flush(5) and second.flush(5)

    received = webhook_receiver.wait_for(202)
    assert Counter(ids(received)) == Counter(d.id for d in deliveries + starters)
    one, other = ledger(first), ledger(second)
    assert one["resumed"] + other["resumed"] == 200
    assert one["resumed"] > 0 and other["resumed"] > 0, (one, other)  # both took some
    assert count_in(spool_path) == 0


def test_a_dispatcher_starting_in_the_same_process_leaves_the_others_hooks_alone(
    webhook_receiver, dispatch, spool_path
):
    lock = threading.Lock()
    arrivals: Counter[str] = Counter()
    again = threading.Event()

    def answer(number: int, hook: ReceivedHook) -> int:
        with lock:
            arrivals[hook.headers["webhook-id"]] += 1
            twice = arrivals[hook.headers["webhook-id"]] > 1
        if twice:
            again.set()
        elif hook.payload["callId"] == "held":
            again.wait(1)  # held in flight: until it arrives a second time, 1 s at most
        return 204

    webhook_receiver.respond_with(answer)
    first = dispatch(webhook_receiver.url)
    (hook,) = first.settings.hooks
    held = pre(hook, "held")
    first.submit(held)
    found = waited(lambda: holders(spool_path), lambda rows: held.id in rows, "held written")
    assert found[held.id][0] is not None  # held by the first dispatcher, in flight

    second = dispatch(webhook_receiver.url)
    fresh = pre(hook, "fresh")
    second.submit(fresh)  # its spooler opens the spool
    assert first.flush(5) and second.flush(5)
    assert Counter(ids(webhook_receiver.received)) == Counter([held.id, fresh.id])


def test_a_hook_delivered_after_close_is_not_sent_again_by_the_next_dispatcher(
    webhook_receiver, dispatch, spool_path
):
    gate = Gate(204)
    webhook_receiver.respond_with(gate)
    first = dispatch(webhook_receiver.url)
    (hook,) = first.settings.hooks
    delivery = pre(hook, "c1")
    first.submit(delivery)
    assert gate.arrived.wait(5)
    first.close(0)
    gate.open()  # the attempt in flight succeeds after close()
    wait_until(lambda: first.stats()["delivered"] == 1, 5, "c1 delivered")

    second = dispatch(webhook_receiver.url)
    fresh = pre(hook, "fresh")
    second.submit(fresh)
    assert second.flush(5)
    assert Counter(ids(webhook_receiver.received)) == Counter([delivery.id, fresh.id])


def test_flush_waits_for_the_hooks_a_former_process_left_in_the_spool(
    webhook_receiver, dispatch, spool_path
):
    url = webhook_receiver.url
    hook = load_settings([{"method": "*", "type": "pre", "url": url}], environ={}).hooks[0]
    left = pre(hook, "left-behind")
    spool_rows(spool_path, [left], time.time())
    dispatcher = dispatch(url)
    with contextlib.closing(sqlite3.connect(spool_path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # another process writes: the spooler waits its turn
        done = dispatcher.flush(2)
        waiting = other.execute("SELECT count(*) FROM hooks").fetchone()[0]
        other.execute("ROLLBACK")
    assert not done or waiting == 0  # True only once the spool is empty (got True, 1)


# A regression test: once, such a hook was sent and dead-lettered.
def test_a_hook_whose_schedule_ran_out_in_the_spool_is_dead_lettered_not_sent(
    webhook_receiver, dispatch, spool_path, dead_file
):
    dispatcher = dispatch(webhook_receiver.url)
    (hook,) = dispatcher.settings.hooks
    late = pre(hook, "late")
    now = time.time()
    spool = Spool(spool_path)
    try:  # left by a process that stopped a day ago
        spool.write([Row(late.id, endpoint_of(hook.url), hook.url, json.dumps("late"), "pre",
                         json.dumps(late.to_message()), now - 86400, now - 60, now - 86400,
                         None)], [], [], "test-host/1/test", now - 86400)  # fmt: skip
    finally:
        spool.close()
    fresh = pre(hook, "fresh")
    dispatcher.submit(fresh)
    assert dispatcher.flush(5)
    assert [r["id"] for r in dead_letters(dead_file)] == [late.id]
    assert ids(webhook_receiver.received) == [fresh.id]


# -- a bad spool does no harm --------------------------------------------------------------


def spool_logs(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == spooler_module.logger.name and r.levelno == level]  # fmt: skip


def test_a_corrupted_spool_file_costs_no_hook(webhook_receiver, dispatch, spool_path, caplog):
    caplog.set_level(logging.INFO, logger=spooler_module.logger.name)
    garbage = b"not a database" * 100
    Path(spool_path).parent.mkdir()
    Path(spool_path).write_bytes(garbage)
    dispatcher = dispatch(webhook_receiver.url, retry_schedule="100ms")
    (hook,) = dispatcher.settings.hooks
    origin = endpoint_of(hook.url)

    dispatcher.submit(pre(hook, "c0"))  # its threads start, and the spool fails to open
    webhook_receiver.wait_for(1)
    wait_until(lambda: dispatcher.stats()["spool_errors"] >= 1, 5, "the spool failing")
    assert dispatcher.endpoint_stats()[origin]["spool"] == "memory"
    webhook_receiver.respond_with(503, 204)
    retried = pre(hook, "c1")
    dispatcher.submit(retried)  # its retry waits in memory
    assert dispatcher.flush(5)

    received = webhook_receiver.wait_for(2)
    assert [h.payload["callId"] for h in received] == ["c0", "c1"]
    assert [h.status for h in webhook_receiver.attempts] == [204, 503, 204]
    assert ids(webhook_receiver.attempts)[1:] == [retried.id, retried.id]
    stats = ledger(dispatcher)
    assert (stats["delivered"], stats["retried"], stats["failed"]) == (2, 1, 0)
    assert (stats["spooled"], stats["resumed"], stats["left"]) == (0, 0, 0)
    assert stats["spool_errors"] >= 1
    (error,) = spool_logs(caplog, logging.ERROR)  # once, however often it is tried again
    assert error.startswith(f"spool {spool_path} failed (DatabaseError: ")
    assert "hooks are kept in memory meanwhile" in error
    assert Path(spool_path).read_bytes() == garbage  # never overwritten


@pytest.fixture
def locker(spool_path, monkeypatch) -> Iterator[Callable[[], sqlite3.Connection]]:
    """``locker()`` takes the spool file's write lock, as another process would hold
    it (a stuck ``sqlite3`` shell, a process stopped in a transaction), and keeps it
    until its ``ROLLBACK`` or the end of the test; the spool's busy timeout is 50 ms.

    This is what fails at run time: a folder made read-only, or replaced by a file,
    stops no connection that is open (and this runs as root, whom chmod does not stop).
    """
    monkeypatch.setattr(spool_module, "BUSY_TIMEOUT", 0.05)  # 5 s in production
    held: list[sqlite3.Connection] = []

    def lock() -> sqlite3.Connection:
        held.append(sqlite3.connect(spool_path, isolation_level=None))
        held[-1].execute("BEGIN IMMEDIATE")
        return held[-1]

    yield lock
    for connection in held:
        connection.close()


def test_a_spool_locked_at_run_time_costs_no_hook_and_is_used_again_once_free(
    webhook_receiver, dispatch, spool_path, locker
):
    dispatcher = dispatch(webhook_receiver.url, retry_schedule="300ms")
    (hook,) = dispatcher.settings.hooks
    dispatcher.submit(pre(hook, "c0"))
    assert dispatcher.flush(5)
    assert dispatcher.stats()["spool_errors"] == 0

    lock = locker()
    wait_until(lambda: dispatcher.stats()["spool_errors"] >= 1, 5, "the spool failing")
    webhook_receiver.respond_with(503, 204)
    retried = pre(hook, "c1")
    dispatcher.submit(retried)  # never blocks on the lock, never raises
    received = webhook_receiver.wait_for(2)  # delivered from memory, the lock still held
    assert ids(received)[1] == retried.id
    assert ids(webhook_receiver.attempts)[1:] == [retried.id, retried.id]
    # The receiver records a hook just before answering: let the answer be counted.
    stats = waited(lambda: ledger(dispatcher), lambda s: s["delivered"] == 2, "c1 counted")
    assert (stats["retried"], stats["failed"], stats["pending"]) == (1, 0, 0)
    lock.execute("ROLLBACK")

    # Free again: tried again (with the removal of c1 it owes the file), used again.
    origin = endpoint_of(hook.url)
    wait_until(lambda: dispatcher.endpoint_stats()[origin]["spool"] == "spool", 5, "it works")
    webhook_receiver.respond_with(503, 204)
    before = dispatcher.stats()
    again = pre(hook, "c2")
    dispatcher.submit(again)
    wait_until(lambda: holders(spool_path).get(again.id) == (None, 0.0), 5, "c2 in the spool")
    assert dispatcher.flush(5)
    assert [h.payload["callId"] for h in webhook_receiver.received] == ["c0", "c1", "c2"]
    stats = ledger(dispatcher)
    assert (stats["spooled"], stats["resumed"]) == (before["spooled"] + 1, before["resumed"] + 1)
    assert (stats["delivered"], stats["failed"], stats["lost"]) == (3, 0, 0)
    assert dispatcher.endpoint_stats()[origin]["spool"] == "spool"
    assert count_in(spool_path) == 0


def test_a_spool_locked_at_run_time_is_reported_once_and_shown_as_memory(
    webhook_receiver, dispatch, spool_path, locker, caplog
):
    caplog.set_level(logging.INFO, logger=spooler_module.logger.name)
    dispatcher = dispatch(webhook_receiver.url, retry_schedule="200ms")
    (hook,) = dispatcher.settings.hooks
    origin = endpoint_of(hook.url)
    dispatcher.submit(pre(hook, "c0"))
    assert dispatcher.flush(5)

    locker()
    wait_until(lambda: dispatcher.stats()["spool_errors"] >= 1, 5, "the spool failing")
    webhook_receiver.respond_with(503, 204)
    dispatcher.submit(pre(hook, "c1"))
    webhook_receiver.wait_for(2)  # its retry waited 200 ms in memory
    assert spool_logs(caplog, logging.INFO) == []  # it never worked meanwhile
    assert len(spool_logs(caplog, logging.ERROR)) == 1
    assert dispatcher.endpoint_stats()[origin]["spool"] == "memory"


# -- configuration ----------------------------------------------------------------------------

HOOKS: list[Mapping[str, Any]] = [
    {"method": "vm.start", "type": "pre/post", "url": "http://127.0.0.1:9/"}
]


def test_a_spool_path_that_is_a_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_settings(HOOKS, environ={"XO_WEBHOOKS_SPOOL": str(tmp_path)})
    assert str(raised.value) == "XO_WEBHOOKS_SPOOL: cannot keep the spool there: it is a folder"


def test_a_spool_path_under_a_file_is_a_config_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError) as raised:
        load_settings(HOOKS, environ={"XO_WEBHOOKS_SPOOL": str(blocker / "spool" / "s.sqlite3")})
    assert str(raised.value) == (
        f"XO_WEBHOOKS_SPOOL: cannot keep the spool there: {blocker} is not a folder"
    )


def test_a_spool_path_is_checked_without_creating_anything(tmp_path):
    path = tmp_path / "var" / "lib" / "s.sqlite3"
    assert load_settings(HOOKS, environ={"XO_WEBHOOKS_SPOOL": str(path)}).spool == str(path)
    assert load_settings(HOOKS, environ={}, spool=str(path)).spool == str(path)
    assert list(tmp_path.iterdir()) == []  # the spooler creates the folder, when it opens it


@pytest.mark.parametrize("by_kwarg", [False, True], ids=["environ", "kwarg"])
def test_a_spool_with_the_celery_dispatcher_is_a_config_error(tmp_path, by_kwarg):
    path = str(tmp_path / "s.sqlite3")
    environ = {"XO_WEBHOOKS_DISPATCHER": "celery", "XO_WEBHOOKS_BROKER_URL": "redis://q:6379/0"}
    kwargs = {"spool": path} if by_kwarg else {}
    if not by_kwarg:
        environ["XO_WEBHOOKS_SPOOL"] = path
    with pytest.raises(ConfigError) as raised:
        load_settings(HOOKS, environ=environ, **kwargs)
    source = "spool" if by_kwarg else "XO_WEBHOOKS_SPOOL"
    assert str(raised.value).startswith(f"{source}: the Celery dispatcher keeps its hooks in")
    assert "the spool is for the thread dispatcher" in str(raised.value)


def test_an_attempt_under_way_at_close_stays_this_processs(webhook_receiver, dispatch, spool_path):
    """close() frees the hooks it holds for the next process, but not one whose attempt
    is still under way: the next process must not send it while it is in flight."""
    gate = Gate(204)
    webhook_receiver.respond_with(gate)
    first = dispatch(webhook_receiver.url)
    (hook,) = first.settings.hooks
    delivery = pre(hook, "c1")
    first.submit(delivery)
    assert gate.arrived.wait(5)
    waited(lambda: holders(spool_path), lambda rows: delivery.id in rows, "c1 written")
    first.close(0)
    assert holders(spool_path)[delivery.id][0] is not None  # still leased by the first

    second = dispatch(webhook_receiver.url)
    second.start()  # another worker of the server, claiming from the spool
    looked = waited(lambda: second.stats(), lambda s: s["resumed"] == 0, "a claim")
    gate.open()
    wait_until(lambda: count_in(spool_path) == 0, 5, "c1 removed once delivered")
    assert second.flush(5)
    assert looked["resumed"] == second.stats()["resumed"] == 0
    assert ids(webhook_receiver.received) == [delivery.id]


def test_a_post_whose_write_fails_still_waits_for_its_spooled_pre(
    webhook_receiver, dispatch, spool_path, monkeypatch
):
    """The pre hook waits in the spool for its retry; the post hook's write fails (a
    lock held too long): it comes back to memory, and still waits for the pre hook."""
    webhook_receiver.respond_with(503, 204)
    real_write = Spool.write

    def refuse_posts(self, rows, deleted, breakers, owner, now):  # type: ignore[no-untyped-def]
        rows = list(rows)
        if any(r.kind == "post" and r.owner is None for r in rows):
            raise sqlite3.OperationalError("database is locked")
        return real_write(self, rows, deleted, breakers, owner, now)

    monkeypatch.setattr(Spool, "write", refuse_posts)
    monkeypatch.setattr(spooler_module, "RETRY_INTERVAL", 0.05)
    dispatcher = dispatch(webhook_receiver.url, retry_schedule="300ms")
    (hook,) = dispatcher.settings.hooks
    dispatcher.submit(pre(hook, "c1"))
    wait_until(lambda: dispatcher.stats()["spooled"] == 1, 5, "the pre hook spooled")
    dispatcher.submit(post(hook, "c1"))
    assert dispatcher.flush(5)
    assert [(h.payload["type"], h.status) for h in webhook_receiver.attempts] == [
        ("pre", 503), ("pre", 204), ("post", 204),
    ]  # fmt: skip
    assert dispatcher.stats()["spool_errors"] >= 1


def test_a_spool_thread_that_cannot_start_leaves_hooks_in_memory(
    webhook_receiver, dispatch, monkeypatch, caplog
):
    real_start = threading.Thread.start

    def no_spool_thread(self: threading.Thread) -> None:
        if self.name == "xo-webhooks-spool":
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", no_spool_thread)
    dispatcher = dispatch(webhook_receiver.url)
    (hook,) = dispatcher.settings.hooks
    dispatcher.submit(pre(hook, "c1"))  # never raises
    assert dispatcher.flush(5)
    assert len(webhook_receiver.wait_for(1)) == 1
    stats = ledger(dispatcher)
    assert (stats["delivered"], stats["spool_errors"]) == (1, 1)
    origin = endpoint_of(webhook_receiver.url)
    assert dispatcher.endpoint_stats()[origin]["spool"] == "memory"
    assert "can't start new thread" in caplog.text


def test_pre_hooks_waiting_for_an_endpoint_that_is_down_cost_no_memory_once_posted(
    dispatch, spool_path
):
    """An endpoint down for hours: each call's pre and post hooks wait in the spool; what
    the dispatcher remembers of them (for ordering) ends with each call's post hook."""
    dispatcher = dispatch(f"http://127.0.0.1:{free_port()}/", breaker_threshold=1)
    (hook,) = dispatcher.settings.hooks
    dispatcher.submit(pre(hook, "first"))  # refused: the endpoint opens
    origin = endpoint_of(hook.url)
    wait_until(lambda: dispatcher.endpoint_stats()[origin]["state"] == "open", 5, "open")
    for n in range(500):
        dispatcher.submit(pre(hook, f"c{n}"))
        dispatcher.submit(post(hook, f"c{n}"))
    stats = ledger(dispatcher)
    assert (stats["pending"], stats["spooled"]) == (0, 1001)
    assert len(dispatcher._spooled_pres) == 1  # "first": its post never came
    wait_until(lambda: count_in(spool_path) == 1001, 5, "all in the spool")


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A folder on a tmpfs of 2 MiB of its own (see helpers.small_disk_at)."""
    with small_disk_at(tmp_path / "disk", "2m") as where:
        yield where


def fill(folder: Path) -> Path:
    """Fill the file system of *folder*; return the file that filled it."""
    filler = folder / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler


def test_a_full_disk_costs_no_hook_and_the_spool_is_used_again_once_there_is_room(
    webhook_receiver, dispatch, small_disk, caplog
):
    path = str(small_disk / "hooks.sqlite3")
    webhook_receiver.respond_with(503, 204)
    dispatcher = dispatch(webhook_receiver.url, spool=path, retry_schedule="200ms")
    (hook,) = dispatcher.settings.hooks
    dispatcher.submit(pre(hook, "c0"))
    assert dispatcher.flush(5)  # through the spool: its retry waited there
    assert ledger(dispatcher)["spooled"] == 1

    filler = fill(small_disk)
    webhook_receiver.respond_with(503, 204)
    calls = [pre(hook, f"c{n}") for n in range(1, 4)]
    for delivery in calls:
        delivery.payload["params"] = {"padding": "x" * 300_000}  # more than the WAL has
        dispatcher.submit(delivery)  # never raises
    assert dispatcher.flush(5)  # the retries were kept in memory
    stats = ledger(dispatcher)
    assert (stats["delivered"], stats["failed"], stats["lost"]) == (4, 0, 0), stats
    assert stats["spool_errors"] >= 1
    # Logged once, though a nearly full disk lets small writes through between failures.
    assert caplog.text.count("kept in memory meanwhile") == 1, caplog.text

    filler.unlink()  # room again: the next retry waits in the spool again
    origin = endpoint_of(webhook_receiver.url)
    wait_until(lambda: dispatcher.endpoint_stats()[origin]["spool"] == "spool", 5, "back")
    webhook_receiver.respond_with(503, 204)
    dispatcher.submit(pre(hook, "c4"))
    assert dispatcher.flush(5)
    assert ledger(dispatcher)["spooled"] > stats["spooled"]
